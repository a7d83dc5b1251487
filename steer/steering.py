"""Steering: install interventions for forward passes and batched HF ``generate`` (KV cache).

>>> import steer, torch
>>> from steer.steering import Steering, steer as steer_ctx
>>> m = steer.load("tiny-llama")
>>> v = torch.randn(64)
>>> with steer_ctx(m, v, layer=1, strength=4.0) as s:
...     texts = s.generate(["Hi", "Hello there"], max_new_tokens=3)
>>> len(texts)
2

How it works. One forward pre-hook on the base model asks each call where its tokens sit
(:func:`steer.hooks.call_positions`): how many columns are cached before them — from
``cache_position``, the KV cache's own length (under whatever name the installed transformers
passes it, see :mod:`steer._hf`) or the 2-D attention mask, which must agree — and, from the
mask, which of the current tokens are real (never pads) and which one is each row's first real
token (the attention sink, left alone unless ``include_sink=True``). A call with no cached
tokens starts a *sequence*; the :class:`~steer.data.Batch` that :meth:`Steering.generate`
tokenized describes it if the call starts with its tokens, each prompt on ``k`` consecutive rows
(``num_return_sequences``, beam search). So the prompt may be prefilled in one call or in chunks,
decode steps may come with or without a mask, and every row still knows its example: its
strength, its prompt-position selection (``Last``, ``post_instruction``, ...) and its gate. Site
hooks then apply :mod:`steer.interventions` with ``[rows]`` strengths times a ``[rows]`` gate.
With a CAST condition the gate is computed once per sequence from each whole prompt's mean hidden
state (a forward pass up to the condition layer) and kept for the rest of generation. That
pre-pass is unsteered, and so are the blocks below the first steered one and, for the rows the
condition does not fire on, every block: the prefill that follows takes those blocks' states and
KV cache from it. It starts above the condition's last block (the rows it fires on first run the
blocks from the first steered one up to there, steered, on their own), or at the first steered
block where the condition fires on every prompt (``Steering.last_resumed_at``; the whole model
runs where skipping could change anything, :meth:`Steering._begin_resume`). All state lives on the
:class:`Steering` object; nothing is global.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from . import interventions as I
from . import positions as P
from .data import Batch, position_ids, tokenize
from .display import Rich
from .hooks import CallPositions, StopForward, add_hooks, call_positions, hook_ids
from .sites import Site, resolve_layers

__all__ = ["Steering", "steer", "prompt_means", "Generations", "compare"]

_EDITABLE = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_REGIONS = ("all", "prompt", "generated")


class Steering:
    """Context manager applying :class:`~steer.interventions.Intervention` s to a model.

    Args:
        model: a :class:`steer.Model`.
        interventions: the edits to make.
        condition: optional CAST :class:`~steer.conditions.Condition` (or rule); when given, each
            example is steered only if the condition fires on its prompt.
        gate: optional ``[batch]`` tensor (0/1 or any weight) multiplying every strength; for a
            ``clamp`` without ``target``, whose strength is the value clamped to, it only says
            which rows are clamped (non-zero: clamped to that value).
        resume: with a ``condition``, let the prefill start where the condition's pre-pass can
            hand over (the blocks it ran unsteered are not run again; :attr:`last_resumed_at`
            says where it started). ``False`` runs every block again: the same result, slower;
            for comparison or to rule the hand-over out while debugging.

    Inside the block, any forward of ``model.hf`` (including HF ``generate``) is steered.
    :meth:`generate`, :meth:`logits` and :meth:`next_token_logits` tokenize prompts for you
    (and make prompt selectors such as ``"post_instruction"`` available).

    >>> import steer, torch
    >>> from steer.interventions import Intervention
    >>> m = steer.load("tiny-llama")
    >>> iv = Intervention("add", torch.randn(64), layers=[0], strength=torch.tensor([0., 8.]))
    >>> with Steering(m, [iv]) as s:
    ...     out = s.next_token_logits(["Hi", "Hi"])
    >>> bool(torch.allclose(out[0], out[1]))
    False
    """

    def __init__(self, model, interventions: Sequence[I.Intervention] = (), *, condition=None,
                 gate: Optional[Tensor] = None, resume: bool = True):
        self.model = model
        self.interventions = list(interventions)
        self.condition = condition
        self.gate = gate
        self.resume = resume
        self.batch: Optional[Batch] = None
        self.last_gate: Optional[Tensor] = None  # the gate used for the current/last sequence
        self.condition_scores: Optional[Tensor] = None
        self._handles: list = []
        self._ctx = None
        self._step: dict[str, Any] = {}  # what the current forward call edits
        self._moved: dict = {}  # tensors moved to the model's device once, with the version they had
        self._seq: Optional[dict] = None  # the sequence being processed (prefill + decode steps)
        self._vectors: dict[tuple, Tensor] = {}  # each vector on each device/dtype it met
        self._in_prepass = False
        self._prepass: Optional[dict] = None  # what the condition's pre-pass left for the prefill to resume from
        self._resumed: Optional[dict] = None  # the prefill now running from it (blocks swapped, cache to join)
        self._own_hooks: set[int] = set()  # ids of this Steering's site hooks
        self._in_sub = False  # inside _run_fired_rows' forward of some rows
        self.last_resumed_at: Optional[int] = None  # the block the last sequence's prefill resumed at, if any
        self._active = False
        self._by_site = self._plan()

    # -- planning -------------------------------------------------------------------------
    def _plan(self) -> dict[Site, list[tuple[int, I.Intervention]]]:
        m = self.model
        by_site: dict[Site, list] = {}
        for i, iv in enumerate(self.interventions):
            if not isinstance(iv, I.Intervention):
                raise TypeError(f"Expected an Intervention, got {type(iv).__name__}.")
            if iv.vector is not None and iv.vector.shape[-1] != m.d_model:
                raise ValueError(
                    f"Intervention {i} has d_model {iv.vector.shape[-1]} but {m.name} has d_model "
                    f"{m.d_model}: the vector was extracted from another model."
                )
            if not (isinstance(iv.positions, str) and iv.positions in _REGIONS) and iv.positions not in P.NAMED \
                    and not callable(iv.positions) and not isinstance(iv.positions, (int, list, tuple, P.Last)):
                raise ValueError(f"Bad positions {iv.positions!r}: use {_REGIONS} or a steer.positions selector.")
            for name in iv.sites:
                if name not in _EDITABLE:
                    raise ValueError(f"Cannot steer site {name!r}: use one of {_EDITABLE}.")
                for layer in resolve_layers(m, iv.layers):
                    by_site.setdefault(Site(name, layer), []).append((i, iv))
        return by_site

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> "Steering":
        if self._active:
            raise RuntimeError("This Steering is already active; nest a new Steering instead.")
        base = self.model.base
        self._handles.append(base.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        # always_call: the blocks a resumed prefill swapped out come back even if the forward raises
        self._handles.append(base.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True))
        self._ctx = add_hooks(self.model, {site: self._site_hook for site in self._by_site})
        try:
            self._own_hooks = hook_ids(self._ctx.__enter__())
        except BaseException:
            self._remove()
            raise
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self):
        self._end_resume()
        self.batch = None  # a batch set by hand describes the calls of one block
        self._seq, self._step, self._vectors, self._moved, self._prepass = None, {}, {}, {}, None
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False

    # -- per-call state -------------------------------------------------------------------
    def _on_forward(self, module, args, kwargs):
        """Work out, for this forward call, what every intervention touches (see the module doc)."""
        if self._in_prepass or self._in_sub:
            return None
        ids, emb = kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")
        cp = call_positions(args, kwargs)
        am, past, cols = cp.attention_mask, cp.past, cp.cols
        rows, n = cp.real.shape
        dev = cp.real.device
        if past == 0 or self._seq is None:
            self.last_resumed_at, self._prepass = None, None
            self._seq = self._start_sequence(module, ids, emb, cp)
        seq = self._seq
        if rows != seq["rows"]:
            raise RuntimeError(
                f"The forward call has {rows} rows but its sequence started with {seq['rows']}: steer "
                "cannot tell which row is which example. Start a new sequence (no cache) instead."
            )
        k = seq["k"]
        if not cp.padding_known:  # e.g. a flex-attention BlockMask: the tokenized prompts know
            cp = self._padding_from_batch(cp, seq, kwargs.get("attention_mask"))
            am = cp.attention_mask
        # what a sequence keeps for all its calls lives on the device, moved once: a host-to-device
        # copy per generated token would synchronise the GPU at every step
        gate = None if seq["gate"] is None else self._once(seq, ("gate", dev), lambda: seq["gate"].to(dev).repeat_interleave(k))
        is_prompt = (cols < seq["width"])[None, :].expand(rows, n)
        step = []
        for i, iv in enumerate(self.interventions):
            m = cp.editable(iv.include_sink)
            pos = iv.positions
            idx = None
            if isinstance(pos, str) and pos in _REGIONS:
                if pos == "prompt":
                    m = m & is_prompt
                elif pos == "generated":
                    m = m & ~is_prompt
            else:
                sel = self._prompt_selection(i, pos, seq).to(dev)  # [rows, prompt width]
                inside = cols < sel.shape[1]  # (gathers, not boolean indexing: no device sync per step)
                at = cols.clamp(max=sel.shape[1] - 1)
                m = m & sel[:, at] & inside[None, :]
                if iv.aligned:
                    rank = sel.long().cumsum(-1) - 1
                    idx = torch.where(inside[None, :], rank[:, at], 0)
            if iv.aligned:
                if idx is None:  # region positions: rank among selected tokens of the prompt
                    idx = (self._region_rank(am, cp.first, iv.include_sink))[:, past:]
                m = m & (idx < iv.vector.shape[0])
                idx = idx.clamp(0, iv.vector.shape[0] - 1)
            if iv.skip_tokens:
                if ids is None:
                    raise ValueError("skip_tokens needs input_ids: this forward call passed inputs_embeds.")
                skip = self._once(seq, ("skip", i, dev), lambda: torch.tensor(sorted(iv.skip_tokens), device=dev))
                m = m & ~torch.isin(ids.to(dev), skip)
            step.append((m, idx, self._row_strength(i, iv, rows, k, dev)))
        self._step = {"interventions": step, "gate": gate}
        if self._prepass is not None:  # this call follows the condition's pre-pass
            self._begin_resume(module, ids, emb, cp, kwargs)
        return None

    def _start_sequence(self, base, ids, emb, cp) -> dict:
        """State of a new sequence: its rows, examples, prompt width and gate.

        ``self.batch`` (set during :meth:`generate`/:meth:`logits`, or by hand for the calls of a
        ``with`` block) describes the sequence if the call starts with its tokens, each prompt on
        ``k`` consecutive rows (``num_return_sequences`` and beam search expand rows that way and
        keep them grouped). A prompt may arrive in one call or in several (chunked prefill);
        ``generate(use_cache=False)`` re-runs it each step."""
        rows, n = cp.real.shape
        bt, prev = self.batch, self._seq
        match = None
        if bt is not None and cp.past == 0 and rows % len(bt) == 0:
            k, w = rows // len(bt), min(n, bt.input_ids.shape[1])
            if ids is None or torch.equal(ids[:, :w], bt.input_ids[:, :w].to(ids.device).repeat_interleave(k, 0)):
                match = bt
        if match is not None:
            width = match.input_ids.shape[1]
        else:  # called directly: one example per row, the prompt is this first call
            k, width = 1, cp.past + n
        seq = {"rows": rows, "k": k, "batch": match, "width": width, "selections": {},
               "gate_of": (self.gate, self.condition)}
        if prev is not None and match is not None and prev["batch"] is match and prev["rows"] == rows \
                and all(a is b for a, b in zip(prev["gate_of"], seq["gate_of"])):
            seq["selections"], seq["gate"] = prev["selections"], prev["gate"]  # same prompts again
            return seq
        if self.condition is not None and cp.past > 0 and match is None:
            raise ValueError(
                "A CAST condition is read from the whole prompt, but this sequence started from a "
                "cache steer did not see: call Steering.generate, or set steering.batch = "
                "steer.tokenize(model, prompts) before calling the model yourself."
            )
        seq["gate"] = self.last_gate = self._compute_gate(base, ids, emb, cp, match, rows)
        return seq

    def _padding_from_batch(self, cp: CallPositions, seq: dict, mask) -> CallPositions:
        """The call's positions with the padding of the sequence's tokenized prompts."""
        bt = seq["batch"]
        if bt is None:
            raise ValueError(
                f"steer cannot read which tokens are padding from this call's attention mask "
                f"({type(mask).__name__}): call Steering.generate, or pass a 2-D attention_mask."
            )
        rows, total = cp.real.shape[0], cp.attention_mask.shape[1]
        prompt = bt.attention_mask.bool().to(cp.real.device).repeat_interleave(seq["k"], 0)
        gen = torch.ones((rows, max(0, total - prompt.shape[1])), dtype=torch.bool, device=prompt.device)
        return CallPositions.of(torch.cat((prompt, gen), 1)[:, :total], cp.past)

    @staticmethod
    def _once(seq: dict, key: tuple, make):
        """``make()``, computed once per sequence (the values of its later calls are the same)."""
        kept = seq.setdefault("kept", {})
        if key not in kept:
            kept[key] = make()
        return kept[key]

    def _row_strength(self, i, iv, rows: int, k: int, dev) -> Tensor:
        """``[rows]`` strengths of intervention ``i`` (per example, repeated over its ``k`` rows),
        read at every call (a caller may change them between steps, as FASB does in place) without
        a host-to-device copy per step: a number is filled on the device, a tensor elsewhere is
        moved once per version of it (``Tensor._version`` counts in-place writes)."""
        st = iv.strength
        if not isinstance(st, Tensor):
            if np.ndim(st) == 0:
                return torch.full((rows,), float(st), dtype=torch.float32, device=dev)
            values = tuple(float(x) for x in np.ravel(st))  # a list (or array): moved once per content
            key = ("listed strength", i, dev)
            if self._moved.get(key, (None,))[0] != values:
                self._moved[key] = (values, torch.tensor(values, dtype=torch.float32, device=dev))
            st = self._moved[key][1]
        if st.device != dev:
            key = ("moved strength", i, dev)
            src, version, moved = self._moved.get(key, (None, None, None))
            if src is not st or version != st._version:
                moved = st.to(device=dev, dtype=torch.float32)
                self._moved[key] = (st, st._version, moved)
            st = moved
        st = st.float()
        if st.ndim == 0:
            return st.expand(rows)
        if st.shape[0] * k != rows:
            raise ValueError(
                f"Intervention {i}: strength has {st.shape[0]} entries but the call has {rows} rows "
                f"({k} per example): pass one strength per prompt."
            )
        return st.repeat_interleave(k)

    def _region_rank(self, am, first, include_sink):
        """Rank of each column among the real prompt tokens (sink excluded unless asked)."""
        keep = am.clone()
        if not include_sink:
            keep[torch.arange(am.shape[0], device=am.device), first] = False
        return keep.long().cumsum(-1) - 1

    def _prompt_selection(self, i: int, pos, seq: dict) -> Tensor:
        """``[rows, prompt width]`` tokens that a prompt selector picks, once per sequence."""
        if i not in seq["selections"]:
            bt = seq["batch"]
            if bt is None:
                raise ValueError(
                    f"positions={pos!r} needs the tokenized prompts: call Steering.generate/logits, or "
                    "set steering.batch = steer.tokenize(model, prompts) before calling the model yourself."
                )
            sel = P.mask(pos, bt, include_sink=self.interventions[i].include_sink)
            seq["selections"][i] = sel.repeat_interleave(seq["k"], 0)
        return seq["selections"][i]

    def _compute_gate(self, base, ids, emb, cp, batch: Optional[Batch], rows: int) -> Optional[Tensor]:
        """``[examples]`` gate: the user's ``gate`` times the condition, read once per sequence
        from each prompt (the whole tokenized prompt when known, else this first call)."""
        b = len(batch) if batch is not None else rows
        gate = None if self.gate is None else torch.as_tensor(self.gate, dtype=torch.float32)
        if gate is not None and gate.shape != (b,):
            raise ValueError(f"gate has shape {tuple(gate.shape)}; the batch has {b} prompts: pass a [batch] tensor.")
        if gate is not None and not torch.isfinite(gate).all():
            raise ValueError("gate holds NaN/inf: give every prompt a finite weight.")
        if self.condition is None:
            return gate
        if batch is not None:
            dev = cp.real.device
            ids, emb = batch.input_ids.to(dev), None
            cp = CallPositions.of(batch.attention_mask.to(dev), 0)
        hs = self._condition_states(base, ids, emb, cp.attention_mask, cp.editable())
        fires = self.condition.evaluate(hs)
        self.condition_scores = getattr(self.condition, "last_scores", None)
        g = fires.float()
        return g if gate is None else g * gate.to(g.device)

    def _condition_states(self, base, ids, emb, am, keep) -> dict[int, Tensor]:
        """Mean resid_post over each prompt's real tokens (sink excluded) at the condition layers.

        The pre-pass runs the blocks up to the last condition layer, unsteered. Below the first
        steered block the prefill that follows would compute the same states again, so (under
        ``no_grad``, where the cache is plain) the pre-pass also keeps its KV cache and the input
        of block :meth:`_resume_layer`, for :meth:`_begin_resume`."""
        from contextlib import ExitStack

        from ._hf import cache_kwarg, empty_cache
        from .hooks import record_block_input, stop_before

        layers = sorted(self.condition.layers)
        hs: dict[int, Tensor] = {}
        w = keep.float()[..., None]
        R = None if torch.is_grad_enabled() or not self.resume else self._resume_layer()
        cache = None if R is None else empty_cache(self.model.hf)
        try:
            cache_name = cache_kwarg(base)
        except TypeError:  # a release that passes the cache under a name steer does not know
            cache = None
        # the block above the last condition layer: where a prefill that no row steers can resume
        top = layers[-1] + 1 if cache is not None and layers[-1] + 1 < self.model.n_layers else None

        def grab(act, site):
            hs[site.layer] = ((act.float() * w).sum(1) / w.sum(1).clamp(min=1))
            if site.layer == layers[-1] and top is None:
                raise StopForward

        pos_ids = position_ids(am)
        rec = rec_top = None
        self._in_prepass = True
        try:
            with ExitStack() as stack:
                stack.enter_context(add_hooks(self.model, {Site("resid_post", l): grab for l in layers}))
                kw = {}
                if cache is not None:
                    rec = stack.enter_context(record_block_input(self.model, R))
                    if top is not None:
                        rec_top = rec if top == R else stack.enter_context(record_block_input(self.model, top))
                        stack.enter_context(stop_before(self.model, top))
                    kw = {cache_name: cache}
                try:
                    base(input_ids=ids, inputs_embeds=emb, attention_mask=am.long(), position_ids=pos_ids,
                         use_cache=cache is not None, **kw)
                except StopForward:
                    pass
        finally:
            self._in_prepass = False
        if ids is not None and emb is None and rec is not None and rec.get("bare") and rec.get("resid") is not None:
            self._prepass = {"layer": R, "resid": rec["resid"], "cache": cache, "ids": ids, "am": am, "pos": pos_ids}
            if rec_top is not None and rec_top.get("bare") and rec_top.get("resid") is not None:
                self._prepass.update(top=top, top_resid=rec_top["resid"])
        return hs

    # -- a prefill that resumes where the condition's pre-pass can hand over -----------------
    def _resume_layer(self) -> Optional[int]:
        """The block the prefill after the condition's pre-pass must start at: the pre-pass has run
        every block below it on the same tokens, and none of them is steered (every site of layer
        ``l`` lives in block ``l``). None if that is block 0. (Where the condition fires on no
        prompt, nothing is steered and the prefill starts above the condition's last layer.)"""
        first_steered = min((site.layer for site in self._by_site), default=self.model.n_layers)
        r = min(max(self.condition.layers) + 1, first_steered)
        return r if 1 <= r < self.model.n_layers else None

    def _begin_resume(self, base, ids, emb, cp: CallPositions, kwargs) -> None:
        """If this call is the prefill of the tokens the pre-pass just read, run only blocks
        ``R ..`` (:func:`steer.hooks.resume_at`) and join the pre-pass's cache of blocks
        ``0 .. R − 1`` to the forward's once it returns (:meth:`_after_forward`): the same
        states, keys and values as running them again. ``R`` is the first steered block, or the
        block above the condition's last where no row is steered there: if the condition fires on
        no prompt, or on some (those rows alone run the blocks from the first steered one up to
        the condition's last, :meth:`_run_fired_rows`). Anything else (another shape, mask or position
        ids, gradients, a cache that is not plain, hooks of others on the skipped blocks or a
        second pre-hook on the base model, such as a nested :class:`Steering`) runs the whole model."""
        from torch.nn.modules import module as nn_module

        from ._hf import can_splice_cache_layers
        from .hooks import resume_at

        pre, self._prepass = self._prepass, None
        if pre is None or cp.past != 0 or torch.is_grad_enabled():
            return
        am = cp.attention_mask
        rows, n = cp.real.shape
        if tuple(pre["resid"].shape) != (rows, n, self.model.d_model) or pre["am"].shape != am.shape \
                or not torch.equal(pre["am"].bool(), am.to(pre["am"].device).bool()):
            return
        if emb is not None or ids is None or not (ids is pre["ids"] or torch.equal(ids, pre["ids"].to(ids.device))):
            return
        pos = kwargs.get("position_ids")
        real = am.bool()
        if pos is None:  # the model counts from 0 in every row, as steer's positions do only without padding
            if not bool(real.all()):
                return
        elif not torch.equal(pos.to(real.device).expand(rows, n)[real], pre["pos"].to(real.device)[real]):
            return
        if len(base._forward_pre_hooks) != 1 or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return
        names = [k for k in ("cache", "past_key_values") if kwargs.get(k) is not None]
        join = kwargs[names[0]] if names else None
        returns_cache = join is None and kwargs.get("use_cache") is not False  # the model makes its own, returns it
        if returns_cache and kwargs.get("return_dict") is False:
            return
        own = self._own_hooks  # below R they run only where no row is steered: they would change nothing

        def can_skip(r: int) -> bool:
            """Blocks 0 .. r − 1 carry no one else's hooks, and their cache can join the forward's."""
            if any(set(m._forward_hooks) - own or set(m._forward_pre_hooks) - own
                   for b in self.model.layers[:r] for m in b.modules()):
                return False
            # a cache the model makes itself is made as empty_cache made the pre-pass's
            return join is None or can_splice_cache_layers(join, pre["cache"], r)

        R, resid = pre["layer"], pre["resid"]
        gate = self._seq["gate"]
        if "top" in pre and gate is not None and can_skip(pre["top"]):
            fired = gate != 0
            if not bool(fired.any()):  # no row is steered: every block the pre-pass ran is the prefill's
                R, resid = pre["top"], pre["top_resid"]
            elif pre["top"] > R and not bool(fired.all()):
                staged = self._run_fired_rows(base, pre, fired)
                if staged is not None:
                    R, resid = pre["top"], staged
        if R != pre.get("top") and not can_skip(R):
            return
        ctx = resume_at(self.model, R, resid)
        ctx.__enter__()
        self._resumed = {"ctx": ctx, "layer": R, "cache": pre["cache"], "join": join, "returns_cache": returns_cache}
        self.last_resumed_at = R

    def _run_fired_rows(self, base, pre: dict, fired: Tensor) -> Optional[Tensor]:
        """The rows the condition fired on, alone, through the blocks from the first steered one
        up to the condition's last, steered as in the whole batch (this call's per-row masks,
        strengths and gate, sliced); their keys and values there replace the pre-pass's unsteered
        ones. Returns every row's input to the block above (the pre-pass's, or these rows'), or
        None (nothing changed) where the blocks or the cache are not plain."""
        from ._hf import assign_cache_rows, cache_kwarg, empty_cache
        from .hooks import run_blocks

        start, top = pre["layer"], pre["top"]
        sub_cache = empty_cache(self.model.hf)
        if sub_cache is None:
            return None
        idx = fired.nonzero().squeeze(-1)

        def take(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[idx.to(t.device)]

        full = self._step
        self._step = {"interventions": [(take(m), take(i), take(st)) for m, i, st in full["interventions"]],
                      "gate": take(full["gate"])}
        self._in_sub = True
        try:
            _, rec = run_blocks(self.model, lambda: base(
                input_ids=take(pre["ids"]), attention_mask=take(pre["am"]).long(), position_ids=take(pre["pos"]),
                use_cache=True, **{cache_kwarg(base): sub_cache}), start, top, take(pre["resid"]))
        finally:
            self._in_sub, self._step = False, full
        if not rec.get("bare") or rec.get("resid") is None \
                or not assign_cache_rows(pre["cache"], idx, sub_cache, start=start, stop=top):
            return None
        resid = pre["top_resid"].clone()
        resid[idx.to(resid.device)] = rec["resid"].to(resid)
        return resid

    def _after_forward(self, module, args, kwargs, output):
        """After a resumed prefill (also one that raised): the blocks come back, and the
        pre-pass's cache of the skipped blocks joins the forward's."""
        if self._in_prepass or self._in_sub or self._resumed is None:
            return None
        r = self._end_resume()
        if output is None:  # the forward raised
            return None
        cache = r["join"]
        if cache is None and r["returns_cache"]:
            from ._hf import output_cache

            try:
                cache = output_cache(output)
            except TypeError:
                cache = None
        if cache is not None:
            from ._hf import splice_cache_layers

            if not splice_cache_layers(cache, r["cache"], r["layer"]):
                raise RuntimeError("Steering could not join the condition pre-pass's KV cache to the prefill's.")
        return None

    def _end_resume(self) -> Optional[dict]:
        r, self._resumed = self._resumed, None
        if r is not None:
            r["ctx"].__exit__(None, None, None)
        return r

    # -- the site hook --------------------------------------------------------------------
    def _vector(self, i: int, iv, layer: int, act: Tensor) -> Tensor:
        """Intervention ``i``'s vector at ``layer`` on ``act``'s device and dtype, moved once
        (not at every decode step); for ablate and clamp the unit vector, normalised and checked once."""
        key = (i, layer, act.device, act.dtype)
        if key not in self._vectors:
            v = iv.vector_for(layer, self.model.n_layers).to(device=act.device, dtype=act.dtype)
            self._vectors[key] = I.unit(v) if iv.kind in ("ablate", "clamp") else v
        return self._vectors[key]

    def _site_hook(self, act: Tensor, site: Site) -> Optional[Tensor]:
        if self._in_prepass or not self._step:
            return None
        step, gate = self._step["interventions"], self._step["gate"]
        out = act
        for i, iv in self._by_site[site]:
            m, idx, strength = step[i]
            if m.shape != act.shape[:2]:
                raise RuntimeError(
                    f"Steering saw activations {tuple(act.shape[:2])} but the forward call had "
                    f"{tuple(m.shape)} tokens: the model was called in an unsupported way."
                )
            m, strength = m.to(act.device), strength.to(act.device)  # layers may sit on other devices
            g = None if gate is None else gate.to(act.device)
            if iv.kind == "map":  # a fitted map (LEACE, transport): f(x, strength) where the mask allows
                s = (strength if g is None else strength * g).to(act.dtype)
                out = torch.where(m[..., None], iv.fn(out, s.view(-1, 1, 1)), out)
                continue
            v = self._vector(i, iv, site.layer, act)
            if iv.kind == "clamp" and iv.target is not None:  # strength: the fraction of the way to target
                out = I.clamp_toward(out, v, iv.target, strength if g is None else strength * g, m, normalized=True)
                continue
            if iv.kind == "clamp":
                # gate decides which rows are clamped; the strength is the target value
                mm = m if g is None else m & (g != 0)[:, None]
                out = I.clamp(out, v, strength.to(act.dtype), mm, normalized=True)
                continue
            s = (strength if g is None else strength * g).to(act.dtype)
            if iv.kind == "add":
                if iv.aligned:
                    out = torch.where(m[..., None], out + v[idx.to(act.device)] * s[:, None, None], out)
                else:
                    out = I.add(out, v, s, m)
            else:
                out = I.ablate(out, v, m, s, normalized=True)
        return out

    # -- conveniences ---------------------------------------------------------------------
    @contextmanager
    def _describing(self, prompts) -> Iterator[Batch]:
        """The tokenized ``prompts`` (or a given :class:`~steer.data.Batch`) describe the sequences
        of the calls inside; the batch set before comes back after. Left set, it would describe a
        later direct call whose tokens happen to begin the same way (its gate, its prompt width)."""
        batch = prompts if isinstance(prompts, Batch) else tokenize(self.model, prompts)
        before, self.batch = self.batch, batch
        try:
            yield batch
        finally:
            self.batch = before

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 64, *, backend=None, **kwargs) -> list[str]:
        """Steered batched HF ``generate`` (greedy by default, KV cache); returns the answers.

        ``backend="vllm"`` (or a :class:`steer.serve.Engine`) generates through vLLM instead,
        with the same edits and gate per prompt (:mod:`steer.serve`; ``kwargs`` then go to
        ``vllm.SamplingParams``, ``min_new_tokens`` included); ``self.last_gate`` is set either way.

        >>> import steer, torch
        >>> m = steer.load("tiny-llama")
        >>> with steer.steering.steer(m, torch.randn(64), layer=0, strength=2.0) as s:
        ...     len(s.generate(["Hi"], max_new_tokens=2))
        1
        """
        self._require_active()
        from .serve import backend_name, engine_for

        if backend_name(backend) == "vllm":
            out = engine_for(self.model, backend).generate(prompts, self, max_new_tokens=max_new_tokens,
                                                           details=True, **kwargs)
            self.last_gate = out.gate
            self.condition_scores = None  # vLLM's worker reads the condition; its scores stay there
            return out.texts
        kwargs.setdefault("do_sample", False)
        with self._describing(prompts) as batch:
            out = self.model.hf.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                pad_token_id=self.model.tokenizer.pad_token_id, **kwargs,
            )
        return self.model.tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def logits(self, prompts) -> Float[Tensor, "batch pos d_vocab"]:
        """Steered logits of a left-padded batch of prompts (pads included: pass a tokenized
        :class:`~steer.data.Batch` to know where they are)."""
        self._require_active()
        with self._describing(prompts) as batch:
            return self.model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, use_cache=False).logits

    def next_token_logits(self, prompts) -> Float[Tensor, "batch d_vocab"]:
        """Steered logits of the first generated token for each prompt.

        >>> import steer, torch
        >>> m = steer.load("tiny-llama")
        >>> with Steering(m) as s:
        ...     s.next_token_logits(["Hi"]).shape[-1] == m.d_vocab
        True
        """
        return self.logits(prompts)[:, -1]

    def _require_active(self):
        if not self._active:
            raise RuntimeError("Use the Steering inside a `with` block: `with steer.steer(model, ...) as s:`.")


