"""Cost of the diagnostics against one plain forward of the same prompts, on the embedded model,
in one run.

    python experiments/bench/bench_diagnostics.py     # prints the ratios (logit lens target <= 1.5)

* logit lens of every layer at the last position (``steer.logit_lens``) against one plain HF
  forward (``model.hf(...)``, logits of every position, as a user would call it);
* the same lens at the last 4 positions;
* a probe trace over 16 generated tokens against plain greedy ``generate`` of the same tokens (the
  trace is read in the generation pass, so the ratio is the cost of the readings).

Measured on 2 CPU cores (fp32, 8 chat prompts of 38 tokens, best of 5): lens at the last position
1.16x one forward (target met); at the last 4 positions 2.19x: decoding 30 layers x 4 positions
x 8 prompts through a 49,152-token unembedding is about two thirds of the forward's FLOPs, plus a
softmax over each row. Probe trace 0.99x generate.
"""

from __future__ import annotations

import time

import torch

PROMPTS = [
    "How do I bake bread?", "Write a short poem about the sea.", "What is the capital of Italy?",
    "Explain photosynthesis simply.", "Give me three tips for studying.", "What is a prime number?",
    "Describe a cat in one sentence.", "How does a bicycle work?",
]


def _best(fn, reps):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(device: str = "cpu", reps: int = 5) -> dict:
    import steer
    from steer import diagnostics as D
    from steer.data import tokenize
    from steer.positions import Last

    model = steer.load(device=device)
    batch = tokenize(model, PROMPTS).to(model.device)
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def forward():
        model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 use_cache=False)

    @torch.no_grad()
    def generate():
        model.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=16,
                          min_new_tokens=16, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)

    t_fwd = _best(forward, reps)
    t_lens = _best(lambda: D.logit_lens(model, PROMPTS, batch_size=len(PROMPTS)), reps)
    t_lens4 = _best(lambda: D.logit_lens(model, PROMPTS, positions=Last(4), batch_size=len(PROMPTS)), reps)
    t_gen = _best(generate, max(1, reps // 2))
    t_trace = _best(lambda: D.probe_trace(model, PROMPTS, v, layer=15, max_new_tokens=16), max(1, reps // 2))
    res = {"device": device, "prompts": len(PROMPTS), "tokens": int(batch.input_ids.shape[1]),
           "forward_s": t_fwd, "lens_last_s": t_lens, "lens_last4_s": t_lens4, "generate_s": t_gen, "trace_s": t_trace,
           "lens_last_ratio": t_lens / t_fwd, "lens_last4_ratio": t_lens4 / t_fwd, "trace_ratio": t_trace / t_gen}
    print(f"{len(PROMPTS)} prompts x {res['tokens']} tokens, {model.n_layers} layers")
    print(f"logit lens, every layer, last position: {t_lens * 1e3:.0f} ms vs one forward {t_fwd * 1e3:.0f} ms "
          f"= {res['lens_last_ratio']:.2f}x (target <= 1.5)")
    print(f"logit lens, every layer, last 4 positions: {res['lens_last4_ratio']:.2f}x")
    print(f"probe trace over 16 generated tokens: {t_trace * 1e3:.0f} ms vs generate {t_gen * 1e3:.0f} ms "
          f"= {res['trace_ratio']:.2f}x")
    return res


if __name__ == "__main__":
    main()
