"""Models a researcher loaded themselves (``Model.from_hf``): PEFT adapters, accelerate's
``device_map`` with offloading, quantized layers.

The reference for each is the same computation without the wrapping: the adapter merged into
the weights, the model loaded whole, the quantized model's own ``output_hidden_states``. Where
steer cannot give the right number (it reads weights, or the model's function depends on the
batch) the test asks for the error that says so.
"""

import copy

import pytest
import torch

import steer
from steer.arch import UnsupportedModel
from steer.data import Raw
from steer.interventions import orthogonalized
from steer.models import Model
from steer.patching import PatchTask, activation_patch, atp
from steer.steering import steer as steer_ctx

PROMPTS = [Raw("Hi there"), Raw("Hello there my good friend, how are you")]
PAIRS = [("M and Y; Y to", "M and Y; N to"), ("B and Q; B to", "B and Q; K to")]


def _capture(m, site="resid_post"):
    return steer.capture(m, PROMPTS, layers="all", site=site, positions="all", progress=False).tensor


def _steered(m):
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(3)) * 3
    with steer_ctx(m, v, layer=1, strength=2.0) as s:
        return s.logits(PROMPTS)


def _patching(m):
    t = PatchTask.from_pairs(m, PAIRS, ["M", "Q"], ["Y", "B"])
    return activation_patch(m, t, "heads").scores, atp(m, t, "heads").scores


def test_wrapping_a_loaded_model_changes_nothing():
    ref = steer.load("tiny-phi3")
    mine = Model.from_hf(ref.hf, ref.tokenizer, name="my-phi3")
    torch.testing.assert_close(_capture(mine, "q"), _capture(ref, "q"))


@pytest.fixture(scope="module")
def lora():
    """tiny-llama with a (non-zero) LoRA adapter on q, v and the MLP's down projection, and the
    same adapter merged into a copy's weights."""
    peft = pytest.importorskip("peft")  # a dev dependency: installed by `make test`
    base = steer.load("tiny-llama")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(copy.deepcopy(base.hf), cfg)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    return Model.from_hf(wrapped, base.tokenizer), Model.from_hf(merged, base.tokenizer), base


def test_peft_adapter_is_what_steer_sees(lora):
    adapted, merged, base = lora
    assert adapted.arch.family == "llama" and type(adapted.hf).__name__ == "LlamaForCausalLM"
    assert float((_capture(merged) - _capture(base)).abs().max()) > 1e-2  # the adapter matters
    # unmerged LoRA (W x + B A x) and merged weights (W' x) differ by fp32 rounding only: up to
    # 1.1e-5 on an AVX2 CPU (1e-5 held elsewhere), 300x below what the adapter changes
    for site in ("resid_post", "q", "mlp_out"):
        torch.testing.assert_close(_capture(adapted, site), _capture(merged, site), atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(_steered(adapted), _steered(merged), atol=3e-5, rtol=1e-4)
    for ours, ref in zip(_patching(adapted), _patching(merged)):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_peft_adapter_refuses_weight_surgery(lora):
    adapted, merged, _ = lora
    orthogonalized(merged, torch.randn(64))  # the merged model is fine
    with pytest.raises(UnsupportedModel, match=r"q_proj|down_proj.*merge_and_unload"):
        orthogonalized(adapted, torch.randn(64))


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """tiny-llama loaded by accelerate with every weight offloaded to disk (on ``meta`` until a
    module runs): the CPU-only stand-in for a ``device_map`` spread over GPUs."""
    from transformers import AutoModelForCausalLM

    base = steer.load("tiny-llama")
    d = tmp_path_factory.mktemp("tiny-llama")
    base.hf.save_pretrained(d)
    hf = AutoModelForCausalLM.from_pretrained(d, device_map="auto", max_memory={"cpu": "60KB"},
                                              offload_folder=str(d / "offload"))
    assert set(hf.hf_device_map.values()) == {"disk"}
    return Model.from_hf(hf, base.tokenizer), base


def test_device_map_offloading_gives_the_same_numbers(offloaded):
    off, base = offloaded
    assert off.device == torch.device("cpu") and off.dtype == base.dtype  # not `meta`
    torch.testing.assert_close(_capture(off), _capture(base))
    torch.testing.assert_close(_steered(off), _steered(base))
    for ours, ref in zip(_patching(off), _patching(base)):
        torch.testing.assert_close(ours, ref)
    with pytest.raises(UnsupportedModel, match="offloaded"):
        orthogonalized(off, torch.randn(64))


def test_quantized_layers():
    """torch's dynamic int8 quantization of every Linear: capture reads what the quantized model
    computes; patching is refused because that model's output depends on the whole batch (each
    Linear scales its input by the batch's range), so a patched batch is not the model's forward."""
    base = steer.load("tiny-llama")
    hf = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base.hf), {torch.nn.Linear}, dtype=torch.qint8)
    q = Model.from_hf(hf, base.tokenizer)
    b = steer.tokenize(q, PROMPTS)
    own = hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
             output_hidden_states=True).hidden_states
    a = steer.capture(q, PROMPTS, layers=[0], site="resid_post", positions="all", progress=False)
    torch.testing.assert_close(a.tensor[:, 0][a.mask], own[1][b.attention_mask.bool()])
    with pytest.raises(UnsupportedModel, match="quantized layers"):
        _patching(q)
    with pytest.raises(UnsupportedModel, match="no weight tensor"):
        orthogonalized(q, torch.randn(64))


