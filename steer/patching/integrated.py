"""Integrated-gradient attribution (EAP-IG style; Hanna, Pezzelle & Belinkov 2024, "Have Faith in
Faithfulness"), in the same engine as AtP.

AtP multiplies each node's activation difference by the gradient at the corrupt (base) run only;
where the metric is far from linear between the two runs (MLP outputs, the residual stream) that
single gradient misleads. Integrated gradients average the gradient over ``m`` points on the
straight path between the base and the other run's *input embeddings*:

``Î(n) = (a_other(n) − a_base(n)) · (1/m) Σ_j ∂M/∂a(n) |_{e_base + α_j (e_other − e_base)}``,
``α_j = (j + ½)/m`` (midpoint rule). At the input (``resid_pre`` of layer 0) the path is straight,
so the scores of all positions add up to ``M(other) − M(base)`` as ``m`` grows (completeness).
The ``m`` points run as rows of one batched forward and backward (``chunk`` points at a time),
so the cost is ``2 + 2m`` forward-equivalents (two capture runs, then a forward and a backward
per point), reported in ``forward_equivalents``.

>>> import steer
>>> from steer.patching import ioi_task, integrated_gradients
>>> m = steer.load("tiny-llama")
>>> r = integrated_gradients(m, ioi_task(m, n=2), "mlp_out", steps=4)
>>> r.method, r.forward_equivalents, tuple(r.scores.shape)[0]
('ig-4', 10.0, 2)
"""

from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch

from ..sites import Site
from ._runner import Runner
from .activation import _check_direction, capture_sites, run_metrics
from .attribution import _kinds
from .result import PatchingResult
from .tasks import PatchTask

__all__ = ["integrated_gradients"]


def integrated_gradients(
    model, task: PatchTask, nodes: Union[str, Sequence[str]] = "heads", direction: str = "denoising",
    steps: int = 5, chunk: Optional[int] = None,
) -> Union[PatchingResult, dict[str, PatchingResult]]:
    """Integrated-gradient estimates of every node's patching effect (module doc), normalised
    like :func:`~steer.patching.activation_patch` (denoising: 0 = corrupt, 1 = clean).
    ``steps``: points on the path (``m``); ``chunk``: points per batched forward (default: all).
    One kind → :class:`PatchingResult`; a list of kinds → dict, from the same runs."""
    direction = _check_direction(direction)
    if steps < 1:
        raise ValueError(f"steps={steps}: integrated gradients need at least one point on the path.")
    kinds, single = _kinds(model, task, nodes)
    t0 = time.perf_counter()
    base_b, other_b = (task.corrupt, task.clean) if direction == "denoising" else (task.clean, task.corrupt)
    sites = sorted({ns.site for ns in kinds})
    base_r, other_r = Runner(model, base_b, verify=False), Runner(model, other_b, verify=False)
    base, _, base_logits = capture_sites(model, base_r, sites)
    other, _, other_logits = capture_sites(model, other_r, sites)
    base_r.verify(base_logits)
    other_r.verify(other_logits)
    clean_l, corrupt_l = (other_logits, base_logits) if direction == "denoising" else (base_logits, other_logits)
    m_clean, m_corrupt = run_metrics(task, clean_l, corrupt_l)

    P, L = task.n_prompts, model.n_layers
    e0, e1 = base_r.embeds.detach(), other_r.embeds.detach()
    alphas = (torch.arange(steps, dtype=e0.dtype, device=e0.device) + 0.5) / steps
    chunk = steps if chunk is None else max(1, int(chunk))
    keys = sorted({(s, l) for s in sites for l in range(L)})
    g_sum = {k: torch.zeros_like(base[k]) for k in keys}
    for c in range(0, steps, chunk):
        a = alphas[c: c + chunk]
        k = len(a)
        store: dict = {}

        def keep(act, site: Site):
            store[(site.name, site.layer)] = y = act.clone()
            return y

        hooks = [(Site(s, l), keep) for s in sites if s != "resid_pre" for l in range(L)]
        with torch.enable_grad():
            h0 = (e0[None] + a[:, None, None, None] * (e1 - e0)[None]).flatten(0, 1).requires_grad_(True)  # [k*P, T, d]
            logits, resid = base_r.run(h0, 0, hooks, keep_resid=True)
            for l in range(L):
                store[("resid_pre", l)] = resid[l]
            M = task.scores(logits.view(k, P, -1).float()).sum()
            gs = torch.autograd.grad(M, [store[key] for key in keys], allow_unused=True)
        for key, g in zip(keys, gs):
            if g is not None:
                g_sum[key] += g.view(k, P, *g.shape[1:]).sum(0)
    out = {}
    d = m_clean - m_corrupt
    sec = time.perf_counter() - t0
    for ns in kinds:
        raw = torch.stack([ns.reduce(((other[(ns.site, l)] - base[(ns.site, l)]) * g_sum[(ns.site, l)] / steps).sum(0))
                           for l in range(L)])
        scores = raw / d if direction == "denoising" else 1.0 + raw / d
        out[ns.kind] = PatchingResult(
            scores=scores.detach().float().cpu(), nodes=ns, tokens=task.column_tokens(model),
            method=f"ig-{steps}", direction=direction, seconds=sec, forward_equivalents=2.0 + 2.0 * steps,
            meta={"metric_clean": m_clean, "metric_corrupt": m_corrupt, "n_prompts": P, "task": task.name,
                  "steps": steps})
    return out[kinds[0].kind] if single else out
