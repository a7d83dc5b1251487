"""What steer reads from a HuggingFace forward call, independent of how a release spells it.

steer's hooks sit on HF modules, so they see whatever keyword arguments the installed
transformers passes. Those move between releases; everything that depends on their spelling
lives here, so a rename is one edit and not a silent change of results.

Known changes (the oldest release ``pyproject.toml`` allows is 5.9):

* **transformers 5.24** renamed the KV cache argument of every model and decoder-layer
  ``forward`` from ``past_key_values=`` to ``cache=`` (``past_key_values`` still works with a
  warning until 5.40). Since 5.18 ``generate`` also drops an all-ones attention mask
  (``generation/utils.py``: "we will never have padding"), so for an unpadded batch — any batch
  of one prompt — decode steps carry no mask, and under 5.24 no ``past_key_values`` either.
  steer read the number of cached tokens from the mask or from ``past_key_values``; under 5.24 it
  found neither, took every decode step for a fresh one-token prompt whose only token was the
  attention sink, and left it unsteered. Batched steered generation then differed from
  per-example generation (issue 10). :func:`cached_length` now asks the cache object itself,
  under whichever name it came, and refuses to guess.
* Before 5.24 the ``sdpa`` attention silently dropped Gemma-2's attention-logit soft-capping
  (5.24 raises instead, and loads Gemma-2 with eager attention): a Gemma-2 loaded with ``sdpa``
  under 5.9-5.23 computes another function than the model's. :func:`softcap_safe_attention`
  switches such a model to eager attention.
* With a static cache (``cache_implementation="static"``) ``generate`` passes the model a 4-D
  mask (``[batch, 1, query, max_cache_len]``), or a dict of them by layer type, instead of the
  2-D one: :func:`padding_mask` reads the padding back from it.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["find_cache", "cached_length", "padding_mask", "cache_kwarg", "assign_cache_rows", "softcap_safe_attention"]

_CACHE_NAMES = ("cache", "past_key_values", "layer_past")  # 5.24+, 5.9-5.23, GPT-NeoX's blocks


def _is_cache(obj: Any) -> bool:
    return hasattr(obj, "get_seq_length") and hasattr(obj, "update")


def find_cache(kwargs: dict) -> Optional[Any]:
    """The KV cache object among a forward call's keyword arguments, whatever it is called.

    >>> from transformers import DynamicCache
    >>> c = DynamicCache()
    >>> find_cache({"cache": c}) is c, find_cache({"past_key_values": c}) is c, find_cache({})
    (True, True, None)
    """
    for name in _CACHE_NAMES:
        if _is_cache(kwargs.get(name)):
            return kwargs[name]
    for value in kwargs.values():  # a future spelling: any argument that is a cache
        if _is_cache(value):
            return value
    return None


def cached_length(kwargs: dict, n_new: int) -> int:
    """How many columns of the sequence precede the ``n_new`` tokens of this call.

    Read from the cache's own length (before this call writes to it), a 2-D attention mask
    (``past + n_new`` columns) and, unless both of those are there, ``cache_position`` (releases
    that pass it; reading a device tensor waits for the GPU). Each source that is present must
    agree with the others; with none of them the call is a fresh
    sequence, and ``position_ids`` that do not start at 0 then mean a cache is hidden somewhere
    steer cannot see — an error, not a guess.

    >>> import torch
    >>> cached_length({"attention_mask": torch.ones(2, 7)}, 1)
    6
    >>> cached_length({"input_ids": torch.ones(1, 3)}, 3)
    0
    """
    found: dict[str, int] = {}
    cache = find_cache(kwargs)
    if cache is not None:
        found["the cache's length"] = int(cache.get_seq_length())
    am = kwargs.get("attention_mask")
    if isinstance(am, Tensor) and am.ndim == 2:
        found["the attention mask"] = am.shape[1] - n_new
    cp = kwargs.get("cache_position")
    if isinstance(cp, Tensor) and cp.numel() and len(found) < 2:  # (reading it syncs a GPU: only
        found["cache_position"] = int(cp.reshape(-1)[0])         # when two others cannot agree)
    if len(set(found.values())) > 1:
        raise RuntimeError(
            f"This forward call disagrees with itself about how many tokens are cached ({found}); "
            "steer cannot place its tokens in the sequence. Pass a 2-D attention_mask covering the "
            "cached and the new tokens."
        )
    if found:
        return next(iter(found.values()))
    pos = kwargs.get("position_ids")
    if isinstance(pos, Tensor) and pos.numel() and int(pos.min()) > 0:
        raise RuntimeError(
            f"The forward call's position_ids start at {int(pos.min())} but it carries no cache, "
            "cache_position or 2-D attention_mask that steer can read, so it cannot tell which "
            "tokens are new. Pass attention_mask= (the full [batch, past + new] mask)."
        )
    return 0


def padding_mask(kwargs: dict, total: int) -> tuple[Optional[Tensor], bool]:
    """Which of a call's ``total`` (cached + new) columns are real tokens: ``(mask, readable)``.

    A 2-D ``attention_mask`` is that mask. A 4-D one (``[batch, 1, query, key]``; boolean, or
    additive with 0 where attention is allowed), or the ``"full_attention"`` entry of a dict of
    them, gives it in its last query row, which sees every earlier real column. No mask means no
    padding (``None, True``), as in HF. Anything else (a sliding-window-only mask, a flex
    ``BlockMask``) is not readable: ``(None, False)``, and the caller must know the padding another
    way or say so.

    >>> import torch
    >>> m4 = torch.tensor([[[[True, False, False], [False, True, False], [False, True, True]]]])
    >>> padding_mask({"attention_mask": m4}, 3)[0].tolist()     # column 0 is padding
    [[False, True, True]]
    >>> padding_mask({}, 3)
    (None, True)
    """
    am = kwargs.get("attention_mask")
    if isinstance(am, dict):
        if "full_attention" not in am:
            return None, False
        am = am["full_attention"]
    if am is None:
        return None, True
    if isinstance(am, Tensor) and am.ndim == 2:
        return am.bool(), True
    if isinstance(am, Tensor) and am.ndim == 4 and am.shape[-1] >= total:
        last = am[:, 0, -1, :total]
        return (last if last.dtype == torch.bool else last == 0), True
    return None, False


def cache_kwarg(module: torch.nn.Module) -> str:
    """The keyword a decoder layer's ``forward`` takes its KV cache under (``cache`` from 5.24).

    >>> import steer
    >>> cache_kwarg(steer.load("tiny-llama").layers[0]) in ("cache", "past_key_values")
    True
    """
    params = inspect.signature(module.forward).parameters
    for name in _CACHE_NAMES:
        if name in params:
            return name
    raise TypeError(
        f"{type(module).__name__}.forward takes neither of {_CACHE_NAMES}: steer does not know how "
        "this transformers release passes the KV cache to a decoder layer."
    )


def output_cache(out: Any) -> Any:
    """The KV cache a model's forward returned (``out.cache`` from 5.24, ``past_key_values`` before;
    read without touching the deprecated name when the new one is there).

    >>> from types import SimpleNamespace as NS
    >>> output_cache(NS(cache=1, past_key_values=2)), output_cache(NS(past_key_values=2))
    (1, 2)
    """
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    raise TypeError(f"{type(out).__name__} holds no KV cache (neither .cache nor .past_key_values): pass use_cache=True.")


def _dynamic_kinds(*caches) -> Optional[tuple]:
    """The plain per-layer key/value kinds (full, sliding-window) of this transformers release if
    every one of ``caches`` is a ``DynamicCache`` of the same depth (none given: just the kinds);
    else None (older releases' tuples, static, quantized or other caches)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:  # a release without per-layer cache objects
        return None
    if any(type(c) is not DynamicCache for c in caches) or len({len(c.layers) for c in caches}) > 1:
        return None
    return DynamicLayer, DynamicSlidingWindowLayer


def assign_cache_rows(cache: Any, rows: Tensor, other: Any, start: int = 0, stop: Optional[int] = None) -> bool:
    """Write ``other`` (a KV cache of the same kind, one batch row per entry of ``rows``, filled
    by the same tokens at the same width) into batch rows ``rows`` of ``cache``, in place, for
    layers ``start .. stop − 1`` (``other`` may hold nothing outside them: :func:`steer.hooks.resume_at`). Only a
    ``DynamicCache`` of full or sliding-window key/value layers is written; for any other kind
    (static, quantized, linear-attention or recurrent states, older releases' tuples) nothing is
    written and the answer is False, so the caller can fall back to recomputing the whole batch.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    >>> a = output_cache(m.hf(input_ids=ids, use_cache=True))
    >>> b = output_cache(m.hf(input_ids=ids[1:] + 1, use_cache=True))
    >>> assign_cache_rows(a, torch.tensor([1]), b), torch.equal(a.layers[0].keys[1], b.layers[0].keys[0])
    (True, True)
    """
    kinds = _dynamic_kinds(cache, other)
    if kinds is None:
        return False
    pairs = []
    for a, b in zip(cache.layers[start:stop], other.layers[start:stop]):
        if type(a) not in kinds or type(b) is not type(a):
            return False
        for name in ("keys", "values"):
            x, y = getattr(a, name, None), getattr(b, name, None)
            if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or x.shape[1:] != y.shape[1:] \
                    or y.shape[0] != len(rows) or x.dtype != y.dtype:
                return False
            pairs.append((x, y))
        if getattr(a, "cumulative_length", None) != getattr(b, "cumulative_length", None):
            return False
    for x, y in pairs:
        x[rows.to(x.device)] = y.to(x.device)
    return True


def empty_cache(hf: torch.nn.Module) -> Optional[Any]:
    """A new, empty ``DynamicCache`` for ``hf``'s config, as its forward would make, if every layer
    of it is a plain full or sliding-window key/value layer (what :func:`assign_cache_rows`,
    :func:`select_cache_rows` and :func:`splice_cache_layers` work on); else None.

    >>> import steer
    >>> type(empty_cache(steer.load("tiny-gemma3").hf)).__name__
    'DynamicCache'
    """
    kinds = _dynamic_kinds()
    if kinds is None:
        return None
    from transformers.cache_utils import DynamicCache

    try:
        cache = DynamicCache(config=hf.config)
    except TypeError:  # a release whose DynamicCache takes no config
        return None
    return cache if cache.layers and all(type(a) in kinds for a in cache.layers) else None


def splice_cache_layers(cache: Any, other: Any, stop: int) -> bool:
    """Make layers ``0 .. stop − 1`` of ``cache`` those of ``other`` (the same model and batch; the
    two forwards that filled them split the model at ``stop``), in place; False (and nothing
    changed) unless both are ``DynamicCache`` s whose layers there are of the same plain kinds
    and hold tensors.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> a, b = (output_cache(m.hf(input_ids=torch.tensor([[5, 6, 7]]) + i, use_cache=True)) for i in (0, 1))
    >>> splice_cache_layers(a, b, 1), a.layers[0] is b.layers[0], a.layers[1] is b.layers[1]
    (True, True, False)
    """
    if not can_splice_cache_layers(cache, other, stop):
        return False
    cache.layers[:stop] = other.layers[:stop]
    return True


def can_splice_cache_layers(cache: Any, other: Any, stop: int) -> bool:
    """Whether :func:`splice_cache_layers` would join ``cache`` and ``other`` at ``stop``: both
    ``DynamicCache`` s whose layers ``0 .. stop − 1`` are of the same plain kinds, ``other``'s
    holding tensors (``cache``'s may be still empty, before the forward that fills the rest).

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> full = output_cache(m.hf(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True))
    >>> can_splice_cache_layers(empty_cache(m.hf), full, 1), can_splice_cache_layers(full, empty_cache(m.hf), 1)
    (True, False)
    """
    kinds = _dynamic_kinds(cache, other)
    if kinds is None:
        return False
    return all(type(a) in kinds and type(b) is type(a) and isinstance(getattr(b, "keys", None), Tensor)
               for a, b in zip(cache.layers[:stop], other.layers[:stop]))


def select_cache_rows(cache: Any, rows: Tensor) -> bool:
    """Keep only batch rows ``rows`` of ``cache``, in place (a batch whose finished rows leave
    it). As :func:`assign_cache_rows`, only a ``DynamicCache`` of full or sliding-window key/value
    layers is changed; for any other kind nothing is, and the answer is False.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> c = output_cache(m.hf(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), use_cache=True))
    >>> k1 = c.layers[0].keys[1].clone()
    >>> select_cache_rows(c, torch.tensor([1])), c.layers[0].keys.shape[0], torch.equal(c.layers[0].keys[0], k1)
    (True, 1, True)
    """
    kinds = _dynamic_kinds(cache)
    if kinds is None or any(type(a) not in kinds or not isinstance(getattr(a, "keys", None), Tensor)
                            or not isinstance(getattr(a, "values", None), Tensor) for a in cache.layers):
        return False
    for a in cache.layers:
        idx = rows.to(a.keys.device)
        a.keys, a.values = a.keys[idx], a.values[idx]
    return True


def softcap_safe_attention(hf: torch.nn.Module) -> bool:
    """Switch a model whose attention soft-caps its logits to eager attention if it would run
    ``sdpa``, which has no soft-capping (before transformers 5.24 it silently skipped it). Returns
    whether it switched.

    >>> import steer
    >>> softcap_safe_attention(steer.load("tiny-llama").hf)   # no soft-capping: left alone
    False
    """
    cfg = hf.config
    if getattr(cfg, "attn_logit_softcapping", None) and getattr(cfg, "_attn_implementation", None) == "sdpa":
        hf.set_attn_implementation("eager")
        return True
    return False


def eos_ids(model) -> set[int]:
    """Every end-of-turn token id: the generation config's (a list in many chat models) and the
    tokenizer's.

    >>> import steer
    >>> sorted(eos_ids(steer.load("tiny-llama"))) == [steer.load("tiny-llama").tokenizer.eos_token_id]
    True
    """
    ids = set()
    for src in (getattr(model.hf, "generation_config", None), model.tokenizer):
        e = getattr(src, "eos_token_id", None)
        ids.update([e] if isinstance(e, int) else list(e or []))
    return ids


@contextmanager
def eager_attention(hf: torch.nn.Module):
    """Run the block with eager attention, so that each attention module returns its weights next
    to its output (``sdpa`` and flash attention compute them without returning them); the model's
    own implementation is restored on exit. Eager attention computes the same function.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> with eager_attention(m.hf):
    ...     inside = m.hf.config._attn_implementation
    >>> inside, m.hf.config._attn_implementation
    ('eager', 'sdpa')
    """
    impl = getattr(hf.config, "_attn_implementation", None)
    switch = impl != "eager"
    if switch:
        hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            hf.set_attn_implementation(impl)


def _is_recorder(fn) -> bool:
    return getattr(fn, "__qualname__", "").endswith(".output_capturing_hook")


def recorders_last(module: torch.nn.Module) -> None:
    """transformers (5.x) records ``output_hidden_states`` through forward hooks it installs on
    the blocks the first time they are asked for, and keeps them. Hooks run in the order they were
    added, so one installed before steer's would record a block's output as it was before steer
    edited it (while the next block reads the edited one). Move them after steer's."""
    hooks = module._forward_hooks
    for key in [k for k, f in hooks.items() if _is_recorder(f)]:
        hooks.move_to_end(key)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def copy_unhooked(module: torch.nn.Module, *, share_parameters: bool = False) -> torch.nn.Module:
    """A deep copy of ``module`` without the hooks installed on it (steer's, a user's), keeping only
    transformers' own output recorders. ``copy.deepcopy`` copies hooks too: a copy taken inside a
    :class:`~steer.steering.Steering` block would stay steered after the block (or fail on the
    context manager's generator). ``share_parameters``: the copy holds the same parameter tensors.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> with steer.add_hooks(m, {"resid_post.0": lambda a, s: a + 1}):
    ...     twin = copy_unhooked(m.hf, share_parameters=True)
    >>> sum(len(b._forward_hooks) for b in twin.modules()), twin.lm_head.weight is m.hf.lm_head.weight
    (0, True)
    """
    memo: dict = {}
    for mod in module.modules():
        keep = {k for k, fn in mod._forward_hooks.items() if _is_recorder(fn)}
        for name in _HOOK_DICTS:
            hooks = getattr(mod, name, None)
            if hooks is not None:
                memo[id(hooks)] = OrderedDict((k, v) for k, v in hooks.items() if k in keep)
    if share_parameters:
        memo.update({id(p): p for p in module.parameters()})
    return copy.deepcopy(module, memo)


# -- models a user loaded: PEFT adapters, accelerate's device maps, quantized layers ----------

def unwrap_adapters(hf: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` under a PEFT ``PeftModel`` (its adapter layers stay injected in that
    model's modules, so its forward is the adapted one); any other model unchanged.

    >>> import steer
    >>> hf = steer.load("tiny-llama").hf
    >>> unwrap_adapters(hf) is hf
    True
    """
    get = getattr(hf, "get_base_model", None)
    return get() if callable(get) and type(hf).__module__.startswith("peft.") else hf


def execution_device(hf: torch.nn.Module) -> torch.device:
    """Where a model's forward takes its inputs: its input embedding's device, or the device
    accelerate's hook computes it on when ``device_map`` offloaded it (its weight is then on
    ``meta``).

    >>> import steer
    >>> execution_device(steer.load("tiny-llama").hf)
    device(type='cpu')
    """
    emb = hf.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    dev = emb.weight.device
    if dev.type == "meta":
        raise ValueError(
            f"{type(hf).__name__}'s input embedding is on the meta device with no accelerate hook to "
            "load it: the model was not fully loaded (load it with from_pretrained, with a device_map "
            "if it does not fit)."
        )
    return dev


def _not_dense(module: torch.nn.Module) -> Optional[str]:
    w = getattr(module, "weight", None)
    if hasattr(module, "base_layer") or hasattr(module, "lora_A"):
        return "it carries a PEFT adapter; merge it first (model = peft_model.merge_and_unload())"
    if not isinstance(w, Tensor):
        return f"{type(module).__name__} has no weight tensor"
    if w.device.type == "meta":
        return ("accelerate offloaded it (device_map with CPU/disk offload); load the model onto "
                "devices that hold it whole")
    if not w.is_floating_point() or type(w) not in (torch.nn.Parameter, Tensor):
        return (f"it is stored as {type(w).__name__} ({w.dtype}), i.e. quantized; load the model "
                "unquantized in bf16/fp16 for this")
    return None


def is_dense(module: torch.nn.Module) -> bool:
    """Whether ``module.weight`` is the whole, materialised floating-point weight of its function.

    >>> is_dense(torch.nn.Linear(2, 2)), is_dense(torch.nn.ReLU())
    (True, False)
    """
    return _not_dense(module) is None


def dense_weight(module: torch.nn.Module, what: str) -> Tensor:
    """``module.weight`` when it is the whole, materialised floating-point weight of the layer's
    function (:func:`is_dense`); otherwise an error naming why steer cannot read it. Code that read
    the weight instead of calling the module would silently ignore an adapter or misread a
    quantized matrix.

    >>> import steer
    >>> dense_weight(steer.load("tiny-llama").hf.lm_head, "the unembedding").shape
    torch.Size([259, 64])
    """
    why = _not_dense(module)
    if why is not None:
        from .arch import UnsupportedModel

        raise UnsupportedModel(f"steer reads the weight of {what} directly and cannot here: {why}.")
    return module.weight
