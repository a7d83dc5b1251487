"""Sites: named places in the model (``resid_post`` at layer 12, head outputs ``z`` at layer 3, ...).

=============  ==========================================  ======================================
site           what                                        shape at the hook
=============  ==========================================  ======================================
``resid_pre``  residual stream entering block ``l``        ``batch pos d_model``
``resid_mid``  residual after attention, before the MLP    ``batch pos d_model``
``resid_post`` residual leaving block ``l``                ``batch pos d_model``
``attn_out``   what attention adds to the residual         ``batch pos d_model``
``mlp_out``    what the MLP adds to the residual           ``batch pos d_model``
``z``          per-head attention output before ``W_O``    ``batch pos head d_head``
``q/k/v``      per-head queries/keys/values (pre-rotary)   ``batch pos head d_head``
``neuron``     MLP hidden activations (input of W_out)     ``batch pos d_mlp``
=============  ==========================================  ======================================

steer hooks the HuggingFace modules (cheap, and fast HF ``generate`` keeps working);
:func:`tl_name` gives the TransformerLens hook with the same values, for parity checks.
For architectures with sandwich norms (Gemma-3) ``attn_out``/``mlp_out`` are the *normed*
outputs, i.e. what is actually added to the residual stream.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from . import arch

__all__ = ["Site", "SITES", "parse_sites", "resolve_layers", "tl_name"]

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "neuron")
_HEADED = {"z", "q", "k", "v"}


@dataclass(frozen=True, order=True)
class Site:
    """One hook point: a site name at a layer."""

    name: str
    layer: int

    def __str__(self) -> str:
        return f"{self.name}.{self.layer}"

    @property
    def per_head(self) -> bool:
        return self.name in _HEADED


def resolve_layers(model, layers: Union[str, int, Iterable[int], None]) -> list[int]:
    """``"all"`` / ``None`` / int / iterable of ints (negative counts from the end) → layer list.

    >>> import steer
    >>> resolve_layers(steer.load("tiny-llama"), -1)
    [1]"""
    n = model.n_layers
    if layers is None or layers == "all":
        return list(range(n))
    if isinstance(layers, str):
        raise ValueError(f"layers={layers!r}: use 'all', an int or a list of ints in [0, {n}).")
    items = [layers] if _is_index(layers) or isinstance(layers, bool) else list(layers)
    if not items:
        raise ValueError("layers is empty: pass 'all', an int or a non-empty list of ints.")
    out = []
    for layer in items:
        if not _is_index(layer):
            raise ValueError(f"Layer {layer!r} is not a layer index: pass ints in [0, {n}) (negative count from the end).")
        layer = operator.index(layer)
        if not -n <= layer < n:
            raise ValueError(f"Layer {layer!r} out of range: {model.name} has layers 0..{n - 1}.")
        if layer % n in out:  # it would be hooked (and steered) twice
            raise ValueError(f"Layer {layer % n} is listed twice in layers={list(items)!r}.")
        out.append(layer % n)
    return out


def _is_index(x) -> bool:
    """An integer (Python's, numpy's, a 0-d integer tensor), not a bool."""
    if isinstance(x, (bool, np.bool_)) or getattr(x, "dtype", None) is torch.bool:
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def _check_name(name: str) -> None:
    if name not in SITES:
        raise ValueError(f"Unknown site {name!r}. Valid sites: {', '.join(SITES)}.")


def parse_sites(model, spec) -> list[Site]:
    """Parse ``"resid_post.12"``, ``("resid_post", 12)``, a :class:`Site`, or a list of these.

    >>> import steer
    >>> parse_sites(steer.load("tiny-llama"), ["z.0", ("mlp_out", -1)])
    [Site(name='z', layer=0), Site(name='mlp_out', layer=1)]"""
    if isinstance(spec, Site):
        items = [spec]
    elif isinstance(spec, str) or (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str)):
        items = [spec]
    else:
        items = list(spec)
    out = []
    for it in items:
        if isinstance(it, Site):
            site = it
        elif isinstance(it, tuple):
            site = Site(it[0], it[1])
        elif isinstance(it, str):
            name, _, layer = it.rpartition(".")
            if not name or not re.fullmatch(r"-?[0-9]+", layer):
                _check_name(it)
                raise ValueError(f"Site {it!r} has no layer: write it as '{it}.<layer>'.")
            site = Site(name, int(layer))
        else:
            raise TypeError(f"Cannot read a site from {it!r}.")
        _check_name(site.name)
        (layer,) = resolve_layers(model, site.layer)
        out.append(Site(site.name, layer))
    return out


_TL = {
    "resid_pre": "blocks.{l}.hook_in",
    "resid_mid": "blocks.{l}.ln2.hook_in",
    "resid_post": "blocks.{l}.hook_out",
    "attn_out": "blocks.{l}.attn.hook_out",
    "mlp_out": "blocks.{l}.mlp.hook_out",
    "z": "blocks.{l}.attn.o.hook_in",
    "q": "blocks.{l}.attn.q.hook_out",
    "k": "blocks.{l}.attn.k.hook_out",
    "v": "blocks.{l}.attn.v.hook_out",
    "neuron": "blocks.{l}.mlp.out.hook_in",
}


def tl_name(site: Site, model=None) -> str:
    """Canonical TransformerBridge hook name carrying the same values as ``site`` (on ``model``:
    where a family's sublayer outputs are normed before the residual add, Gemma-2/3 and OLMo-2,
    ``attn_out``/``mlp_out`` are those norms' outputs).

    >>> tl_name(Site("z", 3))
    'blocks.3.attn.o.hook_in'"""
    a, l = getattr(model, "arch", None), site.layer
    if a is not None:
        if site.name == "attn_out" and a.attn_post_norm:
            return f"blocks.{l}.ln1_post.hook_out"
        if site.name == "mlp_out" and a.mlp_post_norm:
            return f"blocks.{l}.ln2_post.hook_out"
        if site.name == "resid_mid" and a.mlp_norm is None:
            return f"blocks.{l}.mlp.hook_in"
    return _TL[site.name].format(l=l)


# -- where each site lives in a HuggingFace block (the anatomy comes from steer.arch) --------
@dataclass(frozen=True)
class _Target:
    module: torch.nn.Module
    pre: bool  # read/modify the module's first input (True) or its output (False)
    read: Optional[Callable[[Tensor], Tensor]] = None  # module tensor -> site activation
    write: Optional[Callable[[Tensor, Tensor], Tensor]] = None  # (module tensor, new activation) -> module tensor


def _heads(n: int):
    return (lambda x: x.unflatten(-1, (n, -1))), (lambda x, new: new.flatten(-2))


def hf_target(model, site: Site) -> _Target:
    """The HF module (and which of its tensors, and how to view it) that carries ``site``."""
    a: arch.Arch = model.arch
    block = model.layers[site.layer]
    name = site.name
    if name == "resid_pre":
        return _Target(block, True)
    if name == "resid_post":
        return _Target(block, False)
    if name == "resid_mid":  # the MLP's (norm's) input: right for reading; add_hooks edits it via attn_out
        if a.parallel:
            raise arch.UnsupportedModel(
                f"{model.name} runs attention and MLP in parallel on the block input ({a.family}): "
                "there is no resid_mid. Use resid_pre, attn_out or mlp_out."
            )
        norm = a.part(block, "mlp_norm")
        return _Target(norm if norm is not None else a.mlp_module(block), True)
    if name == "attn_out":
        post = a.part(block, "attn_post_norm")
        return _Target(post if post is not None else a.attention(block), False)
    if name == "mlp_out":
        post = a.part(block, "mlp_post_norm")
        return _Target(post if post is not None else a.mlp_module(block), False)
    if name == "z":
        return _Target(a.proj(block, "o"), True, *_heads(model.n_heads))
    if name in ("q", "k", "v"):
        if a.qkv is not None:
            read, write = arch.qkv_slices(a, model.n_heads, model.n_kv_heads, model.d_head)[name]
            return _Target(a.proj(block, "qkv"), False, read, write)
        return _Target(a.proj(block, name), False, *_heads(model.n_heads if name == "q" else model.n_kv_heads))
    if name == "neuron":
        proj = a.mlp_out_proj(block)
        if proj is None:
            raise arch.UnsupportedModel(f"{model.name} ({a.family}): {'; '.join(a.notes) or 'no MLP output projection'}.")
        return _Target(proj, True)
    raise AssertionError(name)
