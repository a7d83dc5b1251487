"""Pure tensor interventions on activations, and the :class:`Intervention` record.

Functions here know nothing about models or hooks: they take an activation tensor
``[batch, pos, d_model]``, a direction, per-example strengths ``[batch]`` and a boolean mask
``[batch, pos]`` of the positions to edit, and return the edited tensor. Positions outside the
mask are returned bit-for-bit unchanged. :mod:`steer.steering` installs them on a model.

=====================  =====================================================================
:func:`add`            ``x ← x + α·v`` (ActAdd / CAA); ``v`` may be ``[k, d]`` for ActAdd's
                       position-aligned injection (see :mod:`steer.steering`)
:func:`ablate`         ``x ← x − (x·v̂) v̂`` (directional ablation, Arditi et al.)
:func:`clamp`          ``x ← x + (c − x·v̂) v̂`` (set the projection on ``v̂`` to ``c``)
:func:`clamp_toward`   ``x·v̂ ← x·v̂ + s (c − x·v̂)`` (move the projection a fraction ``s`` toward ``c``)
``"map"`` kind         ``x ← f(x, s)`` for a fitted map ``f``: a LEACE eraser (:mod:`steer.erasure`),
                       a transport map; ``f`` takes the activations and ``[batch, 1, 1]`` strengths
:func:`orthogonalize_weights`  ``W ← W − v̂ v̂ᵀ W`` for every matrix writing to the residual stream
=====================  =====================================================================

>>> import torch
>>> x = torch.randn(2, 3, 4); v = torch.tensor([1., 0, 0, 0])
>>> ablate(x, v)[..., 0].abs().max().item()
0.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ._hf import dense_weight

__all__ = [
    "Intervention", "add", "ablate", "clamp", "clamp_toward", "orthogonalize_weights", "orthogonalized", "unit",
]

KINDS = ("add", "ablate", "clamp", "map")


def unit(v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """``v / ‖v‖`` along the last axis; a zero or non-finite vector is an error.

    >>> unit(torch.tensor([3., 4.])).tolist()
    [0.6000000238418579, 0.800000011920929]
    """
    if not torch.isfinite(v).all():
        raise ValueError("Direction contains NaN/inf: recompute it from finite activations.")
    n = v.norm(dim=-1, keepdim=True)
    if (n == 0).any():
        raise ValueError("Direction has zero norm: the two groups gave identical activations.")
    return v / n


def _strength(alpha, x: Tensor) -> Tensor:
    """Strength as a ``[batch, 1, 1]`` tensor on x's device/dtype."""
    a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device)
    if a.ndim == 0:
        a = a.expand(x.shape[0])
    if a.shape != (x.shape[0],):
        raise ValueError(f"Strength has shape {tuple(a.shape)}: use a scalar or a [batch={x.shape[0]}] tensor.")
    return a.view(-1, *([1] * (x.ndim - 1)))


def _unit_on(v: Tensor, x: Tensor, normalized: bool) -> Tensor:
    v = v.to(device=x.device, dtype=x.dtype)
    return v if normalized else unit(v)


def _mask(mask: Optional[Tensor], x: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)[..., None]
    if mask.shape != x.shape[:2]:
        raise ValueError(f"Mask shape {tuple(mask.shape)} does not match activations {tuple(x.shape[:2])}.")
    return mask.to(device=x.device, dtype=x.dtype)[..., None]


def add(
    x: Float[Tensor, "batch pos d_model"],
    v: Float[Tensor, "d_model"],
    alpha: Union[float, Float[Tensor, "batch"]] = 1.0,
    mask: Optional[Bool[Tensor, "batch pos"]] = None,
) -> Float[Tensor, "batch pos d_model"]:
    """``x + α·v`` at the masked positions, with one strength per example.

    >>> x = torch.zeros(2, 3, 2)
    >>> m = torch.tensor([[False, True, True], [True, False, False]])
    >>> add(x, torch.tensor([1., 0.]), torch.tensor([1., 2.]), m)[..., 0].tolist()
    [[0.0, 1.0, 1.0], [2.0, 0.0, 0.0]]
    """
    v = v.to(device=x.device, dtype=x.dtype)
    return torch.where(_mask(mask, x) > 0, x + _strength(alpha, x) * v, x)


