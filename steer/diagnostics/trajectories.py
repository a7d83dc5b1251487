"""Layer trajectories of prompts, grouped by task and by outcome (refused or not), and steering
toward a task's non-refusal trajectory ("SafeConstellations: Steering LLM Safety to Reduce
Over-Refusals Through Task-Specific Trajectory", METHODS.md §5).

A prompt's trajectory is its last-token ``resid_post`` at every layer. Layers differ in scale by
orders of magnitude, so each layer's points are centred on that layer's mean over all prompts and
divided by its RMS distance to it ("layer units"); distances and the shared 2-D projection (PCA of
all prompts at all layers in layer units) use them. Each task has a mean trajectory per outcome;
:meth:`Trajectories.distances` gives each prompt's distance to its task's refusal and
non-refusal trajectories, and :meth:`Trajectories.steering` a :class:`~steer.steering.Steering`
that moves prompts of the tasks marked prone to over-refusal from the refusal trajectory toward
the non-refusal one (``+ α (μ_comply − μ_refuse)`` at the chosen layers, per example; prompts of
other tasks are left alone).

>>> import steer
>>> m = steer.load("tiny-llama")
>>> prompts = [steer.Raw(t) for t in ["translate: cat", "translate: dog", "sentiment: nice", "sentiment: bad"]]
>>> tr = trajectories(m, prompts, tasks=["tr", "tr", "se", "se"], refused=[True, False, True, False])
>>> tr.points.shape, tr.projection.shape          # [prompt, layer, d_model], [prompt, layer, 2]
(torch.Size([4, 2, 64]), torch.Size([4, 2, 2]))
>>> tr.distances()["to_comply"].shape              # [prompt]: mean over layers, layer units
torch.Size([4])
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..data import prompt_list
from ..display import Rich

__all__ = ["trajectories", "Trajectories", "read_points"]


class Trajectories(Rich):
    """Result of :func:`trajectories`. ``points`` ``[prompt, layer, d_model]`` (the captured
    residuals), ``tasks`` and ``refused`` per prompt, ``center`` / ``scale`` per layer (layer
    units), ``projection`` ``[prompt, layer, 2]`` (shared PCA), ``means[(task, refused)]``
    ``[layer, d_model]``."""

    def __init__(self, model_name, layers, points, tasks, refused, texts):
        self.model_name, self.layers, self.points = model_name, layers, points
        self.tasks, self.refused, self.texts = list(tasks), list(refused), texts
        self.center = points.mean(0)  # [layer, d]
        self.scale = (points - self.center).norm(dim=-1).pow(2).mean(0).sqrt().clamp_min(1e-12)  # [layer]
        z = self.units(points).flatten(0, 1)
        self._mu = z.mean(0)
        _, _, V = torch.linalg.svd(z - self._mu, full_matrices=False)
        self._basis = V[:2].T  # [d, 2]
        self.projection = ((z - self._mu) @ self._basis).view(*points.shape[:2], -1)
        self.means = {}
        for t in sorted(set(self.tasks)):
            for r in (True, False):
                idx = [i for i, (tt, rr) in enumerate(zip(self.tasks, self.refused)) if tt == t and rr == r]
                if idx:
                    self.means[(t, r)] = points[idx].mean(0)

    def units(self, x: Float[Tensor, "... layer d_model"]) -> Tensor:
        """Residuals in layer units (centred and scaled per layer)."""
        return (x - self.center) / self.scale[:, None]

    def project(self, x: Float[Tensor, "... layer d_model"]) -> Tensor:
        """New trajectories in the same 2-D projection."""
        return (self.units(x) - self._mu) @ self._basis

    def distances(self, points: Optional[Tensor] = None, tasks: Optional[Sequence[str]] = None) -> dict:
        """Distance of each prompt (default: the fitted ones) to its task's refusal and
        non-refusal mean trajectories, per layer (``*_by_layer`` ``[prompt, layer]``) and averaged
        over layers (``to_refuse`` / ``to_comply`` ``[prompt]``), in layer units. NaN where the
        task has no prompt of that outcome."""
        points = self.points if points is None else points
        tasks = self.tasks if tasks is None else list(tasks)
        out = {}
        for name, r in (("to_refuse", True), ("to_comply", False)):
            d = torch.full(points.shape[:2], float("nan"))
            for i, t in enumerate(tasks):
                if (t, r) in self.means:
                    d[i] = (self.units(points[i]) - self.units(self.means[(t, r)])).norm(dim=-1)
            out[name + "_by_layer"], out[name] = d, d.mean(-1)
        return out

    def classify(self, points: Tensor) -> list[str]:
        """The task whose mean trajectory (both outcomes pooled) is nearest, for new prompts."""
        names = sorted(set(self.tasks))
        mu = torch.stack([self.points[[i for i, t in enumerate(self.tasks) if t == n]].mean(0) for n in names])
        d = (self.units(points)[:, None] - self.units(mu)[None]).norm(dim=-1).mean(-1)  # [prompt, task]
        return [names[int(j)] for j in d.argmin(-1)]

    def steering(self, model, tasks: Sequence[str], prone: Sequence[str], *, layers: Sequence[int],
                 strength: float = 1.0, include_sink: bool = False, base=None):
        """A :class:`~steer.steering.Steering` for prompts whose tasks are ``tasks`` (one per
        prompt, in the order they will be generated): those of a ``prone`` task get
        ``+ strength · (μ_comply − μ_refuse)`` of their task at each of ``layers``; others none.
        ``base``: a Steering whose interventions come first (e.g. the one that causes refusal)."""
        from ..interventions import Intervention
        from ..steering import Steering

        missing = [t for t in prone if (t, True) not in self.means or (t, False) not in self.means]
        if missing:
            raise ValueError(f"Tasks {missing} need fitted prompts of both outcomes (refused and not).")
        tasks = list(tasks)
        ivs = list(base.interventions) if base is not None else []
        at = [self.layers.index(l) for l in layers]
        for t in prone:
            rows = torch.tensor([strength if tt == t else 0.0 for tt in tasks])
            if not bool(rows.any()):
                continue
            v = torch.zeros(model.n_layers, model.d_model)
            v[list(layers)] = (self.means[(t, False)] - self.means[(t, True)])[at]
            ivs.append(Intervention("add", v, layers=list(layers), strength=rows, include_sink=include_sink))
        return Steering(model, ivs, condition=getattr(base, "condition", None))

    def to_dict(self) -> dict:
        d = self.distances()
        return {"model": self.model_name, "layers": self.layers, "tasks": self.tasks, "refused": self.refused,
                "projection": self.projection.tolist(), "to_refuse": d["to_refuse"].tolist(),
                "to_comply": d["to_comply"].tolist()}

    def plot(self, path=None, ax=None):
        """Each task's mean trajectory per outcome in the shared projection (solid: complied,
        dashed: refused), individual prompts faint; the first layer marked."""
        from ..plotting import PALETTE, plt, save

        fig, ax = plt.subplots(figsize=(6, 4.6)) if ax is None else (ax.figure, ax)
        for k, t in enumerate(sorted(set(self.tasks))):
            c = PALETTE[k % len(PALETTE)]
            for i in [i for i, tt in enumerate(self.tasks) if tt == t]:
                p = self.projection[i]
                ax.plot(p[:, 0], p[:, 1], color=c, lw=0.4, alpha=0.25, ls="--" if self.refused[i] else "-")
            for r in (False, True):
                if (t, r) in self.means:
                    p = self.project(self.means[(t, r)])
                    ax.plot(p[:, 0], p[:, 1], color=c, lw=2, ls="--" if r else "-",
                            label=f"{t} ({'refused' if r else 'complied'})")
                    ax.plot(p[0, 0], p[0, 1], "o", color=c, ms=4)
        ax.set_xlabel("PC 1 (layer units)")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.set_title(f"{self.model_name}: last-token trajectories through layers {self.layers[0]}–{self.layers[-1]}",
                     fontsize=9)
        if path is not None:
            fig.tight_layout()
            save(fig, path)
        return fig
    def _title(self) -> str:
        return f"Trajectories: {len(self.tasks)} prompts, {len(set(self.tasks))} tasks, {len(self.layers)} layers"

    def _table(self):
        d = self.distances()
        rows = []
        for t in sorted(set(self.tasks)):
            for r in (False, True):
                idx = [i for i, (tt, rr) in enumerate(zip(self.tasks, self.refused)) if tt == t and rr == r]
                if idx:
                    rows.append([t, "refused" if r else "complied", len(idx), float(d["to_refuse"][idx].nanmean()),
                                 float(d["to_comply"][idx].nanmean())])
        return ["task", "outcome", "prompts", "to refusal trajectory", "to non-refusal trajectory"], rows


def trajectories(model, prompts: Sequence, *, tasks: Sequence[str], refused: Sequence[bool], layers="all",
                 steering=None, batch_size: int = 32) -> Trajectories:
    """Capture each prompt's last-token ``resid_post`` at ``layers`` and group the trajectories by
    ``tasks`` (a label per prompt) and ``refused`` (per prompt: did the model refuse it? e.g.
    ``steer.evaluate.refusal_substring`` on its generation). ``steering``: a (not yet entered)
    :class:`~steer.steering.Steering` the prompts are read under, e.g. the one their refusals
    were generated with, whose edits apply to every prompt alike. See the module doc."""
    from ..sites import resolve_layers

    prompts = prompt_list(prompts)
    if not (len(prompts) == len(tasks) == len(refused)):
        raise ValueError(f"{len(prompts)} prompts, {len(tasks)} task labels, {len(refused)} refusal labels: "
                         "give one task and one refusal label per prompt.")
    labels = [r.item() if isinstance(r, (torch.Tensor, np.generic)) else r for r in refused]
    odd = [r for r in labels if not (isinstance(r, bool) or (isinstance(r, int) and r in (0, 1)))]
    if odd:  # bool() read None as complied and "no", "False" or 0.3 as refused
        raise ValueError(f"refused holds {odd[0]!r}: give each prompt True/False (or 1/0), e.g. from "
                         "steer.evaluate.refusal_substring on its generation.")
    layers = resolve_layers(model, layers)
    points = read_points(model, prompts, layers, steering=steering, batch_size=batch_size)
    return Trajectories(model.name, layers, points, tasks, [bool(r) for r in labels], [str(p) for p in prompts])


@torch.no_grad()
def read_points(model, prompts: Sequence, layers: Sequence[int], *, steering=None,
                batch_size: int = 32) -> Float[Tensor, "prompt layer d_model"]:
    """Last-token ``resid_post`` of each prompt at ``layers``, in the prompts' order. Under a
    ``steering`` (not yet entered; it may carry per-example strengths) all prompts form one batch."""
    from ..data import tokenize
    from ..hooks import add_hooks

    prompts = prompt_list(prompts)
    layers = list(layers)
    step = len(prompts) if steering is not None else batch_size
    out = []
    for c in range(0, len(prompts), step):
        b = tokenize(model, prompts[c: c + step]).to(model.device)
        got = {}
        hooks = [(f"resid_post.{l}", lambda act, site: got.__setitem__(site.layer, act[:, -1].float().cpu()))
                 for l in layers]
        ctx = steering if steering is not None else nullcontext()
        with ctx as s, add_hooks(model, hooks):
            if steering is not None:
                s.batch = b
            model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                     use_cache=False)
        out.append(torch.stack([got[l] for l in layers], 1))
    return torch.cat(out)

