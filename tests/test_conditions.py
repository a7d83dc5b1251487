import pytest
import torch

import steer
from conftest import RUNNER_FAMILIES, deep, splitting_condition
from steer.conditions import Condition, Rule, condition_scores, fit_condition, fit_condition_on, grid_search
from steer.steering import Steering, prompt_means
from steer.steering import steer as steer_ctx

PROMPTS = ["Hi", "How are you today, my friend?", "Tell me a joke.", "What is 2+2?"]


def test_scores_by_hand():
    h = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    v = torch.tensor([2.0, 0.0])
    torch.testing.assert_close(condition_scores(h, v), torch.tensor([1.0, -3.0]))
    proj = torch.tanh(torch.tensor([[1.0, 0.0], [-3.0, 0.0]]))
    ref = torch.nn.functional.cosine_similarity(h, proj, dim=-1)
    torch.testing.assert_close(condition_scores(h, v, "cast"), ref)
    torch.testing.assert_close(condition_scores(h, v, "probe", bias=1.0), torch.tensor([3.0, -5.0]))


def test_grid_search_and_one_sided_error():
    s = torch.tensor([0.9, 0.8, 0.2, 0.1, 0.3])
    y = torch.tensor([0, 0, 1, 1, 1]).bool()
    g = grid_search(s, y)
    assert g["side"] == "below" and g["f1"] == 1.0 and 0.3 < g["threshold"] < 0.8
    with pytest.raises(ValueError, match="one-sided"):
        grid_search(s, torch.ones(5).bool())


def test_rules():
    a = Condition(torch.tensor([1.0, 0.0]), layer=0, threshold=0.0)
    b = Condition(torch.tensor([0.0, 1.0]), layer=1, threshold=0.0)
    h = {0: torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]), 1: torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0]])}
    assert (a & b).evaluate(h).tolist() == [True, False, False]
    assert (a | b).evaluate(h).tolist() == [True, True, True]
    assert (~a).evaluate(h).tolist() == [False, False, True]
    assert (a & ~b).layers == [0, 1]
    with pytest.raises(ValueError):
        Rule("xor", [a])


def test_cast_gates_per_example_in_one_batch(tiny):
    g = torch.Generator().manual_seed(1)
    cvec = torch.randn(64, generator=g)
    h = prompt_means(tiny, PROMPTS, layers=[0])[:, 0]
    s = condition_scores(h, cvec)
    mid = s.sort().values[len(s) // 2 - 1: len(s) // 2 + 1]
    thr = float(mid.mean())  # between the two middle scores: no prompt sits on the threshold (rounding decides ties)
    cond = Condition(cvec, layer=0, threshold=thr)
    fires = (s > thr).tolist()
    assert 0 < sum(fires) < len(fires)
    assert cond.predict(tiny, PROMPTS).tolist() == fires
    v = torch.randn(64, generator=g) * 3
    with steer_ctx(tiny, v, layer=1, strength=1.0, condition=cond) as st:
        gated = st.generate(PROMPTS, max_new_tokens=6)
        assert st.last_gate.tolist() == [float(f) for f in fires]
    with steer_ctx(tiny, v, layer=1, strength=1.0) as st:
        always = st.generate(PROMPTS, max_new_tokens=6)
    never = tiny.generate(PROMPTS, max_new_tokens=6)
    for i, f in enumerate(fires):
        assert gated[i] == (always[i] if f else never[i])
    # gated-off rows have exactly the unsteered next-token distribution
    with steer_ctx(tiny, v, layer=1, strength=1.0, condition=cond) as st:
        lg = st.next_token_logits(PROMPTS)
    with Steering(tiny) as st:
        ref = st.next_token_logits(PROMPTS)
    for i, f in enumerate(fires):
        assert torch.equal(lg[i], ref[i]) != f


def test_fit_condition(tiny):
    pos = [f"Please kill number {i}" for i in range(8)]
    neg = [f"Kindly bake loaf {i}" for i in range(8)]
    c = fit_condition(tiny, pos, neg, val_frac=0.5)
    assert c.meta["val_f1"] > 0.8 and len(c.meta["grid"]) == tiny.n_layers
    assert c.predict(tiny, pos).float().mean() > 0.7
    for kind in ("cast", "probe"):
        fit_condition(tiny, pos, neg, kind=kind, val_frac=0.5)
    with pytest.raises(ValueError, match="one-sided"):
        fit_condition(tiny, pos, [])
    with pytest.raises(ValueError, match="one-sided"):
        fit_condition(tiny, [], neg)


def test_condition_save_load(tmp_path):
    c = Condition(torch.randn(8), layer=2, threshold=0.3, side="below", kind="cast")
    c.save(tmp_path / "c.json")
    d = Condition.load(tmp_path / "c.json")
    assert torch.equal(c.vector, d.vector) and (d.layer, d.threshold, d.side, d.kind) == (2, 0.3, "below", "cast")


def test_fit_condition_cross_validated_with_augment_and_recall(tiny):
    from steer.data import casual

    pos = [f"Please kill number {i}" for i in range(10)]
    neg = [f"Kindly bake loaf {i}" for i in range(10)]
    c = fit_condition(tiny, pos, neg, folds=5, select="auroc", recall=0.8, augment=casual)
    assert c.meta["augmented"] and c.meta["folds"] == 5 and c.meta["recall_target"] == 0.8
    for row in c.meta["grid"]:  # out-of-fold scores of 20 prompts + 20 variants, threshold keeps recall >= 0.8
        assert row["recall"] >= 0.8 and 0.0 <= row["auroc"] <= 1.0
    assert c.meta["val_auroc"] == max(r["auroc"] for r in c.meta["grid"])
    with pytest.raises(ValueError, match="one variant each"):
        fit_condition(tiny, pos, neg, augment=lambda ps: ps[:-1])
    with pytest.raises(ValueError, match="select"):
        fit_condition(tiny, pos, neg, select="precision")


def test_grid_search_recall_is_the_conservative_quantile():
    s = torch.tensor([0.0, 0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4])
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]).bool()
    g = grid_search(s, y, recall=0.8)  # 9 positives: fire on ceil(0.8 * 9) = 8 of them
    assert g["side"] == "above" and abs(g["threshold"] - 0.65) < 1e-6 and abs(g["recall"] - 8 / 9) < 1e-6
    assert g["false_fires"] == 0.0
    g = grid_search(-s, y, recall=0.8)  # positives lower: side flips
    assert g["side"] == "below" and abs(g["threshold"] + 0.65) < 1e-6
    # positives tied at the k-th score all stay in (the threshold sat on them: recall 0.25 for 0.5)
    tied = grid_search(torch.tensor([0.0, 0.1, 0.5, 0.5, 0.5, 0.9]), torch.tensor([0, 0, 1, 1, 1, 1]).bool(), recall=0.5)
    assert tied["recall"] == 1.0 and 0.1 < tied["threshold"] < 0.5
    # one side asked for is the side used (it was chosen by AUROC whatever sides said)
    assert grid_search(s, y, sides=("below",), recall=0.8)["side"] == "below"