def ablate(
    x: Float[Tensor, "batch pos d_model"],
    v: Float[Tensor, "d_model"],
    mask: Optional[Bool[Tensor, "batch pos"]] = None,
    alpha: Union[float, Float[Tensor, "batch"]] = 1.0,
    normalized: bool = False,
) -> Float[Tensor, "batch pos d_model"]:
    """Remove the component along ``v̂``: ``x − α (x·v̂) v̂`` (``α = 1``: full ablation).
    ``normalized``: ``v`` is already a checked unit vector (:func:`unit`, whose checks read the
    device: steering hooks normalise once, not at every decode step).

    >>> x = torch.tensor([[[1., 2.]]])
    >>> ablate(x, torch.tensor([1., 0.])).tolist()
    [[[0.0, 2.0]]]
    """
    u = _unit_on(v, x, normalized)
    proj = (x @ u)[..., None]
    return torch.where(_mask(mask, x) > 0, x - _strength(alpha, x) * proj * u, x)


def clamp(
    x: Float[Tensor, "batch pos d_model"],
    v: Float[Tensor, "d_model"],
    value: Union[float, Float[Tensor, "batch"]],
    mask: Optional[Bool[Tensor, "batch pos"]] = None,
    normalized: bool = False,
) -> Float[Tensor, "batch pos d_model"]:
    """Set the projection ``x·v̂`` to ``value`` (per example) at the masked positions
    (``normalized``: as in :func:`ablate`).

    >>> x = torch.tensor([[[1., 2.]]])
    >>> clamp(x, torch.tensor([2., 0.]), 5.0).tolist()
    [[[5.0, 2.0]]]
    """
    u = _unit_on(v, x, normalized)
    proj = (x @ u)[..., None]
    return torch.where(_mask(mask, x) > 0, x + (_strength(value, x) - proj) * u, x)


def clamp_toward(
    x: Float[Tensor, "batch pos d_model"],
    v: Float[Tensor, "d_model"],
    value: float,
    fraction: Union[float, Float[Tensor, "batch"]] = 1.0,
    mask: Optional[Bool[Tensor, "batch pos"]] = None,
    normalized: bool = False,
) -> Float[Tensor, "batch pos d_model"]:
    """Move the projection ``x·v̂`` a ``fraction`` of the way to ``value`` (1: :func:`clamp`;
    ``normalized``: as in :func:`ablate`).

    >>> x = torch.tensor([[[3., 4.], [1., 1.]]])
    >>> clamp_toward(x, torch.tensor([1., 0.]), 1.0, 0.5).tolist()     # 3 → 2, 1 stays 1
    [[[2.0, 4.0], [1.0, 1.0]]]
    """
    u = _unit_on(v, x, normalized)
    proj = x @ u
    target = proj + _strength(fraction, x)[..., 0] * (float(value) - proj)
    return torch.where(_mask(mask, x) > 0, x + (target - proj)[..., None] * u, x)


