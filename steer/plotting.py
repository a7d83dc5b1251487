"""Matplotlib figures. Each function takes an optional ``ax`` and returns the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt

__all__ = ["layer_curve", "save"]


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
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    for name, ys in curves.items():
        ax.plot(list(layers), list(ys), marker=".", label=name)
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


def save(fig, path: str | Path) -> Path:
    """Save a figure as PNG (creating the folder) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
