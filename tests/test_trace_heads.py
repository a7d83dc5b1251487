"""trace_heads (which heads hold a probe's score down) against references that do not use its
hooks: zeroing a head's columns of W_O in the weights, one prompt at a time, for the measured
changes, and a finite difference of that weight edit for the attribution."""

import copy

import pytest
import torch

import steer
from steer import diagnostics as D
from conftest import RUNNER_FAMILIES
from steer.data import Raw

PROMPTS = [Raw("Hi there"), Raw("the cat sat on the")]


def _o_cols(model, layer, head):
    o = model.arch.proj(model.layers[layer], "o")
    return o.weight, slice(head * model.d_head, (head + 1) * model.d_head)


def _zero_head(model, layer, head):
    """A copy of ``model`` with head ``layer.head``'s slice of W_O zeroed (GPT-2's Conv1D: rows)."""
    m = copy.deepcopy(model)
    w, cols = _o_cols(m, layer, head)
    with torch.no_grad():
        if m.arch.conv1d:
            w[cols, :] = 0
        else:
            w[:, cols] = 0
    return m


def _mean_score(model, trace, u, readings="generation", hooks=None):
    """Mean projection on ``u`` of resid_post at the trace's layer over the readings, each prompt
    run alone on its own tokens (no padding, no cache)."""
    vals = []
    for i, ids in enumerate(trace.ids):
        got = {}

        def grab(act, site):
            got["h"] = act[0].double() @ u.double()

        with steer.add_hooks(model, {**(hooks or {}), f"resid_post.{trace.layer}": grab}), torch.no_grad():
            model.hf(input_ids=torch.tensor([ids]))
        p, n = int(trace.prompt_len[i]), len(ids)
        keep = ~torch.isnan(trace.scores[i, :n])
        keep[0] = False
        if readings == "generation":
            keep[:p] = False
        vals.append(got["h"][keep])
    return float(torch.cat(vals).mean())


def _edited(model, layer, head, scale):
    m = copy.deepcopy(model)
    w, cols = _o_cols(m, layer, head)
    with torch.no_grad():
        w[:, cols] *= scale
    return m


@pytest.fixture(scope="module")
def tiny64():
    return steer.load("tiny-llama", dtype=torch.float64)


