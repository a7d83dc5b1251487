"""Contrastive directions: per-layer vectors from two groups (or pairs) of prompts.

>>> import steer
>>> from steer.directions import extract
>>> m = steer.load("tiny-llama")
>>> d = extract(m, ["I love you", "Great day"], ["I hate you", "Awful day"], positions="last")
>>> d.vectors.shape, d.method
(torch.Size([2, 64]), 'mean_diff')

Methods (``method=``), all ``[n_layers, d_model]``, sign fixed so positives project higher:

=================  ===========================================================================
``mean_diff``      mean(positives) − mean(negatives) (Arditi et al., persona vectors); keeps its norm
``paired_mean_diff`` mean over pairs of (positive_i − negative_i) (CAA); equals ``mean_diff``
                   for equal-size groups, but checks the pairing
``pca_diff``       first right-singular vector of the paired differences (uncentred: the
                   consistent difference direction; repeng's ``pca_diff``), unit norm
``pca_center``     first principal component of pair members centred on their pair mean
                   (repeng's ``pca_center``), unit norm
``pca_pairwise``   first principal component of all examples centred on the global mean, unit norm
``probe``          logistic-regression weight (standardised features, L2), mapped back to the
                   activation space, unit norm
=================  ===========================================================================

``Direction.to_gguf`` writes llama.cpp control vectors: tensor ``direction.k`` is added by
llama.cpp to the output of block ``k`` (0-based; ``build_cvec(cur, il)`` after the block's final
residual add; ``direction.0`` is rejected by the loader, so block 0's output cannot be steered).
So ``direction.k`` ↔ steer's ``resid_post.k`` (= ``resid_pre.k+1``), the same numbering repeng uses.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from .capture import _atomic, _load_tagged, _save_tagged, capture, prompts_hash
from .display import Rich
from .interventions import unit
from .sweep import map_units, sweep_key

__all__ = ["Direction", "METHODS", "extract", "from_activations", "actadd_vector", "sweep_layers",
           "LayerSweep", "steering_sweep", "plot_layer_sweep"]

METHODS = ("mean_diff", "paired_mean_diff", "pca_diff", "pca_center", "pca_pairwise", "probe")
_PAIRED = ("paired_mean_diff", "pca_diff", "pca_center")


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except Exception:  # pragma: no cover
        return "unknown"


@dataclass(repr=False)
class Direction(Rich):
    """A direction per layer, with the layer chosen for use and where it came from.

    Attributes:
        vectors: ``[n_layers, d_model]`` float32.
        layer: the chosen layer (``None`` until chosen).
        method: how it was computed (see :data:`METHODS`).
        meta: provenance — ``model``, ``d_model``, ``site``, ``positions``, ``data_hash``,
            ``steer_version``, ``date``, counts.

    >>> import torch
    >>> d = Direction(torch.eye(2, 4), layer=1)
    >>> d.vector().tolist(), round(d.cosine(d), 3)
    ([0.0, 1.0, 0.0, 0.0], 1.0)
    """

    vectors: Float[Tensor, "n_layers d_model"]
    layer: Optional[int] = None
    method: str = "mean_diff"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.vectors = torch.as_tensor(self.vectors).detach().float()
        if self.vectors.ndim == 1:
            self.vectors = self.vectors[None]
        if self.vectors.ndim != 2:
            raise ValueError(f"Direction vectors must be [n_layers, d_model], got {tuple(self.vectors.shape)}.")
        if not torch.isfinite(self.vectors).all():
            raise ValueError("Direction contains NaN/inf: the activations it came from were not finite.")
        if self.layer is not None:
            self.layer = self._layer(self.layer)  # counted from the end if negative, as everywhere else
        self.meta = {**self.meta, "d_model": self.meta.get("d_model", self.d_model)}  # the caller's dict stays as it was

    # -- display ---------------------------------------------------------------------------
    def _fields(self):
        m = self.meta
        f = [("method", self.method), ("layer", self.layer), ("vectors", [self.n_layers, self.d_model])]
        f += [(k, m[k]) for k in ("model", "site", "positions", "n_pos", "n_neg", "n_pairs", "date", "data_hash")
              if k in m]
        if self.layer is not None:
            f.append(("norm at layer", float(self.vectors[self.layer].norm())))
        return f

    def _figure(self):
        if self.n_layers < 2:
            return None
        from .plotting import layer_curve

        fig = layer_curve({"norm": self.norms().tolist()}, list(range(self.n_layers)), ylabel="‖v‖",
                          title=f"{self.method} direction: norm per layer")
        if self.layer is not None:
            fig.axes[0].axvline(self.layer, color="grey", ls="--", lw=1, label=f"chosen: layer {self.layer}")
            fig.axes[0].legend(fontsize=8)
        return fig

    # -- basics ----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.vectors.shape[0]

    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    def _layer(self, layer: Optional[int]) -> int:
        lay = self.layer if layer is None else layer
        if lay is None:
            raise ValueError("No layer chosen: pass layer= or set direction.layer (see sweep_layers).")
        if not -self.n_layers <= lay < self.n_layers:
            raise ValueError(f"layer={lay} out of range for {self.n_layers} layers.")
        return lay % self.n_layers

    def vector(self, layer: Optional[int] = None) -> Float[Tensor, "d_model"]:
        """The vector at ``layer`` (default: the chosen layer)."""
        return self.vectors[self._layer(layer)]

    def unit(self, layer: Optional[int] = None) -> Float[Tensor, "d_model"]:
        """The unit vector at ``layer``.

        >>> d = Direction(torch.tensor([[3., 4.], [0., 2.]]), layer=1)
        >>> d.unit().tolist(), [round(x, 3) for x in d.unit(0).tolist()]
        ([0.0, 1.0], [0.6, 0.8])
        """
        return unit(self.vector(layer))

    def norms(self) -> Float[Tensor, "n_layers"]:
        """Per-layer norms (a ``mean_diff`` direction keeps its norm: a natural steering scale).

        >>> Direction(torch.tensor([[3., 4.], [0., 2.]])).norms().tolist()
        [5.0, 2.0]
        """
        return self.vectors.norm(dim=-1)

    def with_layer(self, layer: int) -> "Direction":
        """A copy with another chosen layer (negative layers count from the end).

        >>> d = Direction(torch.eye(3, 4))
        >>> d.with_layer(-1).layer, d.with_layer(0).vector().tolist(), d.layer
        (2, [1.0, 0.0, 0.0, 0.0], None)
        """
        return Direction(self.vectors.clone(), self._layer(layer), self.method, dict(self.meta))

    def cosine(self, other: Union["Direction", Tensor], layer: Optional[int] = None) -> Union[float, Tensor]:
        """Cosine with another direction/vector at ``layer``; ``layer="all"`` gives ``[n_layers]``.

        >>> import torch
        >>> Direction(torch.tensor([[1., 0.]]), layer=0).cosine(torch.tensor([1., 1.]))
        0.7071067690849304
        """
        if layer == "all":
            o = other.vectors if isinstance(other, Direction) else torch.as_tensor(other).float()
            return torch.nn.functional.cosine_similarity(self.vectors, o.expand_as(self.vectors), dim=-1)
        o = other.vector(layer) if isinstance(other, Direction) else torch.as_tensor(other).float()
        if o.shape[-1] != self.d_model:
            raise ValueError(f"d_model mismatch: {self.d_model} vs {o.shape[-1]}.")
        return float(torch.nn.functional.cosine_similarity(self.vector(layer), o, dim=-1))

    def project(self, acts, layer: Optional[int] = None) -> Tensor:
        """Projection ``x·v̂`` of activations ``[..., d_model]`` (or :class:`~steer.capture.Activations`,
        read at ``layer``) on the unit vector at ``layer``.

        >>> import torch
        >>> Direction(torch.tensor([[2., 0.]]), layer=0).project(torch.tensor([[3., 4.]])).tolist()
        [3.0]
        """
        lay = self._layer(layer)
        if hasattr(acts, "at") and hasattr(acts, "layers"):
            acts = acts.at(lay)
            if acts.ndim == 3:
                raise ValueError("Activations have a pos axis: capture with reduce='mean' or a one-token selector.")
        acts = torch.as_tensor(acts)
        if acts.shape[-1] != self.d_model:
            raise ValueError(f"Activations have d_model {acts.shape[-1]}, the direction {self.d_model}.")
        return acts.float() @ self.unit(lay).to(acts.device)

    # -- arithmetic ------------------------------------------------------------------------
    def _new(self, vectors, method=None) -> "Direction":
        return Direction(vectors, self.layer, method or self.method, dict(self.meta))

    def scale(self, a: float) -> "Direction":
        """``a · v`` at every layer (also ``a * d``, ``-d``; ``d + e`` and ``d - e`` add vectors).

        >>> d = Direction(torch.tensor([[3., 4.]]), layer=0)
        >>> d.scale(2).vector().tolist(), (-d).vector().tolist(), (d + d).vectors.tolist()
        ([6.0, 8.0], [-3.0, -4.0], [[6.0, 8.0]])
        """
        return self._new(self.vectors * a)

    def __mul__(self, a: float) -> "Direction":
        return self.scale(a)

    __rmul__ = __mul__

    def __neg__(self) -> "Direction":
        return self.scale(-1.0)

    def __add__(self, other: "Direction") -> "Direction":
        o = other.vectors if isinstance(other, Direction) else torch.as_tensor(other).float()
        if o.shape[-1] != self.d_model:
            raise ValueError(f"d_model mismatch: {self.d_model} vs {o.shape[-1]}.")
        if isinstance(other, Direction) and other.n_layers != self.n_layers:
            raise ValueError(f"The directions have {self.n_layers} and {other.n_layers} layers: take one layer of "
                             "each (d.vector(layer)) to combine vectors from different layer sets.")
        return self._new(self.vectors + o, "sum")

    def __sub__(self, other: "Direction") -> "Direction":
        return self + (-other if isinstance(other, Direction) else -torch.as_tensor(other))

    def normalized(self) -> "Direction":
        """Unit norm at every layer (layer, method and meta are kept); a zero row (a layer not
        extracted) stays zero.

        >>> d = Direction(torch.tensor([[3., 4.], [0., 2.]]), layer=1).normalized()
        >>> d.norms().tolist(), d.layer
        ([1.0, 1.0], 1)
        >>> Direction(torch.tensor([[0., 0.], [0., 2.]]), layer=1).normalized().norms().tolist()
        [0.0, 1.0]
        """
        zero = self.vectors.norm(dim=-1) == 0
        if bool(zero.all()):
            raise ValueError("Direction has zero norm at every layer: nothing to normalise.")
        v = self.vectors.clone()
        v[~zero] = unit(v[~zero])
        return self._new(v)

    def orthogonalize(self, other: Union["Direction", Tensor]) -> "Direction":
        """Remove ``other``'s component at every layer: ``v − (v·ô) ô``.

        >>> import torch
        >>> d = Direction(torch.tensor([[1., 1.]])).orthogonalize(torch.tensor([[1., 0.]]))
        >>> d.vectors.tolist()
        [[0.0, 1.0]]
        """
        o = other.vectors if isinstance(other, Direction) else torch.as_tensor(other).float()
        o = unit(o.expand_as(self.vectors))
        return self._new(self.vectors - (self.vectors * o).sum(-1, keepdim=True) * o)

    # -- model checks, save/load -----------------------------------------------------------
    def check(self, model, allow_other_model: bool = False) -> None:
        """Raise if the direction does not fit ``model`` (d_model, layer count, name).

        >>> import steer
        >>> m = steer.load("tiny-llama")
        >>> Direction(torch.zeros(2, 64), meta={"model": "tiny-llama"}).check(m)   # fits: no error
        >>> Direction(torch.zeros(2, 32)).check(m)
        Traceback (most recent call last):
        ...
        ValueError: Direction has d_model 32 (from '?') but 'tiny-llama' has d_model 64: extract the direction on this model.
        >>> Direction(torch.zeros(2, 64), meta={"model": "my-finetune"}).check(m, allow_other_model=True)
        """
        if self.d_model != model.d_model:
            raise ValueError(
                f"Direction has d_model {self.d_model} (from {self.meta.get('model', '?')!r}) but "
                f"{model.name!r} has d_model {model.d_model}: extract the direction on this model."
            )
        if self.n_layers != model.n_layers:
            raise ValueError(
                f"Direction has {self.n_layers} layers (from {self.meta.get('model', '?')!r}) but "
                f"{model.name!r} has {model.n_layers}: extract the direction on this model."
            )
        src = self.meta.get("model")
        if src is not None and src != model.name and not allow_other_model:
            raise ValueError(
                f"Direction was extracted from {src!r}, not {model.name!r}; pass allow_other_model=True "
                "if the models share a residual basis (e.g. a fine-tune)."
            )

    def save(self, path: Union[str, Path]) -> None:
        """Save as safetensors with JSON metadata in the header (atomic write).

        >>> import torch, tempfile, os
        >>> d = Direction(torch.ones(2, 4), layer=1)
        >>> p = os.path.join(tempfile.mkdtemp(), "d.safetensors"); d.save(p)
        >>> Direction.load(p).layer
        1
        """
        _save_tagged(path, {"vectors": self.vectors}, "steer_direction",
                     {"layer": self.layer, "method": self.method, "meta": self.meta})

    @classmethod
    def load(cls, path: Union[str, Path], model=None, allow_other_model: bool = False) -> "Direction":
        """Load a saved direction; with ``model``, check that it fits (d_model, layers, name).

        >>> import steer, tempfile, os
        >>> m = steer.load("tiny-llama")
        >>> p = os.path.join(tempfile.mkdtemp(), "d.safetensors")
        >>> extract(m, ["good"], ["bad"], layer=1).save(p)
        >>> d = Direction.load(p, model=m)
        >>> d.layer, d.meta["model"], tuple(d.vectors.shape)
        (1, 'tiny-llama', (2, 64))
        """
        tensors, meta = _load_tagged(path, "steer_direction", "Direction")
        vectors = tensors["vectors"]
        d = cls(vectors, meta["layer"], meta["method"], meta["meta"])
        if model is not None:
            d.check(model, allow_other_model)
        return d

    def to_gguf(self, path: Union[str, Path], model_hint: Optional[str] = None) -> None:
        """Write a llama.cpp control vector (arch ``controlvector``; tensors ``direction.k`` for
        k = 1..n_layers−1, each the vector at steer layer k — see the module docstring).

        The direction should come from ``resid_post`` (llama.cpp adds it to block outputs);
        layer 0 has no slot in the format and is dropped.

        >>> import torch, tempfile, os
        >>> d = Direction(torch.randn(3, 8), meta={"model": "tiny"})
        >>> p = os.path.join(tempfile.mkdtemp(), "cv.gguf"); d.to_gguf(p)
        >>> torch.allclose(Direction.from_gguf(p).vectors[1:], d.vectors[1:])
        True
        """
        import gguf

        if self.meta.get("site", "resid_post") != "resid_post":
            import warnings
            warnings.warn(f"Direction comes from {self.meta.get('site')!r}; llama.cpp adds it to resid_post.")
        hint = model_hint or str(self.meta.get("model_type", self.meta.get("model", "unknown")))

        def write(tmp):
            w = gguf.GGUFWriter(tmp, "controlvector")
            w.add_string("controlvector.model_hint", hint)
            w.add_uint32("controlvector.layer_count", self.n_layers - 1)
            for k in range(1, self.n_layers):
                w.add_tensor(f"direction.{k}", self.vectors[k].numpy().astype("float32"))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()

        _atomic(path, write)

    @classmethod
    def from_gguf(cls, path: Union[str, Path], n_layers: Optional[int] = None) -> "Direction":
        """Read a llama.cpp/repeng control vector; layers without a tensor (and layer 0) are zero."""
        import gguf

        r = gguf.GGUFReader(str(path))
        rows = {}
        for t in r.tensors:
            if t.name.startswith("direction."):
                k = int(t.name.split(".", 1)[1])
                if k <= 0:
                    raise ValueError(f"{path}: invalid layer index in tensor {t.name} (llama.cpp starts at 1).")
                rows[k] = torch.tensor(t.data.copy(), dtype=torch.float32).flatten()
        if not rows:
            raise ValueError(f"{path} holds no direction.* tensors.")
        hint = None
        f = r.fields.get("controlvector.model_hint")
        if f is not None:
            hint = bytes(f.parts[f.data[0]]).decode()
        if n_layers is not None and n_layers <= max(rows):
            raise ValueError(f"n_layers={n_layers}, but {path} holds a vector for layer {max(rows)}: pass the "
                             "model's layer count (or leave it out).")
        n = n_layers or max(rows) + 1
        d = next(iter(rows.values())).numel()
        vec = torch.zeros(n, d)
        for k, v in rows.items():
            vec[k] = v
        return cls(vec, None, "gguf", {"model": hint, "site": "resid_post", "source": str(path)})


# -- extraction ------------------------------------------------------------------------------
def _check_groups(pos: Tensor, neg: Tensor, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: use one of {METHODS}.")
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise ValueError(
            f"A direction needs examples on both sides; got {pos.shape[0]} positive and "
            f"{neg.shape[0]} negative. Pass at least one prompt in each group."
        )
    if pos.shape[1:] != neg.shape[1:]:
        raise ValueError(f"Positive {tuple(pos.shape[1:])} and negative {tuple(neg.shape[1:])} shapes differ.")
    if method in _PAIRED and pos.shape[0] != neg.shape[0]:
        raise ValueError(f"method={method!r} pairs examples: got {pos.shape[0]} positives vs {neg.shape[0]} negatives.")
    if method == "probe" and (pos.shape[0] < 2 or neg.shape[0] < 2):
        raise ValueError("method='probe' needs at least two examples per group.")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise ValueError("Activations contain NaN/inf: load the model in float32 and check the prompts.")


def _top_pc(x: Tensor) -> Tensor:
    """First right-singular vector of ``x [n, d]`` (no centring here)."""
    _, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return vh[0].float()


def _probe(pos: Tensor, neg: Tensor, l2: float = 1e-2, steps: int = 200, with_bias: bool = False):
    """Logistic-regression weight on standardised features mapped back to raw ones (and, with
    ``with_bias``, the fitted intercept in raw coordinates: ``P(pos) = σ(x·w + b)``)."""
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = w.detach() / sd
    if with_bias:
        return w_raw.float(), float(b.detach() - mu @ w_raw)
    return w_raw.float()


def from_activations(
    pos: Float[Tensor, "n_pos n_layers d_model"],
    neg: Float[Tensor, "n_neg n_layers d_model"],
    method: str = "mean_diff",
) -> Float[Tensor, "n_layers d_model"]:
    """Per-layer direction from activation tensors (one row per example).

    >>> import torch
    >>> pos, neg = torch.ones(3, 2, 4), torch.zeros(3, 2, 4)
    >>> from_activations(pos, neg)[0].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    pos, neg = torch.as_tensor(pos).float(), torch.as_tensor(neg).float()
    if pos.ndim == 2:
        pos, neg = pos[:, None], neg[:, None]
    if pos.ndim != 3 or neg.ndim != 3:
        raise ValueError(f"from_activations takes [n, n_layers, d_model] (or [n, d_model]); got {tuple(pos.shape)} and "
                         f"{tuple(neg.shape)}. Activations with a position axis: capture with reduce='mean' or a "
                         "one-token selector such as positions='last'.")
    _check_groups(pos, neg, method)
    if method in ("mean_diff", "paired_mean_diff"):
        return pos.mean(0) - neg.mean(0)
    out = []
    for l in range(pos.shape[1]):
        p, n = pos[:, l], neg[:, l]
        if method == "pca_diff":
            v = _top_pc(p - n)
        elif method == "pca_center":
            mid = (p + n) / 2
            v = _top_pc(torch.cat([p - mid, n - mid]))
        elif method == "pca_pairwise":
            allx = torch.cat([p, n])
            v = _top_pc(allx - allx.mean(0))
        else:
            v = _probe(p, n)
            v = v / v.norm().clamp(min=1e-12)
        if float((p.mean(0) - n.mean(0)) @ v) < 0:  # positives project higher
            v = -v
        out.append(v)
    return torch.stack(out)


