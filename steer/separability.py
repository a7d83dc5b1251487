"""How well two groups of prompts separate, layer by layer (a quick linear read-out).

For every layer: a mean-difference direction fitted on a training split, the held-out
projections scored by accuracy (threshold at the midpoint of the training class means) and
AUROC. This is the "where is the concept encoded" curve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["Separability", "separability", "auroc"]


def auroc(pos: Float[Tensor, "n"], neg: Float[Tensor, "m"]) -> float:
    """Area under the ROC curve of scores ``pos`` (label 1) against ``neg`` (ties count 1/2).

    >>> auroc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0]))
    0.875
    """
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one score in each group.")
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@dataclass
class Separability:
    layers: list[int]
    accuracy: list[float]
    auroc: list[float]

    @property
    def best_layer(self) -> int:
        return self.layers[max(range(len(self.layers)), key=lambda j: (self.accuracy[j], self.auroc[j]))]

    def plot(self, ax=None, title: str = "separability"):
        from .plotting import layer_curve

        return layer_curve({"held-out accuracy": self.accuracy, "held-out AUROC": self.auroc},
                           self.layers, ylabel="score", title=title, ax=ax, mark_best="held-out accuracy")


def separability(
    pos: Float[Tensor, "n layer d"],
    neg: Float[Tensor, "m layer d"],
    layers: list[int] | None = None,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> Separability:
    """Per-layer held-out separability of two groups of activations (e.g. ``Activations.tensor``).

    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randn(20, 2, 8, generator=g) + 1, torch.randn(20, 2, 8, generator=g)
    >>> s = separability(a, b)
    >>> s.accuracy[0] > 0.7
    True
    """
    if pos.ndim != 3 or neg.ndim != 3 or pos.shape[1:] != neg.shape[1:]:
        raise ValueError(f"Expected [n, layer, d] tensors of the same layers/d, got {tuple(pos.shape)} and {tuple(neg.shape)}.")
    if min(len(pos), len(neg)) < 4:
        raise ValueError("Need at least 4 prompts per group to hold some out.")
    g = torch.Generator().manual_seed(seed)
    splits = []
    for x in (pos.float(), neg.float()):
        perm = torch.randperm(len(x), generator=g)
        k = max(1, int(len(x) * test_fraction))
        splits.append((x[perm[k:]], x[perm[:k]]))
    (ptr, pte), (ntr, nte) = splits
    accs, aucs = [], []
    for j in range(pos.shape[1]):
        mu_p, mu_n = ptr[:, j].mean(0), ntr[:, j].mean(0)
        w = mu_p - mu_n
        thr = ((mu_p + mu_n) / 2) @ w
        sp, sn = pte[:, j] @ w, nte[:, j] @ w
        accs.append(float(((sp > thr).sum() + (sn <= thr).sum()) / (len(sp) + len(sn))))
        aucs.append(auroc(sp, sn))
    return Separability(list(layers) if layers is not None else list(range(pos.shape[1])), accs, aucs)
