"""Installing hook functions on sites for the duration of a ``with`` block.

A hook function receives the activation at a site and the :class:`~steer.sites.Site`, and may
return a replacement tensor (same shape) or ``None`` to leave it unchanged::

    def double(act, site):          # act: [batch, pos, d_model] (or [batch, pos, head, d_head])
        return 2 * act

    with steer.add_hooks(model, {"resid_post.3": double}):
        model.hf(**inputs)          # forward passes and HF generate see the hook
    # hooks are gone here, also after an exception

Hooks sit on the HuggingFace modules, so HF ``generate`` with its KV cache runs at full speed.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ._hf import cached_length, padding_mask, recorders_last
from .sites import Site, hf_target, parse_sites

__all__ = ["add_hooks", "HookFn", "CallPositions", "call_positions", "StopForward", "record_block_input", "resume_at",
           "stop_before", "run_blocks", "hook_ids"]

HookFn = Callable[[Tensor, Site], Optional[Tensor]]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs (caught by the caller)."""


def _items(hooks) -> Iterable[tuple[object, HookFn]]:
    if isinstance(hooks, Mapping):
        for spec, fns in hooks.items():
            for fn in fns if isinstance(fns, (list, tuple)) else [fns]:
                yield spec, fn
    else:
        yield from hooks


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


def hook_ids(handles) -> set[int]:
    """The ids of the torch hooks behind :func:`add_hooks`' handles (as keys of a module's
    ``_forward_hooks`` / ``_forward_pre_hooks``): to tell one's own hooks from others'.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> with steer.add_hooks(m, {"resid_post.1": lambda act, site: None}) as hs:
    ...     hook_ids(hs) == set(m.layers[1]._forward_hooks)
    True
    """
    out: set[int] = set()
    for h in handles:
        out |= hook_ids(h.handles) if isinstance(h, _Handles) else {h.id}
    return out


def _first_input(args, kwargs) -> Tensor:
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))


def _install_resid_mid(model, site: Site, fn: HookFn):
    """``resid_mid`` has no module boundary in a HF block (the block keeps the sum
    ``resid_pre + attn_out`` in a local variable). Reading it off the MLP norm's input would let
    an edit reach only the MLP, not the residual stream. Instead: stash ``resid_pre`` as the
    attention's (norm's) input, and at the attention output (``attn_out``) form
    ``mid = resid_pre + attn_out``, let ``fn`` edit it, and write ``attn_out' = mid' - resid_pre``,
    so the edit flows on through the residual stream exactly as ``mid'``."""
    a = model.arch
    hf_target(model, site)  # raises where there is no resid_mid (parallel blocks)
    block = model.layers[site.layer]
    stash_at = a.part(block, "attn_norm") or a.attention(block)
    out_tgt = hf_target(model, Site("attn_out", site.layer))
    state: dict = {}

    def stash(module, args, kwargs):
        state["pre"] = _first_input(args, kwargs)

    def post_hook(module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        pre = state.pop("pre")
        mid = pre + first
        new = fn(mid, site)
        if new is None:
            return None
        if new.shape != mid.shape:
            raise ValueError(f"Hook on {site} returned shape {tuple(new.shape)}, expected {tuple(mid.shape)}.")
        new = new - pre
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return _Handles(stash_at.register_forward_pre_hook(stash, with_kwargs=True),
                    out_tgt.module.register_forward_hook(post_hook))


def _install(model, site: Site, fn: HookFn):
    if site.name == "resid_mid":
        return _install_resid_mid(model, site, fn)
    tgt = hf_target(model, site)

    def call(x: Tensor) -> Optional[Tensor]:
        act = tgt.read(x) if tgt.read else x
        out = fn(act, site)
        if out is None:
            return None
        if out.shape != act.shape:
            raise ValueError(f"Hook on {site} returned shape {tuple(out.shape)}, expected {tuple(act.shape)}.")
        return tgt.write(x, out) if tgt.write else out

    if tgt.pre:

        def pre_hook(module, args, kwargs):
            if args:
                new = call(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))  # passed by keyword
            new = call(kwargs[key])
            if new is None:
                return None
            return args, {**kwargs, key: new}

        return tgt.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        new = call(first)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = tgt.module.register_forward_hook(post_hook)
    recorders_last(tgt.module)
    return handle


