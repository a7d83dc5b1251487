"""integrated_gradients against a brute-force loop over the path through HF's own forward
(interpolated token embeddings as ``inputs_embeds``), on three families; completeness at the
input; chunking changes nothing."""

import pytest
import torch

import steer
from steer.patching import integrated_gradients

KINDS = ["heads", "mlp_out", "resid", "neurons"]
SITE = {"heads": "z", "mlp_out": "mlp_out", "resid": "resid_pre", "neurons": "neuron"}


def _bruteforce(m, task, kind, steps):
    """(1/m) Σ_j (a_clean − a_corrupt) · ∂M/∂a at e_corrupt + α_j (e_clean − e_corrupt), one point
    and one HF forward at a time, reduced to the node kind's units."""
    emb = m.hf.get_input_embeddings()
    b0, b1 = task.corrupt, task.clean
    kw = dict(attention_mask=b0.attention_mask, position_ids=b0.position_ids, use_cache=False)
    site = SITE[kind]

    def acts(batch):
        got = {}
        with steer.add_hooks(m, {f"{site}.{l}": (lambda a, s: got.__setitem__(s.layer, a.detach().clone()))
                                 for l in range(m.n_layers)}), torch.no_grad():
            m.hf(input_ids=batch.input_ids, **kw)
        return got

    a0, a1 = acts(b0), acts(b1)
    e0, e1 = emb(b0.input_ids).detach(), emb(b1.input_ids).detach()
    g = {l: torch.zeros_like(a0[l]) for l in range(m.n_layers)}
    for j in range(steps):
        alpha = (j + 0.5) / steps
        store = {}

        def keep(a, s):
            store[s.layer] = y = a.clone()
            return y

        with torch.enable_grad(), steer.add_hooks(m, {f"{site}.{l}": keep for l in range(m.n_layers)}):
            e = (e0 + alpha * (e1 - e0)).requires_grad_(True)
            lg = m.hf(inputs_embeds=e, **kw).logits[:, -1]
            M = task.scores(lg[None].float())[0]
            gs = torch.autograd.grad(M, [store[l] for l in range(m.n_layers)])
        for l in range(m.n_layers):
            g[l] += gs[l] / steps
    from steer.patching.nodes import node_set

    ns = node_set(m, kind, task.n_pos)
    return torch.stack([ns.reduce(((a1[l] - a0[l]) * g[l]).sum(0)) for l in range(m.n_layers)])


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-gemma3"])
@pytest.mark.parametrize("steps", [1, 3])
def test_ig_equals_the_bruteforce_path_average(family, steps):
    m = steer.load(family)
    from steer.patching import ioi_task

    task = ioi_task(m, n=3)
    res = integrated_gradients(m, task, KINDS, steps=steps)
    d = res["heads"].meta["metric_clean"] - res["heads"].meta["metric_corrupt"]
    for kind in KINDS:
        ref = _bruteforce(m, task, kind, steps) / d
        torch.testing.assert_close(res[kind].scores, ref.float(), atol=2e-4, rtol=1e-3)
        assert res[kind].forward_equivalents == 2 + 2 * steps


def test_completeness_at_the_input_and_chunking(tiny):
    from steer.patching import ioi_task

    task = ioi_task(tiny, n=4)
    r = integrated_gradients(tiny, task, "resid", steps=64)
    assert float(r.scores[0].sum()) == pytest.approx(1.0, abs=2e-3)  # Σ over positions = M(clean) − M(corrupt)
    a = integrated_gradients(tiny, task, ["resid", "heads"], steps=4)
    b = integrated_gradients(tiny, task, ["resid", "heads"], steps=4, chunk=3)
    for k in a:
        torch.testing.assert_close(a[k].scores, b[k].scores, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="steps"):
        integrated_gradients(tiny, task, "resid", steps=0)
