"""Steered generation must not depend on how HF ``generate`` calls the model (issue 10).

Each test drives real HF ``generate`` on both tiny architectures (Llama; Gemma-3 with a sliding
window layer) and compares a batch of differently long prompts with each prompt run alone: the
same tokens, whether the prompt is prefilled in one call or in chunks, with a dynamic or a
static cache, with beams or several return sequences, with a CAST condition deciding per prompt. Under transformers 5.24 a prompt
run alone used to come out unsteered after its first token (see ``steer._hf``).
"""

import pytest
import torch

import steer
from conftest import splitting_condition
from steer.hooks import add_hooks
from steer.steering import steer as steer_ctx

PROMPTS = ["Hi", "How are you today, my friend?", "Tell me a joke.",
           "Write one long sentence about the sea, the wind and the old lighthouse keeper."]
ALPHA = torch.tensor([1.0, 2.0, 0.0, 3.0])
POSITIONS = ["all", steer.Last(1), "post_instruction", "generated"]


def _vector(model, seed=0):
    return torch.randn(model.d_model, generator=torch.Generator().manual_seed(seed)) * 6


def _condition(model):
    """A projection condition that fires on some prompts and not on others."""
    return splitting_condition(model, PROMPTS, 0, torch.randn(model.d_model, generator=torch.Generator().manual_seed(7)))


def _generate(model, prompts, alpha, positions, condition=None, **kw):
    with steer_ctx(model, _vector(model), layer=[0, 1], strength=alpha, positions=positions,
                   condition=condition) as s:
        texts = s.generate(prompts, max_new_tokens=6, **kw)
        return texts, s.last_gate


def _per_example(model, positions, condition=None, **kw):
    texts, gates = [], []
    for i, p in enumerate(PROMPTS):
        t, g = _generate(model, [p], ALPHA[i: i + 1], positions, condition, **kw)
        texts += t
        gates.append(g)
    return texts, gates


def _last_resid(model, strength, positions):
    """resid_post of the last layer at the newest token of every generate call (row 0)."""
    seen = []
    with steer_ctx(model, _vector(model), layer=[0, 1], strength=strength, positions=positions) as s, \
            add_hooks(model, {f"resid_post.{model.n_layers - 1}": lambda act, site: seen.append(act[0, -1].clone())}):
        s.generate(PROMPTS, max_new_tokens=6)
    return torch.stack(seen)


@pytest.mark.parametrize("positions", POSITIONS, ids=str)
def test_batched_equals_per_example(model, positions):
    batched, _ = _generate(model, PROMPTS, ALPHA, positions)
    single, _ = _per_example(model, positions)
    assert batched == single
    plain = model.generate(PROMPTS, max_new_tokens=6)
    assert batched[2] == plain[2]  # strength 0 is unsteered
    # the steering did something (in the residual stream; a tiny model's argmax may not move)
    assert (_last_resid(model, ALPHA, positions) - _last_resid(model, 0 * ALPHA, positions)).abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["all", steer.Last(1)], ids=str)
def test_cast_condition_batched_equals_per_example(model, positions):
    cond = _condition(model)
    batched, gate = _generate(model, PROMPTS, ALPHA, positions, cond)
    single, gates = _per_example(model, positions, cond)
    assert gate.tolist() == torch.cat(gates).tolist()
    assert 0 < gate.sum() < len(PROMPTS)  # it fires on some prompts only
    assert batched == single
    unconditional, _ = _generate(model, PROMPTS, ALPHA, positions)
    plain = model.generate(PROMPTS, max_new_tokens=6)
    for i, fired in enumerate(gate.bool().tolist()):
        assert batched[i] == (unconditional[i] if fired else plain[i])


@pytest.mark.parametrize("positions", POSITIONS, ids=str)
def test_chunked_prefill_equals_one_call(model, positions):
    """``prefill_chunk_size`` makes HF prefill each prompt in several calls."""
    cond = _condition(model)
    whole, gate = _generate(model, PROMPTS, ALPHA, positions, cond)
    chunked, chunk_gate = _generate(model, PROMPTS, ALPHA, positions, cond, prefill_chunk_size=5)
    assert chunked == whole and torch.equal(chunk_gate, gate)


@pytest.mark.parametrize("positions", POSITIONS, ids=str)
def test_static_cache_equals_dynamic(model, positions):
    """A static cache makes HF pass a 4-D mask (or a dict of them) instead of the 2-D one."""
    cond = _condition(model)
    dynamic, gate = _generate(model, PROMPTS, ALPHA, positions, cond)
    static, static_gate = _generate(model, PROMPTS, ALPHA, positions, cond, cache_implementation="static")
    assert static == dynamic and torch.equal(static_gate, gate)


def test_beams_and_return_sequences_follow_their_prompt(model):
    """Rows are expanded per prompt (``num_return_sequences``, ``num_beams``): each row is
    steered with its own prompt's strength, selector and gate."""
    cond = _condition(model)
    kw = dict(num_beams=2, num_return_sequences=2)
    batched, gate = _generate(model, PROMPTS, ALPHA, "post_instruction", cond, **kw)
    single, gates = _per_example(model, "post_instruction", cond, **kw)
    assert len(batched) == 2 * len(PROMPTS)
    assert gate.tolist() == torch.cat(gates).tolist()
    assert batched == single


def test_stale_batch_is_not_used(tiny):
    """A forward call that is not the tokenized batch must not borrow its selections."""
    with steer_ctx(tiny, _vector(tiny), layer=0, positions="post_instruction") as s:
        s.generate(PROMPTS[:2], max_new_tokens=1)
        other = steer.tokenize(tiny, PROMPTS[2:])
        with pytest.raises(ValueError, match="tokenized prompts"):
            tiny.hf(input_ids=other.input_ids, attention_mask=other.attention_mask)
