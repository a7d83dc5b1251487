"""Peak memory and time of AtP* (QK fix + GradDrop) against plain AtP on the embedded model at long
contexts, before and after the block-by-block QK fix, in one run.

    python experiments/bench/bench_qk_memory.py [--lengths 256,512,1024] [--prompts 2]

The task is IOI with a shared neutral-text preamble in front of each prompt, padded to T tokens
(clean and corrupt differ only in the IOI part). Nodes: heads, q and k (per head). Each
measurement runs in its own process; peak memory is the largest resident set sampled every 2 ms
during the call minus the resident set just before it (CPU: no allocator statistics to read).

* ``atp``: plain AtP (2 forwards + 1 backward);
* ``qk whole``: AtP with the QK fix in one block of all T query rows (what it was before:
  ``[P, H, T, T]`` logits, shifts and pattern gradients, a dozen such temporaries in the key fix);
* ``qk blocks``: the same in blocks of query rows bounded by ``QK_BLOCK_ELEMENTS`` (the default);
* ``atp*``: the whole AtP* (QK fix in blocks + GradDrop's L extra partial backward passes), up to
  ``--star-max`` tokens (default 512: on 2 CPU cores it takes minutes per run).

Target (issue 15): at T = 1024, AtP*'s peak ≤ 1.5x AtP's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _peak import peak_mib  # noqa: E402

NODES = ["heads", "q", "k"]



def long_task(model, T: int, n: int):
    """IOI prompts behind a shared neutral-text preamble, each exactly ``T`` tokens."""
    import torch

    from steer.bias import load_neutral_text
    from steer.data import Batch
    from steer.patching import PatchTask, ioi_task

    t = ioi_task(model, n=n)
    n_ioi = t.n_pos
    filler = model.to_tokens(" ".join(load_neutral_text()))
    while len(filler) < T:
        filler = filler + filler
    pre = torch.tensor(filler[: T - n_ioi])[None].expand(n, -1)

    def grow(b):
        p = pre.to(b.input_ids.device)  # the IOI batch sits on the model's device
        ids = torch.cat([p, b.input_ids], 1)
        mask = torch.cat([torch.ones_like(p), b.attention_mask], 1)
        return Batch(ids, mask, [{} for _ in range(n)], list(b.texts))

    return PatchTask(grow(t.clean), grow(t.corrupt), t.metric, name=f"ioi-{T}")


def worker(method: str, T: int, n: int) -> dict:
    import torch

    import steer
    from steer.patching import atp, atp_star

    torch.manual_seed(0)
    model = steer.load()
    task = long_task(model, T, n)
    run = {"atp": lambda: atp(model, task, NODES),
           "qk whole": lambda: atp(model, task, NODES, qk_fix=True, qk_block=T),
           "qk blocks": lambda: atp(model, task, NODES, qk_fix=True),
           "atp*": lambda: atp_star(model, task, NODES)}[method]
    t0 = time.perf_counter()
    res, mib = peak_mib(run)
    sec = time.perf_counter() - t0
    k = res["k"].scores
    return {"method": method, "T": T, "prompts": n, "peak_mib": mib, "seconds": sec,
            "k_sum": float(k.abs().sum())}


def main(device: str = "cpu", lengths=(256, 512, 1024), prompts: int = 2, star_max: int = 512) -> dict:
    if device != "cpu":
        print("    (CPU only: peak memory is read from the resident set)")
    rows = []
    for T in lengths:
        methods = ["atp", "qk whole", "qk blocks"] + (["atp*"] if T <= star_max else [])
        for method in methods:
            out = subprocess.run([sys.executable, __file__, "--worker", method, str(T), str(prompts)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:])
                raise RuntimeError(f"{method} at T={T} failed")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = {x["method"]: x for x in rows if x["T"] == T}
        same = abs(r["qk whole"]["k_sum"] - r["qk blocks"]["k_sum"]) <= 1e-4 * max(1.0, r["qk whole"]["k_sum"])
        ratio = lambda m: r[m]["peak_mib"] / max(r["atp"]["peak_mib"], 1e-9)  # noqa: E731
        line = " ".join(f"{m} {r[m]['peak_mib']:6.0f} MiB ({ratio(m):.2f}x)" for m in methods[1:])
        print(f"T={T:5d}, {prompts} prompts: atp {r['atp']['peak_mib']:6.0f} MiB | {line}  (target: AtP* <= 1.5x)",
              flush=True)
        print("         seconds: " + " ".join(f"{m} {r[m]['seconds']:.1f}" for m in methods) +
              f"; blocks = whole: {same}", flush=True)
    return {"rows": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", nargs=3, default=None)
    ap.add_argument("--lengths", default="256,512,1024")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--star-max", type=int, default=512)
    a = ap.parse_args()
    if a.worker:
        m, T, n = a.worker
        print(json.dumps(worker(m, int(T), int(n))))
    else:
        main(lengths=[int(x) for x in a.lengths.split(",")], prompts=a.prompts, star_max=a.star_max)
