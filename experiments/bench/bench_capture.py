"""Capture overhead: resid_post at all layers, last position, 64 chat prompts, vs plain HF forwards.

Baselines (same batches, same run): the HF model's forward with logits (what one would run
anyway), and the HF decoder alone (no LM head), which is the strictest comparison since
capture does not need logits. Target: capture <= 1.15x the plain forward.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import steer
from steer.data import batches, tokenize


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(device: str = "cpu", repeats: int = 3) -> dict:
    model = steer.load(device=device)
    data = Path(steer.__file__).parent / "datasets"
    prompts = (steer.load_prompts(data / "harmful.json")[:32] + steer.load_prompts(data / "harmless.json")[:32])
    bs = 32
    lengths = tokenize(model, prompts).lengths.tolist()
    groups = [tokenize(model, [prompts[i] for i in g]) for g in batches(len(prompts), bs, lengths)]

    @torch.no_grad()
    def plain(decoder_only: bool):
        net = model.hf.model if decoder_only else model.hf
        for b in groups:
            net(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                use_cache=False)

    def cap():
        steer.capture(model, prompts, layers="all", positions="last", batch_size=bs, progress=False)

    plain(False), cap()  # warm-up
    t_cap = _best_of(cap, repeats)
    t_hf = _best_of(lambda: plain(False), repeats)
    t_dec = _best_of(lambda: plain(True), repeats)
    res = {"capture_s": t_cap, "hf_forward_s": t_hf, "hf_decoder_s": t_dec,
           "ratio_vs_forward": t_cap / t_hf, "ratio_vs_decoder": t_cap / t_dec}
    print(f"capture resid_post x {model.n_layers} layers, last pos, {len(prompts)} chat prompts "
          f"(batch {bs}, {device}): steer {t_cap:.3f} s | HF forward {t_hf:.3f} s -> ratio "
          f"{res['ratio_vs_forward']:.2f}x (target <= 1.15) | HF decoder w/o LM head {t_dec:.3f} s "
          f"-> ratio {res['ratio_vs_decoder']:.2f}x  [best of {repeats}, incl. tokenization in steer]")
    return res


if __name__ == "__main__":
    main()
