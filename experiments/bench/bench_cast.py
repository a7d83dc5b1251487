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

=====================================  =================================  =================================
condition                              short (8 prompts x 24 tokens)      long (4 x ~450 tokens, 16 new)
=====================================  =================================  =================================
at layer 6, fires on every prompt      1.00x resumed (block 7), 0.97x     1.01x resumed (block 7), 0.87x
at layer 14, fires on every prompt     0.97x resumed (block 10), 0.92x    0.90x resumed (block 10), 0.77x
at layer 14, fires on 5 of 8 / 2 of 4  1.01x resumed (block 15), 0.97x    0.94x resumed (block 15), 0.76x
at layer 14, fires on no prompt        1.02x resumed (block 15), 0.94x    1.00x resumed (block 15), 0.74x
=====================================  =================================  =================================

On long prompts the pre-pass cost a quarter of the throughput. Resumed, it costs nothing
measurable here where the condition reads below the steered layer or fires on no prompt. Where it
reads above the steered layer and fires on some prompts, those rows run blocks 10-14 again,
steered, on their own, and every row then starts at block 15 (0.94x on long prompts, two of four
rows firing); where it fires on every prompt, blocks 10-14 run twice for all (0.90x). (An earlier
run of this script drew the "half" threshold from raw projections while the condition scores unit
ones, so that row fired on no prompt; the threshold now comes from the condition's own scores.)
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
                # resume=False: the prefill runs every block again, as before
                with steer.steer(model, v, layer=10, strength=2.0, condition=condition, resume=resume) as s:
                    s.generate(prompts, max_new_tokens=new, min_new_tokens=new)
                    go.resumed = s.last_resumed_at
                    go.fired = None if s.last_gate is None else int(s.last_gate.sum())
            return go

        regimes = {"plain steering": run()}
        scores = Condition(u, layer=14).score(prompt_means(model, prompts, layers=[14])[:, 0])
        half = float(scores.median())  # fires on the prompts above the median
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
            res["regimes"][f"{work}, {k}"] = {"seconds": best[k], "ratio": ratio, "resumed_at": f.resumed,
                                              "fired": f.fired}
            at = f"   (fired on {f.fired} of {len(prompts)}" if f.fired is not None else ""
            at += f"; prefill from block {f.resumed})" if f.resumed is not None else (")" if at else "")
            print(f"  {k:<40} {best[k]:6.2f} s {ratio:6.2f}x{at}")
    print("target: a CAST gate >= 0.9x plain steered generation")
    return res


if __name__ == "__main__":
    main()
