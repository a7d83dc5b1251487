"""steer.multi: the MSRS decomposition against planted subspaces, and the three placements against
hand-built steering."""

import pytest
import torch

import steer
from steer import multi
from steer.steering import Steering


def planted(seed=0, d=48, n=30):
    """Three behaviours: each spans the shared direction e0 plus two private directions of its own."""
    g = torch.Generator().manual_seed(seed)
    e = torch.eye(d)
    out = []
    for i in range(3):
        coef = torch.randn(n, 3, generator=g) + torch.tensor([3.0, 1.0, 0.5])
        basis = torch.stack([e[0], e[1 + 2 * i], e[2 + 2 * i]])
        out.append(coef @ basis + 1e-3 * torch.randn(n, d, generator=g))
    return out


def test_msrs_finds_the_planted_shared_and_private_subspaces():
    s = multi.msrs(planted(), rank=3)
    assert len(s.shared) == 1 and abs(float(s.shared[0, 0])) > 0.999
    q = torch.cat(s.private)
    assert torch.allclose(q @ q.T, torch.eye(len(q)), atol=1e-5)  # private directions orthonormal …
    assert float((q @ s.shared.T).abs().max()) < 1e-5              # … and orthogonal to the shared one
    for i, p in enumerate(s.private):  # behaviour i's private subspace is its own planted plane
        plane = torch.eye(48)[[1 + 2 * i, 2 + 2 * i]]
        assert torch.linalg.matrix_norm(p - (p @ plane.T) @ plane) < 1e-2
    assert (s.captured > 0.999).all()  # the planted vectors lie entirely in shared + private
    assert "shared dimensions: 1" in repr(s) and "<" in s._repr_html_()  # the notebook display (it raised)


def test_msrs_vector_counts_the_shared_part_once():
    s = multi.msrs(planted(1), rank=3)
    a = torch.tensor([1.0, 2.0, 0.0])
    want = (s.shared_part[0] + 2 * s.shared_part[1]) / 2 + s.private_part[0] + 2 * s.private_part[1]
    assert torch.allclose(s.vector(a), want, atol=1e-6)
    assert torch.allclose(s.vector(torch.tensor([0.0, 0.0, 3.0])), 3 * (s.shared_part[2] + s.private_part[2]), atol=1e-6)


def test_msrs_errors():
    with pytest.raises(ValueError, match="at least 2"):
        multi.msrs([torch.randn(4, 8)])
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match="overlap"):
        multi.msrs([x, x + 1e-4 * torch.randn(6, 8)], rank=3, shared=1.01)  # identical subspaces, nothing shared


def behaviours(m):
    g = torch.Generator().manual_seed(0)
    it = [{"question": "Hi?", "matching": "Hello!", "non_matching": "Go away."},
          {"question": "How are you?", "matching": "Great, thanks!", "non_matching": "Leave me alone."}]
    return [multi.Behaviour("a", torch.randn(5, m.n_layers, m.d_model, generator=g), 0, 2.0, it, "Be nice."),
            multi.Behaviour("b", torch.randn(5, m.n_layers, m.d_model, generator=g), 1, 3.0, it, "Be kind.")]


def test_placements_equal_hand_built_steering():
    m = steer.load("tiny-llama")
    a, b = behaviours(m)
    prompts = ["Hi", "Tell me more"]
    with Steering(m, multi.interventions([a, b], "sum", layer=1)) as s:
        got = s.logits(prompts)
    with steer.steer(m, 2.0 * a.vectors[1] + 3.0 * b.vectors[1], layer=1) as s:
        assert torch.allclose(got, s.logits(prompts), atol=1e-5)
    with Steering(m, multi.interventions([a, b], "layers")) as s:
        got = s.logits(prompts)
    with steer.steer(m, a.vectors[0], layer=0, strength=2.0,
                     interventions=steer.steer(m, b.vectors[1], layer=1, strength=3.0).interventions) as s:
        assert torch.allclose(got, s.logits(prompts), atol=1e-5)
    assert multi.interventions([a, b], "sum", on=[False, False]) == []


def test_evaluate_multi_rows_are_the_gaps():
    m = steer.load("tiny-llama")
    bs = behaviours(m)
    ev = multi.evaluate_multi(m, bs, modes=["layers"], neutral_prompts=["Yo"])
    from steer.evaluate import behaviour_gaps
    base = behaviour_gaps(m, bs[0].items)
    alone = behaviour_gaps(m, bs[0].items, Steering(m, multi.interventions(bs, "layers", on=[True, False])))
    both = behaviour_gaps(m, bs[0].items, Steering(m, multi.interventions(bs, "layers")))
    other = behaviour_gaps(m, bs[0].items, Steering(m, multi.interventions(bs, "layers", on=[False, True])))
    r = next(r for r in ev.rows if r["mode"] == "layers" and r["behaviour"] == "a")
    assert r["effect_alone"] == pytest.approx(float((alone - base).mean()), abs=1e-5)
    assert r["effect_together"] == pytest.approx(float((both - base).mean()), abs=1e-5)
    assert r["cross"] == pytest.approx(float((other - base).mean()), abs=1e-5)
    assert r["neutral_kl_together"] > 0
    assert [x["mode"] for x in ev.rows].count("prompt") == 2
    assert "retained" in ev._repr_html_()
