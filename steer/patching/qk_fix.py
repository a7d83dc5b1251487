"""AtP*'s QK fix: exact softmax for patched queries and keys, linearised only after the softmax.

For a query node the row's attention is recomputed exactly with the patched query:
``Î(q_t) = Σ_s (A'_ts - A_ts) ∂M/∂A_ts``. For a key node ``s`` only one logit per row changes,
``x_ts → x_ts + δ_ts``, so every (row, key) pair costs O(1) given per-row sums: all keys of a
head cost O(T²), not O(T³) (:func:`key_fix`). In saturated rows the naive renormaliser
``1 - A_ts + A_ts e^δ`` cancels catastrophically; :func:`key_fix` keeps the partition sum
*excluding the row's top entry* (computed directly) and works in log space.

``∂M/∂A_ts = ∂M/∂z_t · v_s`` (z = A v per head), so no hook on the pattern is needed.
Shapes use ``P`` prompts, ``H`` query heads, ``T`` query and ``S`` key positions.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["rotary", "attn_logits", "pattern_grad", "query_fix", "key_fix", "key_fix_bruteforce", "NEG"]

NEG = -1e30  # finite "minus infinity" for masked logits (no NaN in all-masked padding rows)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotary(x: Float[Tensor, "P T H d"], cos: Float[Tensor, "P T r"], sin: Float[Tensor, "P T r"]) -> Float[Tensor, "P T H d"]:
    """Apply rotary embeddings (HF ``rotate_half`` convention) to pre-rotary q or k; with partial
    rotary (GPT-NeoX, some Phi-3) only the first ``r = cos.shape[-1]`` dimensions turn.

    >>> import torch
    >>> x = torch.randn(1, 3, 2, 4)
    >>> torch.allclose(rotary(x, torch.ones(1, 3, 4), torch.zeros(1, 3, 4)), x)
    True
    >>> torch.equal(rotary(x, torch.zeros(1, 3, 2), torch.ones(1, 3, 2))[..., 2:], x[..., 2:])
    True
    """
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((rotary(x[..., :r], cos, sin), x[..., r:]), -1)
    return x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None]


def attn_logits(
    q_rot: Float[Tensor, "P T H d"], k_rot: Float[Tensor, "P S Hkv d"], scaling: float,
    key_valid: Bool[Tensor, "P S"] | None = None, window: int | None = None, softcap: float | None = None,
    q_offset: int | None = None,
) -> Float[Tensor, "P H T S"]:
    """Causal attention logits with masked entries set to :data:`NEG` (GQA: head h uses kv head
    ``h // (H // Hkv)``). ``window``: sliding-window attention (row ``t`` sees keys
    ``t - window < s <= t``); ``softcap``: ``tanh(x / c) * c`` (Gemma-2 style). ``q_offset``: the
    key position of the first query row (default ``S - T``: the queries are the last ``T``
    positions), so a block of query rows gets its own causal mask.

    >>> import torch
    >>> attn_logits(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4), 0.5).shape
    torch.Size([1, 2, 3, 3])
    >>> q, k = torch.randn(1, 4, 2, 4), torch.randn(1, 4, 1, 4)   # rows 1..2 of a 4-token sequence
    >>> torch.equal(attn_logits(q[:, 1:3], k, 0.5, q_offset=1), attn_logits(q, k, 0.5)[:, :, 1:3])
    True
    """
    H, Hkv = q_rot.shape[2], k_rot.shape[2]
    k = k_rot.repeat_interleave(H // Hkv, dim=2)
    x = torch.einsum("pthd,pshd->phts", q_rot, k) * scaling
    if softcap:
        x = torch.tanh(x / softcap) * softcap
    T, S = x.shape[-2:]
    off = S - T if q_offset is None else q_offset
    valid = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(off)
    if window:
        valid = valid & ~torch.ones_like(valid).tril(off - window)
    valid = valid[None, None]
    if key_valid is not None:
        valid = valid & key_valid[:, None, None, :]
    return x.masked_fill(~valid, NEG)


def pattern_grad(g_z: Float[Tensor, "P T H d"], v: Float[Tensor, "P S Hkv d"]) -> Float[Tensor, "P H T S"]:
    """``∂M/∂A_ts = ∂M/∂z_t · v_s`` per head.

    >>> import torch
    >>> pattern_grad(torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4)).shape
    torch.Size([1, 2, 3, 3])
    """
    H, Hkv = g_z.shape[2], v.shape[2]
    return torch.einsum("pthd,pshd->phts", g_z, v.repeat_interleave(H // Hkv, dim=2))


def query_fix(x: Float[Tensor, "... T S"], x_new: Float[Tensor, "... T S"], g: Float[Tensor, "... T S"]) -> Float[Tensor, "... T"]:
    """Per-row effect of replacing each row's logits: ``Σ_s (softmax(x_new) - softmax(x)) g``.

    >>> import torch
    >>> x = torch.zeros(1, 2); query_fix(x, torch.tensor([[10.0, 0.0]]), torch.tensor([[1.0, 0.0]])).item() > 0.49
    True
    """
    return ((torch.softmax(x_new, -1) - torch.softmax(x, -1)) * g).sum(-1)


def key_fix(x: Float[Tensor, "... T S"], delta: Float[Tensor, "... T S"], g: Float[Tensor, "... T S"],
            impl: str = "torch") -> Float[Tensor, "... T S"]:
    """Effect on row ``t`` of shifting only logit ``x_ts`` by ``δ_ts``: for every (t, s) at once.

    ``out[..., t, s] = Σ_j (A'_tj - A_tj) g_tj`` where ``A'`` is row ``t``'s softmax with
    ``x_ts + δ_ts``. O(T·S) in total; stable in saturated rows. Masked logits (≤ :data:`NEG`/2)
    give 0. Sum over ``t`` for the effect of patching key ``s``.

    ``impl``: ``"torch"`` (default), ``"triton"`` (the fused kernel of
    :mod:`steer.patching.kernels`) or ``"auto"`` (Triton for CUDA tensors when it is installed).
    The kernel is checked in Triton's CPU interpreter but not yet on a GPU, so it is opt-in.

    >>> import torch
    >>> x = torch.tensor([[0.0, 0.0]]); d = torch.tensor([[5.0, 0.0]]); g = torch.tensor([[1.0, 0.0]])
    >>> key_fix(x, d, g)[0, 0].item() > 0.49
    True
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl={impl!r}: use 'auto', 'torch' or 'triton'.")
    if impl == "triton" or (impl == "auto" and x.is_cuda):
        from .kernels import key_fix_triton, triton_available

        if impl == "triton" or triton_available():
            return key_fix_triton(x, delta, g)
    valid = x > NEG / 2
    m, top = x.max(-1, keepdim=True)
    is_top = torch.zeros_like(valid).scatter_(-1, top, True)
    e = torch.exp(x - m)
    eg = e * g
    R = e.masked_fill(is_top, 0).sum(-1, keepdim=True)  # Σ_{j ≠ top} e_j, no cancellation
    HE = eg.sum(-1, keepdim=True)
    H_excl_top = eg.masked_fill(is_top, 0).sum(-1, keepdim=True)
    G = HE / (1 + R)  # Σ_j A_j g_j
    H_ts = torch.where(is_top, H_excl_top, HE - eg)  # Σ_{j ≠ s} e_j g_j
    S_ts = torch.where(is_top, R, (1 + R - e).clamp_min(0))  # Σ_{j ≠ s} e_j
    x_new = x + torch.where(valid, delta, torch.zeros_like(delta))
    logZ_new = torch.logaddexp(m + torch.log(S_ts), x_new)
    a_new = torch.exp(x_new - logZ_new)
    rest = torch.exp(m - logZ_new) * H_ts
    out = rest + a_new * g - G
    return torch.where(valid, out, torch.zeros_like(out))


def key_fix_bruteforce(x: Float[Tensor, "... T S"], delta: Float[Tensor, "... T S"], g: Float[Tensor, "... T S"]) -> Float[Tensor, "... T S"]:
    """O(T·S²) definition of :func:`key_fix`: a full softmax per patched key column.

    >>> import torch
    >>> x, d, g = torch.randn(3, 3).tril(), torch.randn(3, 3), torch.randn(3, 3)
    >>> key_fix_bruteforce(x, d, g).shape
    torch.Size([3, 3])
    """
    valid = x > NEG / 2
    A = torch.softmax(x, -1)
    out = torch.zeros_like(x)
    for s in range(x.shape[-1]):
        xs = x.clone()
        xs[..., s] = torch.where(valid[..., s], x[..., s] + delta[..., s], x[..., s])
        out[..., s] = ((torch.softmax(xs, -1) - A) * g).sum(-1)
    return torch.where(valid, out, torch.zeros_like(out))
