"""The fused Triton kernels, key fix and attribution reduction (on the CPU through Triton's interpreter, which the root
conftest.py switches on where there is no CUDA; compiled, on the GPU, where there is one): equal to
the PyTorch key fix and to the O(T·S²) definition, saturated rows and masked entries included."""

import pytest
import torch

from steer.patching.kernels import key_fix_triton
from steer.patching.qk_fix import NEG, key_fix, key_fix_bruteforce

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the kernels run where the inputs are


def _inputs(T, S, scale, seed, pad=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, T, S, generator=g) * scale
    valid = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None] & (torch.arange(S) >= pad)
    x = x.masked_fill(~valid, NEG)
    return x.to(DEV), (torch.randn(2, 3, T, S, generator=g) * scale).to(DEV), torch.randn(2, 3, T, S, generator=g).to(DEV)


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: saturated rows
@pytest.mark.parametrize("T,S,pad", [(9, 9, 0), (5, 13, 3), (1, 40, 0)])
def test_kernel_matches_torch_and_definition(scale, T, S, pad):
    x, d, g = _inputs(T, S, scale, seed=T + S, pad=pad)
    fused = key_fix_triton(x, d, g)
    torch.testing.assert_close(fused, key_fix(x, d, g, impl="torch"), atol=2e-6, rtol=1e-5)
    ref = key_fix_bruteforce(x.double(), d.double(), g.double())
    torch.testing.assert_close(fused.double(), ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(key_fix(x, d, g, impl="triton"), fused)


def test_fully_masked_rows_give_zero():
    x, d, g = _inputs(4, 4, 1.0, seed=0)
    x[:, :, 1] = NEG  # a padding query row
    out = key_fix_triton(x, d, g)
    assert torch.isfinite(out).all() and out[:, :, 1].abs().max() == 0


def test_kernel_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 3, 3)
    with pytest.raises(RuntimeError, match="CUDA"):
        key_fix_triton(x, x, x)
    with pytest.raises(ValueError, match="one shape"):
        key_fix_triton(x, x[:, :2], x)
    with pytest.raises(ValueError, match="impl"):
        key_fix(x, x, x, impl="cuda")