@contextmanager
def add_hooks(
    model, hooks: Union[Mapping[object, Union[HookFn, list[HookFn]]], Iterable[tuple[object, HookFn]]]
) -> Iterator[None]:
    """Install ``{site: fn}`` (or ``[(site, fn), ...]``) hooks; remove them when the block exits.
    The block receives their handles (:func:`hook_ids` names the torch hooks behind them).

    Sites are ``"resid_post.3"``, ``("z", 5)`` or :class:`~steer.sites.Site`; an unknown site or a
    layer out of range raises before anything is installed.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> seen = []
    >>> with steer.add_hooks(m, {"resid_post.1": lambda act, site: seen.append(act.shape)}):
    ...     _ = m.hf(torch.tensor([[5, 6, 7]]))
    >>> seen
    [torch.Size([1, 3, 64])]
    """
    pairs = [(site, fn) for spec, fn in _items(hooks) for site in parse_sites(model, spec)]
    # resid_mid hooks sit on the attention output too: install them after any attn_out hook so
    # they see (and the residual carries) the edited attention output, as data flows in the layer
    pairs.sort(key=lambda p: p[0].name == "resid_mid")
    handles = []
    try:
        for site, fn in pairs:
            handles.append(_install(model, site, fn))
        yield handles
    finally:
        for h in handles:
            h.remove()


@dataclass
class CallPositions:
    """Where the tokens of one forward call sit: the call's ``n`` tokens are columns
    ``past .. past + n`` of the full (left-padded) sequence, as in ``generate`` with a KV cache.

    ``attention_mask`` is the full ``[batch, past + n]`` mask, ``first`` each row's first real
    column (the attention sink), ``cols`` the columns of the call's tokens, ``real`` the call's
    real tokens and ``sink`` the call's sink tokens (both ``[batch, n]``). ``padding_known`` is
    False when the call's mask could not be read (then every column counts as real).
    """

    attention_mask: Bool[Tensor, "batch full"]
    past: int
    first: Int[Tensor, "batch"]
    cols: Int[Tensor, "pos"]
    real: Bool[Tensor, "batch pos"]
    sink: Bool[Tensor, "batch pos"]
    padding_known: bool = True

    @classmethod
    def of(cls, attention_mask: Bool[Tensor, "batch full"], past: int, padding_known: bool = True) -> "CallPositions":
        """From the full mask of a call whose tokens are its columns ``past ..``."""
        am = attention_mask.bool()
        cols = torch.arange(past, am.shape[1], device=am.device)
        first = am.int().argmax(-1)  # first real column of each row
        return cls(am, past, first, cols, am[:, past:], cols[None, :] == first[:, None], padding_known)

    def editable(self, include_sink: bool = False) -> Bool[Tensor, "batch pos"]:
        """Real tokens, minus the attention sink unless ``include_sink``."""
        return self.real if include_sink else self.real & ~self.sink


