"""The attribution reduction fused into the backward pass against stored gradients, and
integrated gradients' cost, on the embedded model in one run.

    python experiments/bench/bench_attribution.py

* AtP over heads, MLP outputs, residual positions and neurons (IOI, 8 prompts): ``fused=True``
  (each site's gradient reduced to node estimates by a tensor hook as autograd computes it) vs
  ``fused=False`` (all gradients returned, then the products): time (best of 3) and peak resident
  memory (each in its own process, on its first call, sampled every 2 ms, minus the resident set
  before the call).
  Target (issue 15, CPU): never slower than the unfused path.
* integrated gradients (``steps`` = 2, 4, 8) on the same nodes: time against AtP's, next to its
  nominal cost of 2 + 2m forward-equivalents (AtP: 3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _peak import peak_mib  # noqa: E402

KINDS = ["heads", "mlp_out", "resid", "neurons"]



def worker(mode: str) -> dict:
    import steer
    from steer.patching import atp, integrated_gradients, ioi_task

    model = steer.load()
    task = ioi_task(model, n=8)
    call = {"fused": lambda: atp(model, task, KINDS), "stored": lambda: atp(model, task, KINDS, fused=False)}.get(mode)
    if call is None:
        call = lambda: integrated_gradients(model, task, KINDS, steps=int(mode[3:]))  # noqa: E731
    _, mib = peak_mib(call)  # memory first, on a cold call (freed memory is reused)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
    return {"mode": mode, "seconds": best, "peak_mib": mib}


def main(device: str = "cpu") -> dict:
    rows = {}
    for mode in ("stored", "fused", "ig-2", "ig-4", "ig-8"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:])
            raise RuntimeError(f"{mode} failed")
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    s, f = rows["stored"], rows["fused"]
    print(f"AtP, {', '.join(KINDS)}: stored gradients {s['seconds']:.2f} s / {s['peak_mib']:.0f} MiB; "
          f"fused {f['seconds']:.2f} s / {f['peak_mib']:.0f} MiB  ->  time {f['seconds'] / s['seconds']:.2f}x "
          f"(target <= 1.0x), peak memory {f['peak_mib'] / max(s['peak_mib'], 1e-9):.2f}x")
    for m in ("ig-2", "ig-4", "ig-8"):
        r = rows[m]
        print(f"{m}: {r['seconds']:.2f} s = {r['seconds'] / f['seconds']:.1f}x AtP (nominal {(2 + 2 * int(m[3:])) / 3:.1f}x); "
              f"peak {r['peak_mib']:.0f} MiB")
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2])))
    else:
        main()