def test_dense_weight_refuses_integer_storage():
    from steer._hf import dense_weight

    lin = torch.nn.Linear(4, 4)
    assert dense_weight(lin, "a layer") is lin.weight
    lin.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModel, match="quantized"):
        dense_weight(lin, "a layer")


def _split(base, d, memory):
    """``base`` saved to ``d`` and loaded by accelerate with ``memory`` of its weights in memory and
    the rest offloaded to disk."""
    from transformers import AutoModelForCausalLM

    base.hf.save_pretrained(d)
    hf = AutoModelForCausalLM.from_pretrained(d, device_map="auto", max_memory={"cpu": memory},
                                              offload_folder=str(d / "offload"))
    assert {"cpu", "disk"} <= set(hf.hf_device_map.values()), hf.hf_device_map
    return Model.from_hf(hf, base.tokenizer)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """tiny-llama with part of its layers in memory and the rest offloaded to disk by accelerate."""
    base = steer.load("tiny-llama")
    return _split(base, tmp_path_factory.mktemp("tiny-llama-split"), "250KB"), base


def test_a_model_split_by_device_map_gives_the_same_numbers(split, tmp_path):
    """CAST-gated generation (its prefill resumed above the condition's pre-pass), FASB with every
    prompt read again from the steered block on (:func:`steer.hooks.resume_at` swaps
    accelerate-hooked blocks), AtP* and the activation store on a model split across memory and
    disk equal the model loaded whole."""
    from steer import backtracking
    from steer.conditions import Condition
    from steer.patching import atp_star
    from steer.store import ActivationStore

    m, base = split
    prompts = ["Hi there", "Tell me a story about the sea", "Bye"]
    c_vec = torch.randn(64, generator=torch.Generator().manual_seed(5))
    v = torch.randn(64, generator=torch.Generator().manual_seed(6)) * 4
    out = {}
    for name, model in (("split", m), ("whole", base)):
        cond = Condition(c_vec, layer=0, threshold=-1.8)  # scores -1.72, -1.89, -1.67: fires on two
        with steer_ctx(model, v, layer=1, strength=2.0, condition=cond) as s:
            gens = s.generate(prompts, max_new_tokens=4)
            assert s.last_resumed_at == 1  # the prefill took block 0 from the condition's pre-pass
        t = PatchTask.from_pairs(model, PAIRS, ["M", "Q"], ["Y", "B"])
        store = ActivationStore.write(model, prompts, tmp_path / name, progress=False)
        fires = backtracking.Probe(torch.zeros(64), bias=-5.0, layer=1)  # on every row, at the prompt's end
        fasb = backtracking.generate(model, prompts, v, layer=1, strength=1.0, probe=fires, max_new_tokens=4,
                                     reencode_prompt=True)
        assert fasb.reencoded.all()
        out[name] = (gens + fasb.texts, cond.last_scores.clone(),
                     atp_star(model, t, ["heads"])["heads"].scores, store.get())
    (g1, s1, a1, x1), (g2, s2, a2, x2) = out["split"], out["whole"]
    assert g1 == g2
    assert bool((s2 > -1.8).any() and (s2 <= -1.8).any()), "the condition should fire on some prompts only"
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(x1, x2)


def test_fasb_staged_prefill_on_a_model_split_by_device_map(tmp_path):
    """FASB's prefill stopped at the probe's block and resumed above it (a 4-block model steered at
    block 1, probe at block 2), on the model split across memory and disk by accelerate, gives
    the tokens and readings of the model loaded whole."""
    from steer import backtracking
    from conftest import deep

    base = deep("tiny-llama")
    split = _split(base, tmp_path, "300KB")
    v = torch.randn(64, generator=torch.Generator().manual_seed(6)) * 2
    w = torch.randn(64, generator=torch.Generator().manual_seed(7))
    prompts = ["Hi there", "Tell me a story about the sea", "Bye"]
    ends = steer.capture(base, prompts, layers=[2], positions="last", progress=False).tensor[:, 0] @ w
    low, second = ends.sort().values[:2].tolist()
    probe = backtracking.Probe(w, -(low + second) / 2, layer=2)  # fires at the prompt's end on one row
    runs = [backtracking.generate(m, prompts, v, layer=1, strength=1.0, probe=probe, max_new_tokens=4,
                                  reencode_prompt=True) for m in (split, base)]
    assert runs[0].reencoded.tolist() == runs[1].reencoded.tolist() and int(runs[1].reencoded.sum()) == 1
    assert runs[0].tokens == runs[1].tokens
    for a, b in zip(runs[0].probs, runs[1].probs):
        assert a == pytest.approx(b, abs=1e-5)
