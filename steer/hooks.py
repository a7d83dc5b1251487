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

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

from torch import Tensor

from .sites import Site, hf_target, parse_sites

__all__ = ["add_hooks", "HookFn"]

HookFn = Callable[[Tensor, Site], Optional[Tensor]]


def _items(hooks) -> Iterable[tuple[object, HookFn]]:
    if isinstance(hooks, Mapping):
        for spec, fns in hooks.items():
            for fn in fns if isinstance(fns, (list, tuple)) else [fns]:
                yield spec, fn
    else:
        yield from hooks


def _install(model, site: Site, fn: HookFn):
    tgt = hf_target(model, site)
    heads = tgt.heads

    def call(x: Tensor) -> Optional[Tensor]:
        act = x.unflatten(-1, (heads, -1)) if heads else x
        out = fn(act, site)
        if out is None:
            return None
        if out.shape != act.shape:
            raise ValueError(f"Hook on {site} returned shape {tuple(out.shape)}, expected {tuple(act.shape)}.")
        return out.flatten(-2) if heads else out

    if tgt.pre:

        def pre_hook(module, args, kwargs):
            if args:
                new = call(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            key = next(iter(kwargs))  # hidden_states passed by keyword
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

    return tgt.module.register_forward_hook(post_hook)


@contextmanager
def add_hooks(
    model, hooks: Union[Mapping[object, Union[HookFn, list[HookFn]]], Iterable[tuple[object, HookFn]]]
) -> Iterator[None]:
    """Install ``{site: fn}`` (or ``[(site, fn), ...]``) hooks; remove them when the block exits.

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
    handles = []
    try:
        for site, fn in pairs:
            handles.append(_install(model, site, fn))
        yield
    finally:
        for h in handles:
            h.remove()
