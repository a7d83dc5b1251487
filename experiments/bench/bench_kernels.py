"""Benchmark: the fused Triton key fix vs the PyTorch key fix (AtP*'s QK fix for key nodes).

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
    return out


if __name__ == "__main__":
    main()
