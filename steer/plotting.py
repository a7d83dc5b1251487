"""Matplotlib figures, in one style. Each function takes an optional ``ax`` and returns the figure.

* Signed effects use a diverging map centred at zero (:data:`DIVERGING`, ``CenteredNorm``), so
  white is "no effect" whatever the range; the colour bar is labelled with what and in what unit.
* Probabilities and attention weights use a sequential map on a fixed 0–1 scale (:data:`SEQUENTIAL`).
* Lines use the colour-blind-safe Okabe–Ito palette (:data:`PALETTE`).
* Position axes carry :func:`token_labels`: whitespace made visible and each label suffixed with
  its position, so repeated tokens stay distinct (``'␣John'_7``).
* Layer is the vertical axis of heatmaps; head, position or neuron the horizontal one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import CenteredNorm

__all__ = ["PALETTE", "DIVERGING", "SEQUENTIAL", "token_labels", "heatmap", "attention", "layer_curve", "save"]

PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
DIVERGING = "RdBu_r"  # ColorBrewer RdBu: colour-blind safe, red = positive
SEQUENTIAL = "viridis"


def token_labels(tokens: Sequence[str]) -> list[str]:
    """Axis labels for tokens: spaces as ``␣``, newlines and tabs escaped, position appended.

    >>> token_labels([" John", " and", " John", "\\n"])
    ["'␣John'_0", "'␣and'_1", "'␣John'_2", "'\\\\n'_3"]
    """
    out = []
    for i, t in enumerate(tokens):
        t = t.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
        out.append(f"'{t}'_{i}")
    return out


def _fig_ax(ax, size):
    return (ax.figure, ax) if ax is not None else plt.subplots(figsize=size)


def heatmap(values, *, ylabel: str = "layer", xlabel: str = "", xticklabels: Optional[Sequence[str]] = None,
            cbar_label: str = "effect", title: str = "", signed: bool = True, ax=None):
    """A ``[rows, cols]`` heatmap: diverging and centred at zero when ``signed``, else 0–1.

    >>> fig = heatmap(np.array([[0.0, 0.5], [-1.0, 0.25]]), xlabel="head", cbar_label="effect (normalised)")
    >>> fig.axes[1].get_ylabel()
    'effect (normalised)'
    """
    v = np.asarray(values, dtype=float)
    fig, ax = _fig_ax(ax, (max(4.5, 1.5 + 0.4 * min(v.shape[1], 40)), max(3.0, 0.16 * v.shape[0] + 1.5)))
    if signed:
        lim = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 1.0
        im = ax.imshow(v, cmap=DIVERGING, norm=CenteredNorm(0.0, lim or 1.0), aspect="auto", interpolation="nearest")
    else:
        im = ax.imshow(v, cmap=SEQUENTIAL, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)))
        ax.set_xticklabels(list(xticklabels), rotation=90, fontsize=8)
    fig.colorbar(im, ax=ax, label=cbar_label)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def attention(pattern, tokens: Sequence[str], *, title: str = "", ax=None):
    """An attention pattern ``[query, key]`` on a 0–1 scale; the masked (future) triangle is blank.

    >>> import torch
    >>> p = torch.softmax(torch.randn(3, 3).masked_fill(torch.ones(3, 3).triu(1).bool(), -1e9), -1)
    >>> fig = attention(p, ["a", "b", "c"])
    >>> bool(np.isnan(fig.axes[0].images[0].get_array().filled(np.nan)[0, 2]))
    True
    """
    p = np.array(pattern, dtype=float)
    n = p.shape[0]
    p[np.triu(np.ones((n, p.shape[1]), dtype=bool), k=1 + p.shape[1] - n)] = np.nan
    labels = token_labels(tokens)
    fig, ax = _fig_ax(ax, (max(4.0, 0.35 * len(labels) + 2), max(3.5, 0.3 * len(labels) + 1.5)))
    cmap = plt.get_cmap(SEQUENTIAL).with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(p), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels[-n:], fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.colorbar(im, ax=ax, label="attention weight")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def layer_curve(
    curves: Mapping[str, Sequence[float]],
    layers: Sequence[int],
    *,
    ylabel: str = "score",
    title: str = "",
    ax: Optional[plt.Axes] = None,
    mark_best: Optional[str] = None,
):
    """One line per named curve over layers; ``mark_best`` puts a dot on that curve's maximum.

    >>> fig = layer_curve({"accuracy": [0.5, 0.9, 0.8]}, [0, 1, 2], mark_best="accuracy")
    """
    fig, ax = _fig_ax(ax, (6, 3.5))
    for i, (name, ys) in enumerate(curves.items()):
        ax.plot(list(layers), list(ys), marker=".", label=name, color=PALETTE[i % len(PALETTE)])
    if mark_best is not None:
        ys = list(curves[mark_best])
        j = max(range(len(ys)), key=ys.__getitem__)
        ax.scatter([layers[j]], [ys[j]], s=80, zorder=3, color="k", label=f"best: layer {layers[j]}")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def finish(fig, path: str | Path | None = None):
    """A ``plot(path=None)`` method's last step: save ``fig`` when a path is given, return it.

    >>> import os, tempfile
    >>> fig, ax = plt.subplots()
    >>> finish(fig) is fig                                   # no path: the figure, still open
    True
    >>> p = os.path.join(tempfile.mkdtemp(), "sub", "f.png")
    >>> finish(fig, p) is fig and os.path.getsize(p) > 0     # saved (folder made), then closed
    True
    """
    if path is not None:
        save(fig, path)
    return fig


def save(fig, path: str | Path) -> Path:
    """Save a figure as PNG (creating the folder) and close it.

    >>> import os, tempfile
    >>> fig, ax = plt.subplots()
    >>> save(fig, os.path.join(tempfile.mkdtemp(), "f.png")).suffix
    '.png'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
