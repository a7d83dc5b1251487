"""subspace_patch against patches built by hand (one forward per patch), on an illusion planted by
construction (a null-space direction that varies plus a dormant row-space direction), and across
families (GPT-2's transposed Conv1D weights, MoE blocks refused)."""

import pytest
import torch

import steer
from steer.arch import UnsupportedModel
from steer.patching import ioi_task, subspace_patch


@pytest.fixture(scope="module")
def llama():
    m = steer.load("tiny-llama")
    return m, ioi_task(m, n=4)


def _acts(m, batch, site):
    got = {}
    with steer.add_hooks(m, {site: lambda act, s: got.__setitem__("a", act.detach().clone())}), torch.no_grad():
        m.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    return got["a"]


def _metric_with(m, task, site, new):
    with steer.add_hooks(m, {site: lambda act, s: new}), torch.no_grad():
        lg = m.hf(input_ids=task.corrupt.input_ids, attention_mask=task.corrupt.attention_mask,
                  position_ids=task.corrupt.position_ids).logits[:, -1]
    return float(task.scores(lg[None])[0])


def _rowspace(W):
    _, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return Vh[S > 1e-6 * S.max()]


@pytest.mark.parametrize("site,head", [("neuron", None), ("z", 2), ("resid_post", None)])
def test_effects_equal_patches_built_by_hand(llama, site, head):
    m, task = llama
    layer = 1 if site != "resid_post" else 0
    name = f"{site}.{layer}"
    d = {"neuron": m.d_mlp, "z": m.d_head}.get(site, m.d_model)
    u = torch.randn(d, generator=torch.Generator().manual_seed(1))
    r = subspace_patch(m, task, u, site=site, layer=layer, head=head)
    u = u / u.norm()
    clean, corrupt = _acts(m, task.clean, name), _acts(m, task.corrupt, name)
    pick = (lambda a: a[:, :, head]) if head is not None else (lambda a: a)
    c, a = pick(clean), pick(corrupt)
    delta = (c - a)[:, -1:]
    m_clean = float(task.scores(m.hf(input_ids=task.clean.input_ids, attention_mask=task.clean.attention_mask,
                                     position_ids=task.clean.position_ids).logits[:, -1][None].detach())[0])
    m_corrupt = _metric_with(m, task, name, corrupt)
    assert r.metric_clean == pytest.approx(m_clean, abs=1e-4) and r.metric_corrupt == pytest.approx(m_corrupt, abs=1e-4)

    def effect(new_last):
        full = corrupt.clone()
        x = pick(full)
        x[:, -1:] = new_last
        return (_metric_with(m, task, name, full) - m_corrupt) / (m_clean - m_corrupt)

    def along(w):
        return a[:, -1:] + (delta @ w)[..., None] * w

    assert r.effects["component"] == pytest.approx(effect(c[:, -1:]), abs=1e-4)
    assert r.effects["subspace"] == pytest.approx(effect(along(u)), abs=1e-4)
    if site == "resid_post":
        assert r.null_fraction is None and r.illusion is None and set(r.effects) == {"component", "subspace"}
        return
    W = m.arch.read_matrix(m.layers[layer], "mlp" if site == "neuron" else "o")
    if head is not None:
        W = W[:, head * m.d_head:(head + 1) * m.d_head]
    R = _rowspace(W)
    u_row = R.T @ (R @ u)
    u_null = u - u_row
    assert r.null_fraction == pytest.approx(float(u_null @ u_null), abs=1e-5)
    assert r.effects["rowspace"] == pytest.approx(effect(along(u_row / u_row.norm())), abs=1e-4)
    assert r.effects["through_null"] == pytest.approx(effect(a[:, -1:] + (delta @ u_null)[..., None] * u), abs=1e-4)
    assert r.effects["nullspace"] == pytest.approx(0.0, abs=1e-4)


def test_a_planted_illusion_is_flagged(llama):
    """u = (n + r)/√2: n in W_out's null space along which clean and corrupt differ (disconnected),
    r in its row space along which they do not (dormant). Neither alone does anything; together
    they move the metric, all of it through the null-space part."""
    m, task = llama
    clean, corrupt = _acts(m, task.clean, "neuron.1"), _acts(m, task.corrupt, "neuron.1")
    delta = (clean - corrupt)[:, -1]  # [prompt, d_mlp]
    R = _rowspace(m.arch.read_matrix(m.layers[1], "mlp"))  # [64, 128]
    null = delta.mean(0) - R.T @ (R @ delta.mean(0))
    n = null / null.norm()
    q, _ = torch.linalg.qr((R @ delta.T))  # the row-space coordinates the prompts vary in
    best = None
    for seed in range(8):  # a dormant row-space direction with a sizeable effect
        x = torch.randn(R.shape[0], generator=torch.Generator().manual_seed(seed))
        x = x - q @ (q.T @ x)
        rr = R.T @ (x / x.norm())
        res = subspace_patch(m, task, (n + rr) / 2 ** 0.5, site="neuron", layer=1)
        if best is None or abs(res.effects["subspace"]) > abs(best.effects["subspace"]):
            best = res
    e = best.effects
    assert abs(e["subspace"]) > 0.01
    assert e["rowspace"] == pytest.approx(0.0, abs=1e-4) and e["nullspace"] == pytest.approx(0.0, abs=1e-4)
    assert e["through_null"] == pytest.approx(e["subspace"], rel=1e-3)
    assert best.illusion is True and best.null_fraction == pytest.approx(0.5, abs=1e-4)
    # the direction the runs really differ in, within the row space: no illusion
    honest = subspace_patch(m, task, R.T @ (R @ delta.mean(0)), site="neuron", layer=1)
    assert honest.illusion is False and honest.effects["through_null"] == pytest.approx(0.0, abs=1e-4)
    assert "SubspacePatch" in best._text()


def test_families_and_errors():
    g = steer.load("tiny-gpt2")  # Conv1D stores W_out and W_O transposed
    task = ioi_task(g, n=2)
    for site, head, d in [("neuron", None, g.d_mlp), ("z", 1, g.d_head)]:
        r = subspace_patch(g, task, torch.randn(d), site=site, layer=1, head=head)
        assert r.effects["nullspace"] == pytest.approx(0.0, abs=1e-4)
    moe = steer.load("tiny-qwen3-moe")
    with pytest.raises(UnsupportedModel, match="MoE"):
        subspace_patch(moe, ioi_task(moe, n=2), torch.randn(moe.d_mlp), site="neuron", layer=0)
    with pytest.raises(ValueError, match="needs head"):
        subspace_patch(g, task, torch.randn(g.d_head), site="z", layer=0)
    with pytest.raises(ValueError, match="entries"):
        subspace_patch(g, task, torch.randn(3), site="neuron", layer=0)