def call_positions(args: tuple, kwargs: dict) -> CallPositions:
    """:class:`CallPositions` of a decoder forward call from its (pre-hook) arguments
    (``input_ids`` or ``inputs_embeds``; how many tokens are cached, from ``cache_position``, the
    KV cache under either of its names or a 2-D ``attention_mask``; which are padding, from the
    2-D or 4-D mask: see :mod:`steer._hf`). Without a mask every column is real, as in HF.

    >>> cp = call_positions((), {"input_ids": torch.tensor([[0, 5, 6]]), "attention_mask": torch.tensor([[0, 1, 1]])})
    >>> cp.editable().tolist(), cp.editable(include_sink=True).tolist()
    ([[False, False, True]], [[False, True, True]])
    >>> cp = call_positions((), {"input_ids": torch.tensor([[7]]), "attention_mask": torch.tensor([[0, 1, 1, 1]])})
    >>> cp.past, cp.editable().tolist()      # a generate step: column 3, not the sink
    (3, [[True]])
    >>> from transformers import DynamicCache
    >>> cache = DynamicCache()
    >>> cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)[0].shape[2]
    3
    >>> cp = call_positions((), {"input_ids": torch.tensor([[7]]), "cache": cache})  # no mask (HF dropped it)
    >>> cp.past, cp.editable().tolist()
    (3, [[True]])
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        raise TypeError("The forward call has neither input_ids nor inputs_embeds.")
    b, n = ref.shape[0], ref.shape[1]
    past = cached_length(kwargs, n)
    keep, readable = padding_mask(kwargs, past + n)
    am = keep.to(ref.device) if keep is not None else torch.ones((b, past + n), dtype=torch.bool, device=ref.device)
    return CallPositions.of(am, past, readable)


@contextmanager
def record_block_input(model, layer: int) -> Iterator[dict]:
    """Record the input block ``layer`` receives, as the block above hands it over (before any
    pre-hook edits it), in ``rec["resid"]``; ``rec["bare"]`` says whether block ``layer − 1``
    returns a bare tensor (what :func:`resume_at` needs to stand in for it).

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> with record_block_input(m, 1) as rec:
    ...     _ = m.hf(input_ids=torch.tensor([[5, 6, 7]]))
    >>> rec["resid"].shape, rec["bare"]
    (torch.Size([1, 3, 64]), True)
    """
    if not 1 <= layer < len(model.layers):
        raise ValueError(f"record_block_input: layer {layer} has no block before it in 1..{len(model.layers) - 1}.")
    rec = {}

    def pre(module, args, kwargs):
        rec["resid"] = _first_input(args, kwargs)

    def post(module, args, output):
        rec["bare"] = isinstance(output, Tensor)

    handles = (model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
               model.layers[layer - 1].register_forward_hook(post, prepend=True))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


class _Skipped(torch.nn.Module):
    """Stands in for a decoder block that need not run: hands its input on (or ``out`` for the
    last skipped block) and answers attribute lookups (``attention_type``, ...) as the block does."""

    def __init__(self, block: torch.nn.Module, out: Optional[Tensor]):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: parameters stay the block's
        object.__setattr__(self, "_out", out)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, hidden_states=None, *args, **kwargs):
        if self._out is None:
            return hidden_states
        if hidden_states is not None and hidden_states.shape != self._out.shape:
            raise ValueError(f"resume_at: resid has shape {tuple(self._out.shape)} but this forward's tokens give "
                             f"{tuple(hidden_states.shape)}: pass what record_block_input recorded for the same tokens.")
        return self._out


@contextmanager
def resume_at(model, layer: int, resid: Float[Tensor, "batch pos d_model"]) -> Iterator[None]:
    """Within the block, a forward pass of ``model`` runs only blocks ``layer ..``: blocks
    ``0 .. layer − 1`` are swapped for stand-ins (their hooks and KV-cache writes skipped) and
    block ``layer`` receives ``resid``, the input it had in an earlier forward pass of the same
    tokens (:func:`record_block_input`). The embedding, final norm and unembedding still run; the
    forward's cache holds nothing for the skipped blocks. Only for blocks that return a bare tensor.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> with record_block_input(m, 1) as rec:
    ...     full = m.hf(input_ids=ids).logits
    >>> with resume_at(m, 1, rec["resid"]):
    ...     part = m.hf(input_ids=ids).logits
    >>> torch.equal(full, part)
    True
    """
    blocks = model.layers
    if not 1 <= layer < len(blocks):
        raise ValueError(f"resume_at: layer {layer} has no block before it in 1..{len(blocks) - 1}.")
    if resid.ndim != 3 or resid.shape[-1] != model.d_model:
        raise ValueError(f"resume_at: resid has shape {tuple(resid.shape)}; block {layer} takes [batch, pos, "
                         f"{model.d_model}]: pass what record_block_input recorded for the same tokens.")
    kept = [blocks[i] for i in range(layer)]
    try:
        for i in range(layer):
            blocks[i] = _Skipped(kept[i], resid if i == layer - 1 else None)
        yield
    finally:
        for i in range(layer):
            blocks[i] = kept[i]


@contextmanager
def stop_before(model, layer: int) -> Iterator[None]:
    """Within the block, a forward pass of ``model`` ends (:class:`StopForward`, for the caller to
    catch) as block ``layer`` is about to run, after any hook that reads its input first
    (:func:`record_block_input`): blocks below have run and written their KV cache.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> with record_block_input(m, 1) as rec, stop_before(m, 1):
    ...     try:
    ...         m.hf(input_ids=torch.tensor([[5, 6, 7]]))
    ...     except StopForward:
    ...         print("stopped", tuple(rec["resid"].shape))
    stopped (1, 3, 64)
    """
    if not 0 <= layer < len(model.layers):
        raise ValueError(f"stop_before: layer {layer} is outside 0..{len(model.layers) - 1}.")

    def stop(module, args, kwargs):
        raise StopForward

    handle = model.layers[layer].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def run_blocks(model, forward: Callable[[], Any], start: int, stop: int,
               resid: Optional[Float[Tensor, "batch pos d_model"]] = None) -> tuple[Any, dict]:
    """Call ``forward()`` (a forward pass of ``model``) so that it runs only blocks
    ``start .. stop − 1``: block ``start`` receives ``resid`` (:func:`resume_at`; with no
    ``resid``, the blocks below run too) and the pass ends before block ``stop``
    (:func:`stop_before`; ``stop = n_layers`` runs to the end). Returns the forward's output (None
    where it stopped) and the record of block ``stop``'s input (:func:`record_block_input`; empty
    at the end).

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> _, at1 = run_blocks(m, lambda: m.hf(input_ids=ids), 0, 1)
    >>> out, _ = run_blocks(m, lambda: m.hf(input_ids=ids), 1, m.n_layers, at1["resid"])
    >>> torch.equal(out.logits, m.hf(input_ids=ids).logits)
    True
    """
    n = len(model.layers)
    if not 0 <= start < stop <= n:
        raise ValueError(f"run_blocks: blocks {start} .. {stop} − 1 are not a range of 0 .. {n - 1} "
                         "(need 0 <= start < stop <= n_layers).")
    with ExitStack() as stack:
        if resid is not None:
            stack.enter_context(resume_at(model, start, resid))
        rec = {}
        if stop < len(model.layers):
            rec = stack.enter_context(record_block_input(model, stop))
            stack.enter_context(stop_before(model, stop))
        try:
            return forward(), rec
        except StopForward:
            return None, rec
