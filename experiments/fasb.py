"""FASB (dynamic steering with backtracking, :mod:`steer.backtracking`) against constant steering
on the embedded SmolLM2-135M-Instruct: refusing held-out harmful requests while answering
held-out harmless ones.

* steering vector: steer's refusal behaviour vector (refusal vs compliance openings after
  steer's training prompts, layer 10; :func:`steer.refusal.behaviour_vector`), ``+α·v`` at every
  position but the attention sink;
* constant steering: every row and token, ``α = --strength`` (steer's refusal default, 2), through
  :meth:`steer.Steering.generate`;
* FASB: a logistic probe of *appropriate* behaviour on ``resid_post`` at ``--probe-layer`` (18),
  trained per token on the unsteered states of the model's own greedy answers to 32 harmful and
  32 harmless *training* requests (teacher-forced) — desired: a harmful request with its answer
  under constant steering, if that is a refusal (unsteered, the model refuses none of them);
  a harmless request with its unsteered answer, if not a refusal; undesired: a harmful request
  with its unsteered answer, if not a refusal. (Trained on steer's canned openings instead, it
  fired on 15 of 16 harmless rows: the model's own answers look different. Adding "harmless + refusal" as
  undesired makes the target an XOR of harmfulness and refusal, which no linear probe separates.)
  It is read at every generated token (not at the prompt's end, which it never saw), and the
  decision uses the mean of its last ``--window`` (4) readings (single tokens dip); below
  ``--threshold`` a row backs up ``--backtrack`` tokens and continues steered at
  ``α = strength · (1 + (threshold − p)/threshold)``;
* measured on ``--n`` held-out harmful and ``--n`` held-out harmless requests, greedy,
  ``--max-new-tokens``: refusal rate (steer's refusal substrings) on each side, the share of
  harmless answers identical to the unsteered ones, steered tokens (FASB: steered forward columns,
  constant: every accepted token), and throughput in accepted tokens per second, all in one run.

    python experiments/fasb.py [--out DIR] [--n 16] [--max-new-tokens 32]

Writes ``results.json`` and ``fasb.png`` (per-row probe traces) to ``--out`` (default ``out/fasb``).

Measured (CPU fp32, defaults, 16 + 16 prompts x 32 tokens): refusal on harmful requests 0.31
unsteered, 1.00 constant, **0.75 FASB**; on harmless ones 0.00 / 1.00 / 0.44; harmless answers
identical to the unsteered ones 0 % constant, 25 % FASB; FASB steered 684 of 1024 accepted
tokens (0.67x constant's); throughput 103 accepted tok/s vs 119 for constant steered HF
``generate`` (0.87x). The targets (refusal within 0.05 of constant with at most half the tokens
steered) are not met, and the cause is the probe, not the backtracking: it fired on 13 of 16
harmful rows but also on 12 of 16 harmless ones (its per-token training accuracy is 0.98, but
it does not transfer from steer's training prompts to the held-out set), and where it fires late
(token 18–28) the steered continuation often does not turn into a refusal.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def fit_appropriateness_probe(m, layer: int, vector, steer_layer: int, strength: float, n: int = 32,
                              max_new_tokens: int = 24):
    """The FASB probe, from the model's own answers to *training* prompts (see the module doc)."""
    import torch

    import steer
    from steer import backtracking, refusal
    from steer import evaluate as E
    from steer.steering import Steering

    d = refusal.training_data()
    H, S = d["harmful"][:n], d["harmless"][:n]
    with Steering(m) as s:
        own_h, own_s = s.generate(H, max_new_tokens=max_new_tokens), s.generate(S, max_new_tokens=max_new_tokens)
    with steer.steer(m, vector, layer=steer_layer, strength=strength) as s:
        steered_h = s.generate(H, max_new_tokens=max_new_tokens)

    def states(pairs):
        pairs = [(p, t) for p, t in pairs if t.strip()]
        a = steer.capture(m, pairs, layers=[layer], positions="completion", progress=False)
        return a.tensor.permute(0, 2, 1, 3)[a.mask][:, 0]

    refused_h = E.refusal_substring(own_h)
    good = torch.cat([states([(p, t) for p, t, r in zip(H, steered_h, E.refusal_substring(steered_h)) if r]),
                      states([(p, t) for p, t, r in zip(S, own_s, E.refusal_substring(own_s)) if not r])])
    bad = states([(p, t) for p, t, r in zip(H, own_h, refused_h) if not r])
    return backtracking.fit_probe(good, bad, layer)


