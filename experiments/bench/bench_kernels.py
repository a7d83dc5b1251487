"""Benchmark: the fused Triton key fix vs the PyTorch key fix (AtP*'s QK fix for key nodes), and
the tiled QK fix (``steer.patching.qk_tiled``) against SDPA attention forward + backward of the
same layer (Llama-3.2-1B shape: 32 query heads, 8 kv heads of 64, bf16; T = 2048).

Run: ``python experiments/bench/bench_kernels.py`` (needs CUDA; on the CPU it says so and stops:
Triton's CPU interpreter is for correctness, not speed).

Shapes are a long-context attention layer: ``P`` prompts x ``H`` heads x ``T`` x ``T``. Prints
the time and peak memory of each implementation and their ratios, measured in the same run.
"""

from __future__ import annotations

import time

import torch


def _time(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main(device: str = "cuda", shapes=((4, 9, 1024), (2, 9, 4096))) -> dict:
    """Print ``key_fix P x H x T: torch X ms, triton Y ms, speedup Zx, peak memory ...`` lines."""
    from steer.patching.kernels import triton_available
    from steer.patching.qk_fix import NEG, key_fix

    if not (device.startswith("cuda") and torch.cuda.is_available() and triton_available()):
        print("bench_kernels: needs a CUDA device and Triton; not run on this machine.")
        return {}
    out = {}
    for P, H, T in shapes:
        x = torch.randn(P, H, T, T, device=device) * 8
        x = x.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=device).tril(), NEG)
        d, g = torch.randn_like(x) * 8, torch.randn_like(x)
        row = {}
        for impl in ("torch", "triton"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            sec = _time(lambda: key_fix(x, d, g, impl=impl))
            row[impl] = (sec, (torch.cuda.max_memory_allocated() - base) / 2**20)
        err = float((key_fix(x, d, g, impl="torch") - key_fix(x, d, g, impl="triton")).abs().max())
        (ts, tm), (ks, km) = row["torch"], row["triton"]
        print(f"key_fix {P}x{H}x{T}x{T}: torch {ts * 1e3:.2f} ms ({tm:.0f} MiB extra), triton {ks * 1e3:.2f} ms "
              f"({km:.0f} MiB extra): speedup {ts / ks:.1f}x, memory {tm / max(km, 1e-9):.1f}x less; "
              f"max |diff| {err:.1e}")
        out[f"{P}x{H}x{T}"] = {"torch_s": ts, "triton_s": ks, "speedup": ts / ks, "torch_mib": tm, "triton_mib": km}
    out.update(qk_fix_vs_sdpa(device))
    return out


def qk_fix_vs_sdpa(device: str = "cuda", T: int = 2048, H: int = 32, Hkv: int = 8, d: int = 64) -> dict:
    """One layer's whole QK fix (queries per row + every key position) from the tiled kernels,
    against ``scaled_dot_product_attention`` forward + backward (causal, GQA) on the same q, k, v."""
    from steer.patching.qk_tiled import key_fix_sum, row_fix

    g = torch.Generator(device=device).manual_seed(0)
    q, qa, gz = (torch.randn(1, T, H, d, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3))
    k, ka, v = (torch.randn(1, T, Hkv, d, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3))
    scale = d ** -0.5

    def fix():
        row_fix(q, k, qa, None, v, gz, scale)
        key_fix_sum(q, k, ka, v, gz, scale)

    qs, ks, vs = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    go = gz.transpose(1, 2)

    def sdpa():
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        torch.autograd.grad(o, (qs, ks, vs), go)

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t_fix = _time(fix)
    mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    t_sdpa = _time(sdpa)
    print(f"QK fix (tiled, queries + keys) 1x{H}x{T}, d {d}: {t_fix * 1e3:.2f} ms ({mib:.0f} MiB extra); "
          f"SDPA fwd+bwd {t_sdpa * 1e3:.2f} ms: ratio {t_fix / t_sdpa:.2f}x (target <= 2x) "
          f"on {torch.cuda.get_device_name()}")
    return {"qk_fix_s": t_fix, "sdpa_fwd_bwd_s": t_sdpa, "qk_fix_over_sdpa": t_fix / t_sdpa, "qk_fix_mib": mib}


if __name__ == "__main__":
    main()