@dataclass
class Intervention:
    """One edit of the model's activations, installed by :class:`steer.steering.Steering`.

    Attributes:
        kind: ``"add"``, ``"ablate"``, ``"clamp"`` or ``"map"``.
        vector: ``[d_model]``, ``[n_layers, d_model]`` (one row per layer, e.g. a
            :class:`~steer.directions.Direction`'s vectors) or, for ``"add"`` only, ``[k, d_model]``
            with ``aligned=True``: row ``j`` is added at the ``j``-th selected prompt token (ActAdd).
        layers: layer indices (``"all"`` for every layer).
        sites: site names (``"resid_post"``, ``"resid_pre"``, ``"attn_out"``, ...).
        positions: ``"all"`` (prompt and generated tokens), ``"prompt"``, ``"generated"``, or a
            :mod:`steer.positions` selector applied to the prompt (needs the tokenized batch).
        strength: scalar or ``[batch]`` (``add``: α; ``ablate``: fraction removed; ``clamp``: the
            value, or with ``target`` the fraction of the way to it; ``map``: passed to ``fn``).
        include_sink: also edit the first real token of each prompt (default: leave it alone).
        aligned: ``add`` only — row ``j`` of ``vector`` goes to the ``j``-th selected token.
        target: ``clamp`` only — the value to move the projection toward (see :func:`clamp_toward`).
        fn: ``map`` only — ``fn(x [batch, pos, d], strength [batch, 1, 1]) -> x'`` (a fitted
            :class:`~steer.erasure.LeaceEraser`, a transport map); ``vector`` stays ``None``.
        skip_tokens: token ids never edited, wherever they occur in prompt or generation (e.g. the
            tokens that carry massive activations: ``steer.steer(..., exclude="massive")``).

    >>> iv = Intervention("add", torch.ones(64), layers=[1], strength=4.0)
    >>> iv.kind, iv.layers
    ('add', [1])
    """

    kind: str
    vector: Optional[Tensor] = None
    layers: Any = "all"
    sites: Any = ("resid_post",)
    positions: Any = "all"
    strength: Any = 1.0
    include_sink: bool = False
    aligned: bool = False
    meta: dict = field(default_factory=dict)
    target: Optional[float] = None
    fn: Optional[Callable] = None
    skip_tokens: frozenset = frozenset()

    def __post_init__(self):
        self.skip_tokens = frozenset(int(t) for t in self.skip_tokens)
        if self.kind not in KINDS:
            raise ValueError(f"Unknown intervention kind {self.kind!r}: use one of {KINDS}.")
        if isinstance(self.sites, str):
            self.sites = (self.sites,)
        self.sites = tuple(self.sites)
        if not self.sites or len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites={self.sites!r}: name each site to edit once (e.g. 'resid_post').")
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if self.target is not None and self.kind != "clamp":
            raise ValueError("target= is for kind='clamp' (the value the projection moves toward).")
        for name in ("strength", "target"):
            value = getattr(self, name)
            finite = value is None or callable(value) or torch.isfinite(torch.as_tensor(value, dtype=torch.float64)).all()
            if not finite:
                raise ValueError(f"{name}={value!r} is not finite: every row of the batch would come out NaN.")
        if self.kind == "map":
            if not callable(self.fn) or self.vector is not None:
                raise ValueError("kind='map' takes fn= (a callable fn(x, strength)) and no vector.")
            return
        if self.fn is not None:
            raise ValueError(f"fn= is for kind='map'; kind={self.kind!r} takes a vector.")
        if self.vector is None:
            raise ValueError(f"kind={self.kind!r} needs a vector.")
        self.vector = torch.as_tensor(self.vector).detach()
        if not torch.isfinite(self.vector).all():
            raise ValueError("Intervention vector contains NaN/inf.")
        if self.aligned and self.kind != "add":
            raise ValueError("aligned=True (ActAdd) only makes sense with kind='add'.")
        if self.vector.ndim not in (1, 2):
            raise ValueError(f"Intervention vector must be [d_model] or [rows, d_model], got {tuple(self.vector.shape)}.")

    def vector_for(self, layer: int, n_layers: int) -> Tensor:
        """The vector used at ``layer``: the row for that layer, or the single vector."""
        if self.vector.ndim == 1 or self.aligned:
            return self.vector
        if self.vector.shape[0] != n_layers:
            raise ValueError(
                f"Per-layer vector has {self.vector.shape[0]} rows but the model has {n_layers} layers."
            )
        return self.vector[layer]