def extract(
    model,
    positive: Sequence[Any],
    negative: Sequence[Any],
    *,
    layers="all",
    site: str = "resid_post",
    positions="last",
    method: str = "mean_diff",
    include_sink: bool = False,
    batch_size: int = 32,
    layer: Optional[int] = None,
    exclude=None,
) -> Direction:
    """Capture both groups and compute a :class:`Direction` (one row per model layer).

    ``positions`` is any :mod:`steer.positions` selector; multi-token selectors are averaged per
    prompt (e.g. ``"completion"`` with ``(prompt, completion)`` pairs, CAST's behaviour vectors,
    or ``"all"`` for the prompt-mean hidden state). Layers not in ``layers`` are zero rows.
    ``exclude="massive"`` leaves the massive activations out (Sun et al., 2024; found on these
    prompts by :func:`steer.massive_activations`, or pass its result): the tokens that carry them
    are not read and their dimensions are zero in the direction.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> d = extract(m, ["good", "nice"], ["bad", "awful"], method="pca_diff", layer=1)
    >>> round(float(d.vector().norm()), 3)
    1.0
    """
    positive, negative = list(positive), list(negative)
    if not positive or not negative:
        raise ValueError(
            f"extract() needs prompts on both sides; got {len(positive)} positive and {len(negative)} "
            "negative. Pass at least one prompt in each group."
        )
    sel, dims, skip = positions, [], frozenset()
    if exclude is not None:
        from . import positions as P
        from .diagnostics.massive import exclusion

        dims, skip, sink = exclusion(model, exclude, positive + negative)
        include_sink = include_sink and not sink
        if skip:  # the selected tokens, less those that carry massive activations
            ids = torch.tensor(sorted(skip))

            def sel(batch, keep=include_sink):
                return P.mask(positions, batch, include_sink=keep) & ~torch.isin(batch.input_ids, ids)
    kw = dict(layers=layers, site=site, positions=sel, include_sink=include_sink, batch_size=batch_size,
              reduce=None if _single(sel) else "mean")
    a = capture(model, positive, **kw)
    b = capture(model, negative, **kw)
    vec = from_activations(a.tensor, b.tensor, method)
    if dims:
        vec[..., dims] = 0
    full = torch.zeros(model.n_layers, model.d_model)
    full[a.layers] = vec
    meta = {
        "model": model.name, "d_model": model.d_model, "site": site, "positions": repr(positions),
        "layers": a.layers, "data_hash": prompts_hash(positive + negative), "n_pos": len(positive),
        "n_neg": len(negative), "include_sink": include_sink, "steer_version": _version(),
        "exclude": None if exclude is None else {"dims": list(dims), "tokens": sorted(skip)},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_type": getattr(model.config, "model_type", None),
    }
    return Direction(full, layer, method, meta)


