"""How good is a ranking? Top-K recovery cost, and a bound on effects that were missed.

* :func:`topk_recovery_cost` (AtP* paper's evaluation): verify candidates by activation
  patching in the order a fast method ranks them; the cost, in forward-equivalents, is the
  method's own cost plus one forward per verified candidate until every true top-K node is found.
* :func:`missed_effect_bound` (AtP*'s subsampling diagnostic): patch random subsets of the
  not-yet-verified nodes jointly. Each node enters a subset with probability ``p``. Assume the
  summed effect of the *other* nodes in a subset is sign-symmetric and independent of a given
  node ``n`` (then a subset containing ``n`` has ``|effect| >= |c(n)|`` with probability
  >= 1/2). If some unverified node had ``|c(n)| > B = max_S |effect(S)|``, all ``m`` subsets would
  have missed it with probability <= ``(1 - p/2)^m``; so with confidence ``1 - (1 - p/2)^m`` no
  unverified node has an effect larger than ``B``. ``m`` is chosen from the requested confidence.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence, Union

import torch

from ..sites import Site
from ._runner import Runner
from .activation import _check_direction, _patcher, auto_batch_size, capture_sites, run_metrics
from .nodes import NodeSet, resolve_nodes
from .result import PatchingResult
from .tasks import PatchTask

__all__ = ["topk_recovery_cost", "missed_effect_bound"]


def topk_recovery_cost(true: PatchingResult, estimate: PatchingResult, k: int = 10,
                       method_cost: Optional[float] = None) -> dict:
    """Forward-equivalents to recover the true top-``k`` nodes (by ``|effect|``) when
    ``estimate``'s candidates are verified in ranked order.

    Returns ``{"k", "verified", "method_cost", "cost"}`` with ``cost = method_cost + verified``.

    >>> import steer
    >>> from steer.patching import ioi_task, activation_patch, atp, topk_recovery_cost
    >>> m = steer.load("tiny-llama"); t = ioi_task(m, n=2)
    >>> c = topk_recovery_cost(activation_patch(m, t, "heads"), atp(m, t, "heads"), k=2)
    >>> 2 <= c["verified"] <= 8
    True
    """
    if tuple(true.scores.shape) != tuple(estimate.scores.shape) or true.nodes.kind != estimate.nodes.kind:
        raise ValueError(f"true ({true.nodes.kind}) and estimate ({estimate.nodes.kind}) must score the same node set.")
    n = true.scores.numel()
    k = min(k, n)
    target = set(true.top_indices(k))
    order = estimate.top_indices(n)
    found, verified = 0, 0
    for i in order:
        verified += 1
        found += i in target
        if found == len(target):
            break
    mc = estimate.forward_equivalents if method_cost is None else method_cost
    mc = 0.0 if mc is None or math.isnan(mc) else float(mc)
    return {"k": k, "verified": verified, "method_cost": mc, "cost": mc + verified}


@torch.no_grad()
def missed_effect_bound(
    model, task: PatchTask, nodes: Union[str, NodeSet], verified: Sequence[int] = (),
    confidence: float = 0.95, p: float = 0.1, direction: str = "denoising", seed: int = 0,
    batch_size: Optional[int] = None,
) -> dict:
    """Bound the largest effect among unverified nodes by patching random subsets of them.

    ``verified``: flat node indices already checked (excluded from the subsets). Returns
    ``{"bound", "confidence", "n_subsets", "p", "subset_effects", "subsets"}``: effects are
    normalised (``|change|`` of ``(M - corrupt)/(clean - corrupt)`` from the base run) and
    ``subsets[i]`` lists the flat node indices patched together in subset ``i``.

    >>> import steer
    >>> from steer.patching import ioi_task, missed_effect_bound
    >>> m = steer.load("tiny-llama")
    >>> d = missed_effect_bound(m, ioi_task(m, n=2), "heads", confidence=0.5, p=0.5)
    >>> d["n_subsets"], d["bound"] >= 0
    (3, True)
    """
    direction = _check_direction(direction)
    if not 0 < confidence < 1 or not 0 < p <= 1:
        raise ValueError("Need 0 < confidence < 1 and 0 < p <= 1.")
    ns = resolve_nodes(model, nodes, task.n_pos)
    t0 = time.perf_counter()
    m_sub = math.ceil(math.log(1 - confidence) / math.log(1 - p / 2))
    g = torch.Generator().manual_seed(seed)
    include = torch.rand(m_sub, ns.n_nodes, generator=g) < p
    if verified:
        include[:, torch.as_tensor(list(verified), dtype=torch.long)] = False
    base_b, other_b = (task.corrupt, task.clean) if direction == "denoising" else (task.clean, task.corrupt)
    base, other = Runner(model, base_b), Runner(model, other_b)
    other_acts, _, other_logits = capture_sites(model, other, [ns.site])
    base_logits = base.run(base.embeds)
    cl, xl = (other_logits, base_logits) if direction == "denoising" else (base_logits, other_logits)
    m_clean, m_corrupt = run_metrics(task, cl, xl)
    P = task.n_prompts
    per_chunk = max(1, (batch_size or auto_batch_size(model, task.n_pos)) // P)
    per_layer = include.view(m_sub, ns.n_layers, ns.per_layer)
    effects = []
    for s0 in range(0, m_sub, per_chunk):
        inc = per_layer[s0 : s0 + per_chunk]
        V = inc.shape[0]
        hooks = []
        for l in range(ns.n_layers):
            if not inc[:, l].any():
                continue
            mask = ns.masks_from(inc[:, l]).to(base.embeds.device)[:, None]
            hooks.append((Site(ns.site, l), _patcher(mask, other_acts[(ns.site, l)], V, P)))
        logits = base.run(base.embeds.repeat(V, 1, 1), 0, hooks)
        effects.append(task.scores(logits.view(V, P, -1)))
    eff = torch.cat(effects)
    m_base = m_corrupt if direction == "denoising" else m_clean
    norm = ((eff - m_base) / (m_clean - m_corrupt)).abs()
    return {"bound": float(norm.max()), "confidence": 1 - (1 - p / 2) ** m_sub, "n_subsets": m_sub, "p": p,
            "subset_effects": norm.tolist(), "subsets": [row.nonzero().flatten().tolist() for row in include],
            "seconds": time.perf_counter() - t0}
