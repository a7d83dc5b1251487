"""CAST-gated generation against plain steered generation on the embedded model, in one run:
what the condition's pre-pass costs, with the prefill resuming from it (the default) and with
the whole prefill run again (the loop before 2026-12-05).

    python experiments/bench/bench_cast.py      # prints one ratio per regime (target >= 0.9)

Steering ``+α·v`` at layer 10; the condition (a random projection; it fires on every prompt, so
every row does the same work) reads layer 6 (below the steered layer: the prefill resumes at
block 7 and no block runs twice) or layer 14 (above it: the prefill resumes at block 10, blocks
10-14 run twice). Two workloads: 8 short chat prompts x 24 new tokens, where decoding dominates,
and 4 prompts of about 450 tokens x 16 new tokens, where the prefill does.

Measured on 2 CPU cores (Intel Xeon, fp32, best of 3, 2026-12-05), against plain steering:

===========  ======================================  ======================================
condition    short (8 prompts x 24 new tokens)       long (4 x ~450 tokens, 16 new)
===========  ======================================  ======================================
layer 6      1.00x resumed at block 7; 0.99x whole   1.01x resumed at block 7; 0.87x whole
layer 14     0.99x resumed at block 10; 0.93x whole  0.90x resumed at block 10; 0.77x whole
===========  ======================================  ======================================

On long prompts the pre-pass cost up to a quarter of the throughput; resuming leaves only the
blocks between the steered layer and the condition's (10-14) run twice.
"""

from __future__ import annotations

import time

import torch

SHORT = [
    "How do I bake bread?", "Write a short poem about the sea.", "What is the capital of Italy?",
    "Explain photosynthesis simply.", "Give me three tips for studying.", "What is a prime number?",
    "Describe a cat in one sentence.", "How does a bicycle work?",
]
LONG = ["The history of bread goes back thousands of years. " * 40 + f"Question {i}: summarise the text."
        for i in range(4)]


def main(device: str = "cpu", reps: int = 3) -> dict:
    import steer
    from steer.conditions import Condition
    from steer.steering import Steering

    model = steer.load(device=device)
    g = torch.Generator().manual_seed(0)
    v, u = torch.randn(model.d_model, generator=g), torch.randn(model.d_model, generator=g)
    res = {"device": device, "regimes": {}}
    for work, prompts, new in (("short", SHORT, 24), ("long", LONG, 16)):
        def run(condition=None, resume=True):
            def go():
                with steer.steer(model, v, layer=10, strength=2.0, condition=condition) as s:
                    if not resume:  # the prefill runs every block again, as before
                        s._resume_layer = lambda: None
                    s.generate(prompts, max_new_tokens=new, min_new_tokens=new)
                    go.resumed = s.last_resumed_at
            return go

        regimes = {"plain steering": run()}
        for layer in (6, 14):
            cond = Condition(u, layer=layer, threshold=-1e9)  # fires on every prompt
            regimes[f"condition at {layer}, resumed"] = run(cond)
            regimes[f"condition at {layer}, whole"] = run(cond, resume=False)
        for f in regimes.values():  # warm-up
            f()
        best = {k: float("inf") for k in regimes}
        for _ in range(reps):  # interleaved, best of reps
            for k, f in regimes.items():
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
        print(f"{work}: {len(prompts)} prompts x {new} new tokens")
        for k, f in regimes.items():
            ratio = best["plain steering"] / best[k]
            res["regimes"][f"{work}, {k}"] = {"seconds": best[k], "ratio": ratio, "resumed_at": f.resumed}
            at = f"   (prefill from block {f.resumed})" if f.resumed is not None else ""
            print(f"  {k:<28} {best[k]:6.2f} s {ratio:6.2f}x{at}")
    print("target: a CAST gate >= 0.9x plain steered generation")
    return res


if __name__ == "__main__":
    main()