@pytest.mark.parametrize("steered", [False, True])
def test_measured_changes_equal_zeroing_heads_in_the_weights(tiny64, steered):
    m = tiny64
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.randn(m.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    st = (lambda: steer.steer(m, w, layer=0, strength=1.0, include_sink=True)) if steered else (lambda: None)
    hooks = {"resid_post.0": lambda act, site: act + w} if steered else None
    tr = D.probe_trace(m, PROMPTS, v, layer=1, max_new_tokens=5, steering=st())
    th = D.trace_heads(m, tr, v, top=5, include_sink=True, steering=st(), batch_size=3)
    u = v / v.norm()
    base = _mean_score(m, tr, u, hooks=hooks)
    assert th.base == pytest.approx(base, abs=1e-6)
    for j, (l, h) in enumerate(th.heads):
        alone = _mean_score(_edited(m, l, h, 0.0), tr, u, hooks=hooks)
        assert float(th.measured[j]) == pytest.approx(alone - base, abs=1e-6)
    # the cumulative ablations: the first k heads zeroed together
    mk = m
    for j, (l, h) in enumerate(th.heads):
        mk = _edited(mk, l, h, 0.0)
        assert float(th.cumulative[j]) == pytest.approx(_mean_score(mk, tr, u, hooks=hooks) - base, abs=1e-6)
    # the ranking is by predicted rise, and it is the attribution's
    assert th.predicted.tolist() == sorted(th.attribution.flatten().tolist(), reverse=True)[:5]


def test_attribution_is_the_derivative_of_the_ablation(tiny64):
    """Zero ablation's first-order estimate: d/dε of the score with the head scaled by (1 − ε)
    (central difference; ε is not tiny because HF's RMSNorm and rotary compute in fp32 even in a
    fp64 model)."""
    m = tiny64
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tr = D.probe_trace(m, PROMPTS, v, layer=1, max_new_tokens=4)
    th = D.trace_heads(m, tr, v, top=1, include_sink=True, readings="all")
    u, eps = v / v.norm(), 3e-3
    for l in range(2):
        for h in range(m.n_heads):
            up = _mean_score(_edited(m, l, h, 1 - eps), tr, u, readings="all")
            down = _mean_score(_edited(m, l, h, 1 + eps), tr, u, readings="all")
            assert float(th.attribution[l, h]) == pytest.approx((up - down) / (2 * eps), rel=1e-3, abs=5e-5)


def test_a_planted_suppressing_head_ranks_first(tiny):
    """A probe pointing against what head 1.2 writes: ablating that head raises it most."""
    m = tiny
    tr0 = D.probe_trace(m, PROMPTS, torch.ones(m.d_model), layer=1, max_new_tokens=6)
    ids = torch.tensor([tr0.ids[1]])
    got = {}
    with steer.add_hooks(m, {"z.1": lambda act, site: got.__setitem__("z", act[0, 1:, 2])}), torch.no_grad():
        m.hf(input_ids=ids)
    w, cols = _o_cols(m, 1, 2)
    probe = -(got["z"] @ w[:, cols].T).mean(0)
    tr = D.probe_trace(m, PROMPTS, probe, layer=1, max_new_tokens=6)
    th = D.trace_heads(m, tr, probe, top=4, readings="all")
    assert th.heads[0] == (1, 2)
    assert float(th.measured[0]) > 0 and float(th.measured[0]) == float(th.measured.max())


def test_mean_ablation_and_errors(tiny):
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(2))
    st = steer.steer(tiny, torch.randn(tiny.d_model) * 4, layer=0, strength=1.0)
    tr = D.probe_trace(tiny, PROMPTS, v, layer=1, max_new_tokens=4, steering=st)
    with pytest.raises(ValueError, match="does not reproduce its readings"):
        D.trace_heads(tiny, tr, v)  # the trace was steered: pass its steering
    th = D.trace_heads(tiny, tr, v, steering=steer.steer(tiny, st.interventions[0].vector, layer=0, strength=1.0),
                       ablation="mean", top=3)
    assert len(th.heads) == 3 and th.to_dict()["ablation"] == "mean"
    with pytest.raises(ValueError, match="ablation="):
        D.trace_heads(tiny, tr, v, ablation="resample")
    with pytest.raises(ValueError, match="probe reads layer 0"):
        D.trace_heads(tiny, tr, steer.Condition(v, layer=0))
    one = D.probe_trace(tiny, PROMPTS, v, layer=1, max_new_tokens=1)
    with pytest.raises(ValueError, match="no generation readings"):
        D.trace_heads(tiny, one, v)
    assert "TraceHeads" in th._text() and th._repr_mimebundle_()["text/html"]


@pytest.mark.slow
def test_heads_holding_the_refusal_probe_down_on_smollm2(smol):
    """SmolLM2 complies with harmful prompts; a refusal probe read over its answers is low. The
    heads ranked by attribution raise it when ablated (3% of the heads, measured), the ranking
    agrees with the measurements, and the same heads come first on other prompts."""
    data = steer.refusal.training_data()
    d = steer.extract(smol, data["harmful"][:32], data["harmless"][:32], positions="post_instruction")
    found = []
    for prompts in (data["harmful"][-8:], data["harmful"][-16:-8]):
        tr = D.probe_trace(smol, prompts, d, layer=16, max_new_tokens=16)
        th = D.trace_heads(smol, tr, d, top=8)  # 8 of 270 heads: 3%
        assert float(th.cumulative[-1]) > 2.0, th.cumulative
        assert bool((th.measured[:3] > 0).all()), th.measured
        assert th.rank_agreement > 0.3
        found.append(set(th.heads[:4]))
    assert len(found[0] & found[1]) >= 2, found


@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_every_family_replays_its_trace_and_measures_true_ablations(family):
    """The teacher-forced replay reproduces the generation-pass readings (left padding, sliding
    windows, GQA, MoE, GPT-2's learned positions) and the top head's measured change equals
    zeroing its W_O slice in the weights."""
    m = steer.load(family)
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    tr = D.probe_trace(m, PROMPTS, v, layer=1, max_new_tokens=4)
    th = D.trace_heads(m, tr, top=2, include_sink=True)
    u = v / v.norm()
    base = _mean_score(m, tr, u)
    l, h = th.heads[0]
    assert float(th.measured[0]) == pytest.approx(_mean_score(_zero_head(m, l, h), tr, u) - base, abs=1e-4)