def run(out="out/fasb", n=16, max_new_tokens=32, strength=2.0, layer=10, probe_layer=18, threshold=0.5,
        backtrack=4, window=4, model=None) -> dict:
    import torch

    import steer
    from steer import backtracking, plotting, refusal
    from steer import evaluate as E
    from steer.data import load_prompts
    from steer.steering import Steering

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = model or steer.load()
    d = refusal.training_data()
    beh = refusal.behaviour_vector(m, d["harmful"], d["harmless"], d["refusals"], d["compliances"], n=64,
                                   layer=layer, layers=[layer])
    v = beh.vectors[layer]
    probe = fit_appropriateness_probe(m, probe_layer, v, layer, strength)
    data = Path(__file__).parent / "data"
    harmful = load_prompts(data / "eval_harmful.json")[:n]
    harmless = load_prompts(data / "eval_harmless.json")[:n]
    prompts = harmful + harmless

    def n_tokens(texts):
        return sum(len(m.tokenizer(t, add_special_tokens=False).input_ids) for t in texts)

    def timed(make):
        t0 = time.perf_counter()
        with make() as s:
            texts = s.generate(prompts, max_new_tokens=max_new_tokens)
        return texts, time.perf_counter() - t0

    plain, t_plain = timed(lambda: Steering(m))
    const, t_const = timed(lambda: steer.steer(m, v, layer=layer, strength=strength))
    fasb = backtracking.generate(m, prompts, v, layer=layer, strength=strength, probe=probe, threshold=threshold,
                                 backtrack=backtrack, max_new_tokens=max_new_tokens, watch_prompt=False,
                                 window=window)
    nh = len(harmful)
    const_tokens = n_tokens(const)
    res = {
        "model": m.name, "n_harmful": nh, "n_harmless": len(harmless), "layer": layer, "strength": strength,
        "probe_layer": probe_layer, "threshold": threshold, "backtrack": backtrack, "window": window, "max_new_tokens": max_new_tokens,
        "probe_train_accuracy": probe.meta["train_accuracy"],
        "refusal_harmful": {"unsteered": E.refusal_rate(plain[:nh]), "constant": E.refusal_rate(const[:nh]),
                            "fasb": E.refusal_rate(fasb.texts[:nh])},
        "refusal_harmless": {"unsteered": E.refusal_rate(plain[nh:]), "constant": E.refusal_rate(const[nh:]),
                             "fasb": E.refusal_rate(fasb.texts[nh:])},
        "harmless_identical_to_unsteered": {
            "constant": sum(a == b for a, b in zip(plain[nh:], const[nh:])) / len(harmless),
            "fasb": sum(a == b for a, b in zip(plain[nh:], fasb.texts[nh:])) / len(harmless)},
        # rows whose probe never fired, and how many of them came out exactly as unsteered
        "unfired_rows": int((~fasb.triggered).sum()),
        "unfired_identical_to_unsteered": sum(a == b for a, b, f in zip(plain, fasb.texts, fasb.triggered.tolist()) if not f),
        "fired": {"harmful": float(fasb.triggered[:nh].float().mean()), "harmless": float(fasb.triggered[nh:].float().mean())},
        "trigger_step_harmful": fasb.trigger_step[:nh].tolist(),
        "steered_tokens": {"constant": const_tokens, "fasb": int(fasb.steered_tokens.sum())},
        "accepted_tokens": {"constant": const_tokens, "fasb": fasb.accepted},
        "tokens_per_second": {"unsteered_hf": n_tokens(plain) / t_plain, "constant_hf": const_tokens / t_const,
                              "fasb": fasb.tokens_per_second},
        "examples": [{"prompt": prompts[i], "unsteered": plain[i], "constant": const[i], "fasb": fasb.texts[i],
                      "fired": bool(fasb.triggered[i])} for i in (0, 1, nh, nh + 1)],
    }
    res["steered_fraction_vs_constant"] = res["steered_tokens"]["fasb"] / max(const_tokens, 1)
    res["throughput_vs_constant"] = res["tokens_per_second"]["fasb"] / res["tokens_per_second"]["constant_hf"]

    from steer.plotting import plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, pr in enumerate(fasb.probs):
        ax.plot(pr, color=plotting.PALETTE[0 if i < nh else 1], alpha=0.5, lw=1,
                label=("harmful" if i == 0 else "harmless" if i == nh else None))
    ax.axhline(threshold, color="k", ls="--", lw=0.8, label="threshold")
    ax.set_xlabel("generation step (fed column)")
    ax.set_ylabel("probe P(appropriate)")
    ax.set_title(f"{m.name}: FASB probe traces (back {backtrack} tokens on firing)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plotting.save(fig, out / "fasb.png")
    res["figure"] = str(out / "fasb.png")
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/fasb")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--backtrack", type=int, default=4)
    p.add_argument("--window", type=int, default=4)
    a = p.parse_args(argv)
    r = run(a.out, a.n, a.max_new_tokens, threshold=a.threshold, backtrack=a.backtrack, window=a.window)
    print(json.dumps({k: v for k, v in r.items() if k != "examples"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