def _vector_of(model, direction, layer: Optional[int]) -> tuple[Tensor, Optional[int]]:
    """(vector, default layer) from a Direction, a [d] tensor or a [n_layers, d] tensor."""
    if hasattr(direction, "vectors") and hasattr(direction, "layer"):
        direction.check(model)
        lay = direction.layer if layer is None else layer
        if lay is None:
            raise ValueError("The direction has no chosen layer: pass layer=.")
        return direction.vectors[lay], lay
    v = torch.as_tensor(direction)
    if v.shape[-1] != model.d_model:
        raise ValueError(f"Vector has d_model {v.shape[-1]}, {model.name} has {model.d_model}.")
    if v.ndim == 2 and not (v.shape[0] == model.n_layers and layer is not None):
        return v, layer
    if v.ndim == 2:
        return v[layer], layer
    return v, layer


def steer(
    model,
    direction=None,
    *,
    layer: Union[int, Sequence[int], str, None] = None,
    strength: Union[float, Tensor] = 1.0,
    kind: str = "add",
    sites: Union[str, Sequence[str]] = "resid_post",
    positions: Any = "all",
    include_sink: bool = False,
    condition=None,
    gate: Optional[Tensor] = None,
    interventions: Sequence[I.Intervention] = (),
    exclude=None,
    resume: bool = True,
) -> Steering:
    """Build a :class:`Steering` for one direction (plus any extra ``interventions``).

    ``kind="add"`` adds ``strength · v`` (v as stored: a mean-difference vector keeps its norm);
    ``"ablate"`` removes ``v̂`` (use ``layer="all"`` and ``sites=("resid_pre","attn_out","mlp_out")``
    for Arditi's ablation everywhere); ``"clamp"`` sets ``x·v̂ = strength``. ``layer`` defaults to a
    :class:`~steer.directions.Direction`'s chosen layer; a ``[n_layers, d]`` tensor uses its row at
    each layer. ``exclude="massive"`` leaves the model's massive activations alone (Sun et al.,
    2024): their dimensions are zeroed in the vector and their tokens are not edited (found by
    :func:`steer.massive_activations` on a few built-in prompts: they barely depend on the
    input), or pass the :class:`~steer.diagnostics.MassiveActivations` to use.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> with steer.steering.steer(m, torch.randn(64), layer=1, strength=torch.tensor([1., 0.])) as s:
    ...     out = s.generate(["Hi", "Hi"], max_new_tokens=2)
    >>> len(out)
    2
    """
    ivs = list(interventions)
    if exclude is not None and direction is None:
        raise ValueError("exclude= applies to the direction given to steer(); for your own interventions, zero "
                         "the dimensions and set Intervention(skip_tokens=...) from steer.diagnostics.massive.exclusion.")
    if direction is not None:
        lay = layer if not (isinstance(layer, (list, tuple)) or layer == "all") else None
        v, default = _vector_of(model, direction, lay)
        layers = layer if layer is not None else default
        if layers is None:
            raise ValueError("Pass layer= (an int, a list of ints or 'all').")
        if hasattr(direction, "vectors") and (isinstance(layer, (list, tuple)) or layer == "all") and kind == "add":
            v = direction.vectors  # one row per layer
        elif hasattr(direction, "vectors") and (isinstance(layer, (list, tuple)) or layer == "all"):
            v = direction.vectors[direction.layer] if direction.layer is not None else direction.vectors
        skip = frozenset()
        if exclude is not None:
            from .diagnostics.massive import exclusion

            dims, skip, sink = exclusion(model, exclude)
            v = torch.as_tensor(v).clone()
            v[..., dims] = 0
            include_sink = include_sink and not sink
        ivs.insert(0, I.Intervention(kind, v, layers=layers, sites=sites, positions=positions,
                                     strength=strength, include_sink=include_sink, skip_tokens=skip))
    return Steering(model, ivs, condition=condition, gate=gate, resume=resume)