def _single(positions) -> bool:
    from .positions import is_single
    return is_single(positions)


@torch.no_grad()
def actadd_vector(model, positive: str, negative: str, layer: int, site: str = "resid_pre") -> Tensor:
    """ActAdd's position-aligned difference ``[k, d_model]`` of two raw prompts at ``layer``.

    The shorter prompt is right-padded with space tokens (as in the paper). Both are tokenized as
    steer tokenizes a raw prompt (:class:`steer.Raw`: with the tokenizer's special tokens), so row
    ``j`` belongs at the ``j``-th token of a raw prompt: use it with ``Intervention("add", vec, aligned=True,
    positions="prompt", include_sink=True)``. Where the tokenizer starts with a BOS token, row 0 is
    BOS − BOS = 0 and the sink is left as it is; where it adds none (GPT-2, SmolLM2), row 0 is the
    first tokens' difference and is added at the first token.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> actadd_vector(m, "Love", "Hate", layer=1).shape
    torch.Size([4, 64])
    """
    from .hooks import add_hooks

    tok = model.tokenizer
    ids = [tok(t).input_ids for t in (positive, negative)]  # as steer.data.tokenize reads raw text
    if not ids[0] or not ids[1]:
        raise ValueError("ActAdd needs two non-empty prompts.")
    space = tok(" ", add_special_tokens=False).input_ids[-1]
    k = max(len(ids[0]), len(ids[1]))
    ids = torch.tensor([r + [space] * (k - len(r)) for r in ids], device=model.device)
    got = {}
    with add_hooks(model, {f"{site}.{layer}": lambda a, s: got.__setitem__("x", a.detach().float())}):
        model.hf(input_ids=ids, use_cache=False)
    return (got["x"][0] - got["x"][1]).cpu()


