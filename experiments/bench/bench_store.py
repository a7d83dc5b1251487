"""Benchmark: the activation store's memory on a dataset larger than one would hold.

Run: ``python experiments/bench/bench_store.py [--n 10000]``.

In a fresh process (so that its peak RSS is the store's): the embedded SmolLM2 captures the
last-token ``resid_post`` at all 30 layers for ``n`` short prompts into an
:class:`~steer.store.ActivationStore` (shards of 1,024 prompts). Prints the peak resident memory
during the write (target: under 2 GiB for 10,000 prompts; the kernel's peak mark is reset after
the model is loaded), the resident memory and peak of loading the model, the time, the size on disk, and the largest difference between a
mean-difference direction from the store and :func:`steer.extract` on the same prompts (a
1,000-prompt subset, in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _prompts(n: int) -> list[str]:
    topics = ["the sea", "bread", "a violin", "rain", "chess", "a garden", "the moon", "trains", "honey", "glass"]
    verbs = ["Describe", "Explain", "Tell me about", "Write a line on", "Summarise"]
    return [f"{verbs[i % 5]} {topics[(i // 5) % 10]} ({i})." for i in range(n)]


def _status_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(n: int, path: str) -> None:
    import torch

    import steer
    from steer.store import ActivationStore

    model = steer.load()
    after_load, load_peak = _status_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reset = _reset_peak()
    prompts = _prompts(n)
    t0 = time.perf_counter()
    store = ActivationStore.write(model, prompts, path, shard_size=1024, batch_size=64, progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the whole process, loading included
    write_peak = _status_mib("VmHWM") if reset else float("nan")  # since the reset: the write alone
    sub = list(range(min(n, 1000)))
    pos, neg = [i for i in sub if i % 2], [i for i in sub if not i % 2]
    ref = steer.extract(model, [prompts[i] for i in pos], [prompts[i] for i in neg], positions="last",
                        include_sink=True, batch_size=64)
    got = store.direction(pos, neg)
    diff = float((got.vectors - ref.vectors).abs().max() / ref.vectors.abs().max())
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20
    print("RESULT " + json.dumps({"n": n, "seconds": seconds, "peak_rss_mib": peak, "rss_after_load_mib": after_load,
                                  "load_peak_mib": load_peak, "write_peak_mib": write_peak,
                                  "disk_mib": size, "direction_rel_diff": diff, "shape": list(store.get(rows=[0]).shape),
                                  "threads": torch.get_num_threads()}), flush=True)


def main(device: str = "cpu", n: int = 10_000) -> dict:
    """Run the worker in a child process and print its figures (``device`` is ignored: CPU)."""
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "STEER_PROGRESS": "0"}
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--n", str(n), "--path", d],
                             env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    r = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    print(f"activation store, SmolLM2 resid_post last token x 30 layers, {r['n']} prompts: peak RSS during the "
          f"write {r['write_peak_mib']:.0f} MiB (target < 2048; model loaded: {r['rss_after_load_mib']:.0f} MiB resident, "
          f"loading peaked at {r['load_peak_mib']:.0f}; whole process {r['peak_rss_mib']:.0f}), "
          f"{r['seconds']:.0f} s, {r['disk_mib']:.0f} MiB on disk; direction from the store vs in memory "
          f"(1,000 prompts): max relative difference {r['direction_rel_diff']:.1e}")
    return r


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--path")
    a = ap.parse_args()
    if a.worker:
        worker(a.n, a.path)
    else:
        main(n=a.n)
