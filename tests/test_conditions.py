import pytest
import torch

from steer.conditions import Condition, Rule, condition_scores, fit_condition, grid_search
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
