"""AtP*'s QK fix in tiles, as a Triton kernel: logits recomputed from q and k, never stored.

:mod:`steer.patching.qk_fix` states the fix on full logit tensors ``[P, H, T, S]``; the
PyTorch path (``_Attribution._qk_scores``) bounds memory by walking blocks of query rows. These
kernels go one step further, as FlashAttention's backward does: one program per
(prompt, head, block of query rows) walks the keys in tiles, computes the logits
``x = q·k / √d`` (soft-capped and masked), the alternative logits with the patched q or k, and
the pattern gradient ``g = ∂M/∂z_t · v_s`` in registers, and writes only the per-row or
per-key results. Extra memory is O(P·H·T).

* :func:`row_fix` — ``Σ_s (softmax(x')_ts − softmax(x)_ts) g_ts`` per row (query nodes, and a
  head's keys patched all at once), one pass with two online softmaxes.
* :func:`key_fix_sum` — the key fix of :func:`~steer.patching.qk_fix.key_fix` summed over rows
  and prompts: ``[H, S]``. Pass 1 collects each row's maximum, its position, and the partition
  sums *excluding* that top entry (the stable formula for saturated rows, carried online);
  pass 2 evaluates every (row, key) effect and adds column sums into the output.

Inputs are post-norm, post-rotary ``q`` ``[P, T, H, d]`` and ``k``/``v`` ``[P, S, Hkv, d]`` (GQA:
head ``h`` reads kv head ``h // (H // Hkv)``). Products are exact and accumulate in fp32: bf16 /
fp16 operands go to the tensor cores as they are (a product of two halves is exact in fp32),
fp32 operands use IEEE products (no TF32); everything after the products is fp32. Tested in
Triton's CPU interpreter against the PyTorch definitions and compiled for sm_90 offline (no
register spills at :data:`TILES`, ``experiments/bench/kernel_resources.py``); on CUDA it is what
``impl="auto"`` uses when Triton is installed.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from jaxtyping import Bool, Float
from torch import Tensor

try:  # optional: CUDA builds of torch ship it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = tl = None

__all__ = ["row_fix", "key_fix_sum"]

# (query rows, keys, warps) per program, by operand type. Chosen so that no config spills
# registers when compiled for sm_90 (read offline from the cubin: `cuobjdump -res-usage`); the
# first kernels (64 x 64 tiles, 4 warps, fp32 dots) spilled up to 26 KB a thread and ran 533x
# slower than SDPA fwd+bwd on an H200. experiments/bench/bench_gpu.py times alternatives.
TILES = {"half": (64, 64, 8), "fp32": (32, 32, 8)}


if tl is not None:

    @triton.jit
    def _tanh(y):  # sign(y) (1 − e) / (1 + e), e = exp(−2|y|): no overflow
        e = tl.exp(-2.0 * tl.abs(y))
        return tl.where(y < 0, -1.0, 1.0) * (1.0 - e) / (1.0 + e)

    @triton.jit
    def _mm(a, b, F32: tl.constexpr):
        """``a @ bᵀ`` accumulated in fp32. fp32 operands: IEEE products (no TF32); bf16/fp16
        operands: tensor-core products, which are exact in fp32, so nothing is lost either way."""
        if F32:
            return tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            return tl.dot(a, tl.trans(b), out_dtype=tl.float32)

    @triton.jit
    def _tile(q, qa, k_ptr, ka_ptr, v_ptr, gz, kv_ptr, p, hk, s0, t_idx, S, HKV, off, window, scaling, softcap,
              D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, ALT: tl.constexpr,
              WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, F32: tl.constexpr):
        """Logits, alternative logits, pattern gradient and validity of one [BT, BS] tile.
        ``ALT``: 1 the alternative logits use the patched queries ``qa``, 2 the patched keys at
        ``ka_ptr``, 0 none are needed (``xa`` is ``x``)."""
        s_idx = s0 + tl.arange(0, BS)
        dd = tl.arange(0, BD)
        kmask = (s_idx[:, None] < S) & (dd[None, :] < D)
        koff = ((p * S + s_idx[:, None]).to(tl.int64) * HKV + hk) * D + dd[None, :]
        k = tl.load(k_ptr + koff, mask=kmask, other=0.0)
        v = tl.load(v_ptr + koff, mask=kmask, other=0.0)
        x = _mm(q, k, F32) * scaling
        if ALT == 1:  # the row block's patched queries against the keys
            xa = _mm(qa, k, F32) * scaling
        elif ALT == 2:  # the queries against the patched keys
            ka = tl.load(ka_ptr + koff, mask=kmask, other=0.0)
            xa = _mm(q, ka, F32) * scaling
        else:
            xa = x
        if SOFTCAP:
            x = _tanh(x / softcap) * softcap
            if ALT:
                xa = _tanh(xa / softcap) * softcap
            else:
                xa = x
        g = _mm(gz, v, F32)
        kv = tl.load(kv_ptr + p * S + s_idx, mask=s_idx < S, other=0)
        valid = (s_idx[None, :] <= t_idx[:, None] + off) & (kv[None, :] != 0)
        if WINDOW:
            valid = valid & (s_idx[None, :] > t_idx[:, None] + off - window)
        return x, xa, g, valid, s_idx

    @triton.jit
    def _online(m, z, n, x, g):
        """One tile of an online softmax-weighted sum: running max ``m``, ``z = Σ e^(x−m)``,
        ``n = Σ e^(x−m) g`` per row, merged with tile ``x`` (masked entries −inf)."""
        b = tl.maximum(m, tl.max(x, 1))
        bs = tl.where(b > float("-inf"), b, 0.0)
        r = tl.exp(m - bs)
        e = tl.exp(x - bs[:, None])
        return b, z * r + tl.sum(e, 1), n * r + tl.sum(e * g, 1)

    @triton.jit
    def _load_rows(ptr, p, h, t_idx, T, H, D: tl.constexpr, BD: tl.constexpr):
        dd = tl.arange(0, BD)
        off = ((p * T + t_idx[:, None]).to(tl.int64) * H + h) * D + dd[None, :]
        return tl.load(ptr + off, mask=(t_idx[:, None] < T) & (dd[None, :] < D), other=0.0)

    @triton.jit
    def _row_fix_kernel(q_ptr, k_ptr, qa_ptr, ka_ptr, v_ptr, gz_ptr, kv_ptr, out_ptr,
                        T, H, HKV, off, window, scaling, softcap,
                        S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                        ALT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, F32: tl.constexpr):
        tb, ph = tl.program_id(0), tl.program_id(1)
        p, h = ph // H, ph % H
        hk = h // (H // HKV)
        t_idx = tb * BT + tl.arange(0, BT)
        q = _load_rows(q_ptr, p, h, t_idx, T, H, D, BD)
        gz = _load_rows(gz_ptr, p, h, t_idx, T, H, D, BD)
        if ALT == 1:  # patched queries (2: patched keys, read tile by tile)
            qa = _load_rows(qa_ptr, p, h, t_idx, T, H, D, BD)
        else:
            qa = q
        m1 = tl.full((BT,), float("-inf"), tl.float32)
        z1 = tl.zeros((BT,), tl.float32)
        n1 = tl.zeros((BT,), tl.float32)
        m2 = tl.full((BT,), float("-inf"), tl.float32)
        z2 = tl.zeros((BT,), tl.float32)
        n2 = tl.zeros((BT,), tl.float32)
        last = tb * BT + BT - 1 + off  # the block's last row sees no key past this
        for s0 in range(0, S, BS):
            if s0 <= last:
                x, xa, g, valid, s_idx = _tile(q, qa, k_ptr, ka_ptr, v_ptr, gz, kv_ptr, p, hk, s0, t_idx, S, HKV, off,
                                               window, scaling, softcap, D, BD, BS, ALT, WINDOW, SOFTCAP, F32)
                m1, z1, n1 = _online(m1, z1, n1, tl.where(valid, x, float("-inf")), g)
                m2, z2, n2 = _online(m2, z2, n2, tl.where(valid, xa, float("-inf")), g)
        ok = (z1 > 0) & (z2 > 0)
        out = tl.where(ok, n2 / tl.where(ok, z2, 1.0) - n1 / tl.where(ok, z1, 1.0), 0.0)
        tl.store(out_ptr + (p * H + h).to(tl.int64) * T + t_idx, out, mask=t_idx < T)

    @triton.jit
    def _key_fix_kernel(q_ptr, k_ptr, ka_ptr, v_ptr, gz_ptr, kv_ptr, out_ptr,
                        T, H, HKV, off, window, scaling, softcap,
                        S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                        WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, F32: tl.constexpr):
        tb, ph = tl.program_id(0), tl.program_id(1)
        p, h = ph // H, ph % H
        hk = h // (H // HKV)
        t_idx = tb * BT + tl.arange(0, BT)
        q = _load_rows(q_ptr, p, h, t_idx, T, H, D, BD)
        gz = _load_rows(gz_ptr, p, h, t_idx, T, H, D, BD)
        last = tb * BT + BT - 1 + off
        # pass 1: per row the maximum m, its key, R = Σ_{j≠top} e_j, HE = Σ_j e_j g_j and
        # HX = Σ_{j≠top} e_j g_j (e_j = exp(x_j − m)), merged block by block without cancellation
        m = tl.full((BT,), float("-inf"), tl.float32)
        top = tl.zeros((BT,), tl.int32)
        R = tl.zeros((BT,), tl.float32)
        HE = tl.zeros((BT,), tl.float32)
        HX = tl.zeros((BT,), tl.float32)
        for s0 in range(0, S, BS):
            if s0 <= last:
                x, xa, g, valid, s_idx = _tile(q, q, k_ptr, ka_ptr, v_ptr, gz, kv_ptr, p, hk, s0, t_idx, S, HKV, off,
                                               window, scaling, softcap, D, BD, BS, 0, WINDOW, SOFTCAP, F32)
                x = tl.where(valid, x, float("-inf"))
                bm = tl.max(x, 1)
                bidx = tl.argmax(x, 1)
                has = bm > float("-inf")
                bms = tl.where(has, bm, 0.0)
                e = tl.exp(x - bms[:, None])
                btop = tl.arange(0, BS)[None, :] == bidx[:, None]
                br = tl.sum(tl.where(btop, 0.0, e), 1)
                bhe = tl.sum(e * g, 1)
                bhx = tl.sum(tl.where(btop, 0.0, e * g), 1)
                wins = has & (bm > m)  # this block holds the new top entry
                mine = m > float("-inf")
                alpha = tl.exp(tl.minimum(tl.where(mine, m, 0.0) - bms, 0.0))  # old scale → block's (block wins)
                beta = tl.exp(tl.minimum(bms - tl.where(mine, m, 0.0), 0.0))  # block scale → old (old wins)
                R_w = alpha * (R + tl.where(mine, 1.0, 0.0)) + br
                R_l = R + tl.where(has, beta * (1.0 + br), 0.0)
                HE_w = alpha * HE + bhe
                HE_l = HE + tl.where(has, beta * bhe, 0.0)
                HX_w = alpha * HE + bhx
                HX_l = HX + tl.where(has, beta * bhe, 0.0)
                R = tl.where(wins, R_w, tl.where(mine, R_l, R))
                HE = tl.where(wins, HE_w, tl.where(mine, HE_l, HE))
                HX = tl.where(wins, HX_w, tl.where(mine, HX_l, HX))
                top = tl.where(wins, (s0 + bidx).to(tl.int32), top)
                m = tl.where(wins, bm, m)
        row_ok = (m > float("-inf")) & (t_idx < T)
        ms = tl.where(row_ok, m, 0.0)
        G = HE / (1.0 + R)
        # pass 2: out_ts = Σ_j (A'_tj − A_tj) g_tj for x_ts → x'_ts, summed over rows into [H, S]
        for s0 in range(0, S, BS):
            if s0 <= last:
                x, xa, g, valid, s_idx = _tile(q, q, k_ptr, ka_ptr, v_ptr, gz, kv_ptr, p, hk, s0, t_idx, S, HKV, off,
                                               window, scaling, softcap, D, BD, BS, 2, WINDOW, SOFTCAP, F32)
                valid = valid & row_ok[:, None]
                e = tl.where(valid, tl.exp(tl.where(valid, x, ms[:, None]) - ms[:, None]), 0.0)
                is_top = s_idx[None, :] == top[:, None]
                H_ts = tl.where(is_top, HX[:, None], HE[:, None] - e * g)
                S_ts = tl.where(is_top, R[:, None], tl.maximum(1.0 + R[:, None] - e, 0.0))
                xn = tl.where(valid, xa, 0.0)
                a = tl.where(S_ts > 0, ms[:, None] + tl.log(tl.maximum(S_ts, 1e-30)), float("-inf"))
                hi = tl.maximum(a, xn)
                logZ = hi + tl.log(tl.exp(a - hi) + tl.exp(xn - hi))
                out = tl.exp(ms[:, None] - logZ) * H_ts + tl.exp(xn - logZ) * g - G[:, None]
                col = tl.sum(tl.where(valid, out, 0.0), 0)
                tl.atomic_add(out_ptr + h.to(tl.int64) * S + s_idx, col, mask=s_idx < S)


def _prepare(q: Tensor, k: Tensor, v: Tensor, g_z: Tensor, key_valid: Optional[Tensor]):
    if triton is None:
        raise RuntimeError("The tiled QK fix needs Triton (pip install triton), or use impl='torch'.")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or interpret):
        raise RuntimeError("The tiled QK fix needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU).")
    P, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape != v.shape or g_z.shape != q.shape or k.shape[0] != P or k.shape[-1] != D or H % Hkv:
        raise ValueError(f"q/g_z [P, T, H, d] and k/v [P, S, Hkv, d] with H divisible by Hkv; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, g_z {tuple(g_z.shape)}.")
    kv = (torch.ones(P, S, dtype=torch.bool, device=q.device) if key_valid is None else key_valid).to(torch.int8).contiguous()
    dts = {q.dtype, k.dtype, v.dtype, g_z.dtype}
    # one operand dtype: a half type when every input has it (exact products on tensor cores), else fp32
    # (Triton 3.6's CPU interpreter multiplies bf16 operands wrongly, so there they go as fp32)
    half = (torch.float16,) if interpret else (torch.bfloat16, torch.float16)
    dt = dts.pop() if len(dts) == 1 and q.dtype in half else torch.float32
    bd = max(16, triton.next_power_of_2(D))
    bt, bs, warps = (16, 16, 4) if interpret or S <= 64 else TILES["fp32" if dt == torch.float32 else "half"]
    return P, T, H, D, S, Hkv, kv, bd, (bt, bs, warps), dt


def row_fix(
    q: Float[Tensor, "P T H d"], k: Float[Tensor, "P S Hkv d"], q_alt: Optional[Float[Tensor, "P T H d"]],
    k_alt: Optional[Float[Tensor, "P S Hkv d"]], v: Float[Tensor, "P S Hkv d"], g_z: Float[Tensor, "P T H d"],
    scaling: float, key_valid: Optional[Bool[Tensor, "P S"]] = None, offset: Optional[int] = None,
    window: Optional[int] = None, softcap: Optional[float] = None,
) -> Float[Tensor, "P H T"]:
    """``Σ_s (softmax(x')_ts − softmax(x)_ts) (g_z · v)_ts`` per query row, where ``x = q·k``
    and ``x'`` uses ``q_alt`` (a patched query) or ``k_alt`` (all keys of a head patched): give
    exactly one of the two. Causal with the queries at key positions ``offset + t`` (default
    ``S − T``), ``window`` (sliding window) and ``softcap`` as in
    :func:`~steer.patching.qk_fix.attn_logits`. Fully masked rows give 0.

    >>> import os, torch
    >>> from steer.patching.qk_fix import attn_logits, pattern_grad, query_fix
    >>> dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (as in the tests)
    >>> q, qa, gz = (torch.randn(1, 5, 2, 4, device=dev) for _ in range(3))
    >>> k, v = torch.randn(1, 5, 1, 4, device=dev), torch.randn(1, 5, 1, 4, device=dev)
    >>> ref = query_fix(attn_logits(q, k, 0.5), attn_logits(qa, k, 0.5), pattern_grad(gz, v))
    >>> torch.allclose(row_fix(q, k, qa, None, v, gz, 0.5), ref, atol=1e-5)
    True
    """
    if (q_alt is None) == (k_alt is None):
        raise ValueError("row_fix needs exactly one of q_alt (patched queries) and k_alt (patched keys).")
    P, T, H, D, S, Hkv, kv, bd, (bt, bs, warps), dt = _prepare(q, k, v, g_z, key_valid)
    out = torch.empty(P, H, T, dtype=torch.float32, device=q.device)
    if not (P and T and H):
        return out
    alt_q = q_alt is not None
    c = [t.to(dt).contiguous() for t in (q, k, q_alt if alt_q else q, k_alt if not alt_q else k, v, g_z)]
    _row_fix_kernel[(triton.cdiv(T, bt), P * H)](*c, kv, out, T, H, Hkv, S - T if offset is None else offset,
                                                 window or 0, float(scaling), float(softcap or 0.0),
                                                 S=S, D=D, BD=bd, BT=bt, BS=bs, ALT=1 if alt_q else 2,
                                                 WINDOW=bool(window), SOFTCAP=bool(softcap), F32=dt == torch.float32,
                                                 num_warps=warps, num_stages=2)
    return out


def key_fix_sum(
    q: Float[Tensor, "P T H d"], k: Float[Tensor, "P S Hkv d"], k_alt: Float[Tensor, "P S Hkv d"],
    v: Float[Tensor, "P S Hkv d"], g_z: Float[Tensor, "P T H d"], scaling: float,
    key_valid: Optional[Bool[Tensor, "P S"]] = None, offset: Optional[int] = None,
    window: Optional[int] = None, softcap: Optional[float] = None,
) -> Float[Tensor, "H S"]:
    """:func:`~steer.patching.qk_fix.key_fix` of ``x = q·k`` with ``δ = q·k_alt − x``, summed
    over prompts and query rows: the effect of patching each key position of each head, ``[H, S]``.

    >>> import torch
    >>> from steer.patching.qk_fix import attn_logits, pattern_grad, key_fix
    >>> dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (as in the tests)
    >>> q, gz = torch.randn(2, 5, 2, 4, device=dev), torch.randn(2, 5, 2, 4, device=dev)
    >>> k, ka, v = (torch.randn(2, 5, 1, 4, device=dev) for _ in range(3))
    >>> x = attn_logits(q, k, 0.5)
    >>> ref = key_fix(x, attn_logits(q, ka, 0.5) - x, pattern_grad(gz, v)).sum((0, 2))
    >>> torch.allclose(key_fix_sum(q, k, ka, v, gz, 0.5), ref, atol=1e-5)
    True
    """
    P, T, H, D, S, Hkv, kv, bd, (bt, bs, warps), dt = _prepare(q, k, v, g_z, key_valid)
    out = torch.zeros(H, S, dtype=torch.float32, device=q.device)
    if not (P and T and H):
        return out
    c = [t.to(dt).contiguous() for t in (q, k, k_alt, v, g_z)]
    _key_fix_kernel[(triton.cdiv(T, bt), P * H)](*c, kv, out, T, H, Hkv, S - T if offset is None else offset,
                                                 window or 0, float(scaling), float(softcap or 0.0),
                                                 S=S, D=D, BD=bd, BT=bt, BS=bs,
                                                 WINDOW=bool(window), SOFTCAP=bool(softcap), F32=dt == torch.float32,
                                                 num_warps=warps, num_stages=2)
    return out
