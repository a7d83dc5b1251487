"""Node sets: which components get a score, and how a variant patches one of them.

=================  ==========  ==========================  ==================================
kind               site        score shape                 one node patches
=================  ==========  ==========================  ==================================
``resid``          resid_pre   ``layer pos``               residual stream entering the layer
``attn_out``       attn_out    ``layer pos``               attention output at one position
``mlp_out``        mlp_out     ``layer pos``               MLP output at one position
``heads``          z           ``layer head``              one head's z at every position
``heads_by_pos``   z           ``layer pos head``          one head's z at one position
``q``/``k``/``v``  q/k/v       ``layer head``              one (KV-)head at every position
``q_by_pos`` ...   q/k/v       ``layer pos head``          one (KV-)head at one position
``neurons``        neuron      ``layer neuron``            one MLP neuron at every position
=================  ==========  ==========================  ==================================

k and v have ``n_kv_heads`` heads (grouped-query attention), as in TransformerLens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union
from math import prod

import torch
from jaxtyping import Bool
from torch import Tensor

__all__ = ["NodeSet", "node_set", "resolve_nodes", "NODE_KINDS"]

# kind -> (site, unit axes)
_KINDS = {
    "resid": ("resid_pre", ("pos",)),
    "attn_out": ("attn_out", ("pos",)),
    "mlp_out": ("mlp_out", ("pos",)),
    "heads": ("z", ("head",)),
    "heads_by_pos": ("z", ("pos", "head")),
    "q": ("q", ("head",)),
    "k": ("k", ("head",)),
    "v": ("v", ("head",)),
    "q_by_pos": ("q", ("pos", "head")),
    "k_by_pos": ("k", ("pos", "head")),
    "v_by_pos": ("v", ("pos", "head")),
    "neurons": ("neuron", ("neuron",)),
}
NODE_KINDS = tuple(_KINDS)
_ALIASES = {"z": "heads", "head": "heads", "neuron": "neurons", "resid_pre": "resid"}


@dataclass(frozen=True)
class NodeSet:
    """A node kind resolved for a model and a sequence length.

    ``act_axes``/``act_shape``: the site activation without the batch axis; ``units``: the axes
    that index a node (besides the layer). Scores have shape ``(n_layers, *unit sizes)``.
    Build one with :func:`node_set`.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")                # 2 layers, 4 heads of d_head 16
    >>> ns = node_set(m, "heads_by_pos", n_pos=3)
    >>> ns.site, ns.axes, ns.shape, ns.n_nodes
    ('z', ('layer', 'pos', 'head'), (2, 3, 4), 24)
    >>> ns.act_shape, ns.mask_shape                 # z is [pos, head, d_head]; masks broadcast over d_head
    ((3, 4, 16), (3, 4, 1))

    One mask per node of a layer (row-major over ``units``: node 5 is pos 1, head 1), or
    several nodes patched together in one variant:

    >>> masks = ns.masks()
    >>> masks.shape, masks[5].squeeze(-1).nonzero().tolist()
    (torch.Size([12, 3, 4, 1]), [[1, 1]])
    >>> include = torch.zeros(1, ns.per_layer, dtype=torch.bool); include[0, [0, 7]] = True
    >>> ns.masks_from(include)[0].squeeze(-1).nonzero().tolist()
    [[0, 0], [1, 3]]

    Per-node scores from an activation-shaped tensor (e.g. a gradient times a difference, as in
    attribution patching) by summing the non-unit axes:

    >>> ns.reduce(torch.ones(5, 3, 4, 16)).shape       # [batch, pos, head]
    torch.Size([5, 3, 4])
    """

    kind: str
    site: str
    n_layers: int
    act_axes: tuple[str, ...]
    act_shape: tuple[int, ...]
    units: tuple[str, ...]

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return tuple(self.act_shape[self.act_axes.index(u)] for u in self.units)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the score array: ``(layer, *units)``."""
        return (self.n_layers, *self.unit_shape)

    @property
    def axes(self) -> tuple[str, ...]:
        return ("layer", *self.units)

    @property
    def n_nodes(self) -> int:
        return prod(self.shape)

    @property
    def per_layer(self) -> int:
        return prod(self.unit_shape)

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """Activation shape with the non-unit axes set to 1 (masks broadcast over them)."""
        return tuple(n if a in self.units else 1 for a, n in zip(self.act_axes, self.act_shape))

    def masks(self, start: int = 0, stop: int | None = None) -> Bool[Tensor, "variant *mask"]:
        """One boolean mask per node of a layer (nodes ``start:stop`` in row-major unit order)."""
        stop = self.per_layer if stop is None else stop
        flat = torch.zeros(stop - start, self.per_layer, dtype=torch.bool)
        flat[torch.arange(stop - start), torch.arange(start, stop)] = True
        return self.masks_from(flat)

    def masks_from(self, include: Bool[Tensor, "variant node"]) -> Bool[Tensor, "variant *mask"]:
        """Masks patching several nodes of a layer at once: ``include[v, i]`` = node ``i`` in variant ``v``."""
        V = include.shape[0]
        m = include.reshape(V, *self.unit_shape)
        order = [self.units.index(a) for a in self.act_axes if a in self.units]
        m = m.permute(0, *[o + 1 for o in order])
        return m.reshape(V, *self.mask_shape)

    def reduce(self, x: Tensor) -> Tensor:
        """Sum an activation-shaped tensor ``[..., *act_shape]`` over the non-unit axes."""
        nd = len(self.act_axes)
        dims = [x.ndim - nd + i for i, a in enumerate(self.act_axes) if a not in self.units]
        out = x.sum(dim=dims) if dims else x
        kept = [a for a in self.act_axes if a in self.units]
        perm = [kept.index(u) for u in self.units]
        lead = out.ndim - len(kept)
        return out.permute(*range(lead), *[lead + p for p in perm])


