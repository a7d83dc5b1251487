"""Fused Triton kernels: AtP*'s key fix (:func:`steer.patching.qk_fix.key_fix`) and the
attribution reduction (:func:`attribution_reduce`).

The key fix is memory-bound: for every head it reads the logits ``x``, the logit shifts
``δ`` and the pattern gradient ``g`` (each ``[P, H, T, S]``) and writes one tensor of the same
size, yet the PyTorch version materialises about a dozen temporaries of that size. The kernel
runs one program per attention row, keeps the row in registers, and makes one pass over
memory: 3 reads and 1 write per element. Same stable formula (partition sum excluding the
row's top entry, log-space renormaliser).

Opt-in (``key_fix(..., impl="triton")`` or ``"auto"``): it has been checked in Triton's CPU
interpreter but not yet compiled and timed on a GPU (``experiments/bench/bench_kernels.py``
does both, with a parity check, where CUDA is present). Tests run it on the CPU under
``TRITON_INTERPRET=1`` (set by the root ``conftest.py`` on machines without CUDA, before Triton
is imported) against the PyTorch version and the O(T·S²) definition.
"""

import functools
import os

import torch
from torch import Tensor

from .qk_fix import NEG

try:  # optional: CUDA builds of torch ship it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = tl = None

__all__ = ["key_fix_triton", "triton_available", "attribution_reduce"]


