"""Steered vs unsteered HF ``generate`` throughput on the embedded model (same batch, same tokens).

    python experiments/bench/bench_steering.py          # prints the ratio (target >= 0.9)
"""

from __future__ import annotations

import time

import torch

PROMPTS = [
    "How do I bake bread?", "Write a short poem about the sea.", "What is the capital of Italy?",
    "Explain photosynthesis simply.", "Give me three tips for studying.", "What is a prime number?",
    "Describe a cat in one sentence.", "How does a bicycle work?",
]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(device: str = "cpu", new_tokens: int = 24, reps: int = 2) -> dict:
    """Time unsteered and steered (add α·v at layer 10, every position but the sink) greedy generation;
    returns and prints the throughput ratio steered/unsteered (best of ``reps``, interleaved)."""
    import steer
    from steer.data import tokenize
    from steer.steering import steer as steer_ctx

    model = steer.load(device=device)
    batch = tokenize(model, PROMPTS)
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=new_tokens,
              min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)

    def plain():
        with torch.no_grad():
            model.hf.generate(**kw)

    def steered():
        with steer_ctx(model, v, layer=10, strength=2.0) as s, torch.no_grad():
            s.batch = batch
            model.hf.generate(**kw)

    plain()  # warm-up
    t_plain, t_steer = [], []
    for _ in range(reps):
        t_plain.append(_timed(plain))
        t_steer.append(_timed(steered))
    tokens = len(PROMPTS) * new_tokens
    res = {"unsteered_tok_s": tokens / min(t_plain), "steered_tok_s": tokens / min(t_steer),
           "ratio": min(t_plain) / min(t_steer), "batch": len(PROMPTS), "new_tokens": new_tokens, "device": device}
    print(f"unsteered {res['unsteered_tok_s']:.1f} tok/s  steered {res['steered_tok_s']:.1f} tok/s  "
          f"ratio {res['ratio']:.3f} (target >= 0.9)")
    return res


if __name__ == "__main__":
    main()
