"""Layer-by-layer forward over the HF decoder layers (private).

Lets a patched run start from a cached residual at layer ``l`` and return only the logits at
the last token (left padding puts every prompt's last token at the last position).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..data import Batch
from ..hooks import add_hooks


def _check_supported(model) -> None:
    inner = getattr(model.hf, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        raise NotImplementedError(
            f"steer.patching runs Llama-style decoders (model.hf.model.rotary_emb/layers); "
            f"{type(model.hf).__name__} is not supported yet - use a Llama-family model."
        )
    if hasattr(model.layers[0], "pre_feedforward_layernorm"):
        raise NotImplementedError(
            "steer.patching does not support sandwich-norm (Gemma-3) layers yet; use a Llama-family model."
        )


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
        with torch.no_grad():
            self.embeds = self.inner.embed_tokens(batch.input_ids)
            cos, sin = self.inner.rotary_emb(self.embeds, position_ids=self.position_ids)
        self.cos, self.sin = cos, sin
        am = batch.attention_mask
        if bool((am == 1).all()):
            self.mask = None  # plain causal: sdpa's fast path
        else:
            keep = torch.tril(torch.ones(self.T, self.T, dtype=torch.bool, device=am.device))
            keep = keep[None] & am[:, None, :].bool()
            m = torch.zeros(keep.shape, dtype=self.embeds.dtype, device=am.device)
            m.masked_fill_(~keep, torch.finfo(m.dtype).min)
            self.mask = m[:, None]  # [P, 1, T, T]
        self.prefix = prefix
        self.cache = _PrefixCache(prefix)
        keep = torch.ones(self.T, self.T, dtype=torch.bool, device=am.device).tril()[prefix:]
        keep = keep[None] & am[:, None, :].bool()
        sm = torch.zeros(keep.shape, dtype=self.embeds.dtype, device=am.device)
        self.suffix_mask = sm.masked_fill_(~keep, torch.finfo(sm.dtype).min)[:, None]  # [P, 1, T-prefix, T]

    def _expand(self, reps: int):
        if reps == 1:
            return self.mask, (self.cos, self.sin), self.position_ids
        mask = None if self.mask is None else self.mask.repeat(reps, 1, 1, 1)
        return mask, (self.cos.repeat(reps, 1, 1), self.sin.repeat(reps, 1, 1)), self.position_ids.repeat(reps, 1)

    def run_suffix(self, h: Tensor, start: int, hooks=None, columns: Tensor | None = None) -> Tensor:
        """Run layers ``start..`` on the suffix residual ``h`` ``[reps*P, T - prefix, d]``; return
        last-token logits (only the vocabulary ``columns`` if given)."""
        reps = h.shape[0] // self.P
        n = self.prefix
        mask = self.suffix_mask.repeat(reps, 1, 1, 1) if reps > 1 else self.suffix_mask
        pe = (self.cos[:, n:].repeat(reps, 1, 1), self.sin[:, n:].repeat(reps, 1, 1))
        pos = self.position_ids[:, n:].repeat(reps, 1)
        self.cache.recording, self.cache.reps = False, reps
        try:
            with add_hooks(self.model, hooks or {}):
                for layer in self.model.layers[start:]:
                    h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos,
                              past_key_values=self.cache)
                    if isinstance(h, tuple):
                        h = h[0]
        finally:
            self.cache.recording, self.cache.reps = True, 1
        return self.unembed(h[:, -1], columns)

    def unembed(self, h: Tensor, columns: Tensor | None = None) -> Tensor:
        """Final norm + unembedding of residuals ``[rows, d]`` (onto ``columns`` only if given)."""
        x = self.inner.norm(h)
        head = self.model.hf.lm_head
        if columns is None:
            return head(x)
        cols = columns.to(x.device)
        bias = None if head.bias is None else head.bias[cols]
        return torch.nn.functional.linear(x, head.weight[cols], bias)

    def run(self, h: Tensor, start: int = 0, hooks=None, keep_resid: bool = False, record: bool = False):
        """Run layers ``start..L-1`` on residual ``h`` ``[reps*P, T, d]``; return last-token logits.

        With ``keep_resid`` also returns the residuals entering each layer and the final one
        (``L - start + 1`` tensors, in the autograd graph when ``h`` requires grad).
        """
        reps = h.shape[0] // self.P
        mask, pe, pos = self._expand(reps)
        resid = []
        with add_hooks(self.model, hooks or {}):
            for layer in self.model.layers[start:]:
                if keep_resid:
                    resid.append(h)
                kw = {"past_key_values": self.cache} if record else {}
                h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos, **kw)
                if isinstance(h, tuple):
                    h = h[0]
        if keep_resid:
            resid.append(h)
        logits = self.model.hf.lm_head(self.inner.norm(h[:, -1]))
        return (logits, resid) if keep_resid else logits
