"""Layer-by-layer forward over the HF decoder layers (private).

Lets a patched run start from a cached residual at layer ``l`` and return only the logits at
the last token (left padding puts every prompt's last token at the last position).

It calls the HF blocks themselves (found through :mod:`steer.arch`), so each family's block
internals (sandwich norms, parallel attention + MLP, fused projections, soft-capping) are HF's.
What it supplies around them: the embeddings (taken from HF's own forward: scaling and learned
positions included), per-layer-type rotary embeddings (partial rotary too), causal, padding and
sliding-window masks, a prefix KV cache, the final norm, unembedding and logit soft-capping.
Before a runner is used it reproduces HF's own logits on its batch (:meth:`Runner.verify`).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from .. import arch
from .._hf import cache_kwarg, is_dense
from ..arch import UnsupportedModel
from ..data import Batch
from ..hooks import StopForward, add_hooks
from .qk_fix import attn_logits, rotary


def _check_supported(model) -> None:
    a = model.arch
    if not a.runner or (a.rotary is not None and a.rotary_of(model.hf) is None):
        raise UnsupportedModel(
            f"steer.patching re-runs a model block by block; it does not do {a.family!r} models yet "
            f"({'; '.join(a.notes) or 'no rotary embedding on the base model'}). Supported families: "
            f"{', '.join(f.family for f in arch.FAMILIES if f.runner)}."
        )


def _embeddings(model, batch: Batch) -> Tensor:
    """What HF's own forward feeds the first block (embedding scale, learned positions included)."""
    got = {}

    def grab(module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]
        raise StopForward

    handle = model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False)
    except StopForward:
        pass
    finally:
        handle.remove()
    return got["h"]


def _softcap(x: Tensor, cap) -> Tensor:
    return x if not cap else torch.tanh(x / cap) * cap


def _mask(am: Tensor, T: int, rows: slice, window, dtype) -> Tensor:
    """Additive mask ``[P, 1, rows, T]``: causal, padding keys and (if set) the sliding window."""
    i = torch.arange(T, device=am.device)[rows, None]
    j = torch.arange(T, device=am.device)[None, :]
    keep = j <= i
    if window:
        keep = keep & (i - j < window)
    keep = keep[None] & am[:, None, :].bool()
    m = torch.zeros(keep.shape, dtype=dtype, device=am.device)
    return m.masked_fill_(~keep, torch.finfo(dtype).min)[:, None]


class _PrefixCache:
    """Duck-typed KV cache: records the first ``n`` key/value positions of a full run, or
    prepends the recorded ones when a run covers only the suffix."""

    def __init__(self, n: int):
        self.n, self.kv, self.reps, self.recording = n, {}, 1, True

    def update(self, k, v, layer_idx, *args, **kwargs):
        if self.recording:
            self.kv[layer_idx] = (k[:, :, : self.n].detach(), v[:, :, : self.n].detach())
            return k, v
        pk, pv = self.kv[layer_idx]
        if self.reps > 1:
            pk, pv = pk.repeat(self.reps, 1, 1, 1), pv.repeat(self.reps, 1, 1, 1)
        return torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)