# -- layer selection -------------------------------------------------------------------------
@dataclass(repr=False)
class LayerSweep(Rich):
    """Per-layer scores of a direction (rows of dicts) and the best layer, from
    :func:`sweep_layers` (held-out accuracy/AUROC) or :func:`steering_sweep`.

    >>> g = torch.Generator().manual_seed(2)
    >>> pos = torch.randn(20, 3, 8, generator=g); pos[:, 2] += 2      # the concept lives at layer 2
    >>> neg = torch.randn(20, 3, 8, generator=g)
    >>> s = sweep_layers(pos, neg)
    >>> s.best_layer, s.key, [round(r["auroc"], 2) for r in s.rows]
    (2, 'accuracy', [0.44, 0.67, 1.0])
    >>> Direction(from_activations(pos, neg), layer=s.best_layer).layer     # use the best layer
    2
    """

    rows: list[dict]
    best_layer: int
    key: str

    @property
    def layers(self) -> list[int]:
        return [r["layer"] for r in self.rows]

    def column(self, key: str) -> list:
        """One score per layer.

        >>> LayerSweep([{"layer": 0, "auroc": 0.5}, {"layer": 1, "auroc": 0.9}], 1, "auroc").column("auroc")
        [0.5, 0.9]
        """
        return [r[key] for r in self.rows]

    def _fields(self):
        best = next(r for r in self.rows if r["layer"] == self.best_layer)
        return [("best layer", self.best_layer), (f"best {self.key}", best[self.key]), ("layers", len(self.rows))]

    def _table(self):
        cols = list(self.rows[0])
        return cols, [[r[c] for c in cols] for r in self.rows]
    def table(self) -> str:
        """The rows as a fixed-width text table.

        >>> s = LayerSweep([{"layer": 0, "accuracy": 0.5, "auroc": 0.625},
        ...                 {"layer": 1, "accuracy": 1.0, "auroc": 1.0}], best_layer=1, key="accuracy")
        >>> print(s.table())
             layer    accuracy       auroc
                 0      0.5000      0.6250
                 1      1.0000      1.0000
        """
        cols = list(self.rows[0])
        lines = ["  ".join(f"{c:>10}" for c in cols)]
        for r in self.rows:
            lines.append("  ".join(f"{r[c]:>10.4f}" if isinstance(r[c], float) else f"{r[c]:>10}" for c in cols))
        return "\n".join(lines)

    def plot(self, path: Optional[Union[str, Path]] = None, ax=None, keys: Optional[Sequence[str]] = None):
        """Score per layer; saved to ``path`` when given. Returns the figure.

        >>> import os, tempfile
        >>> s = LayerSweep([{"layer": 0, "accuracy": 0.5, "auroc": 0.625},
        ...                 {"layer": 1, "accuracy": 1.0, "auroc": 1.0}], best_layer=1, key="accuracy")
        >>> fig = s.plot(os.path.join(tempfile.mkdtemp(), "sweep.png"), keys=["auroc"])
        >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        ['auroc', 'best: layer 1']
        """
        return plot_layer_sweep(self, path, ax, keys)