def triton_available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of torch).

    >>> isinstance(triton_available(), bool)
    True
    """
    return triton is not None


if tl is not None:

    def _key_fix_body(x_ptr, d_ptr, g_ptr, out_ptr, S, neg_half, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        inside = offs < S
        base = row.to(tl.int64) * S
        x = tl.load(x_ptr + base + offs, mask=inside, other=float("-inf")).to(tl.float32)
        valid = inside & (x > neg_half)
        m = tl.max(x, 0)
        top = tl.argmax(x, 0)
        is_top = offs == top
        g = tl.load(g_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
        e = tl.where(inside, tl.exp(x - m), 0.0)
        eg = e * g
        R = tl.sum(tl.where(is_top, 0.0, e), 0)  # Σ_{j ≠ top} e_j, no cancellation
        HE = tl.sum(eg, 0)
        H_excl_top = tl.sum(tl.where(is_top, 0.0, eg), 0)
        G = HE / (1.0 + R)
        H_ts = tl.where(is_top, H_excl_top, HE - eg)  # Σ_{j ≠ s} e_j g_j
        S_ts = tl.where(is_top, R, tl.maximum(1.0 + R - e, 0.0))  # Σ_{j ≠ s} e_j
        x_new = x + tl.where(valid, d, 0.0)
        a = tl.where(S_ts > 0, m + tl.log(tl.maximum(S_ts, 1e-30)), float("-inf"))
        hi = tl.maximum(a, x_new)
        logZ = hi + tl.log(tl.exp(a - hi) + tl.exp(x_new - hi))
        out = tl.exp(m - logZ) * H_ts + tl.exp(x_new - logZ) * g - G
        tl.store(out_ptr + base + offs, tl.where(valid, out, 0.0), mask=inside)


if tl is not None:

    def _reduce_body(d_ptr, g_ptr, out_ptr, N, P: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):  # P, D constexpr: loop bounds (few distinct values)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for p in range(0, P):
            for d0 in range(0, D, BLOCK_D):
                inside = (rows[:, None] < N) & (d0 + cols[None, :] < D)
                off = (p * N + rows[:, None]).to(tl.int64) * D + d0 + cols[None, :]
                a = tl.load(d_ptr + off, mask=inside, other=0.0).to(tl.float32)
                b = tl.load(g_ptr + off, mask=inside, other=0.0).to(tl.float32)
                acc += tl.sum(a * b, 1)
        tl.store(out_ptr + rows, acc, mask=rows < N)


@functools.lru_cache(maxsize=None)
def _reduce_kernel(interpret: bool):
    return triton.jit(_reduce_body)


def attribution_reduce(delta: Tensor, g: Tensor, impl: str = "auto") -> Tensor:
    """``Σ_p Σ_d delta[p, n, d] · g[p, n, d]`` → fp32 ``[n]``: attribution patching's per-node
    reduction of an activation difference and a gradient (inputs may be bf16; accumulation is
    fp32). ``impl``: ``"torch"``, ``"triton"`` (one pass over both inputs, no fp32 copies) or
    ``"auto"`` (Triton for CUDA tensors when it is installed).

    >>> import torch
    >>> d, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    >>> torch.allclose(attribution_reduce(d, g, impl="torch"), (d * g).sum((0, 2)))
    True
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl={impl!r}: use 'auto', 'torch' or 'triton'.")
    if delta.shape != g.shape or delta.ndim != 3:
        raise ValueError(f"delta and g must both be [P, N, D]; got {tuple(delta.shape)} and {tuple(g.shape)}.")
    use = impl == "triton" or (impl == "auto" and delta.is_cuda and triton_available())
    if not use:
        if delta.dtype == torch.float32 and g.dtype == torch.float32:
            return torch.einsum("pnd,pnd->n", delta, g)
        out = torch.zeros(delta.shape[1], dtype=torch.float32, device=delta.device)
        for p in range(delta.shape[0]):  # fp32 copies of one prompt at a time
            out += torch.einsum("nd,nd->n", delta[p].float(), g[p].float())
        return out
    if triton is None:
        raise RuntimeError("attribution_reduce(impl='triton') needs Triton (pip install triton), or use impl='torch'.")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (delta.is_cuda or interpret):
        raise RuntimeError("The Triton reduction needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU).")
    P, N, D = delta.shape
    a, b = delta.contiguous(), g.contiguous()
    out = torch.empty(N, dtype=torch.float32, device=delta.device)
    if N:
        block_d = min(128, triton.next_power_of_2(max(D, 1)))
        block_n = max(1, min(64, 4096 // block_d))
        _reduce_kernel(interpret)[(triton.cdiv(N, block_n),)](a, b, out, N, P=P, D=D, BLOCK_N=block_n, BLOCK_D=block_d)
    return out


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool):
    """The jitted kernel; built on first use because ``triton.jit`` picks the interpreter from
    ``TRITON_INTERPRET`` when it runs."""
    return triton.jit(_key_fix_body)


def key_fix_triton(x: Tensor, delta: Tensor, g: Tensor) -> Tensor:
    """Fused :func:`~steer.patching.qk_fix.key_fix` (same arguments, shapes and result, fp32).

    Rows longer than 65,536 keys are not supported (one row lives in one program).

    >>> import torch
    >>> from steer.patching.qk_fix import key_fix
    >>> dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: TRITON_INTERPRET=1 (as in the tests)
    >>> x, d, g = (torch.randn(2, 5, 5, device=dev) for _ in range(3))
    >>> torch.allclose(key_fix_triton(x.tril(), d, g), key_fix(x.tril(), d, g, impl="torch"), atol=1e-5)
    True
    """
    if triton is None:
        raise RuntimeError("key_fix_triton needs Triton (pip install triton), or use impl='torch'.")

    if not (x.shape == delta.shape == g.shape):
        raise ValueError(f"x, delta and g must have one shape; got {tuple(x.shape)}, "
                         f"{tuple(delta.shape)}, {tuple(g.shape)}.")
    S = x.shape[-1]
    if S > 65536:
        raise ValueError(f"key_fix_triton handles rows of up to 65,536 keys, not {S}: use impl='torch'.")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (x.is_cuda or interpret):
        raise RuntimeError("key_fix_triton needs CUDA tensors (or TRITON_INTERPRET=1 to run on the CPU).")
    if interpret and type(tl.max).__name__ != "InterpretedFunction":
        raise RuntimeError("TRITON_INTERPRET=1 was set after Triton was imported; set it before "
                           "(in the shell, or first thing in the script).")
    xs, ds, gs = (t.contiguous().float() for t in (x, delta, g))
    out = torch.empty_like(xs)
    rows = xs.numel() // S if S else 0
    if rows:
        block = triton.next_power_of_2(S)
        warps = 4 if block <= 1024 else 8 if block <= 4096 else 16  # as in Triton's softmax tutorial
        _kernel(interpret)[(rows,)](xs, ds, gs, out, S, NEG / 2, BLOCK=block, num_warps=warps)
    return out.to(x.dtype)