# -- weight orthogonalization ----------------------------------------------------------------
def _writers(model) -> list[tuple[str, torch.nn.Module, str]]:
    """(parameter name, module, kind) for every matrix that writes into the residual stream:
    ``"embed"`` (rows written), ``"out"`` (a Linear, ``[d_model, in]``) or ``"conv1d"`` (GPT-2's
    ``Conv1D``, ``[in, d_model]``)."""
    a = model.arch
    if a.attn_post_norm or a.mlp_post_norm:
        raise NotImplementedError(
            f"Weight orthogonalization is not exact for models whose sublayer outputs are normed "
            f"before the residual add ({a.family}: Gemma-2/3 sandwich norms, OLMo-2 post-norms): "
            "the norms rescale what is written. Use runtime ablation (Steering) instead."
        )
    if a.mlp_out is None:
        raise NotImplementedError(f"{model.name} ({a.family}): {'; '.join(a.notes)}.")
    names = {m: n for n, m in model.hf.named_modules()}
    embeds = [m for m in (model.hf.get_input_embeddings(), a.pos_embedding(model.hf)) if m is not None]
    out = [(names[m] + ".weight", m, "embed") for m in embeds]
    kind = "conv1d" if a.conv1d else "out"
    out += [(names[m] + ".weight", m, kind) for layer in model.layers for m in a.writers(layer)]
    return out


@torch.no_grad()
def orthogonalize_weights(model, direction) -> dict[str, Float[Tensor, "..."]]:
    """New weights with ``v̂`` projected out of everything that writes to the residual stream.

    ``W_out ← W_out − v̂ v̂ᵀ W_out`` for attention ``o_proj`` and MLP ``down_proj`` (and their
    biases), ``W_E ← W_E − (W_E v̂) v̂ᵀ`` for the embedding. Equivalent to ablating ``v̂`` at every
    layer and position including the first token (Arditi et al.). Returns ``{param name: tensor}``;
    the model is not modified — :func:`orthogonalized` gives a modified copy (and unties a tied
    unembedding, which must keep its original weights).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> w = orthogonalize_weights(m, torch.randn(64))
    >>> sorted(w)[0]
    'model.embed_tokens.weight'
    """
    v = direction.vector() if hasattr(direction, "vector") and callable(direction.vector) else direction
    v = torch.as_tensor(v)
    if v.shape != (model.d_model,):
        raise ValueError(f"Direction has shape {tuple(v.shape)}, model {model.name} needs [{model.d_model}].")
    out = {}
    for name, module, kind in _writers(model):
        W = dense_weight(module, f"{name[: -len('.weight')]} (to orthogonalize it)")
        u = unit(v.to(W.device, torch.float32))
        Wf = W.float()
        if kind in ("embed", "conv1d"):  # [vocab or d_in, d_model]: rows are written
            new = Wf - (Wf @ u)[:, None] * u[None, :]
        else:  # Linear [d_model, d_in]: columns are written
            new = Wf - u[:, None] * (u @ Wf)[None, :]
        out[name] = new.to(W.dtype)
        if kind != "embed" and getattr(module, "bias", None) is not None:
            b = module.bias.float()
            out[name[: -len("weight")] + "bias"] = (b - (b @ u) * u).to(W.dtype)
    return out


def orthogonalized(model, direction):
    """A copy of ``model`` with :func:`orthogonalize_weights` applied (the original is untouched).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> m2 = orthogonalized(m, torch.randn(64))
    >>> m2 is m
    False
    """
    from ._hf import copy_unhooked
    from .models import Model

    weights = orthogonalize_weights(model, direction)
    hf = copy_unhooked(model.hf)  # not the hooks of a steering block around the call
    out_emb = hf.get_output_embeddings()
    in_emb = hf.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:  # tied: keep the unembedding
        out_emb.weight = torch.nn.Parameter(in_emb.weight.detach().clone(), requires_grad=False)
        hf.config.tie_word_embeddings = False
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    return Model(model.name, hf, model.tokenizer)