def sweep_layers(
    pos: Float[Tensor, "n_pos n_layers d_model"],
    neg: Float[Tensor, "n_neg n_layers d_model"],
    method: str = "mean_diff",
    val_frac: float = 0.3,
    seed: int = 0,
    layers: Optional[Sequence[int]] = None,
) -> LayerSweep:
    """Fit on a split, score on held-out examples at each layer: separation accuracy (threshold
    at the midpoint of the training class means of the projection) and AUROC.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> pos, neg = torch.randn(20, 3, 8, generator=g) + 2, torch.randn(20, 3, 8, generator=g)
    >>> s = sweep_layers(pos, neg)
    >>> len(s.rows), s.rows[0]["auroc"] > 0.9
    (3, True)
    """
    from .evaluate import accuracy, auroc

    pos, neg = torch.as_tensor(pos).float(), torch.as_tensor(neg).float()
    _check_groups(pos, neg, method)
    g = torch.Generator().manual_seed(seed)

    def split(x):
        idx = torch.randperm(len(x), generator=g)
        k = max(1, int(round(len(x) * val_frac)))
        if len(x) - k < 1:
            raise ValueError(f"Too few examples ({len(x)}) to hold out {val_frac:.0%}; pass more data.")
        return x[idx[k:]], x[idx[:k]]

    if method in _PAIRED:
        idx = torch.randperm(len(pos), generator=g)
        k = max(1, int(round(len(pos) * val_frac)))
        ptr, pva, ntr, nva = pos[idx[k:]], pos[idx[:k]], neg[idx[k:]], neg[idx[:k]]
    else:
        ptr, pva = split(pos)
        ntr, nva = split(neg)
    vec = from_activations(ptr, ntr, method)
    rows = []
    for l in (layers if layers is not None else range(pos.shape[1])):
        u = unit(vec[l])
        mid = float(((ptr[:, l] @ u).mean() + (ntr[:, l] @ u).mean()) / 2)
        s = torch.cat([pva[:, l] @ u, nva[:, l] @ u])
        y = torch.cat([torch.ones(len(pva)), torch.zeros(len(nva))])
        rows.append({"layer": int(l), "accuracy": accuracy(s > mid, y), "auroc": auroc(s, y),
                     "threshold": mid, "norm": float(vec[l].norm())})
    best = max(rows, key=lambda r: (r["accuracy"], r["auroc"]))["layer"]
    return LayerSweep(rows, best, "accuracy")


