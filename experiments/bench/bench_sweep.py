"""Benchmark: activation patching sharded over 2 processes (torchrun, gloo) vs 1 process.

Run: ``python experiments/bench/bench_sweep.py`` (the driver; it launches the workers).

The sweep: every head of the embedded SmolLM2 (30 x 9) patched on 8 IOI prompts, denoising.
Measured in one run, each configuration in its own process(es), model loading excluded (timed
from a barrier just before ``activation_patch`` to its return, the gather included):

* 1 process, 1 thread; 1 process, 2 threads (PyTorch's intra-op parallelism on both cores);
* 2 processes of 1 thread each under ``torchrun`` (``--shard auto``).

Prints the times, the ratios of the 2-process run to each 1-process run (target <= 0.65x) and
whether the scores are identical (bitwise to the 1-thread process, which does the same unit
computations; 2 threads may sum in another order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

NODES, N = "heads", 8


def worker() -> None:
    import torch

    import steer
    from steer.patching import activation_patch, ioi_task
    from steer.sweep import Shards

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shards = Shards.auto()
    model = steer.load()
    task = ioi_task(model, n=N)
    shards.barrier()
    t0 = time.perf_counter()
    r = activation_patch(model, task, NODES, shards=shards, progress=False)
    seconds = time.perf_counter() - t0
    if shards.rank == 0:
        print("RESULT " + json.dumps({"seconds": seconds, "scores": r.scores.tolist()}), flush=True)


def _launch(cmd: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "STEER_BENCH_SWEEP_WORKER": "1", "STEER_PROGRESS": "0"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(device: str = "cpu") -> dict:
    """The CPU configurations above (``device`` is accepted for ``run.py`` and ignored: gloo on CPU)."""
    me = os.path.abspath(__file__)
    one_1 = _launch([sys.executable, me], 1)
    one_2 = _launch([sys.executable, me], 2)
    two = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", me], 1)
    same = two["scores"] == one_1["scores"]  # the same unit computations, 1 thread each: bitwise
    import torch

    diff_2t = float((torch.tensor(two["scores"]) - torch.tensor(one_2["scores"])).abs().max())
    r1, r2 = two["seconds"] / one_1["seconds"], two["seconds"] / one_2["seconds"]
    print(f"activation patching, SmolLM2 {NODES}, {N} IOI prompts: 1 process x 1 thread {one_1['seconds']:.1f} s, "
          f"1 process x 2 threads {one_2['seconds']:.1f} s, 2 processes x 1 thread (gloo) {two['seconds']:.1f} s: "
          f"ratio {r1:.2f}x / {r2:.2f}x (target <= 0.65x); scores identical to 1 process x 1 thread: {same} "
          f"(max |diff| to 2 threads {diff_2t:.1e})")
    return {"one_proc_1_thread_s": one_1["seconds"], "one_proc_2_threads_s": one_2["seconds"],
            "two_procs_s": two["seconds"], "ratio_vs_1_thread": r1, "ratio_vs_2_threads": r2, "identical": same,
            "max_diff_vs_2_threads": diff_2t}


if __name__ == "__main__":
    if os.environ.get("STEER_BENCH_SWEEP_WORKER"):
        worker()
    else:
        main()