def test_attribution_reduce_triton_matches_torch_bf16():
    """The Triton reduction against PyTorch and a float64 sum, fp32 and bf16 inputs (fp32 sums)."""
    from steer.patching.kernels import attribution_reduce

    g = torch.Generator().manual_seed(0)
    for shape in [(3, 7, 5), (2, 130, 200), (1, 4, 1)]:
        d, gr = torch.randn(*shape, generator=g).to(DEV), torch.randn(*shape, generator=g).to(DEV)
        torch.testing.assert_close(attribution_reduce(d, gr, impl="triton"), attribution_reduce(d, gr, impl="torch"),
                                   atol=1e-4, rtol=1e-5)
        db, gb = d.bfloat16(), gr.bfloat16()
        ref = (db.double() * gb.double()).sum((0, 2)).float()
        torch.testing.assert_close(attribution_reduce(db, gb, impl="triton"), ref, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(attribution_reduce(db, gb, impl="torch"), ref, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="impl="):
        attribution_reduce(d, gr, impl="cuda")
    with pytest.raises(ValueError, match=r"\[P, N, D\]"):
        attribution_reduce(d[0], gr[0])


# -- the tiled QK fix (steer.patching.qk_tiled): logits recomputed from q, k, never stored --------

from steer.patching.qk_fix import attn_logits, pattern_grad, query_fix  # noqa: E402
from steer.patching.qk_tiled import key_fix_sum, row_fix  # noqa: E402

TILED_CASES = {  # P, T, S, H, Hkv, d, window, softcap, left padding of prompt 0; 16-key tiles in the interpreter
    "mha": (2, 9, 9, 2, 2, 8, None, None, 0),
    "gqa-padded-blocks": (2, 37, 37, 4, 2, 8, None, None, 3),
    "queries-after-a-prefix": (1, 20, 33, 2, 1, 16, None, None, 0),
    "window": (2, 35, 35, 2, 1, 8, 7, None, 2),
    "softcap": (2, 24, 24, 2, 1, 8, None, 3.0, 0),
}


def _qk_inputs(P, T, S, H, Hkv, d, pad, scale, seed):
    g = torch.Generator().manual_seed(seed)
    q, q_alt, g_z = (torch.randn(P, T, H, d, generator=g) for _ in range(3))
    k, k_alt, v = (torch.randn(P, S, Hkv, d, generator=g) for _ in range(3))
    key_valid = torch.ones(P, S, dtype=torch.bool)
    key_valid[0, :pad] = False
    return tuple(t.to(DEV) for t in (q * scale, q_alt * scale, k, k_alt, v, g_z, key_valid))


@pytest.mark.parametrize("scale", [1.0, 12.0])  # 12: saturated rows
@pytest.mark.parametrize("case", list(TILED_CASES))
def test_tiled_qk_fix_matches_the_definitions(case, scale):
    """Row fix (patched queries; a head's keys all patched) and per-key fix equal the PyTorch
    definitions on full logits, and the O(T·S²) brute force in fp64."""
    P, T, S, H, Hkv, d, window, softcap, pad = TILED_CASES[case]
    q, q_alt, k, k_alt, v, g_z, kv = _qk_inputs(P, T, S, H, Hkv, d, pad, scale, seed=T + S)
    kw = dict(key_valid=kv, window=window, softcap=softcap)
    f64 = [t.double() for t in (q, q_alt, k, k_alt, v, g_z)]
    x, x_q, x_k = attn_logits(f64[0], f64[2], 0.5, **kw), attn_logits(f64[1], f64[2], 0.5, **kw), attn_logits(f64[0], f64[3], 0.5, **kw)
    g = pattern_grad(f64[5], f64[4])
    torch.testing.assert_close(row_fix(q, k, q_alt, None, v, g_z, 0.5, **kw).double(), query_fix(x, x_q, g), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(row_fix(q, k, None, k_alt, v, g_z, 0.5, **kw).double(), query_fix(x, x_k, g), atol=2e-5, rtol=1e-5)
    ref = key_fix_bruteforce(x, x_k - x, g).sum((0, 2))
    torch.testing.assert_close(key_fix_sum(q, k, k_alt, v, g_z, 0.5, **kw).double(), ref, atol=5e-5, rtol=1e-5)
    f32 = key_fix(x.float(), (x_k - x).float(), g.float()).sum((0, 2))  # the PyTorch path, same precision
    assert float((key_fix_sum(q, k, k_alt, v, g_z, 0.5, **kw).double() - ref).abs().max()) <= 2 * float((f32.double() - ref).abs().max()) + 1e-5


def test_tiled_qk_fix_padding_rows_and_errors():
    q, q_alt, k, k_alt, v, g_z, kv = _qk_inputs(2, 6, 6, 2, 1, 8, 0, 1.0, seed=0)
    kv[1, :4] = False  # prompt 1: its first 4 query rows see no key at all, row 4 only itself
    rows = row_fix(q, k, q_alt, None, v, g_z, 0.5, key_valid=kv)
    assert torch.isfinite(rows).all() and rows[1, :, :4].abs().max() == 0 and rows[1, :, 5:].abs().min() > 0  # row 4: one key
    assert torch.isfinite(key_fix_sum(q, k, k_alt, v, g_z, 0.5, key_valid=kv)).all()
    with pytest.raises(ValueError, match="exactly one"):
        row_fix(q, k, q_alt, k_alt, v, g_z, 0.5)
    with pytest.raises(ValueError, match="divisible"):
        row_fix(q, k.expand(2, 6, 2, 8)[:, :, :1].repeat(1, 1, 3, 1), q_alt, None, v, g_z, 0.5)


@pytest.mark.parametrize("case", ["gqa-padded-blocks", "window", "softcap"])
def test_tiled_qk_fix_half_operands(case):
    """Half-precision q, k, v, g_z go to the tensor cores as they are (their products are exact in
    fp32): the same answers as the fp64 definitions on the same rounded values. fp16 here (the CPU
    interpreter mis-multiplies bf16, which therefore runs as fp32 there; bf16 is checked on a GPU
    by tests/test_gpu.py)."""
    P, T, S, H, Hkv, d, window, softcap, pad = TILED_CASES[case]
    *ts, kv = _qk_inputs(P, T, S, H, Hkv, d, pad, 4.0, seed=7)
    q, q_alt, k, k_alt, v, g_z = (t.half() for t in ts)
    kw = dict(key_valid=kv, window=window, softcap=softcap)
    f64 = [t.double() for t in (q, q_alt, k, k_alt, v, g_z)]
    x, x_q, x_k = (attn_logits(a, b, 0.5, **kw) for a, b in ((f64[0], f64[2]), (f64[1], f64[2]), (f64[0], f64[3])))
    g = pattern_grad(f64[5], f64[4])
    torch.testing.assert_close(row_fix(q, k, q_alt, None, v, g_z, 0.5, **kw).double(), query_fix(x, x_q, g), atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(row_fix(q, k, None, k_alt, v, g_z, 0.5, **kw).double(), query_fix(x, x_k, g), atol=5e-5, rtol=1e-5)
    ref = key_fix_bruteforce(x, x_k - x, g).sum((0, 2))
    torch.testing.assert_close(key_fix_sum(q, k, k_alt, v, g_z, 0.5, **kw).double(), ref, atol=2e-4, rtol=1e-5)


def test_tiled_kernels_compile_for_hopper_without_register_spills():
    """Compiled for sm_90 with the ptxas in Triton's wheel (no GPU needed; in a process of its own,
    as this one may interpret Triton): at steer's tile sizes no QK-fix kernel spills registers,
    with or without window and soft-capping, and bf16 operands use the tensor cores. The first
    kernels spilled 0.4-26 KB a thread and ran 533x slower than SDPA fwd+bwd on an H200."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "kernel_resources.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script), "--variants", "--json"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 12
    for r in rows:
        assert r["spill"] == 0, r
        assert (r["mma"] > 0) == (r["dtype"] == "bf16"), r
