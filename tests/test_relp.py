"""RelP (relevance patching): each LRP rule against a hand-written backward, forward values
unchanged, and an end-to-end score through the final norm computed by hand."""

import math

import pytest
import torch

import steer
from steer.patching import activation_patch, atp, relevance_rules, relp
from steer.patching._runner import Runner


FAMILIES = steer.models.TINY_MODELS
RELP = [f for f in FAMILIES if steer.load(f).arch.gated_mlp is not None]


@pytest.fixture(scope="module", params=RELP)
def model(request):
    """The runner families whose MLP RelP's rules are written for (gated, separate gate and up
    projections); see test_relp_refuses_other_mlps for the rest."""
    return steer.load(request.param)


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - set(RELP)))
def test_relp_refuses_other_mlps(name):
    with pytest.raises(NotImplementedError, match="gated MLPs"):
        with relevance_rules(steer.load(name)):
            pass


def _gain(norm):
    return (1.0 + norm.weight) if "Gemma" in type(norm).__name__ else norm.weight


def _eps(norm):
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))


def _vjp(module, x, g):
    """``gᵀ ∂module(x)/∂x`` through whatever backward the module has right now."""
    (gx,) = torch.autograd.grad((module(x) * g).sum(), x)
    return gx


def _ln_rule(norm, x, g):
    """The LN-rule by hand: ``c · s · g`` with ``s = 1/rms(x)`` held fixed."""
    s = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + _eps(norm))
    return _gain(norm).detach() * s * g


def test_forward_values_unchanged(model, task):
    r = Runner(model, task.clean)
    with torch.no_grad():
        plain = r.run(r.embeds)
        with relevance_rules(model):
            ruled = r.run(r.embeds)
    torch.testing.assert_close(ruled, plain, atol=1e-5, rtol=0)
    assert not any(m._forward_hooks for m in model.hf.modules())  # removed on exit


def test_ln_rule_holds_the_rms_scale_fixed(model):
    a = model.arch
    norm = a.part(model.layers[0], "attn_norm") or a.part(model.layers[0], "attn_post_norm")
    x = torch.randn(3, 5, model.d_model, requires_grad=True)
    g = torch.randn(3, 5, model.d_model)
    with relevance_rules(model):
        gx = _vjp(norm, x, g)
    torch.testing.assert_close(gx, _ln_rule(norm, x, g), atol=1e-5, rtol=1e-5)
    assert (_vjp(norm, x, g) - gx).abs().max() > 1e-3  # the plain gradient has the d(1/rms)/dx term


def test_identity_and_half_rules_in_the_gated_mlp(model):
    mlp = model.layers[1].mlp
    x = torch.randn(2, 4, model.d_model, requires_grad=True)
    g = torch.randn(2, 4, model.d_model)
    with relevance_rules(model):
        gx = _vjp(mlp, x, g)
    with torch.no_grad():
        pre, up = mlp.gate_proj(x), mlp.up_proj(x)
        act = mlp.act_fn(pre)
        gh = g @ mlp.down_proj.weight  # dL/dh for h = act * up
        ref = (0.5 * (act / pre) * up * gh) @ mlp.gate_proj.weight + (0.5 * act * gh) @ mlp.up_proj.weight
    torch.testing.assert_close(gx, ref, atol=1e-4, rtol=1e-4)


def test_last_layer_mlp_score_through_the_frozen_final_norm(model, task):
    """RelP of the last MLP output at the last position = (clean - corrupt) · c s (W_U[a] - W_U[w]),
    averaged over prompts and normalised: the LN-rule on the final norm, written out by hand."""
    res = relp(model, task, "mlp_out")
    L, T = model.n_layers, task.n_pos
    store = {}

    def grab(tag):
        def fn(act, site):
            store[tag] = act.detach().clone()
        return fn

    for tag, batch in [("clean", task.clean), ("corrupt", task.corrupt)]:
        r = Runner(model, batch)
        with torch.no_grad():
            _, resid = r.run(r.embeds, 0, {f"mlp_out.{L - 1}": grab(tag)}, keep_resid=True)
        store[tag + "_final"] = resid[-1][:, -1]
    norm = getattr(model.base, model.arch.final_norm)
    W_U = model.hf.get_output_embeddings().weight.detach()
    s = torch.rsqrt(store["corrupt_final"].pow(2).mean(-1, keepdim=True) + _eps(norm))
    a, w = task.metric.answer_ids, task.metric.wrong_ids
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    if cap:  # logits = cap·tanh(raw/cap): the gradient carries 1 - tanh² at the corrupt run's logits
        with torch.no_grad():
            raw = norm(store["corrupt_final"]) @ W_U.T
        slope = 1 - torch.tanh(raw / cap) ** 2
        rows = torch.arange(len(a))
        direction = W_U[a] * slope[rows, a, None] - W_U[w] * slope[rows, w, None]
    else:
        direction = W_U[a] - W_U[w]
    coef = _gain(norm).detach() * s * direction  # [prompt, d_model]
    delta = store["clean"][:, -1] - store["corrupt"][:, -1]
    d = res.meta["metric_clean"] - res.meta["metric_corrupt"]
    ref = float((delta * coef).sum(-1).mean()) / d
    assert math.isclose(float(res.scores[L - 1, T - 1]), ref, rel_tol=1e-4, abs_tol=1e-5)
    assert float(res.scores[L - 1, : T - 1].abs().max()) == 0.0  # earlier positions cannot reach the answer
    plain = atp(model, task, "mlp_out")
    assert abs(float(plain.scores[L - 1, T - 1]) - ref) > 1e-6  # AtP differentiates through 1/rms


def test_relp_shapes_and_cli_method(model, task):
    from steer.patching import patch

    out = patch(model, task, "heads", ["activation", "relp"], k=2)
    assert out["results"]["relp"].method == "relp"
    assert out["results"]["relp"].scores.shape == activation_patch(model, task, "heads").scores.shape
    assert "pearson" in out["comparison"]["relp"]


def test_qk_norms_keep_their_gradient_unless_asked():
    model = steer.load("tiny-gemma3")  # the tiny model with per-head q/k norms
    attn = model.layers[0].self_attn
    x = torch.randn(2, 3, model.n_heads, model.d_head, requires_grad=True)
    g = torch.randn(2, 3, model.n_heads, model.d_head)
    true = _vjp(attn.q_norm, x, g)
    with relevance_rules(model):
        default = _vjp(attn.q_norm, x, g)
    with relevance_rules(model, qk_norms=True):
        ruled = _vjp(attn.q_norm, x, g)
    torch.testing.assert_close(default, true)
    torch.testing.assert_close(ruled, _ln_rule(attn.q_norm, x, g), atol=1e-5, rtol=1e-5)