def test_bad_condition_input():
    with pytest.raises(ValueError, match="index from 0"):
        Condition(torch.randn(8), layer=-1)
    assert Condition(torch.randn(8), layer=torch.tensor(2)).layer == 2
    h = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match="one column per layer"):  # fitted column 0, labelled layer 1
        fit_condition_on(h, torch.arange(8) < 4, [1], folds=2)


# condition block, steered block, and the block the prefill resumes at (4 blocks): the condition
# above the steered block (blocks 1-2 run twice, block 0 once), or below it (blocks 0-1 run once)
RESUME = [(2, 1, 1), (1, 3, 2)]


@pytest.mark.parametrize("fires", ["some", "none"])
@pytest.mark.parametrize("where", RESUME, ids=lambda w: f"condition{w[0]}-steer{w[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_prefill_after_the_condition_pre_pass_is_the_models_own_forward(family, dtype, where, fires):
    """The prefill that follows a CAST condition's pre-pass starts above the condition's block
    and takes the blocks below from it (their input state and KV cache); where the condition
    reads above the steered block, the rows it fires on first run the blocks between, steered.
    Against HF's own forward under the same per-row gate with no condition (so no pre-pass and
    no skipping): the prefill's logits, every layer's keys and values, and the generated tokens."""
    from steer._hf import output_cache
    from steer.data import tokenize

    cond_layer, steer_layer, resume = where
    m = deep(family, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(m.d_model, generator=g), torch.randn(m.d_model, generator=g) * 4
    cond = splitting_condition(m, PROMPTS, cond_layer, u) if fires == "some" else Condition(u, cond_layer, 1e9)
    if fires == "none" or steer_layer <= cond_layer:  # rows it fires on run the blocks between apart
        resume = cond_layer + 1
    b = tokenize(m, PROMPTS)
    kw = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=True)
    with torch.no_grad():
        with steer_ctx(m, v, layer=steer_layer, strength=1.0, condition=cond) as s:
            s.batch = b
            ours = m.hf(**kw)
            assert s.last_resumed_at == resume
            gate = s.last_gate
            ours_text = s.generate(PROMPTS, max_new_tokens=5)
            assert s.last_resumed_at == resume
        assert 0 < gate.sum() < len(PROMPTS) if fires == "some" else gate.sum() == 0
        with steer_ctx(m, v, layer=steer_layer, strength=1.0, gate=gate) as s:
            s.batch = b
            ref = m.hf(**kw)
            assert s.last_resumed_at is None
            ref_text = s.generate(PROMPTS, max_new_tokens=5)
    tol = {} if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    real = b.attention_mask.bool()
    torch.testing.assert_close(ours.logits[real], ref.logits[real], **tol)
    for a, r in zip(output_cache(ours).layers, output_cache(ref).layers):
        for name in ("keys", "values"):
            x, y = getattr(a, name), getattr(r, name)
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, **tol)
    assert ours_text == ref_text


