"""The fused Triton kernels, key fix and attribution reduction (on the CPU through Triton's interpreter, which the root
conftest.py switches on where there is no CUDA): equal to the PyTorch key fix and to the
O(T·S²) definition, saturated rows and masked entries included."""

import pytest
import torch

from steer.patching.kernels import key_fix_triton
from steer.patching.qk_fix import NEG, key_fix, key_fix_bruteforce


def _inputs(T, S, scale, seed, pad=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, T, S, generator=g) * scale
    valid = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None] & (torch.arange(S) >= pad)
    x = x.masked_fill(~valid, NEG)
    return x, torch.randn(2, 3, T, S, generator=g) * scale, torch.randn(2, 3, T, S, generator=g)


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
        d, gr = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
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
