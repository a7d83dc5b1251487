"""Conditional activation steering (CAST, "Programming Refusal with Conditional Activation Steering").

A :class:`Condition` reads the prompt's mean hidden state ``h`` (``resid_post`` at its layer,
averaged over the prompt's real tokens except the attention sink) and fires when a score is on
the chosen side of a threshold. Scores:

* ``"projection"``: ``h·ĉ`` (Latent-Guard style linear read-out);
* ``"cast"``: CAST's ``cos(h, tanh((h·ĉ) ĉ))``;
* ``"probe"``: a logistic probe's logit ``w·h + b``.

:func:`fit_condition` extracts the condition vector from labelled prompts and grid-searches
``(layer, threshold, side)`` for the best F1 on a held-out split. Conditions combine with ``&``,
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .evaluate import accuracy, f1
from .interventions import unit

__all__ = ["Condition", "Rule", "fit_condition", "grid_search", "condition_scores"]

KINDS = ("projection", "cast", "probe")


class _Logic:
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


@dataclass
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

    def to_dict(self) -> dict:
        return {"vector": self.vector.tolist(), "layer": self.layer, "threshold": self.threshold,
                "side": self.side, "kind": self.kind, "bias": self.bias, "meta": self.meta}

    def save(self, path: Union[str, Path]) -> None:
        """Save as JSON."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Condition":
        d = json.loads(Path(path).read_text())
        return cls(torch.tensor(d["vector"]), d["layer"], d["threshold"], d["side"], d["kind"], d["bias"], d["meta"])


@dataclass
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
    scores: Float[Tensor, "n"], labels: Bool[Tensor, "n"], sides: Sequence[str] = ("above", "below")
) -> dict:
    """Best ``(threshold, side)`` for F1 (ties: accuracy) over midpoints of the sorted scores.

    >>> import torch
    >>> g = grid_search(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1]).bool())
    >>> g["side"], round(g["threshold"], 2), g["f1"]
    ('above', 0.5, 1.0)
    """
    s = torch.as_tensor(scores).float().flatten()
    y = torch.as_tensor(labels).bool().flatten()
    if s.numel() != y.numel() or s.numel() == 0:
        raise ValueError(f"grid_search got {s.numel()} scores and {y.numel()} labels.")
    if bool(y.all()) or not bool(y.any()):
        raise ValueError("grid_search needs both positive and negative labels: the labelled set is one-sided.")
    u = torch.unique(s)
    cands = torch.cat([u[:1] - 1e-3, (u[1:] + u[:-1]) / 2, u[-1:] + 1e-3])
    best = None
    for side in sides:
        for t in cands.tolist():
            pred = s > t if side == "above" else s < t
            key = (f1(pred, y), accuracy(pred, y))
            if best is None or key > best[0]:
                best = (key, t, side)
    (f, acc), t, side = best
    return {"threshold": float(t), "side": side, "f1": f, "accuracy": acc}


def fit_condition(
    model,
    positive: Sequence,
    negative: Sequence,
    *,
    layers="all",
    method: str = "mean_diff",
    kind: str = "projection",
    val_frac: float = 0.3,
    seed: int = 0,
    batch_size: int = 32,
) -> Condition:
    """Fit a condition on labelled prompts: condition vectors from a training split (``method``
    as in :mod:`steer.directions`), then a grid search over layer × threshold × side maximising F1
    on the held-out split. ``meta["grid"]`` holds the per-layer results, ``meta["val_f1"]`` /
    ``meta["val_accuracy"]`` the chosen one's.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> c = fit_condition(m, ["kill him", "steal it", "hurt them"], ["bake bread", "sing a song", "plant trees"],
    ...                   val_frac=0.34)
    >>> c.layer in (0, 1)
    True
    """
    from .capture import prompts_hash
    from .directions import _probe, from_activations
    from .sites import resolve_layers
    from .steering import prompt_means

    positive, negative = list(positive), list(negative)
    if len(positive) < 2 or len(negative) < 2:
        raise ValueError(
            f"fit_condition needs at least 2 prompts per side (got {len(positive)} positive, "
            f"{len(negative)} negative): the labelled set is empty or one-sided."
        )
    layer_list = resolve_layers(model, layers)
    hp = prompt_means(model, positive, layer_list, batch_size)
    hn = prompt_means(model, negative, layer_list, batch_size)
    g = torch.Generator().manual_seed(seed)
    ip, ineg = torch.randperm(len(hp), generator=g), torch.randperm(len(hn), generator=g)
    kp, kn = max(1, round(len(hp) * val_frac)), max(1, round(len(hn) * val_frac))
    tr_p, va_p, tr_n, va_n = hp[ip[kp:]], hp[ip[:kp]], hn[ineg[kn:]], hn[ineg[:kn]]
    if len(tr_p) == 0 or len(tr_n) == 0:
        raise ValueError("Too few prompts to hold out a validation split; pass more or lower val_frac.")
    y = torch.cat([torch.ones(len(va_p)), torch.zeros(len(va_n))]).bool()
    if kind == "probe":
        method = "probe"
    vecs = from_activations(tr_p, tr_n, "mean_diff" if method == "probe" else method)
    grid, best = [], None
    for j, layer in enumerate(layer_list):
        bias = 0.0
        v = vecs[j]
        if kind == "probe":
            x = torch.cat([tr_p[:, j], tr_n[:, j]])
            w = _probe(tr_p[:, j], tr_n[:, j])
            v = w
            bias = float(-(x @ w).mean())
        s = condition_scores(torch.cat([va_p[:, j], va_n[:, j]]), v, kind, bias)
        r = grid_search(s, y)
        r.update(layer=layer)
        grid.append(r)
        if best is None or (r["f1"], r["accuracy"]) > (best[0]["f1"], best[0]["accuracy"]):
            best = (r, v, bias)
    r, v, bias = best
    meta = {"model": model.name, "method": method, "val_f1": r["f1"], "val_accuracy": r["accuracy"],
            "grid": grid, "data_hash": prompts_hash(positive + negative)}
    return Condition(v, r["layer"], r["threshold"], r["side"], kind, bias, meta)
