"""Issue 15's GPU figures in one run: the attribution reduction against the device's copy
bandwidth, the QK-fix kernels against SDPA, activation patching against
``transformer_lens.patching``, and whole AtP* time and peak memory, on random-init models of real
shapes in bf16 (timing does not depend on the weights).

    python experiments/bench/bench_gpu.py --tokenizer DIR [--json out.json] [--only reduce qk ...]

``--tokenizer``: a saved tokenizer directory (SmolLM2's: ``~/.cache/steer/smollm2-135m-instruct``
after ``steer.load()``), needed because IOI names must be single tokens. Sections:

* ``reduce``: :func:`steer.patching.kernels.attribution_reduce` (Triton) on bf16 ``[P, T·H, d]``
  against steer's PyTorch path and eager bf16 ``(δ·g).sum(dtype=fp32)``, in GB/s and as a
  fraction of a device-to-device copy's bandwidth (bytes read + written), measured in this run.
  Targets: ≥ 70 % of copy bandwidth, ≥ 3x eager bf16.
* ``qk``: :mod:`experiments.bench.bench_kernels` (key fix Triton vs PyTorch; one layer's tiled QK
  fix at T = 2048, Llama-3.2-1B attention, against SDPA fwd+bwd; target ≤ 2x).
* ``patching``: all heads and all residual positions by activation patching, steer vs
  TransformerLens (TL timed on a random subset of nodes and extrapolated, as the line says), and
  AtP / RelP / AtP* in forward-equivalents; SmolLM2-135M and Llama-3.2-1B shapes.
* ``memory``: AtP, AtP with the QK fix (PyTorch blocks; Triton tiles) and the whole AtP* at long
  contexts: seconds and peak allocated memory above the model (``torch.cuda.max_memory_allocated``).
  Target: AtP* ≤ 1.5x AtP's peak at T = 1024.

``--smoke`` runs every section at toy sizes on the CPU (Triton through its interpreter) to check
the script before spending device time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

SHAPES = {  # Llama-family configs of the real models (random weights)
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, rope_theta=100000.0),
    "llama-3.2-1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, rope_theta=500000.0),
    "toy": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=49152, rope_theta=10000.0),
}


def random_model(shape: str, tokenizer_dir: str, device: str, dtype=torch.bfloat16):
    """A random-init Llama of ``SHAPES[shape]`` wrapped as a :class:`steer.Model`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import steer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(cfg).to(dtype)
    return steer.Model.from_hf(hf, tok, name=f"random-{shape}")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps: int = 20) -> float:
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / reps


def copy_bandwidth(device, nbytes: int = 2**30) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes``."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    sec = _time(lambda: y.copy_(x), device)
    return 2 * nbytes / sec


def section_reduce(device, smoke: bool) -> dict:
    from steer.patching.kernels import attribution_reduce

    bw = copy_bandwidth(device, 2**20 if smoke else 2**30)
    print(f"copy bandwidth (read + write): {bw / 1e9:.0f} GB/s", flush=True)
    out = {"copy_GBps": bw / 1e9, "shapes": {}}
    shapes = [(2, 8, 4, 16)] if smoke else [(8, 512, 32, 64), (8, 2048, 32, 64), (16, 4096, 32, 64)]
    for P, T, H, d in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        delta = torch.randn(P, T * H, d, device=device, generator=g).bfloat16()
        grad = torch.randn(P, T * H, d, device=device, generator=g).bfloat16()
        ref = (delta.float() * grad.float()).sum((0, 2))
        impls = {"triton": lambda: attribution_reduce(delta, grad, impl="triton"),
                 "steer torch": lambda: attribution_reduce(delta, grad, impl="torch"),
                 "eager bf16": lambda: (delta * grad).sum((0, 2), dtype=torch.float32)}
        row = {}
        for name, fn in impls.items():
            err = float((fn() - ref).abs().max() / ref.abs().max())
            sec = _time(fn, device, reps=3 if smoke else 50)
            gbps = 2 * delta.numel() * 2 / sec / 1e9  # bytes of both inputs read once
            row[name] = {"ms": sec * 1e3, "GBps": gbps, "of_copy": gbps * 1e9 / bw, "rel_err": err}
        t = row["triton"]
        print(f"reduce P={P} T={T} H={H} d={d} ({2 * delta.numel() * 2 / 2**20:.0f} MiB read): " +
              "; ".join(f"{k} {v['ms']:.3f} ms {v['GBps']:.0f} GB/s ({v['of_copy']:.0%} of copy) err {v['rel_err']:.1e}"
                        for k, v in row.items()) +
              f"  ->  triton {row['eager bf16']['ms'] / t['ms']:.1f}x eager bf16, "
              f"{row['steer torch']['ms'] / t['ms']:.1f}x steer torch", flush=True)
        out["shapes"][f"{P}x{T}x{H}x{d}"] = row
    return out


