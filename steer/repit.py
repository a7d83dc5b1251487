"""Targeted concept vectors — RepIt (Siu et al., "RepIt: Representing Isolated Targets to Steer
Language Models", 2025): isolate the part of a concept representation that is specific to one
target concept, by removing what it shares with the other concepts, and use it to change the
model's behaviour on the target alone.

steer's estimator (its own; RepIt's paper derives its vectors differently) works on the
statistic CAST conditions read, the prompt-mean ``resid_post`` at the condition's layer:

1. concept vectors ``c_k = mean(h | concept k) − mean(h | harmless)``; the target's from a few
   examples (the paper: a dozen suffice), the others from all of theirs;
2. isolation: ``t = c_target − Π c_target``, with ``Π`` the projection onto the span of the other
   concepts' vectors (what the target shares with them is removed);
3. sparsity: ``t`` keeps its ``neurons`` largest coordinates (the paper: the correction lives in
   100–200 neurons), and ``û = t / ‖t‖``;
4. a target detector: the projection ``h·û`` above a threshold ``τ`` (the value that best
   separates the target examples from the other concepts' prompts: largest true-positive minus
   false-positive rate), as a CAST :class:`~steer.conditions.Condition`;
5. the corrected condition is ``condition & ~detector`` (a CAST rule): it fires as before except
   on prompts that express the isolated target, so it can only fire *less* — harmless prompts
   stay as they were.

With conditional refusal steering on (CAST), this is meant to suppress refusal on the target
concept and keep it on the others; how far it does on SmolLM2 is in ``experiments/repit.py``.
(Folding ``−β (h·û − μ₀)`` into a linear probe, tried first, raised firing on harmless prompts
from 3 % to about 20 %: held-out prompts below ``μ₀`` got pushed up.)

>>> import torch
>>> e = torch.eye(4)
>>> t = isolate(e[0] + e[1], [e[1] + e[2], e[1] - e[2]])     # e1 is shared with the others
>>> [round(x, 6) for x in t.tolist()]
[1.0, 0.0, 0.0, 0.0]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .conditions import Condition
from .display import Rich

__all__ = ["isolate", "sparsify", "TargetedCorrection", "fit_correction", "concept_vectors"]


def isolate(target: Float[Tensor, "d"], others: Sequence[Float[Tensor, "d"]]) -> Float[Tensor, "d"]:
    """``target`` minus its projection onto the span of ``others`` (least squares, float64)."""
    t = torch.as_tensor(target).double()
    if not len(others):
        return t.float()
    o = torch.stack([torch.as_tensor(x).double() for x in others], 1)  # [d, k]
    coef = torch.linalg.lstsq(o, t[:, None]).solution
    return (t - (o @ coef)[:, 0]).float()


def sparsify(v: Float[Tensor, "d"], neurons: Optional[int]) -> Float[Tensor, "d"]:
    """``v`` with only its ``neurons`` largest-magnitude coordinates kept (``None``: all).

    >>> sparsify(torch.tensor([0.1, -3.0, 2.0]), 2).tolist()
    [0.0, -3.0, 2.0]
    """
    if neurons is None or neurons >= v.numel():
        return v.clone()
    if neurons < 1:
        raise ValueError(f"neurons={neurons}: keep at least one.")
    out = torch.zeros_like(v)
    idx = v.abs().topk(neurons).indices
    out[idx] = v[idx]
    return out


def concept_vectors(h_by_concept: dict[str, Tensor], h_harmless: Tensor) -> dict[str, Tensor]:
    """``{concept: mean(h | concept) − mean(h | harmless)}`` from ``[n, d]`` prompt statistics."""
    mu0 = h_harmless.float().mean(0)
    return {k: h.float().mean(0) - mu0 for k, h in h_by_concept.items()}


@dataclass(repr=False)
class TargetedCorrection(Rich):
    """The isolated target direction ``û`` and its detector (see the module doc); :meth:`apply`
    gives the corrected CAST rule ``condition & ~detector``."""

    direction: Float[Tensor, "d"]
    detector: Condition
    target: str
    meta: dict = field(default_factory=dict)

    def apply(self, condition):
        """``condition & ~detector``: the condition, except on prompts of the isolated target."""
        return condition & ~self.detector

    def _fields(self):
        return [("target", self.target), ("detector", f"h·û > {self.detector.threshold:.4g} at layer {self.detector.layer}"),
                ("neurons", int((self.direction != 0).sum()))] + [(k, v) for k, v in self.meta.items()
                                                                   if isinstance(v, (int, float, str))]


def _best_threshold(pos: Tensor, neg: Tensor) -> tuple[float, float]:
    """The threshold maximising TPR − FPR of ``score > τ`` (positives ``pos``), and that value."""
    cand = torch.cat([pos, neg]).sort().values
    mids = torch.cat([cand[:1] - 1, (cand[1:] + cand[:-1]) / 2, cand[-1:] + 1])
    tpr = (pos[None, :] > mids[:, None]).float().mean(1)
    fpr = (neg[None, :] > mids[:, None]).float().mean(1)
    j = int((tpr - fpr).argmax())
    return float(mids[j]), float(tpr[j] - fpr[j])


def fit_correction(condition: Condition, target: str, h_target: Float[Tensor, "n d"],
                   h_others: dict[str, Tensor], h_harmless: Float[Tensor, "m d"], *,
                   neurons: Optional[int] = 150) -> TargetedCorrection:
    """The RepIt-style correction of ``condition`` for ``target`` (module doc, steps 1–5), from
    prompt statistics at the condition's layer: ``h_target`` (a few target examples), the other
    concepts' ``h_others`` and harmless prompts' ``h_harmless``.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> shared, own = torch.randn(16, generator=g), torch.eye(16)
    >>> mk = lambda k: 0.1 * torch.randn(12, 16, generator=g) + shared + 3 * own[k]
    >>> cond = Condition(shared, layer=0, threshold=0.5 * float(shared @ shared), kind="probe")
    >>> c = fit_correction(cond, "a", mk(0), {"b": mk(1), "c": mk(2)}, 0.1 * torch.randn(12, 16, generator=g), neurons=4)
    >>> fixed = c.apply(cond)
    >>> fires = lambda c, h: c.evaluate({0: h})
    >>> fires(cond, mk(0)).all().item(), fires(fixed, mk(0)).any().item(), fires(fixed, mk(1)).all().item()
    (True, False, True)
    """
    if len(h_target) < 2 or not h_others:
        raise ValueError("fit_correction needs ≥ 2 target examples and at least one other concept.")
    vecs = concept_vectors({target: h_target, **h_others}, h_harmless)
    full = isolate(vecs[target], [v for k, v in vecs.items() if k != target])
    t = sparsify(full, neurons)
    if t.norm() == 0:
        raise ValueError(f"Nothing of {target!r} is left once what it shares with the other concepts is removed.")
    u = t / t.norm()
    pos = h_target.float() @ u
    neg = torch.cat([h.float() for h in h_others.values()]) @ u
    tau, j = _best_threshold(pos, neg)
    det = Condition(u, condition.layer, tau, "above", "projection", meta={"repit_target": target})
    meta = {"neurons": neurons, "n_target": len(h_target), "train_tpr_minus_fpr": j,
            "isolated_fraction": float(full.norm() / vecs[target].norm())}
    return TargetedCorrection(u, det, target, meta)
