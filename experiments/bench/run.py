"""Run every benchmark in experiments/bench/ (``make bench``); each prints ratios vs its baseline."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
ORDER = ["bench_capture", "bench_steering", "bench_methods", "bench_cast", "bench_diagnostics", "bench_patching", "bench_attribution",
         "bench_qk_memory", "bench_kernels", "bench_sweep", "bench_store"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="*", help="benchmark module names to run")
    args = ap.parse_args()
    names = args.only or [n for n in ORDER if (HERE / f"{n}.py").exists()]
    print(f"steer benchmarks on {args.device} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for name in names:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        t0 = time.time()
        print(f"\n--- {name}", flush=True)
        mod.main(device=args.device)
        print(f"    ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
