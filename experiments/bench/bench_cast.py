"""CAST-gated generation against plain steered generation on the embedded model, in one run:
what the condition's pre-pass costs, with the prefill resuming from it (the default) and with
the whole prefill run again (the loop before 2026-12-05).

    python experiments/bench/bench_cast.py      # prints one ratio per regime (target >= 0.9)

Steering ``+α·v`` at layer 10; the condition (a random projection, made to fire on every prompt,
on half or on none) reads layer 6 (below the steered layer: the prefill resumes at block 7 and no
block runs twice) or layer 14 (above it: the rows it fires on run blocks 10-14 again, steered,
and the prefill resumes at block 15; where it fires on every prompt, at block 10). Two
workloads: 8 short chat prompts x 24 new tokens, where decoding dominates, and 4 prompts of about
450 tokens x 16 new tokens, where the prefill does.

Measured on 2 CPU cores (Intel Xeon, fp32, best of 3, 2026-12-05), against plain steering;
"resumed" is the default, the second figure the prefill run again from block 0:

===================================  =================================  =================================
condition                            short (8 prompts x 24 tokens)      long (4 x ~450 tokens, 16 new)
===================================  =================================  =================================
at layer 6, fires on every prompt    1.00x resumed (block 7), 0.97x     1.02x resumed (block 7), 0.84x
at layer 14, fires on every prompt   0.98x resumed (block 10), 0.95x    0.89x resumed (block 10), 0.75x
at layer 14, fires on half           1.01x resumed (block 15), 0.95x    1.00x resumed (block 15), 0.75x
at layer 14, fires on no prompt      1.00x resumed (block 15), 0.96x    1.01x resumed (block 15), 0.74x
===================================  =================================  =================================

On long prompts the pre-pass cost a quarter of the throughput. Resumed, it costs nothing
measurable here where the condition reads below the steered layer, or above it and fires on some
prompts or none (the rows it fires on run blocks 10-14 again, steered, apart; every row then
starts at block 15). Where it fires on every prompt, blocks 10-14 run twice for all (0.89x on
long prompts).
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
    from steer.steering import prompt_means

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
        half = float((prompt_means(model, prompts, layers=[14])[:, 0] @ u).median())  # fires on half
        for layer, fires in ((6, "every"), (14, "every"), (14, "half"), (14, "no")):
            cond = Condition(u, layer=layer, threshold={"every": -1e9, "half": half, "no": 1e9}[fires])
            regimes[f"at {layer}, fires on {fires}, resumed"] = run(cond)
            regimes[f"at {layer}, fires on {fires}, whole"] = run(cond, resume=False)
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
            print(f"  {k:<40} {best[k]:6.2f} s {ratio:6.2f}x{at}")
    print("target: a CAST gate >= 0.9x plain steered generation")
    return res


if __name__ == "__main__":
    main()
