"""Gradient estimators over many prompts: the task cut into chunks of prompts, the chunks split
across ``torchrun`` processes (:mod:`steer.sweep`), the results combined exactly.

AtP, AtP with the QK fix, RelP and integrated gradients are sums over prompts: with the metric
``M = mean_p m_p``, a chunk ``c`` of ``P_c`` prompts gives ``raw_c = Σ_{p∈c} δ_p · ∂m_p/∂a_p / P_c``,
and the whole task's ``raw = Σ_c raw_c · P_c / P`` (likewise the clean and corrupt metrics).
So the chunked result is the one-batch result up to floating-point rounding, and, because the
chunks are fixed by ``chunk`` and not by the number of processes, any number of processes
gives bitwise the same answer. AtP*'s GradDrop takes ``|·|`` of each dropped layer's
whole-task estimate, so its chunks return those signed estimates (``keep_drops``), which are
summed before the ``|·|``.

>>> import steer
>>> from steer.patching import ioi_task, atp
>>> from steer.patching.sharded import over_prompts
>>> m = steer.load("tiny-llama"); t = ioi_task(m, n=6)
>>> r = over_prompts("atp", m, t, "heads", chunk=4)
>>> bool((r.scores - atp(m, t, "heads").scores).abs().max() < 1e-4)
True
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..models import weights_fingerprint
from ..sweep import Shards, map_units, sweep_key
from .result import PatchingResult
from .tasks import PatchTask

__all__ = ["over_prompts", "ESTIMATORS"]

ESTIMATORS = ("atp", "relp", "ig", "atp*")


def _estimator(method: str):
    from .attribution import atp, atp_star
    from .integrated import integrated_gradients
    from .relevance import relp

    table = {"atp": atp, "relp": relp, "ig": integrated_gradients, "atp*": atp_star}
    if method not in table:
        raise ValueError(f"method={method!r}: use one of {', '.join(ESTIMATORS)}.")
    return table[method]


def over_prompts(
    method: str, model, task: PatchTask, nodes: Union[str, Sequence[str]] = "heads", *, chunk: int = 8,
    shards: Union[Shards, str, None] = None, directory: Union[str, Path, None] = None,
    progress: Optional[bool] = None, **kw,
) -> Union[PatchingResult, dict[str, PatchingResult]]:
    """``method`` (``"atp"``, ``"relp"``, ``"ig"``, ``"atp*"``; keyword arguments ``kw`` passed on, e.g.
    ``qk_fix=True``, ``steps=4``, ``direction=``) on chunks of ``chunk`` prompts of ``task``,
    combined into the whole task's result. ``shards="auto"``: chunks split across ``torchrun``
    processes; ``directory``: finished chunks kept for a resumed run. The task's metric must
    support ``subset`` (:meth:`PatchTask.subset`)."""
    fn = _estimator(method)
    star = method == "atp*"
    if star:
        if kw.get("fused") is False or kw.get("grad_drop") is False:
            raise ValueError("over_prompts('atp*') needs fused=True and grad_drop=True (for AtP without GradDrop use "
                             "over_prompts('atp', ..., qk_fix=True)).")
        kw = {**kw, "keep_drops": True}
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be >= 1 prompt.")
    P = task.n_prompts
    # the metric read on fixed random logits: its shape says whether chunks combine as a mean over
    # prompts, and its values name it in the resume key (a metric that changed must not resume)
    with torch.no_grad():
        probe = task.metric(torch.randn(P, model.d_vocab, generator=torch.Generator().manual_seed(0)))
    if torch.as_tensor(probe).shape != (P,):
        raise ValueError(f"over_prompts combines chunks as a mean over prompts: the task's metric must return one "
                         f"value per prompt ([{P}]), not {tuple(torch.as_tensor(probe).shape)}.")
    spans = [list(range(a, min(P, a + chunk))) for a in range(0, P, chunk)]
    single = isinstance(nodes, str)
    kinds = [nodes] if single else list(nodes)
    direction = kw.get("direction", "denoising")

    def unit(rows) -> dict[str, PatchingResult]:
        return fn(model, task.subset(rows), kinds, **kw)

    key = None if directory is None else sweep_key(  # only a directory to resume needs the sweep's name
        "over_prompts", method, model.name, weights_fingerprint(model), task.clean.input_ids.tolist(),
        task.corrupt.input_ids.tolist(), [round(float(x), 4) for x in probe], kinds, chunk,
        sorted((k, repr(v)) for k, v in kw.items()))
    parts = map_units(unit, spans, shards=shards, directory=directory, key=key,
                      desc=f"{method} over {len(spans)} prompt chunks", progress=progress)
    w = [len(rows) / P for rows in spans]  # chunk c's share of the mean over prompts
    out = {}
    for k in kinds:
        rs = [p[k] for p in parts]
        mc = sum(wi * r.meta["metric_clean"] for wi, r in zip(w, rs))
        mx = sum(wi * r.meta["metric_corrupt"] for wi, r in zip(w, rs))
        d = mc - mx

        def normalised(raw):
            return (raw / d if direction == "denoising" else 1.0 + raw / d).float()

        if star:  # GradDrop: the dropped layers' signed estimates sum over chunks, then |·|
            drops = sum(wi * r.meta["drops_raw"].double() for wi, r in zip(w, rs))
            plain = sum(wi * r.meta["plain_raw"].double() for wi, r in zip(w, rs))
            raw = torch.sign(plain) * drops.abs().sum(0) / max(drops.shape[0] - 1, 1)
            extra = {"plain": normalised(plain).tolist()}
        else:  # undo each chunk's normalisation: raw_c = (score_c [- 1]) · d_c
            raw = sum(wi * (r.meta["metric_clean"] - r.meta["metric_corrupt"])
                      * (r.scores.double() if direction == "denoising" else r.scores.double() - 1.0)
                      for wi, r in zip(w, rs))
            extra = {}
        scores = normalised(raw)
        out[k] = dataclasses.replace(
            rs[0], scores=scores, tokens=task.column_tokens(model),
            seconds=sum(r.seconds for r in rs), forward_equivalents=sum(wi * r.forward_equivalents for wi, r in zip(w, rs)),
            meta={**{k_: v for k_, v in rs[0].meta.items() if k_ not in ("drops_raw", "plain_raw", "plain")},
                  "metric_clean": mc, "metric_corrupt": mx, "n_prompts": P, "task": task.name,
                  "chunks": len(spans), "chunk": chunk, **extra})
    return out[kinds[0]] if single else out