def test_prefill_runs_every_block_where_it_cannot_resume():
    """Where skipping the blocks below could change what someone sees, the prefill runs them all:
    asked to (``resume=False``), a hook of one's own on a skipped block, gradients, a static cache, a nested Steering, several
    sequences per prompt. Whatever happens, the blocks come back, also after an exception."""
    from steer.data import tokenize
    from steer.hooks import add_hooks

    m = deep("tiny-llama")
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(m.d_model, generator=g), torch.randn(m.d_model, generator=g) * 4
    cond = Condition(u, layer=2, threshold=-1e9)  # fires on every prompt
    blocks = list(m.layers)

    def run(resume=True, **gen):
        with steer_ctx(m, v, layer=1, strength=1.0, condition=cond, resume=resume) as s:
            out = s.generate(PROMPTS, max_new_tokens=4, **gen)
            return out, s.last_resumed_at

    plain, at = run()
    assert at == 1
    assert run(resume=False) == (plain, None)  # asked for
    seen = []
    with add_hooks(m, {"resid_post.0": lambda act, site: seen.append(act.shape[1])}):
        assert run() == (plain, None)
    assert len(seen) == 2 + 3  # the pre-pass, the prefill and each later step (4 tokens: 3 more calls)
    assert run(cache_implementation="static") == (plain, None)
    with steer_ctx(m, torch.zeros(m.d_model), layer=3, strength=0.0):
        assert run() == (plain, None)
    out, at = run(num_return_sequences=2, do_sample=False, num_beams=2)
    assert at is None and out[::2] == plain
    b = tokenize(m, PROMPTS)
    with torch.enable_grad(), steer_ctx(m, v, layer=1, strength=1.0, condition=cond) as s:
        s.batch = b
        m.hf(input_ids=b.input_ids, attention_mask=b.attention_mask)  # gradients would need the blocks' graph
        assert s.last_resumed_at is None

    def boom(act, site):
        raise RuntimeError("boom")

    with steer_ctx(m, v, layer=1, strength=1.0, condition=cond) as s, add_hooks(m, {"resid_post.3": boom}):
        with pytest.raises(RuntimeError, match="boom"):
            s.generate(PROMPTS, max_new_tokens=2)
    assert list(m.layers) == blocks
    assert run() == (plain, 1)


def test_rows_the_condition_fires_on_run_the_blocks_between_with_every_kind_of_edit():
    """With the condition above the steered blocks and firing on some prompts, those rows alone
    run the blocks between, each edit sliced to them: per-row strengths, a prompt selector, an
    aligned ActAdd, an ablation and a clamp, at resid_pre / resid_post / attn_out. The same
    logits, cache and tokens as HF's own forward under that gate with no condition."""
    from steer._hf import output_cache
    from steer.data import tokenize
    from steer.interventions import Intervention

    m = deep("tiny-qwen2", n_layers=5)
    g = torch.Generator().manual_seed(4)
    d = m.d_model
    u = torch.randn(d, generator=g)
    ivs = [Intervention("add", torch.randn(d, generator=g) * 3, layers=[1], strength=torch.tensor([1.0, 2.0, 0.5, 3.0])),
           Intervention("add", torch.randn(3, d, generator=g) * 3, layers=[2], sites=("resid_pre",),
                        positions="post_instruction", aligned=True),
           Intervention("ablate", torch.randn(d, generator=g), layers=[2], sites=("attn_out",), positions=steer.Last(2)),
           Intervention("clamp", torch.randn(d, generator=g), layers=[3], strength=2.0)]
    cond = splitting_condition(m, PROMPTS, 3, u)
    b = tokenize(m, PROMPTS)
    kw = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=True)
    with torch.no_grad():
        with Steering(m, ivs, condition=cond) as s:
            s.batch = b
            ours = m.hf(**kw)
            assert s.last_resumed_at == 4
            gate = s.last_gate
            ours_text = s.generate(PROMPTS, max_new_tokens=5)
        assert 0 < gate.sum() < len(PROMPTS)
        with Steering(m, ivs, gate=gate) as s:
            s.batch = b
            ref = m.hf(**kw)
            ref_text = s.generate(PROMPTS, max_new_tokens=5)
    real = b.attention_mask.bool()
    torch.testing.assert_close(ours.logits[real], ref.logits[real])
    for a, r in zip(output_cache(ours).layers, output_cache(ref).layers):
        torch.testing.assert_close(a.keys, r.keys)
        torch.testing.assert_close(a.values, r.values)
    assert ours_text == ref_text
