import os

import pytest
import torch

import steer

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """2-layer random Llama with a byte tokenizer and a ChatML template."""
    return steer.load("tiny-llama")


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (dequantized once, then read from the cache)."""
    return steer.load()


# Every family of steer.arch, each a tiny random model: Llama, Gemma-3 (a 4-token sliding-window
# layer and a global one, q/k norms, sandwich norms), then the rest of the matrix.
RUNNER_FAMILIES = ["tiny-llama", "tiny-gemma3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-qwen3-moe",
                   "tiny-olmo2", "tiny-gemma", "tiny-gemma2", "tiny-phi3", "tiny-gpt2", "tiny-pythia"]


@pytest.fixture(scope="module", params=RUNNER_FAMILIES)
def model(request):
    """Each tiny architecture, in turn."""
    return steer.load(request.param)


@pytest.fixture(scope="module")
def task(model):
    """A 3-prompt IOI-shaped patching task for :func:`model` (clean/corrupt differ in one name)."""
    from steer.patching import PatchTask

    pairs = [("M and Y; Y to", "M and Y; N to"), ("B and Q; B to", "B and Q; K to"), ("J and D; J to", "J and D; W to")]
    return PatchTask.from_pairs(model, pairs, ["M", "Q", "D"], ["Y", "B", "J"], name="tiny-ioi")


def pytest_collection_modifyitems(config, items):
    """Every test that uses the embedded model is ``slow`` (``make test-fast`` leaves them out).

    Tests marked ``gpu`` run on ``STEER_TEST_DEVICE`` (default ``cuda``). Without a CUDA device
    they are deselected, and the summary says so; ``-m gpu`` then fails instead (``make
    test-gpu`` is for a machine with a GPU; ``STEER_TEST_DEVICE=cpu`` dry-runs them here)."""
    for item in items:
        if "smol" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    _deselect_vllm(config, items)
    gpu = [i for i in items if i.get_closest_marker("gpu")]
    if not gpu or not os.environ.get("STEER_TEST_DEVICE", "cuda").startswith("cuda") or torch.cuda.is_available():
        return
    if config.getoption("markexpr", "") == "gpu":
        raise pytest.UsageError("`-m gpu` needs a CUDA device; STEER_TEST_DEVICE=cpu runs these tests on the CPU.")
    items[:] = [i for i in items if not i.get_closest_marker("gpu")]
    config.hook.pytest_deselected(items=gpu)
    config.stash[_GPU_LEFT] = len(gpu)


_GPU_LEFT = pytest.StashKey[int]()
_VLLM_LEFT = pytest.StashKey[int]()


def _deselect_vllm(config, items):
    """Tests marked ``vllm`` need vLLM, which lives in its own venv (``make test-vllm`` runs them
    there, and ``.ci/run`` calls it). Elsewhere they are deselected and the summary says so;
    ``-m vllm`` without vLLM fails instead."""
    marked = [i for i in items if i.get_closest_marker("vllm")]
    if not marked:
        return
    from steer.serve import available

    if available():
        return
    if config.getoption("markexpr", "") == "vllm":
        raise pytest.UsageError("`-m vllm` needs vLLM: run `make test-vllm` (it builds .venv-vllm).")
    items[:] = [i for i in items if not i.get_closest_marker("vllm")]
    config.hook.pytest_deselected(items=marked)
    config.stash[_VLLM_LEFT] = len(marked)


def pytest_terminal_summary(terminalreporter, config):
    n = config.stash.get(_VLLM_LEFT, 0)
    if n:
        terminalreporter.write_line(f"{n} tests marked vllm deselected: vLLM is not installed here (`make test-vllm` runs them).")
    n = config.stash.get(_GPU_LEFT, 0)
    if n:
        terminalreporter.write_line(f"{n} tests marked gpu deselected: no CUDA device here (`make test-gpu` runs them on one).")
