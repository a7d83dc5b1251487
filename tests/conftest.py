import os
import sys
from pathlib import Path

import pytest
import torch

import steer

torch.set_num_threads(2)

# the experiments are scripts: they import their shared modules (experiments/heldout.py) as
# top-level modules, as `python experiments/<name>.py` lets them; so do the tests that run them
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))


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


def splitting_condition(model, prompts, layer, u):
    """A projection condition on ``u`` at ``layer`` that fires on some of ``prompts`` and not on
    others: its threshold sits in the widest gap between their scores (keeping a prompt on each
    side), so float noise cannot flip a decision."""
    from steer.conditions import Condition
    from steer.steering import prompt_means

    probe = Condition(u, layer=layer)
    scores = probe.score(prompt_means(model, prompts, layers=[layer])[:, 0]).sort().values
    gap = int((scores[1:] - scores[:-1])[:-1].argmax())
    return Condition(u, layer=layer, threshold=float(scores[gap: gap + 2].mean()))


def deep(family, n_layers=4, dtype=torch.float32):
    """``family``'s tiny model with ``n_layers`` blocks (the matrix's have 2: too few to put a
    steered block, a reading block and blocks above them in one model)."""
    from steer.models import Model, _tiny

    hf, tok = _tiny(family, 0, n_layers)
    return Model.from_hf(hf.to(dtype), tok, name=f"{family}-{n_layers}-layers")


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

    Tests marked ``gpu`` run on ``STEER_TEST_DEVICE`` (default ``cuda``); tests marked ``vllm``
    need vLLM, which lives in its own venv (``make test-vllm`` runs them there, and ``.ci/run``
    calls it). Where their need is not met they are deselected and the summary says so;
    ``-m gpu`` / ``-m vllm`` then fail instead (``STEER_TEST_DEVICE=cpu`` dry-runs the gpu tests
    here)."""
    from steer.serve import available

    for item in items:
        if "smol" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    _deselect(config, items, "vllm", available,
              "`-m vllm` needs vLLM: run `make test-vllm` (it builds .venv-vllm).")
    _deselect(config, items, "gpu",
              lambda: not os.environ.get("STEER_TEST_DEVICE", "cuda").startswith("cuda") or torch.cuda.is_available(),
              "`-m gpu` needs a CUDA device; STEER_TEST_DEVICE=cpu runs these tests on the CPU.")


_LEFT = pytest.StashKey[dict]()
_WHY = {"vllm": "vLLM is not installed here (`make test-vllm` runs them)",
        "gpu": "no CUDA device here (`make test-gpu` runs them on one)"}


def _deselect(config, items, marker: str, met, refusal: str) -> None:
    """Deselect the tests marked ``marker`` unless ``met()``; ``-m marker`` raises ``refusal``."""
    marked = [i for i in items if i.get_closest_marker(marker)]
    if not marked or met():
        return
    if config.getoption("markexpr", "") == marker:
        raise pytest.UsageError(refusal)
    items[:] = [i for i in items if not i.get_closest_marker(marker)]
    config.hook.pytest_deselected(items=marked)
    config.stash.setdefault(_LEFT, {})[marker] = len(marked)


def pytest_terminal_summary(terminalreporter, config):
    for marker, n in config.stash.get(_LEFT, {}).items():
        terminalreporter.write_line(f"{n} tests marked {marker} deselected: {_WHY[marker]}.")


def strict_json(text: str):
    """JSON as a strict parser reads it: a bare NaN / Infinity is an error, not a number."""
    import json

    def bad(c):
        raise ValueError(f"invalid JSON constant {c}")
    return json.loads(text, parse_constant=bad)