def prompt_means(model, prompts, layers="all", batch_size: int = 32):
    """``[n, n_layers, d]`` mean resid_post over each prompt's real tokens except the first (sink).

    The statistic CAST conditions read at prefill (see :class:`Steering`).

    >>> import steer
    >>> prompt_means(steer.load("tiny-llama"), ["Hi", "Hello"], layers=[1]).shape
    torch.Size([2, 1, 64])
    """
    from .capture import capture

    return capture(model, prompts, layers=layers, site="resid_post", positions="all", reduce="mean",
                   include_sink=False, batch_size=batch_size, progress=False).tensor


def _prompt_text(p) -> str:
    """What a prompt says: the text, a message list's last user turn, a (prompt, completion) pair's prompt."""
    if isinstance(p, tuple):
        return _prompt_text(p[0])
    if isinstance(p, list):
        users = [m["content"] for m in p if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else str(p)
    return str(p)


class Generations(Rich):
    """Generations of the same prompts under several settings, side by side.

    ``columns`` maps a setting's name to one answer per prompt; ``gates`` (optional) the gate each
    conditional setting applied per prompt. ``Generations[name]`` is that column.

    >>> g = Generations([[{"role": "user", "content": "Hi"}]], {"plain": ["Hello!"]})
    >>> g.prompts, g["plain"]
    (['Hi'], ['Hello!'])
    """

    def __init__(self, prompts: Sequence, columns: dict[str, list[str]], gates: Optional[dict[str, list]] = None):
        self.prompts = [_prompt_text(p) for p in prompts]
        self.columns = dict(columns)
        self.gates = dict(gates or {})
        for k, v in self.columns.items():
            if len(v) != len(self.prompts):
                raise ValueError(f"Column {k!r} has {len(v)} answers for {len(self.prompts)} prompts.")

    def __getitem__(self, name: str) -> list[str]:
        return self.columns[name]

    def _fields(self):
        return [("prompts", len(self.prompts)), ("settings", list(self.columns))]

    def _table(self):
        def cell(k, i):
            t = " ".join(self.columns[k][i].split())
            t = t if len(t) <= 90 else t[:87] + "..."
            g = self.gates.get(k)
            return t if g is None else f"[{'on' if g[i] else 'off'}] {t}"

        return ["prompt", *self.columns], [[p, *(cell(k, i) for k in self.columns)] for i, p in enumerate(self.prompts)]


def compare(model, prompts: Sequence, settings: dict[str, Optional[Steering]], max_new_tokens: int = 32,
            **kwargs) -> Generations:
    """Generate the same prompts under each setting (a :class:`Steering` built but not entered,
    or ``None`` for the unsteered model), batched per setting; greedy unless ``kwargs`` say otherwise
    (``backend="vllm"``: through :mod:`steer.serve`).

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> s = steer.steering.steer(m, torch.randn(64), layer=1, strength=8.0)
    >>> g = compare(m, ["Hi", "Yo"], {"plain": None, "steered": s},
    ...             max_new_tokens=3)
    >>> list(g.columns), len(g["steered"])
    (['plain', 'steered'], 2)
    """
    cols, gates = {}, {}
    for name, s in settings.items():
        with (s if s is not None else Steering(model)) as active:
            cols[name] = active.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
            if s is not None and s.condition is not None and active.last_gate is not None:
                gates[name] = [bool(g) for g in active.last_gate.tolist()]
    return Generations(prompts, cols, gates)
