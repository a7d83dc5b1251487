"""Layer-by-layer forward over the HF decoder layers (private).

Lets a patched run start from a cached residual at layer ``l`` and return only the logits at
the last token (left padding puts every prompt's last token at the last position).

Handles Llama-style decoders and Gemma-3's additions: per-layer-type rotary embeddings and
sliding-window masks, q/k norms, sandwich norms (inside the HF layer) and logit soft-capping.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .._hf import cache_kwarg
from ..data import Batch
from ..hooks import add_hooks
from .qk_fix import attn_logits, rotary


def _check_supported(model) -> None:
    inner = getattr(model.hf, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        raise NotImplementedError(
            f"steer.patching runs Llama-style decoders (model.hf.model.rotary_emb/layers); "
            f"{type(model.hf).__name__} is not supported yet - use a Llama- or Gemma-3-family model."
        )


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

    def __init__(self, model, batch: Batch, prefix: int = 0):
        _check_supported(model)
        self.model = model
        self.inner = model.hf.model
        self.batch = batch
        self.P, self.T = batch.input_ids.shape
        self.position_ids = batch.position_ids
        cfg = model.hf.config
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.attn_softcap = getattr(cfg, "attn_logit_softcapping", None)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * model.n_layers
        self.layer_types = list(types)[: model.n_layers]
        self.windows = [getattr(layer.self_attn, "sliding_window", None) for layer in model.layers]
        with torch.no_grad():
            self.embeds = self.inner.embed_tokens(batch.input_ids)
            typed = "layer_type" in inspect.signature(self.inner.rotary_emb.forward).parameters
            self.pe = {
                t: self.inner.rotary_emb(self.embeds, self.position_ids, t) if typed
                else self.inner.rotary_emb(self.embeds, position_ids=self.position_ids)
                for t in set(self.layer_types)
            }
        am = batch.attention_mask
        dtype = self.embeds.dtype
        self.masks, self.suffix_masks = {}, {}
        for w in set(self.windows):
            full = bool((am == 1).all()) and (not w or w >= self.T)
            self.masks[w] = None if full else _mask(am, self.T, slice(None), w, dtype)  # None: sdpa's fast path
            self.suffix_masks[w] = _mask(am, self.T, slice(prefix, None), w, dtype)  # [P, 1, T-prefix, T]
        self.prefix = prefix
        self.cache = _PrefixCache(prefix)
        self._cache_kw = cache_kwarg(model.layers[0])  # `cache` from transformers 5.24 (steer._hf)

    def layer_pe(self, l: int) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` ``[P, T, d_head]`` used by layer ``l``."""
        return self.pe[self.layer_types[l]]

    def attention_logits(self, l: int, q: Tensor, k: Tensor) -> Tensor:
        """Layer ``l``'s attention logits ``[P, H, T, T]`` from pre-norm, pre-rotary ``q``
        ``[P, T, H, d]`` and ``k`` ``[P, T, Hkv, d]`` (the ``q``/``k`` sites): q/k norms if the
        model has them, rotary, scaling, soft-capping; masked entries are ``qk_fix.NEG``."""
        attn = self.model.layers[l].self_attn
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self.layer_pe(l)
        return attn_logits(rotary(q, cos, sin), rotary(k, cos, sin), attn.scaling,
                           self.batch.attention_mask.bool(), window=self.windows[l], softcap=self.attn_softcap)

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
                cos, sin = self.layer_pe(l)
                pe = (cos[:, n:], sin[:, n:])
                mask = masks[self.windows[l]]
                if reps > 1:
                    pe = (pe[0].repeat(reps, 1, 1), pe[1].repeat(reps, 1, 1))
                    mask = None if mask is None else mask.repeat(reps, 1, 1, 1)
                h = self.model.layers[l](h, attention_mask=mask, position_embeddings=pe, position_ids=pos, **cache_kw)
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
        x = self.inner.norm(h)
        head = self.model.hf.lm_head
        if columns is None:
            return _softcap(head(x), self.final_softcap)
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