class Runner:
    """Forward machinery for one token batch (``P`` prompts of ``T`` tokens).

    ``prefix``: positions ``< prefix`` are identical in every run of interest (clean and corrupt
    agree there, so patching them is a no-op); :meth:`run_suffix` then recomputes only positions
    ``>= prefix``, attending to the keys/values recorded by a full :meth:`run` with ``record=True``.
    """

    def __init__(self, model, batch: Batch, prefix: int = 0, verify: bool = True):
        _check_supported(model)
        self.model = model
        self.arch = a = model.arch
        self.batch = batch
        self.P, self.T = batch.input_ids.shape
        self.position_ids = batch.position_ids
        cfg = model.hf.config
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.attn_softcap = getattr(cfg, "attn_logit_softcapping", None)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * model.n_layers
        self.layer_types = list(types)[: model.n_layers]
        self.windows = [getattr(a.attention(layer), "sliding_window", None) for layer in model.layers]
        self.final_norm, self.lm_head = a.final_norm_of(model.hf), model.hf.get_output_embeddings()
        with torch.no_grad():
            self.embeds = _embeddings(model, batch)
            self.pe = {}  # (cos, sin) by layer type; none where positions are in the embeddings (GPT-2)
            rope = a.rotary_of(model.hf)
            if rope is not None:
                typed = "layer_type" in inspect.signature(rope.forward).parameters
                self.pe = {
                    t: rope(self.embeds, self.position_ids, t) if typed
                    else rope(self.embeds, position_ids=self.position_ids)
                    for t in set(self.layer_types)
                }
        am = batch.attention_mask
        dtype = self.embeds.dtype
        self.masks, self.suffix_masks = {}, {}
        # no mask lets sdpa take its causal fast path; other attention implementations (eager, as
        # Gemma-2 uses for soft-capping) would attend to later tokens without one
        sdpa = getattr(cfg, "_attn_implementation", None) == "sdpa"
        for w in set(self.windows):
            full = sdpa and bool((am == 1).all()) and (not w or w >= self.T)
            self.masks[w] = None if full else _mask(am, self.T, slice(None), w, dtype)  # None: sdpa's fast path
            self.suffix_masks[w] = _mask(am, self.T, slice(prefix, None), w, dtype)  # [P, 1, T-prefix, T]
        self.prefix = prefix
        self.cache = _PrefixCache(prefix)
        self._cache_kw = cache_kwarg(model.layers[0])  # `cache` from transformers 5.24 (steer._hf)
        if verify:  # (callers that run the batch anyway pass verify=False and check those logits)
            self.verify()

    # fp32 agrees with HF to ~1e-6 of the logit scale; half precision rounds every block
    TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 1e-2}

    @torch.no_grad()
    def verify(self, logits: Optional[Tensor] = None) -> float:
        """Check that the block-by-block forward reproduces HF's own forward on this batch
        (``logits``: this runner's unpatched last-token logits, if already computed).

        Returns the largest last-token logit difference relative to the logits' scale; raises
        :class:`~steer.arch.UnsupportedModel` past :attr:`TOLERANCE` (a patching score computed
        from a forward that is not the model's would be a plausible, wrong number).
        """
        b = self.batch
        ref = self.model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask,
                            position_ids=b.position_ids, use_cache=False).logits[:, -1].float()
        ours = (self.run(self.embeds) if logits is None else logits).float()
        err = float((ours - ref).abs().max() / ref.abs().max().clamp(min=1.0))
        quantized = [] if err <= self.TOLERANCE.get(self.embeds.dtype, 1e-2) else [
            n for n, m in self.model.hf.named_modules()
            if hasattr(m, "weight") and not hasattr(m, "base_layer") and not is_dense(m)]
        why = (f"its {len(quantized)} quantized layers (e.g. {quantized[0]}) may compute another "
               "function on the runner's batches (dynamic quantization scales by the whole batch)"
               if quantized else "something in its blocks (masks, positions, norms, soft-capping) "
               "is not what steer.patching assumes")
        return self._refuse_unless_close(
            err, "steer's block-by-block forward does not reproduce the model's own: its last-token logits",
            f"patching this model would give wrong numbers, so it is refused; {why}.")

    def _refuse_unless_close(self, err: float, what: str, consequence: str) -> float:
        tol = self.TOLERANCE.get(self.embeds.dtype, 1e-2)
        if not err <= tol:
            raise UnsupportedModel(
                f"{what} differ by {err:.2e} of their scale (tolerance {tol:.0e}) on "
                f"{type(self.model.hf).__name__} ({self.arch.family!r} family, {self.embeds.dtype}): {consequence}"
            )
        return err

    def layer_pe(self, l: int) -> Optional[tuple[Tensor, Tensor]]:
        """``(cos, sin)`` ``[P, T, d_rotary]`` used by layer ``l`` (None without rotary embeddings)."""
        return self.pe.get(self.layer_types[l])

    def attention_qk(self, l: int, q: Tensor, k: Tensor, rows: Optional[slice] = None) -> tuple[Tensor, Tensor]:
        """Layer ``l``'s queries and keys as its attention uses them, from pre-norm, pre-rotary
        ``q`` ``[P, T, H, d]`` and ``k`` ``[P, T, Hkv, d]`` (the ``q``/``k`` sites): q/k norms if
        the model has them, then rotary. ``rows``: only those query rows."""
        attn = self.arch.attention(self.model.layers[l])
        rows = slice(0, q.shape[1]) if rows is None else rows
        q = q[:, rows]
        if hasattr(attn, "q_norm") and self.arch.qk_norm_scope == "full":  # OLMo-2: over all heads at once
            q, k = attn.q_norm(q.flatten(-2)).view_as(q), attn.k_norm(k.flatten(-2)).view_as(k)
        elif hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        pe = self.layer_pe(l)
        if pe is not None:
            q, k = rotary(q, pe[0][:, rows], pe[1][:, rows]), rotary(k, *pe)
        return q, k

    def attention_shape(self, l: int) -> dict:
        """What besides q and k decides layer ``l``'s logits: ``scaling``, ``key_valid``,
        ``window``, ``softcap`` (keyword arguments of :func:`~steer.patching.qk_fix.attn_logits`
        and of the kernels in :mod:`steer.patching.qk_tiled`)."""
        return dict(scaling=self.arch.attention(self.model.layers[l]).scaling, key_valid=self.batch.attention_mask.bool(),
                    window=self.windows[l], softcap=self.attn_softcap)

    def rotated_logits(self, l: int, q_rot: Tensor, k_rot: Tensor, rows: slice) -> Tensor:
        """Layer ``l``'s attention logits in fp32 for query ``rows`` from queries and keys already
        through :meth:`attention_qk` (in the model's dtype, as its attention multiplies them)."""
        return attn_logits(q_rot[:, rows].float(), k_rot.float(), **self.attention_shape(l), q_offset=rows.start)

    @torch.no_grad()
    def attention_error(self, logits: Tensor, v: Tensor, z: Tensor, rows: Optional[slice] = None) -> tuple[float, float]:
        """``(max |softmax(logits)·v − z|, max |z|)`` over real query tokens (``rows``: the query
        rows ``logits`` and ``z`` hold); see :meth:`refuse_attention`."""
        H, Hkv = z.shape[2], v.shape[2]
        pattern = torch.softmax(logits.float(), -1)  # [P, H, T, S]
        z_hat = torch.einsum("phts,pshd->pthd", pattern, v.float().repeat_interleave(H // Hkv, 2))
        real = self.batch.attention_mask.bool()[:, slice(None) if rows is None else rows]
        if not bool(real.any()):
            return 0.0, 0.0
        return float((z_hat - z.float())[real].abs().max()), float(z.float()[real].abs().max())

    def refuse_attention(self, l: int, diff: float, scale: float) -> float:
        """Raise unless ``diff / scale`` (from :meth:`attention_error`, maxima over blocks of
        rows) is within :attr:`TOLERANCE`: ``softmax(logits) · v`` must be the ``z`` the real forward
        produced at layer ``l`` (on real query tokens). Raises :class:`~steer.arch.UnsupportedModel`
        otherwise (attention with parts steer does not model, e.g. learned sink logits or ALiBi,
        would make the QK fix wrong)."""
        err = diff / max(scale, 1e-6)
        return self._refuse_unless_close(
            err, f"steer's attention logits for layer {l} do not reproduce the model's attention: "
            "softmax(logits)·v and its z", "the QK fix would be wrong; use atp() without the QK fix.")

    def _layers(self, start: int, h: Tensor, reps: int, suffix: bool, hooks, cache_kw, keep: bool = False):
        n = self.prefix if suffix else 0
        masks = self.suffix_masks if suffix else self.masks
        pos = self.position_ids[:, n:]
        pos = pos.repeat(reps, 1) if reps > 1 else pos
        resid = []
        with add_hooks(self.model, hooks or {}):
            for l in range(start, self.model.n_layers):
                if keep:
                    resid.append(h)
                kw = dict(cache_kw)
                pe = self.layer_pe(l)
                if pe is not None:
                    pe = (pe[0][:, n:], pe[1][:, n:])
                    kw["position_embeddings"] = pe if reps == 1 else (pe[0].repeat(reps, 1, 1), pe[1].repeat(reps, 1, 1))
                mask = masks[self.windows[l]]
                if reps > 1:
                    mask = None if mask is None else mask.repeat(reps, 1, 1, 1)
                h = self.model.layers[l](h, attention_mask=mask, position_ids=pos, **kw)
                if isinstance(h, tuple):
                    h = h[0]
        resid.append(h)
        return resid

    def run_suffix(self, h: Tensor, start: int, hooks=None, columns: Tensor | None = None) -> Tensor:
        """Run layers ``start..`` on the suffix residual ``h`` ``[reps*P, T - prefix, d]``; return
        last-token logits (only the vocabulary ``columns`` if given)."""
        reps = h.shape[0] // self.P
        self.cache.recording, self.cache.reps = False, reps
        try:
            h = self._layers(start, h, reps, True, hooks, {self._cache_kw: self.cache})[-1]
        finally:
            self.cache.recording, self.cache.reps = True, 1
        return self.unembed(h[:, -1], columns)

    def unembed(self, h: Tensor, columns: Tensor | None = None) -> Tensor:
        """Final norm + unembedding (+ soft-cap) of residuals ``[rows, d]`` (onto ``columns`` only if given)."""
        x = self.final_norm(h)
        head = self.lm_head
        if columns is None or not is_dense(head):  # (an adapter or offloaded head: call it)
            out = head(x) if columns is None else head(x)[:, columns.to(x.device)]
            return _softcap(out, self.final_softcap)
        cols = columns.to(x.device)
        bias = None if head.bias is None else head.bias[cols]
        return _softcap(torch.nn.functional.linear(x, head.weight[cols], bias), self.final_softcap)

    def run(self, h: Tensor, start: int = 0, hooks=None, keep_resid: bool = False, record: bool = False):
        """Run layers ``start..L-1`` on residual ``h`` ``[reps*P, T, d]``; return last-token logits.

        With ``keep_resid`` also returns the residuals entering each layer and the final one
        (``L - start + 1`` tensors, in the autograd graph when ``h`` requires grad).
        """
        reps = h.shape[0] // self.P
        kw = {self._cache_kw: self.cache} if record else {}
        resid = self._layers(start, h, reps, False, hooks, kw, keep=keep_resid)
        logits = self.unembed(resid[-1][:, -1])
        return (logits, resid) if keep_resid else logits
