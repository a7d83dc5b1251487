"""Massive activations (Sun et al., "Massive Activations in Large Language Models", 2024).

A very few entries of the residual stream are orders of magnitude larger than the rest: at a few
fixed dimensions, on the first token or on delimiter tokens, nearly whatever the input. They act
as biases and draw attention onto their tokens (attention sinks). :func:`massive_activations`
finds them in one forward per batch: per layer and prompt the ``k`` largest ``|a|`` with their
position (in the prompt's own tokens, pads excluded) and dimension, the median ``|a|``, and per
dimension the largest ``|a|`` over tokens, whose spread across prompts says whether an outlier
depends on the input. An entry is *massive* when ``|a| ≥ min_value`` and ``|a| ≥ min_ratio ×``
the median of its prompt and layer (the paper: above 100 and about 1,000x the median). With
``attention=True`` a second pass (eager attention, the model's own weights) measures how much
attention each head puts on each prompt's massive positions, next to what uniform causal
attention would put there.

>>> import steer
>>> r = massive_activations(steer.load("tiny-llama"), ["Hello there", "The sky is blue"], min_value=0.0, min_ratio=3.0)
>>> r.top_values.shape, r.attention_mass.shape          # [prompt, layer, k], [layer, head]
(torch.Size([2, 2, 5]), torch.Size([2, 4]))
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..data import prompt_list, tokenize
from ..display import Rich
from ..hooks import add_hooks
from ..progress import bar
from ..sites import Site, resolve_layers

__all__ = ["massive_activations", "MassiveActivations", "exclusion"]


class MassiveActivations(Rich):
    """What :func:`massive_activations` found.

    ``top_values/top_positions/top_dims`` ``[prompt, layer, k]``: the ``k`` largest ``|a|`` per
    prompt and layer (signed values; positions count the prompt's own tokens from 0, the first
    real token). ``median`` ``[prompt, layer]``: the median ``|a|`` over the prompt's tokens and
    dimensions. ``dim_max`` ``[prompt, layer, d_model]``: the largest ``|a|`` of each dimension.
    ``entries``: one row per (layer, dimension) that is massive in at least one prompt.
    ``attention_mass`` ``[layer, head]``: mean attention of a query on its prompt's massive
    positions (``uniform_mass``: the same for uniform causal attention), or ``None``.
    """

    def __init__(self, model_name, layers, tokens, token_ids, top_values, top_positions, top_dims, median, dim_max,
                 min_value, min_ratio, attention_mass=None, uniform_mass=None):
        self.model_name, self.layers, self.tokens, self.token_ids = model_name, list(layers), tokens, token_ids
        self.top_values, self.top_positions, self.top_dims = top_values, top_positions, top_dims
        self.median, self.dim_max = median, dim_max
        self.min_value, self.min_ratio = min_value, min_ratio
        self.attention_mass, self.uniform_mass = attention_mass, uniform_mass
        self.entries = self._entries()

    # -- what is massive ------------------------------------------------------------------
    @property
    def is_massive(self) -> Tensor:
        """``[prompt, layer, k]``: which of the top entries pass both criteria."""
        a = self.top_values.abs()
        return (a >= self.min_value) & (a >= self.min_ratio * self.median[..., None])

    def _entries(self) -> list[dict]:
        hit = self.is_massive
        n = len(self.tokens)
        rows = []
        for j, layer in enumerate(self.layers):
            dims = sorted({int(d) for d in self.top_dims[:, j][hit[:, j]].tolist()})
            for d in dims:
                sel = hit[:, j] & (self.top_dims[:, j] == d)
                prompts = sel.any(-1)
                pos = self.top_positions[:, j][sel].tolist()
                toks = Counter(self.tokens[i][p] for i, p in zip(sel.nonzero()[:, 0].tolist(), pos))
                across = self.dim_max[:, j, d]  # this dimension's largest |a| in every prompt
                rows.append({
                    "layer": layer, "dim": d, "prompts": int(prompts.sum()), "of": n,
                    "positions": sorted(set(pos)), "tokens": [t for t, _ in toks.most_common(3)],
                    "max_abs": float(self.top_values[:, j][sel].abs().max()),
                    "ratio_to_median": float((self.top_values[:, j].abs() / self.median[:, j, None])[sel].max()),
                    "cv_across_prompts": float(across.std() / across.mean()) if n > 1 else float("nan"),
                })
        return rows

    def positions(self, prompt: int) -> list[int]:
        """The massive positions of one prompt (any layer), counted in its own tokens."""
        hit = self.is_massive[prompt]
        return sorted({int(p) for p in self.top_positions[prompt][hit].tolist()})

    @property
    def dims(self) -> list[int]:
        """The dimensions that are massive at some layer in some prompt."""
        return sorted({e["dim"] for e in self.entries})

    @property
    def massive_token_ids(self) -> set[int]:
        """Token ids that carry a massive activation at some position other than the first."""
        return {self.token_ids[i][p] for i in range(len(self.tokens)) for p in self.positions(i) if p > 0}

    def peak(self) -> dict:
        """The single largest activation: layer, prompt, position, token, dimension, value, ratio."""
        a = self.top_values[..., 0].abs()
        i, j = divmod(int(a.argmax()), a.shape[1])
        p = int(self.top_positions[i, j, 0])
        return {"layer": self.layers[j], "prompt": i, "position": p, "token": self.tokens[i][p],
                "dim": int(self.top_dims[i, j, 0]), "value": float(self.top_values[i, j, 0]),
                "median": float(self.median[i, j]), "ratio": float(a[i, j] / self.median[i, j])}

    def to_dict(self) -> dict:
        out = {"model": self.model_name, "layers": self.layers, "min_value": self.min_value,
               "min_ratio": self.min_ratio, "peak": self.peak(), "entries": self.entries,
               "top1_abs_by_layer": self.top_values[..., 0].abs().max(0).values.tolist(),
               "median_by_layer": self.median.median(0).values.tolist()}
        if self.attention_mass is not None:
            out["attention_mass"] = self.attention_mass.tolist()
            out["uniform_mass"] = self.uniform_mass.tolist()
        return out

    # -- display --------------------------------------------------------------------------
    def plot(self, path=None):
        """Top-1 and median ``|a|`` per layer (log scale) and, if measured, each head's attention
        on the massive positions."""
        from ..plotting import PALETTE, finish, heatmap, plt

        cols = 2 if self.attention_mass is not None else 1
        fig, axes = plt.subplots(1, cols, figsize=(5.2 * cols, 3.6), squeeze=False)
        ax = axes[0, 0]
        top = self.top_values[..., 0].abs()
        ax.plot(self.layers, top.max(0).values, marker=".", color=PALETTE[3], label="largest |a| (max over prompts)")
        ax.plot(self.layers, self.median.median(0).values, marker=".", color=PALETTE[0], label="median |a|")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("|activation| (resid_post)")
        pk = self.peak()
        ax.set_title(f"{self.model_name}: peak {pk['value']:,.0f} at layer {pk['layer']}, dim {pk['dim']}, "
                     f"token {pk['token']!r}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if self.attention_mass is not None:
            heatmap(self.attention_mass.numpy(), ax=axes[0, 1], xlabel="head", ylabel="layer", signed=False,
                    cbar_label="attention on massive positions",
                    title=f"mean attention on massive positions (uniform: {float(self.uniform_mass.mean()):.2f})")
            axes[0, 1].title.set_fontsize(8)
        fig.tight_layout()
        return finish(fig, path)
    def _title(self) -> str:
        return f"MassiveActivations of {self.model_name} ({len(self.tokens)} prompts)"

    def _fields(self):
        pk = self.peak()
        f = [("peak", f"{pk['value']:,.1f} at layer {pk['layer']}, dim {pk['dim']}, position {pk['position']} "
                      f"({pk['token']!r}); median {pk['median']:.3g}, ratio {pk['ratio']:,.0f}x"),
             ("criteria", f"|a| ≥ {self.min_value:g} and ≥ {self.min_ratio:g}x the median"),
             ("massive dims", self.dims)]
        if self.attention_mass is not None:
            f.append(("attention on massive positions", f"mean over heads {float(self.attention_mass.mean()):.3f} "
                      f"(uniform attention: {float(self.uniform_mass.mean()):.3f})"))
        return f

    def _table(self):
        cols = ["layer", "dim", "prompts", "positions", "tokens", "max_abs", "ratio_to_median", "cv_across_prompts"]
        return cols, [[e[c] for c in cols] for e in self.entries[:40]]


@torch.no_grad()
def massive_activations(model, prompts: Sequence, layers="all", *, k: int = 5, min_value: float = 100.0,
                        min_ratio: float = 1000.0, attention: bool = True, batch_size: int = 8,
                        progress: Optional[bool] = None) -> MassiveActivations:
    """Find the massive activations of ``resid_post`` at ``layers`` over ``prompts`` (see the module
    doc for what is measured and when an entry counts as massive).

    >>> import steer
    >>> r = massive_activations(steer.load("tiny-llama"), ["Hi"], k=3, attention=False)
    >>> r.top_dims.shape, r.entries                   # a random tiny model has no massive activations
    (torch.Size([1, 2, 3]), [])
    """
    prompts = prompt_list(prompts)
    if not prompts:
        raise ValueError("massive_activations needs at least one prompt.")
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}.")
    if not (math.isfinite(min_value) and math.isfinite(min_ratio) and min_value >= 0 and min_ratio >= 0):
        raise ValueError(f"min_value={min_value}, min_ratio={min_ratio}: both must be finite and ≥ 0 (a NaN marked "
                         "nothing as massive).")
    layer_list = resolve_layers(model, layers)
    n, L, d = len(prompts), len(layer_list), model.d_model
    top_v = torch.zeros(n, L, k)
    top_p = torch.zeros(n, L, k, dtype=torch.long)
    top_d = torch.zeros(n, L, k, dtype=torch.long)
    median = torch.zeros(n, L)
    dim_max = torch.zeros(n, L, d)
    tokens, token_ids = [None] * n, [None] * n
    state = {}

    def grab(act, site):
        j = layer_list.index(site.layer)
        for r, i in enumerate(state["rows"]):
            s = state["starts"][r]
            a = act[r, s:].float()  # the prompt's own tokens [t, d]
            flat = a.abs().flatten()
            kk = min(k, flat.numel())
            v, idx = flat.topk(kk)
            top_v[i, j, :kk] = a.flatten()[idx].cpu()
            top_p[i, j, :kk], top_d[i, j, :kk] = (idx // d).cpu(), (idx % d).cpu()
            median[i, j] = flat.median().cpu()
            dim_max[i, j] = a.abs().max(0).values.cpu()

    groups = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    with add_hooks(model, {Site("resid_post", l): grab for l in layer_list}):
        for rows in bar(groups, desc="massive activations", enabled=progress):
            b = tokenize(model, [prompts[i] for i in rows]).to(model.device)
            starts = (b.input_ids.shape[1] - b.lengths).tolist()
            state.update(rows=rows, starts=starts)
            for r, i in enumerate(rows):
                ids = b.input_ids[r, starts[r]:].tolist()
                token_ids[i], tokens[i] = ids, [model.tokenizer.decode([t]) for t in ids]
            model.base(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                       use_cache=False)
    res = MassiveActivations(model.name, layer_list, tokens, token_ids, top_v, top_p, top_d, median, dim_max,
                             min_value, min_ratio)
    if attention:
        res.attention_mass, res.uniform_mass = _attention_on(model, prompts, [res.positions(i) for i in range(n)],
                                                             groups, progress)
    return res


@contextmanager
def attention_weights(model):
    """``{layer: [batch, head, q, k]}`` filled by every forward in the block: the weights each
    layer's attention module returns next to its output under eager attention (see
    :func:`steer._hf.eager_attention`). A forward hook of steer's, removed on exit; HF's
    ``output_attentions=True`` is not used, as it leaves recording hooks installed on the model.

    >>> import steer, torch
    >>> from steer._hf import eager_attention
    >>> m = steer.load("tiny-llama")
    >>> with eager_attention(m.hf), attention_weights(m) as w:
    ...     _ = m.hf(input_ids=torch.tensor([[5, 6, 7]]))
    >>> w[1].shape, round(float(w[1][0, 0, 2].sum()), 4)
    (torch.Size([1, 4, 3, 3]), 1.0)
    """
    got: dict[int, Tensor] = {}

    def hook(layer):
        def grab(module, args, out):
            w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if not isinstance(w, Tensor) or w.ndim != 4:
                raise RuntimeError(f"The attention of layer {layer} returned no weights: run it under "
                                   "steer._hf.eager_attention (sdpa and flash attention do not return them).")
            got[layer] = w.detach()
        return grab

    handles = [model.arch.attention(block).register_forward_hook(hook(l)) for l, block in enumerate(model.layers)]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _attention_on(model, prompts, positions: list[list[int]], groups, progress) -> tuple[Tensor, Tensor]:
    """Mean attention (over prompts and their queries) each head puts on its prompt's ``positions``,
    and what uniform causal attention would put there; prompts without any such position are left out."""
    from .._hf import eager_attention

    keep = [i for i, p in enumerate(positions) if p]
    total, uniform, count = None, None, 0
    with eager_attention(model.hf), attention_weights(model) as weights:
        for rows in bar(groups, desc="attention on massive positions", enabled=progress):
            rows = [i for i in rows if i in keep]
            if not rows:
                continue
            b = tokenize(model, [prompts[i] for i in rows]).to(model.device)
            weights.clear()
            model.base(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                       use_cache=False)
            att = torch.stack([weights[l].float() for l in range(model.n_layers)], 1)  # [b, layer, head, q, k]
            T = b.input_ids.shape[1]
            for r, i in enumerate(rows):
                s = T - int(b.lengths[r])
                cols = torch.tensor([s + p for p in positions[i]], device=att.device)
                q = torch.arange(s, T, device=att.device)
                mass = att[r][:, :, q][..., cols].sum(-1).mean(-1).cpu()  # [layer, head]
                seen = ((cols[None, :] <= q[:, None]).sum(-1).float() / (q - s + 1).float()).mean().cpu()
                total = mass if total is None else total + mass
                uniform = seen if uniform is None else uniform + seen
                count += 1
    if not count:
        z = torch.zeros(model.n_layers, model.n_heads)
        return z, torch.zeros(())
    return total / count, (uniform / count).expand(model.n_layers, model.n_heads).clone()


def exclusion(model, exclude, prompts: Optional[Sequence] = None) -> tuple[list[int], frozenset, bool]:
    """What ``exclude="massive"`` leaves alone: ``(dims, token_ids, sink)``: the massive
    dimensions, the tokens that carry massive activations past the first position, and whether
    the first position carries one. ``exclude`` is ``"massive"`` (found on ``prompts``, default a
    few built-in harmless requests) or a :class:`MassiveActivations`.

    >>> import steer
    >>> exclusion(steer.load("tiny-llama"), "massive")            # a random tiny model has none
    ([], frozenset(), False)
    """
    if isinstance(exclude, str):
        if exclude != "massive":
            raise ValueError(f"exclude={exclude!r}: use 'massive' or a MassiveActivations.")
        if prompts is None:
            from ..refusal import training_data

            prompts = training_data()["harmless"][:4]
        exclude = massive_activations(model, prompts, attention=False, progress=False)
    if not isinstance(exclude, MassiveActivations):
        raise TypeError(f"exclude must be 'massive' or a MassiveActivations, got {type(exclude).__name__}.")
    sink = any(0 in exclude.positions(i) for i in range(len(exclude.tokens)))
    return exclude.dims, frozenset(exclude.massive_token_ids), sink