def section_qk(device, smoke: bool) -> dict:
    """bench_kernels (key fix; the whole tiled QK fix vs SDPA at T = 2048), then each tiled kernel
    alone at other tile sizes (``qk_tiled.TILES``), bf16 and fp32 operands, same inputs."""
    import bench_kernels

    from steer.patching import qk_tiled
    from steer.patching.qk_tiled import key_fix_sum, row_fix

    if smoke:
        print("qk: CUDA only (bench_kernels times compiled kernels); skipped in --smoke")
        return {}
    out = bench_kernels.main(device)
    T, H, Hkv, d = 2048, 32, 8, 64
    g = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(1, T, H, d, device=device, generator=g) for _ in range(3)] + \
           [torch.randn(1, T, Hkv, d, device=device, generator=g) for _ in range(3)]
    keep = dict(qk_tiled.TILES)
    sweep = {}
    try:
        for dt, key, configs in [(torch.bfloat16, "half", [(64, 64, 8), (64, 32, 8), (128, 64, 8), (64, 64, 4), (32, 64, 4)]),
                                 (torch.float32, "fp32", [(32, 32, 8), (32, 16, 8), (16, 16, 4), (64, 16, 8)])]:
            q, qa, gz, k, ka, v = (t.to(dt) for t in base)
            for cfg in configs:
                qk_tiled.TILES[key] = cfg
                t_row = _time(lambda: row_fix(q, k, qa, None, v, gz, d ** -0.5), device, reps=5)
                t_key = _time(lambda: key_fix_sum(q, k, ka, v, gz, d ** -0.5), device, reps=5)
                sweep[f"{key} {cfg}"] = {"row_fix_ms": t_row * 1e3, "key_fix_sum_ms": t_key * 1e3}
                print(f"tiles {key} {cfg}: row_fix {t_row * 1e3:.3f} ms, key_fix_sum {t_key * 1e3:.3f} ms", flush=True)
    finally:
        qk_tiled.TILES.update(keep)
    out["tile_sweep"] = sweep
    return out


def section_patching(device, smoke: bool, tok: str) -> dict:
    import bench_patching

    out = {}
    for shape, n, tl_nodes in ([("toy", 2, 4)] if smoke else [("smollm2-135m", 8, 60), ("llama-3.2-1b", 8, 40)]):
        model = random_model(shape, tok, device)
        from steer.patching import activation_patch, atp, ioi_task

        warm = ioi_task(model, n=2)  # compile / autotune outside the timed calls
        activation_patch(model, warm, "heads")
        atp(model, warm, ["heads", "q", "k"], qk_fix=True)
        print(f"[{shape}, bf16, {n} IOI prompts]", flush=True)
        out[shape] = bench_patching.main(device=device, n_prompts=n, tl_nodes=tl_nodes, model=model)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def section_memory(device, smoke: bool, tok: str) -> dict:
    from bench_qk_memory import NODES, long_task

    from steer.patching import atp, atp_star

    cuda = device.startswith("cuda")
    plan = [("toy", (48,), 2)] if smoke else [("smollm2-135m", (256, 1024, 2048), 2), ("llama-3.2-1b", (1024, 2048), 2)]
    out = []
    for shape, lengths, n in plan:
        model = random_model(shape, tok, device)
        for T in lengths:
            task = long_task(model, T, n)
            runs = {"atp": lambda: atp(model, task, NODES),
                    "qk torch blocks": lambda: atp(model, task, NODES, qk_fix=True, impl="torch"),
                    "qk triton tiles": lambda: atp(model, task, NODES, qk_fix=True, impl="triton"),
                    "atp*": lambda: atp_star(model, task, NODES)}
            row = {}
            for name, fn in runs.items():
                fn() if name == "atp" else None  # first call pays for CUDA/Triton warm-up
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                res = fn()
                _sync(device)
                sec = time.perf_counter() - t0
                mib = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
                row[name] = {"seconds": sec, "peak_mib": mib, "k_abs_sum": float(res["k"].scores.abs().sum())}
            a = row["atp"]["peak_mib"]
            kt, kq = row["qk torch blocks"]["k_abs_sum"], row["qk triton tiles"]["k_abs_sum"]
            print(f"{shape} T={T:5d} x{n}: " + " | ".join(
                f"{k} {v['seconds']:.2f} s {v['peak_mib']:.0f} MiB ({v['peak_mib'] / max(a, 1e-9):.2f}x)" for k, v in row.items()) +
                f"; torch vs triton |k| sums rel diff {abs(kt - kq) / max(kt, 1e-12):.1e}", flush=True)
            out.append({"shape": shape, "T": T, "prompts": n, **row})
        del model
        if cuda:
            torch.cuda.empty_cache()
    return {"rows": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", nargs="*", default=["reduce", "qk", "patching", "memory"])
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    dev = a.device
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    import transformers

    print(f"bench_gpu on {name}: torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    results = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__}
    for sec in a.only:
        t0 = time.time()
        print(f"\n--- {sec}", flush=True)
        try:
            fn = {"reduce": lambda: section_reduce(dev, a.smoke), "qk": lambda: section_qk(dev, a.smoke),
                  "patching": lambda: section_patching(dev, a.smoke, a.tokenizer),
                  "memory": lambda: section_memory(dev, a.smoke, a.tokenizer)}[sec]
            results[sec] = fn()
        except Exception:  # one section's failure must not cost the others' figures
            traceback.print_exc()
            results[sec] = {"error": traceback.format_exc(limit=3)}
        print(f"    ({time.time() - t0:.0f} s)", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