def plot_layer_sweep(sweep: LayerSweep, path=None, ax=None, keys: Optional[Sequence[str]] = None):
    """Line plot of the sweep's scores per layer (saved to ``path`` if given), with the best
    layer marked; ``keys`` picks the columns (default: every numeric score but threshold/norm).

    >>> import os, tempfile
    >>> s = LayerSweep([{"layer": 0, "accuracy": 0.5, "auroc": 0.625, "norm": 2.0},
    ...                 {"layer": 1, "accuracy": 1.0, "auroc": 1.0, "norm": 3.0}], best_layer=1, key="accuracy")
    >>> path = os.path.join(tempfile.mkdtemp(), "sweep.png")
    >>> fig = plot_layer_sweep(s, path)
    >>> os.path.exists(path), [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    (True, ['accuracy', 'auroc', 'best: layer 1'])
    """
    from .plotting import layer_curve

    xs = [r["layer"] for r in sweep.rows]
    keys = keys or [k for k in sweep.rows[0] if k not in ("layer", "threshold", "norm")
                    and isinstance(sweep.rows[0][k], (int, float))]
    fig = layer_curve({k: [r[k] for r in sweep.rows] for k in keys}, xs, ylabel="score", ax=ax)
    fig.axes[0].axvline(sweep.best_layer, color="grey", ls="--", lw=1, label=f"best: layer {sweep.best_layer}")
    fig.axes[0].legend(fontsize=8)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


