"""`PatchingResult`: a score per node, with labels, top-k, correlation, heatmap and saving."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..display import Rich
from .nodes import NodeSet

__all__ = ["PatchingResult", "pearson", "spearman"]


def pearson(a, b) -> float:
    """Pearson correlation of two flat arrays (NaNs dropped pairwise).

    >>> round(pearson([1, 2, 3], [2, 4, 7]), 3)
    0.993
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    # average ties
    vals, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return (sums / counts)[inv]


def spearman(a, b) -> float:
    """Spearman rank correlation (NaNs dropped pairwise).

    >>> spearman([1, 2, 3], [1, 5, 9])
    1.0
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    return pearson(_rank(a[ok]), _rank(b[ok]))


@dataclass(repr=False)
class PatchingResult(Rich):
    """Scores of one method on one node set.

    ``scores: Float[Tensor, "layer *units"]`` is the (estimated) normalised metric after
    patching each node, ``(patched - corrupt) / (clean - corrupt)``: in denoising 0 means no
    effect, in noising 1 means no effect. ``effects`` is the change from the base run.

    >>> import steer
    >>> from steer.patching import ioi_task, atp
    >>> m = steer.load("tiny-llama")
    >>> r = atp(m, ioi_task(m, n=2), "heads")
    >>> len(r.labels()) == r.scores.numel(), len(r.top_k(3))
    (True, 3)

    The views on hand-made scores (2 layers x 2 heads):

    >>> from steer.patching.nodes import NodeSet
    >>> heads = NodeSet("heads", "z", 2, ("pos", "head", "d_head"), (3, 2, 4), ("head",))
    >>> r = PatchingResult(torch.tensor([[0.25, 0.75], [-0.5, 0.0]]), heads, ["a", "b", "c"],
    ...                    method="activation", direction="denoising")
    >>> r.top_k(2)                                   # largest |effect| first
    [('z:L0 H1', 0.75), ('z:L1 H0', -0.5)]
    >>> r.top_k(1, by="neg"), r.top_indices(2), r.labels()[1]
    ([('z:L1 H0', -0.5)], [1, 2], {'layer': 0, 'head': 1, 'name': 'z:L0 H1'})
    >>> d = r.to_dict()                              # json.dumps-ready
    >>> d["shape"], d["labels"], d["scores"][0]
    ([2, 2], ['z:L0 H0', 'z:L0 H1', 'z:L1 H0', 'z:L1 H1'], [0.25, 0.75])
    """

    scores: Float[Tensor, "layer *units"]
    nodes: NodeSet
    tokens: list[str]
    method: str
    direction: str
    seconds: float = 0.0
    forward_equivalents: float = float("nan")
    meta: dict = field(default_factory=dict)

    # -- display ---------------------------------------------------------------------------
    def _title(self) -> str:
        return f"PatchingResult: {self.method} ({self.direction}) on {self.nodes.kind}"

    def _fields(self):
        f = [("nodes", f"{self.nodes.kind} at {self.nodes.site}, {' x '.join(map(str, self.nodes.shape))} "
                       f"({' x '.join(self.nodes.axes)})"),
             ("score", "(patched − corrupt) / (clean − corrupt)")]
        for k in ("task", "metric_clean", "metric_corrupt", "n_prompts"):
            if k in self.meta:
                f.append((k, self.meta[k]))
        f += [("seconds", round(self.seconds, 2)), ("forward equivalents", self.forward_equivalents)]
        return f

    def _table(self):
        labels, scores, effects = self.labels(), self.scores.flatten(), self.effects.flatten()
        return ["top nodes (|effect|)", "score", "effect"], [
            [labels[i]["name"], float(scores[i]), float(effects[i])] for i in self.top_indices(10)]

    def _figure(self):
        try:
            return self.plot()
        except ValueError:  # (no 2-D view of this node kind)
            return None

    # -- views -----------------------------------------------------------------------------
    @property
    def effects(self) -> Float[Tensor, "layer *units"]:
        """Normalised change caused by the patch (0 = none), in either direction.

        >>> from steer.patching.nodes import NodeSet
        >>> ns = NodeSet("heads", "z", 1, ("pos", "head", "d_head"), (3, 2, 4), ("head",))
        >>> PatchingResult(torch.tensor([[1.0, 0.25]]), ns, [], "activation", "noising").effects.tolist()
        [[0.0, -0.75]]
        """
        return self.scores if self.direction == "denoising" else self.scores - 1.0

    def labels(self) -> list[dict]:
        """One dict per node (row-major order of ``scores``): layer, head/pos/neuron, token, name."""
        out = []
        for idx in np.ndindex(*self.nodes.shape):
            d = dict(zip(self.nodes.axes, (int(i) for i in idx)))
            name = f"L{d['layer']}"
            if "pos" in d:
                d["token"] = self.tokens[d["pos"]] if d["pos"] < len(self.tokens) else ""
                name += f" P{d['pos']}{d['token']!r}"
            if "head" in d:
                name += f" H{d['head']}"
            if "neuron" in d:
                name += f" N{d['neuron']}"
            d["name"] = f"{self.nodes.site}:{name}"
            out.append(d)
        return out

    def top_k(self, k: int = 10, by: str = "abs") -> list[tuple[str, float]]:
        """The ``k`` nodes with the largest effect (``by="abs"``, ``"pos"`` or ``"neg"``).

        Returns ``[(name, effect), ...]`` best first.
        """
        eff = self.effects.flatten().double()
        key = {"abs": eff.abs(), "pos": eff, "neg": -eff}.get(by)
        if key is None:
            raise ValueError(f"by={by!r}: use 'abs', 'pos' or 'neg'.")
        key = torch.nan_to_num(key, nan=-float("inf"))
        idx = torch.argsort(key, descending=True)[:k]
        labels = self.labels()
        return [(labels[i]["name"], float(eff[i])) for i in idx.tolist()]

    def top_indices(self, k: int) -> list[int]:
        """Flat indices of the ``k`` largest ``|effect|``."""
        key = torch.nan_to_num(self.effects.flatten().double().abs(), nan=-1.0)
        return torch.argsort(key, descending=True)[:k].tolist()

    def correlation(self, other: "PatchingResult", absolute: bool = False) -> dict:
        """Pearson and Spearman correlation of effects with another result on the same nodes.

        ``absolute=True`` correlates ``|effect|`` (what ranking methods such as GradDrop estimate).

        >>> from steer.patching.nodes import NodeSet
        >>> ns = NodeSet("heads", "z", 2, ("pos", "head", "d_head"), (3, 2, 4), ("head",))
        >>> exact = PatchingResult(torch.tensor([[0.25, 0.75], [-0.5, 0.0]]), ns, [], "activation", "denoising")
        >>> approx = PatchingResult(torch.tensor([[0.5, 1.0], [-0.25, 0.0]]), ns, [], "atp", "denoising")
        >>> {k: round(v, 3) for k, v in approx.correlation(exact).items()}
        {'pearson': 0.975, 'spearman': 1.0}
        """
        if tuple(self.scores.shape) != tuple(other.scores.shape) or self.nodes.kind != other.nodes.kind:
            raise ValueError(f"{self.nodes.kind} {tuple(self.scores.shape)} vs {other.nodes.kind} "
                             f"{tuple(other.scores.shape)}: compare results for the same node set.")
        a, b = self.effects.flatten().numpy(), other.effects.flatten().numpy()
        if absolute:
            a, b = np.abs(a), np.abs(b)
        return {"pearson": pearson(a, b), "spearman": spearman(a, b)}

    # -- output ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready dict: scores (nested list), node labels, axes, timing, metadata."""
        return {
            "method": self.method,
            "direction": self.direction,
            "kind": self.nodes.kind,
            "site": self.nodes.site,
            "axes": list(self.nodes.axes),
            "shape": list(self.nodes.shape),
            "scores": _nan_to_none(self.scores.float().tolist()),  # NaN is not JSON
            "labels": [l["name"] for l in self.labels()],
            "tokens": self.tokens,
            "seconds": self.seconds,
            "forward_equivalents": self.forward_equivalents,
            "meta": self.meta,
        }

    def save(self, path) -> Path:
        """Save as JSON (``.json``) or a torch file (anything else). Returns the path.

        >>> import steer, tempfile, os
        >>> from steer.patching import ioi_task, atp
        >>> m = steer.load("tiny-llama"); r = atp(m, ioi_task(m, n=2), "heads")
        >>> r.save(os.path.join(tempfile.mkdtemp(), "r.json")).exists()
        True
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict()))
        else:
            torch.save({"result": self.to_dict(), "scores": self.scores}, path)
        return path

    def plot(self, path=None, ax=None, title: Optional[str] = None):
        """Heatmap: layer x head, layer x position (tokens on the axis) or layer x neuron.

        ``heads_by_pos`` results are summed over heads. Returns the figure; saves it at ``path``.

        >>> import os, tempfile
        >>> from steer.patching.nodes import NodeSet
        >>> ns = NodeSet("resid", "resid_pre", 2, ("pos", "d_model"), (3, 8), ("pos",))
        >>> r = PatchingResult(torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 1.0]]), ns,
        ...                    ["When", " Mary", " to"], "activation", "denoising")
        >>> path = os.path.join(tempfile.mkdtemp(), "resid.png")
        >>> fig = r.plot(path)
        >>> os.path.exists(path), [t.get_text() for t in fig.axes[0].get_xticklabels()]
        (True, ["'When'_0", "'␣Mary'_1", "'␣to'_2"])
        """
        from ..plotting import heatmap, token_labels

        eff = self.effects.float()
        axes = list(self.nodes.axes)
        if axes == ["layer", "pos", "head"]:
            eff, axes = eff.sum(-1), ["layer", "pos"]
        if eff.ndim != 2:
            raise ValueError(f"Cannot draw a heatmap of {self.nodes.kind} scores with shape {tuple(eff.shape)}.")
        fig = heatmap(eff.numpy(), xlabel=axes[1], ax=ax,
                      xticklabels=token_labels(self.tokens) if axes[1] == "pos" else None,
                      cbar_label="effect (fraction of clean − corrupt)",
                      title=title or f"{self.method} ({self.direction}) - {self.nodes.kind}")
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110)
        return fig


def _nan_to_none(x):
    """Nested lists with NaN replaced by None (strict JSON has no NaN)."""
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if x != x else x
