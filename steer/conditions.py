"""Conditional activation steering (CAST, "Programming Refusal with Conditional Activation Steering").

A :class:`Condition` reads the prompt's mean hidden state ``h`` (``resid_post`` at its layer,
averaged over the prompt's real tokens except the attention sink) and fires when a score is on
the chosen side of a threshold. Scores:

* ``"projection"``: ``h·ĉ`` (Latent-Guard style linear read-out);
* ``"cast"``: CAST's ``cos(h, tanh((h·ĉ) ĉ))``;
* ``"probe"``: ``w·h + b``, ``w`` a logistic probe's weights and ``b`` centring the fitting
  prompts' scores at 0 (not the probe's intercept: the threshold is grid-searched on these scores,
  so an intercept would only move it).

:func:`fit_condition` extracts the condition vector from labelled prompts and grid-searches
``(layer, threshold, side)`` for the best F1 on out-of-fold scores (cross-validation), or picks
the layer by AUROC and sets the threshold for a target recall. Conditions combine with ``&``,
``|`` and ``~`` into rules. Passed to :class:`~steer.steering.Steering` (``condition=``), a
condition gates each example of a batch separately, once per sequence, at prefill.

>>> import steer, torch
>>> from steer.conditions import Condition
>>> c = Condition(torch.tensor([1.0] + [0.0] * 63), layer=1, threshold=0.0)
>>> rule = c | ~c
>>> rule.evaluate({1: torch.tensor([[2.0] + [0.0] * 63, [-1.0] + [0.0] * 63])}).tolist()
[True, True]
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .display import Rich
from .evaluate import accuracy, auroc, f1
from .interventions import unit
from .sites import _is_index

__all__ = ["Condition", "Rule", "fit_condition", "fit_condition_on", "grid_search", "condition_scores"]

KINDS = ("projection", "cast", "probe")


class _Logic(Rich):
    """and/or/not combinators shared by conditions and rules."""

    def __and__(self, other) -> "Rule":
        return Rule("and", [self, other])

    def __or__(self, other) -> "Rule":
        return Rule("or", [self, other])

    def __invert__(self) -> "Rule":
        return Rule("not", [self])

    def predict(self, model, prompts, batch_size: int = 32) -> Bool[Tensor, "batch"]:
        """Whether the condition fires on each prompt (reads the prompt means itself).

        >>> import steer, torch
        >>> m = steer.load("tiny-llama")
        >>> Condition(torch.randn(64), layer=1, threshold=-1e9).predict(m, ["Hi", "Yo"]).tolist()
        [True, True]
        """
        from .steering import prompt_means

        layers = sorted(self.layers)
        h = prompt_means(model, prompts, layers=layers, batch_size=batch_size)
        return self.evaluate({l: h[:, j] for j, l in enumerate(layers)})


@dataclass(repr=False)
class Condition(_Logic):
    """A CAST condition: fires when ``score(h)`` is above (``side="above"``) or below a threshold.

    >>> import torch
    >>> c = Condition(torch.tensor([0.0, 1.0]), layer=0, threshold=0.5)
    >>> c.fires(torch.tensor([[0.0, 1.0], [0.0, 0.0]])).tolist()
    [True, False]
    """

    vector: Float[Tensor, "d_model"]
    layer: int
    threshold: float = 0.0
    side: str = "above"
    kind: str = "projection"
    bias: float = 0.0
    meta: dict = field(default_factory=dict)
    last_scores: Optional[Tensor] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.vector = torch.as_tensor(self.vector).detach().float()
        if self.vector.ndim != 1:
            raise ValueError(f"A condition vector is [d_model], got {tuple(self.vector.shape)}.")
        unit(self.vector)  # raises on zero/NaN
        if self.side not in ("above", "below"):
            raise ValueError(f"side={self.side!r}: use 'above' or 'below'.")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: use one of {KINDS}.")
        if not _is_index(self.layer) or operator.index(self.layer) < 0:
            raise ValueError(f"layer={self.layer!r}: a condition reads one layer, an index from 0 (count from the "
                             "first block; negative indices are not resolved against a model here).")
        self.layer = operator.index(self.layer)

    @property
    def layers(self) -> list[int]:
        return [self.layer]

    def score(self, h: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch"]:
        """The condition score of prompt-mean hidden states ``h``."""
        return condition_scores(h, self.vector, self.kind, self.bias)

    def fires(self, h: Float[Tensor, "batch d_model"]) -> Bool[Tensor, "batch"]:
        """Whether the condition holds for each row of ``h``."""
        s = self.score(h)
        self.last_scores = s
        return s > self.threshold if self.side == "above" else s < self.threshold

    def evaluate(self, hs: dict[int, Tensor]) -> Bool[Tensor, "batch"]:
        """``fires`` on ``hs[self.layer]`` (``hs``: layer → ``[batch, d_model]``)."""
        if self.layer not in hs:
            raise KeyError(f"Condition needs layer {self.layer}; got layers {sorted(hs)}.")
        return self.fires(hs[self.layer])

    def _fields(self):
        f = [("fires when", f"{self.kind} score {'>' if self.side == 'above' else '<'} {self.threshold:.4g}"),
             ("layer", self.layer), ("‖vector‖", float(self.vector.norm()))]
        if self.bias:
            f.append(("bias", self.bias))
        return f + [(k, v) for k, v in self.meta.items() if isinstance(v, (str, int, float))]

    def _table(self):
        if self.last_scores is None:
            return None
        s = self.last_scores.float()
        fires = (s > self.threshold) if self.side == "above" else (s < self.threshold)
        return ["last prompts", "n", "fired", "min score", "max score"], \
            [["scores", len(s), int(fires.sum()), float(s.min()), float(s.max())]]

    def to_dict(self) -> dict:
        return {"vector": self.vector.tolist(), "layer": self.layer, "threshold": self.threshold,
                "side": self.side, "kind": self.kind, "bias": self.bias, "meta": self.meta}

    def save(self, path: Union[str, Path]) -> None:
        """Save as JSON (written atomically)."""
        from .capture import _atomic

        _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(self.to_dict())))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Condition":
        d = json.loads(Path(path).read_text())
        return cls(torch.tensor(d["vector"]), d["layer"], d["threshold"], d["side"], d["kind"], d["bias"], d["meta"])


@dataclass(repr=False)
class Rule(_Logic):
    """Conditions combined with ``"and"``, ``"or"`` or ``"not"``.

    >>> import torch
    >>> a = Condition(torch.tensor([1.0, 0.0]), layer=0)
    >>> b = Condition(torch.tensor([0.0, 1.0]), layer=0)
    >>> (a & ~b).evaluate({0: torch.tensor([[1.0, -1.0], [1.0, 1.0]])}).tolist()
    [True, False]
    """

    op: str
    parts: list

    def __post_init__(self):
        if self.op not in ("and", "or", "not"):
            raise ValueError(f"op={self.op!r}: use 'and', 'or' or 'not'.")
        if self.op == "not" and len(self.parts) != 1:
            raise ValueError("'not' takes exactly one condition.")
        if not self.parts:
            raise ValueError("A rule needs at least one condition.")

    @property
    def layers(self) -> list[int]:
        return sorted({l for p in self.parts for l in p.layers})

    def _describe(self) -> str:
        def one(p):
            if isinstance(p, Rule):
                return f"({p._describe()})"
            return f"{p.kind}@L{p.layer} {'>' if p.side == 'above' else '<'} {p.threshold:.3g}"
        return f"not {one(self.parts[0])}" if self.op == "not" else f" {self.op} ".join(one(p) for p in self.parts)

    def _fields(self):
        return [("rule", self._describe()), ("layers", self.layers)]

    def evaluate(self, hs: dict[int, Tensor]) -> Bool[Tensor, "batch"]:
        vals = [p.evaluate(hs) for p in self.parts]
        if self.op == "not":
            return ~vals[0]
        out = vals[0]
        for v in vals[1:]:
            out = out & v if self.op == "and" else out | v
        return out


def condition_scores(
    h: Float[Tensor, "batch d_model"], vector: Float[Tensor, "d_model"], kind: str = "projection", bias: float = 0.0
) -> Float[Tensor, "batch"]:
    """Scores of hidden states under a condition vector (see the module docstring).

    >>> import torch
    >>> condition_scores(torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 0.0])).tolist()
    [3.0]
    """
    h = torch.as_tensor(h).float()
    v = vector.to(h.device).float()
    if h.shape[-1] != v.shape[-1]:
        raise ValueError(f"Hidden states have d_model {h.shape[-1]}, the condition vector {v.shape[-1]}.")
    if not torch.isfinite(h).all():
        raise ValueError("Hidden states contain NaN/inf.")
    if kind == "projection":
        return h @ unit(v)
    if kind == "probe":
        return h @ v + bias
    if kind == "cast":
        u = unit(v)
        proj = torch.tanh((h @ u)[:, None] * u[None, :])
        return torch.nn.functional.cosine_similarity(h, proj, dim=-1)
    raise ValueError(f"kind={kind!r}: use one of {KINDS}.")


def grid_search(
    scores: Float[Tensor, "n"],
    labels: Bool[Tensor, "n"],
    sides: Sequence[str] = ("above", "below"),
    recall: Optional[float] = None,
) -> dict:
    """Best ``(threshold, side)`` for labelled scores.

    By default (CAST) the threshold maximises F1 (ties: accuracy) over midpoints of the sorted
    scores. With ``recall=r`` it is instead the most conservative threshold that still fires on a
    fraction ``r`` of the positives (midway between the ``⌈r·n⌉``-th and next positive score,
    on the side where positives score higher): it trades a little recall for fewer false fires
    when unseen negatives drift towards the positives.

    >>> import torch
    >>> g = grid_search(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1]).bool())
    >>> g["side"], round(g["threshold"], 2), g["f1"]
    ('above', 0.5, 1.0)
    >>> g = grid_search(torch.tensor([0.1, 0.2, 0.6, 0.8, 0.9, 1.0]), torch.tensor([0, 0, 1, 1, 1, 1]).bool(),
    ...                 recall=0.75)
    >>> round(g["threshold"], 2), g["recall"]
    (0.7, 0.75)
    """
    s = torch.as_tensor(scores).float().flatten()
    y = torch.as_tensor(labels).bool().flatten()
    if s.numel() != y.numel() or s.numel() == 0:
        raise ValueError(f"grid_search got {s.numel()} scores and {y.numel()} labels.")
    if bool(y.all()) or not bool(y.any()):
        raise ValueError("grid_search needs both positive and negative labels: the labelled set is one-sided.")
    if recall is not None:
        if not 0 < recall <= 1:
            raise ValueError(f"recall={recall}: pass a fraction in (0, 1].")
        side = sides[0] if len(sides) == 1 else "above" if auroc(s, y) >= 0.5 else "below"
        sign = 1.0 if side == "above" else -1.0
        pos = (sign * s[y]).sort(descending=True).values
        k = max(1, math.ceil(recall * len(pos) - 1e-9))
        below = pos[pos < pos[k - 1]]  # the next lower score: positives tied with the k-th stay in
        lo = below[0] if len(below) else pos[k - 1] - 1e-3
        t = sign * float((pos[k - 1] + lo) / 2)
        candidates = [(side, t)]
    else:
        u = torch.unique(s)
        cands = torch.cat([u[:1] - 1e-3, (u[1:] + u[:-1]) / 2, u[-1:] + 1e-3]).tolist()
        candidates = [(side, t) for side in sides for t in cands]
    best = None
    for side, t in candidates:
        pred = s > t if side == "above" else s < t
        key = (f1(pred, y), accuracy(pred, y))
        if best is None or key > best[0]:
            best = (key, t, side, pred)
    (f, acc), t, side, pred = best
    return {"threshold": float(t), "side": side, "f1": f, "accuracy": acc,
            "recall": float(pred[y].float().mean()), "false_fires": float(pred[~y].float().mean())}


def fit_condition(
    model,
    positive: Sequence,
    negative: Sequence,
    *,
    layers="all",
    method: str = "mean_diff",
    kind: str = "projection",
    folds: int = 5,
    val_frac: Optional[float] = None,
    select: str = "f1",
    recall: Optional[float] = None,
    augment: Optional[Callable[[list], list]] = None,
    seed: int = 0,
    batch_size: int = 32,
) -> Condition:
    """Fit a condition on labelled prompts (CAST's grid search, cross-validated).

    For every layer, condition vectors (``method`` as in :mod:`steer.directions`; a logistic
    probe for ``kind="probe"``) are fitted on ``folds - 1`` folds and score the held-out fold,
    giving out-of-fold scores for every prompt (``val_frac`` instead holds out one split of that
    size). The layer is the best by ``select`` — ``"f1"`` (CAST; ties: accuracy) or ``"auroc"``
    (threshold-free; ties: F1) — its ``(threshold, side)`` come from :func:`grid_search` on the
    out-of-fold scores (F1, or a target ``recall``), and the final vector is refitted on all
    prompts at that layer.

    ``augment`` maps a list of prompts to one variant of each (e.g. :func:`steer.data.casual`):
    variants join the training and held-out folds of their original, so held-out scores measure
    transfer to the other style too.

    ``meta["grid"]`` holds the per-layer out-of-fold results, ``meta["val_f1"]``,
    ``meta["val_accuracy"]``, ``meta["val_auroc"]`` the chosen layer's.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> c = fit_condition(m, ["kill him", "steal it", "hurt them"], ["bake bread", "sing a song", "plant trees"],
    ...                   folds=3)
    >>> c.layer in (0, 1), len(c.meta["grid"])
    (True, 2)
    """
    from .capture import prompts_hash
    from .sites import resolve_layers
    from .steering import prompt_means

    positive, negative = list(positive), list(negative)
    if len(positive) < 2 or len(negative) < 2:
        raise ValueError(
            f"fit_condition needs at least 2 prompts per side (got {len(positive)} positive, "
            f"{len(negative)} negative): the labelled set is empty or one-sided."
        )
    if select not in ("f1", "auroc"):
        raise ValueError(f"select={select!r}: use 'f1' or 'auroc'.")
    if kind == "probe":
        method = "probe"
    layer_list = resolve_layers(model, layers)
    prompts = positive + negative
    y_all = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).bool()
    h = prompt_means(model, prompts, layer_list, batch_size)  # [n, layer, d]
    h_aug = None
    if augment is not None:
        variants = list(augment(prompts))
        if len(variants) != len(prompts):
            raise ValueError(f"augment returned {len(variants)} prompts for {len(prompts)}: return one variant each.")
        h_aug = prompt_means(model, variants, layer_list, batch_size)
    meta = {"model": model.name, "augmented": augment is not None, "data_hash": prompts_hash(positive + negative)}
    return fit_condition_on(h, y_all, layer_list, method=method, kind=kind, folds=folds, val_frac=val_frac,
                            select=select, recall=recall, seed=seed, h_aug=h_aug, meta=meta)


def fit_condition_on(
    h: Float[Tensor, "n layer d"], y_all: Bool[Tensor, "n"], layer_list: Sequence[int], *, method: str = "mean_diff",
    kind: str = "projection", folds: int = 5, val_frac: Optional[float] = None, select: str = "f1",
    recall: Optional[float] = None, seed: int = 0, h_aug: Optional[Tensor] = None, meta: Optional[dict] = None,
) -> Condition:
    """:func:`fit_condition` on prompt means already computed (``h``: CAST's statistic, mean
    ``resid_post`` over each prompt's tokens but the sink, at ``layer_list``; ``y_all``: which
    rows are positive), e.g. read from an :class:`~steer.store.ActivationStore`.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> h = torch.cat([torch.randn(6, 2, 8, generator=g) + 2, torch.randn(6, 2, 8, generator=g)])  # [n, layer, d]
    >>> c = fit_condition_on(h, torch.arange(12) < 6, [0, 1], folds=3)
    >>> c.layer in (0, 1), c.meta["val_f1"] == 1.0
    (True, True)
    """
    from .directions import _probe, from_activations

    if h.ndim != 3 or h.shape[1] != len(layer_list):
        raise ValueError(f"h has shape {tuple(h.shape)}: it needs [n, {len(layer_list)}, d_model], one column per "
                         f"layer of layer_list={list(layer_list)}, in that order.")
    if h_aug is not None and h_aug.shape != h.shape:
        raise ValueError(f"h_aug has shape {tuple(h_aug.shape)}; h has {tuple(h.shape)}: one variant per prompt.")
    if kind == "probe":
        method = "probe"
    if select not in ("f1", "auroc"):
        raise ValueError(f"select={select!r}: use 'f1' or 'auroc'.")
    augment = h_aug is not None
    fold = _fold_ids(y_all, folds, val_frac, seed)

    def rows(mask):  # activations and labels of the prompts in ``mask`` (and their variants)
        x, y = h[mask], y_all[mask]
        if augment:
            x, y = torch.cat([x, h_aug[mask]]), torch.cat([y, y])
        return x, y

    def fit(x, y, j):  # (vector, bias) at layer index j
        if method == "probe":
            w = _probe(x[y, j], x[~y, j])
            return w, float(-(x[:, j] @ w).mean())
        return from_activations(x[y][:, [j]], x[~y][:, [j]], method)[0], 0.0

    oof = {j: ([], []) for j in range(len(layer_list))}
    for k in sorted(set(fold.tolist()) - {-1}):
        xt, yt = rows(fold != k)
        xv, yv = rows(fold == k)
        if yt.all() or not yt.any():
            raise ValueError("A training fold is one-sided; pass more prompts or fewer folds.")
        for j in range(len(layer_list)):
            v, b = fit(xt, yt, j)
            oof[j][0].append(condition_scores(xv[:, j], v, kind, b))
            oof[j][1].append(yv)
    grid, best = [], None
    for j, layer in enumerate(layer_list):
        sc, yy = torch.cat(oof[j][0]), torch.cat(oof[j][1])
        r = grid_search(sc, yy, recall=recall)
        r.update(layer=layer, auroc=auroc(sc, yy) if r["side"] == "above" else auroc(-sc, yy))
        grid.append(r)
        key = (r["f1"], r["accuracy"]) if select == "f1" else (r["auroc"], r["f1"])
        if best is None or key > best[0]:
            best = (key, j, r)
    _, j, r = best
    v, bias = fit(*rows(torch.ones(len(y_all), dtype=torch.bool)), j)
    meta = {**(meta or {}), "method": method, "val_f1": r["f1"], "val_accuracy": r["accuracy"],
            "val_auroc": r["auroc"], "select": select, "recall_target": recall, "folds": folds if val_frac is None else 1,
            "augmented": augment, "grid": grid}
    return Condition(v, r["layer"], r["threshold"], r["side"], kind, bias, meta)


def _fold_ids(y: Bool[Tensor, "n"], folds: int, val_frac: Optional[float], seed: int) -> Tensor:
    """Stratified fold id per example; with ``val_frac`` one held-out fold (0) and the rest -1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(len(y), dtype=torch.long)
    for cls in (True, False):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        if val_frac is not None:
            k = max(1, round(len(idx) * val_frac))
            if k >= len(idx):
                raise ValueError("Too few prompts to hold out a validation split; pass more or lower val_frac.")
            ids[idx] = -1
            ids[idx[:k]] = 0
        else:
            n_folds = min(folds, len(idx))
            if n_folds < 2:
                raise ValueError("Cross-validation needs at least 2 prompts per side and folds >= 2.")
            ids[idx] = torch.arange(len(idx)) % n_folds
    return ids