@torch.no_grad()
def steering_sweep(
    model,
    direction: Direction,
    prompts: Sequence[Any],
    neutral_prompts: Sequence[Any],
    score_fn,
    layers: Sequence[int],
    strengths: Sequence[float],
    positions="all",
    progress: Optional[bool] = None,
    shards=None,
    directory=None,
) -> LayerSweep:
    """For each (layer, strength): behaviour change ``mean score_fn(steered next-token logits)
    − unsteered`` on ``prompts`` and the side effect, mean next-token KL on ``neutral_prompts``.

    ``score_fn(logits [b, vocab]) -> [b]`` (e.g. refusal log-odds). The best row maximises
    ``change − 10·KL``. ``shards="auto"`` splits the grid's cells across ``torchrun``
    processes and ``directory`` keeps finished cells for a resumed run (:mod:`steer.sweep`).

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> d = Direction(torch.randn(2, 64), meta={"model": "tiny-llama"})
    >>> s = steering_sweep(m, d, ["Hi"], ["Yo"], lambda lg: lg[:, 0], [0, 1], [1.0])
    >>> len(s.rows)
    2
    """
    from .evaluate import next_token_kl
    from .steering import Steering, steer

    if not prompts or not neutral_prompts:
        raise ValueError("steering_sweep needs behaviour prompts and neutral prompts.")
    with Steering(model) as s:
        base = score_fn(s.next_token_logits(prompts)).float()
        neutral = s.next_token_logits(neutral_prompts)
    grid = [(int(l), float(a)) for l in layers for a in strengths]

    def cell(la) -> dict:
        l, a = la
        with steer(model, direction, layer=l, strength=a, positions=positions) as s:
            sc = score_fn(s.next_token_logits(prompts)).float()
            kl = next_token_kl(neutral, s.next_token_logits(neutral_prompts))
        return {"layer": l, "strength": a, "change": float((sc - base).mean()), "kl": float(kl.mean())}

    key = None
    if directory is not None:  # only a directory to resume needs the sweep's name
        import hashlib

        vec_hash = hashlib.sha256(direction.vectors.detach().float().cpu().numpy().tobytes()).hexdigest()
        key = sweep_key("steering_sweep", model.name, vec_hash, prompts_hash(prompts), prompts_hash(neutral_prompts),
                        base.tolist(), grid, repr(positions))  # base: the unsteered scores (score_fn is a callable)
    rows = map_units(cell, grid, shards=shards, directory=directory, key=key, desc="steering sweep", progress=progress)
    best = max(rows, key=lambda r: r["change"] - 10 * r["kl"])
    return LayerSweep(rows, best["layer"], "change")