def node_set(model, kind: str, n_pos: int) -> NodeSet:
    """Resolve a node kind for ``model`` and prompts of ``n_pos`` tokens.

    >>> import steer
    >>> node_set(steer.load("tiny-llama"), "heads", 5).shape
    (2, 4)
    """
    kind = _ALIASES.get(kind, kind)
    if kind not in _KINDS:
        raise ValueError(f"Unknown node kind {kind!r}. Choose from: {', '.join(NODE_KINDS)}.")
    site, units = _KINDS[kind]
    if site in ("resid_pre", "attn_out", "mlp_out"):
        axes, shape = ("pos", "d_model"), (n_pos, model.d_model)
    elif site == "neuron":
        axes, shape = ("pos", "neuron"), (n_pos, model.d_mlp)
    else:
        heads = model.n_heads if site in ("z", "q") else model.n_kv_heads
        axes, shape = ("pos", "head", "d_head"), (n_pos, heads, model.d_head)
    return NodeSet(kind, site, model.n_layers, axes, shape, units)


def resolve_nodes(model, nodes: Union[str, NodeSet], n_pos: int) -> NodeSet:
    """``nodes`` as a :class:`NodeSet` for ``model`` and prompts of ``n_pos`` tokens: a kind name
    is resolved; a ``NodeSet`` must have been built for the same shapes (one built for prompts of
    another length would label the scores with the wrong positions).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> resolve_nodes(m, "heads", 5) == node_set(m, "heads", 5)
    True
    >>> resolve_nodes(m, node_set(m, "resid", 3), 5)
    Traceback (most recent call last):
    ...
    ValueError: NodeSet 'resid' was built for activations (3, 64) of a 2-layer model; this model and task have (5, 64) and 2 layers: build it with node_set(model, 'resid', task.n_pos), or pass the kind 'resid'.
    """
    if not isinstance(nodes, NodeSet):
        return node_set(model, nodes, n_pos)
    want = node_set(model, nodes.kind, n_pos)
    if nodes != want:
        raise ValueError(f"NodeSet {nodes.kind!r} was built for activations {nodes.act_shape} of a {nodes.n_layers}-layer "
                         f"model; this model and task have {want.act_shape} and {want.n_layers} layers: build it with "
                         f"node_set(model, {nodes.kind!r}, task.n_pos), or pass the kind {nodes.kind!r}.")
    return nodes

