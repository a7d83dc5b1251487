"""FASB (dynamic steering with backtracking, :mod:`steer.backtracking`) against constant steering
on the embedded SmolLM2-135M-Instruct: refusing held-out harmful requests while answering
held-out harmless ones.

* steering vector: steer's refusal behaviour vector (refusal vs compliance openings after
  steer's training prompts, layer 10; :func:`steer.refusal.behaviour_vector`), ``+α·v`` at every
  position but the attention sink;
* constant steering: every row and token, ``α = --strength`` (steer's refusal default, 2), through
  :meth:`steer.Steering.generate`;
* FASB: :func:`steer.refusal.fasb_probe`, a logistic probe of *appropriate* behaviour on
  ``resid_post`` at ``--probe-layer`` (22), trained on the unsteered states of the model's own
  greedy answers to ``--probe-prompts`` (128) harmful and 128 harmless *training* requests
  (teacher-forced), per answer token and at each prompt's last token (its docstring gives the
  labels). (Trained on steer's canned openings instead, it fired on 15 of 16 harmless rows: the
  model's own answers look different.) It is read at the prompt's end and
  at every generated token, and the decision uses the mean of its last ``--window`` (16)
  readings (single tokens dip); below ``--threshold`` (0.4) a row backs up ``--backtrack`` (4)
  tokens and continues steered at ``α = strength · (1 + (threshold − p)/threshold)``. A row that
  fires at the prompt's end has its prompt read again steered (``reencode_prompt``, as constant
  steering reads it); the run also reports the variant that steers only the prompt's last token;
* measured on ``--n`` held-out harmful and ``--n`` held-out harmless requests, greedy,
  ``--max-new-tokens``: refusal rate (steer's refusal substrings) on each side, the share of
  harmless answers identical to the unsteered ones, steered tokens (FASB: steered forward columns
  from the prompt's last token on, a prompt read again counting as that one column; constant:
  every accepted token; neither counts the rest of the prompt), and throughput in
  accepted tokens per second, all in one run.

How the settings were chosen (none on the reported rows): the probe layer on a validation split
of steer's training requests (128 fit, the next 64 held out; a probe of answer tokens only,
l2 = 0.01; fired on held-out answered-harmful / harmless rows: layer 18, the old layer, 61/62
and 21/64; layer 22 61/62 and 7/64; the other layers from 8 to 28 fired on 15-40 of the 64
harmless rows); the training size went from 32 to 128 requests of each kind without a
comparison of its own; threshold and window on held-out requests 16–47 of the evaluation files
(the rows reported below are 0–15), with an earlier version of the probe that read the harmful
prompts' ends steered: at 0.5 / 4 FASB refused 1.00 of harmful and 0.41 of harmless requests
with 0.81x constant's steered tokens; 0.5 / 16: 1.00 / 0.31 / 0.69x; 0.4 / 16: 1.00 / 0.19 /
0.60x; 0.3 / 8: 0.88 / 0.16 / 0.55x.

    python experiments/fasb.py [--out DIR] [--n 16] [--start 0] [--max-new-tokens 32] [--no-reencode]

Writes ``results.json``, ``rows.json`` (every row's request, texts, whether the probe fired and
which runs refused) and ``fasb.png`` (per-row probe traces) to ``--out`` (default ``out/fasb``).

Measured (CPU fp32, defaults, 16 + 16 held-out prompts x 32 tokens, one run):

=====================  =========  ========  ============================  =====================
refusal                unsteered  constant  FASB (prompt read again)      FASB (last token only)
=====================  =========  ========  ============================  =====================
harmful requests       0.31       1.00      **0.94**                      0.88
harmless requests      0.00       1.00      **0.12**                      0.12
steered tokens         0          1024      **560** (0.55x)               560 (0.55x)
accepted tok/s         168        166       126 (0.76x)                   154 (0.93x)
=====================  =========  ========  ============================  =====================

The probe fired on 15 of 16 harmful rows (all 15 at the prompt's end) and on 3 of 16 harmless
ones (one at the prompt's end); 13 of 16 harmless answers are the unsteered answer token for
token (constant steering: 0), and so is every row that never fired. Against the targets: refusal
within 0.05 of constant's — missed by one prompt of 16 (0.94 against 1.00); at most half the
tokens steered — missed narrowly (0.55x): with half the rows harmful, steering every harmful
answer from its first token is already 0.5x, so any harmless row that fires goes over. Reading
the prompt again is what brings refusal from 0.88 to 0.94; it costs a second prefill of the rows
that fire there (16 of 32 prompts of up to 86 tokens; a prefill of all 32 takes 2.5 s on this
CPU, about 25 decode steps of the batch), hence 0.76x constant's throughput against 0.93x
without it. Prefilling the whole batch again instead of just those rows gave 0.67x (with 12
rows firing there).

On a larger held-out sample (``--start 48 --n 64``: rows 48–111, used for nothing before; same
probe, settings and run otherwise):

=====================  =========  ========  ============================  =====================
refusal                unsteered  constant  FASB (prompt read again)      FASB (last token only)
=====================  =========  ========  ============================  =====================
harmful requests       0.20       0.95      **0.88**                      0.72
harmless requests      0.09       0.91      **0.17**                      0.17
steered tokens         0          4096      **1997** (0.49x)              1983 (0.48x)
accepted tok/s         231        217       176 (0.81x)                   214 (0.99x)
=====================  =========  ========  ============================  =====================

The probe fired on 57 of 64 harmful rows (54 at the prompt's end) and on 6 of 64 harmless ones;
58 of 64 harmless answers are the unsteered answer (constant: 0). Here the token target is met
(0.49x) and the refusal target is missed by 0.08 (five prompts of 64): the seven harmful rows
the probe never fired on are the gap. Throughput is 0.81x with the re-read and 0.99x without
it (rows 0–15: 0.76x / 0.93x).

Changes to the loop since (2026-12-05; the same tokens in all 128 rows of 48–111), so that no
block runs twice without need (``backtracking.generate(resume_blocks=)``, default on) and no
finished row is computed (``drop_finished``, default on):

* below the steered layer (10) the steered and unsteered states are the same: the prefill keeps
  its input to block 10, and a prompt read again starts there. That second prefill (the 58 rows
  that fire at the prompt's end, 68 columns) took 2.5 s instead of 3.7 s through the whole model;
* the prefill stops after the probe's block (22) for the check; the rows that fire run blocks
  10–22 again steered, and blocks 23–29 run once for every row (the rows that fire no longer run
  them unsteered first);
* rows that have finished leave the batch: the rows that backed up run their last five steps
  with 5, 2 and 1 rows instead of 128 (a decode step takes 0.26 s at 128 rows, 0.06 s at 5).

Three runs interleaved with constant steering, rows 48–111: FASB 0.99x / 0.92x / 0.92x
constant's throughput (median **0.92x**; constant's own speed varied 229–253 tok/s between the
runs), against 0.87x / 0.75x / 0.75x with these turned off (the loop of the tables above). With
only the first and last of them (an earlier run): median 0.87x, against 0.76x. Rows 0–15, the
same way: 0.92x / 0.88x / 0.92x (median **0.92x**) against 0.80x / 0.75x / 0.78x; same tokens.
This script itself, rows 48–111, one run: refusal and steered tokens as in the table above
(0.88 / 0.17, 1997 = 0.49x); accepted tok/s 243 constant, 224 FASB (**0.92x**), 244 FASB
steering only the prompt's last token (1.00x).

A second probe for the prompt's end alone (tried, not adopted): a logistic probe of harmless
against harmful requests on the prompts' last states at layer 22 (256 training requests of each
kind), read at the first check instead of the answer-token probe. On a split of the training
requests (fit 0–255, read 300–349) it looked better (fired on 0.94 of harmful and 0.04 of
harmless requests at 0.4, against 0.90 / 0.10); on the evaluation rows it does not transfer
(rows 16–47, AUROC of harmful vs harmless prompt ends 0.88 against the answer-token probe's
0.967). Run end to end it gave, rows 0–15: refusal 0.94 / 0.12 with 0.48x steered tokens (the
answer-token probe: 0.94 / 0.12, 0.55x); rows 48–111: 0.89 / 0.22 with 0.58x (0.88 / 0.17, 0.49x).

A probe trained on every category (tried, not adopted). steer's training files are sorted by
category, so the probe's 128 requests of each kind are weapons to drugs (6 of 15 harmful
categories) against cooking to writing. On rows 48–111 the probe never fired on five harmful rows
that constant steering turns to refusals, four of them self-harm requests the model answers
("Sure, here's a daily meal plan..."). A probe on 128 requests of each kind taken one category
after another (``training_data(balanced=True)``) separates harmful from harmless prompt ends no
better (AUROC rows 16–47 / 0–15 / 48–111: 0.95 / 0.93 / 0.941, against 0.967 / 0.98 / 0.941) and
fires less at 0.4 (on harmful rows 0.53 / 0.38 / 0.64, against 0.94 / 0.94 / 0.84). End to end,
refusal of harmful / harmless requests and steered tokens against constant's: rows 16–47 0.78 /
0.12, 0.47x; rows 0–15 0.81 / 0.00, 0.27x; rows 48–111 0.75 / 0.16, 0.42x; rows 112–119 (8 + 8,
used for nothing else before) 1.00 / 0.00, 0.50x, where the probe adopted gives 1.00 / 0.25, 0.64x.
Twice the requests, 256 of each kind of every category (fitted in 138 s against 76 s), is not
better either: AUROC at the prompt's end 0.966 / 0.931 on rows 16–47 / 48–111 (adopted: 0.967 /
0.941); end to end on rows 16–47 refusal 0.97 / 0.16 with 1081 steered tokens (adopted: 1.00 /
0.25, 1306), on rows 48–111 0.81 / 0.17 with 1920 (adopted: 0.88 / 0.17, 1997).

History on rows 0–15: the first probe (layer 18, 32 training prompts, answer tokens only,
threshold 0.5, window 4) refused 0.75 / 0.44 with 0.67x constant's tokens steered, firing on 12
of 16 harmless rows; a version of the present one that read the harmful prompts' ends steered
(a state the probe never decides on) refused 0.94 / 0.12 with 0.47x steered (a re-read prompt
counted no column then; 0.48x as counted now).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from heldout import heldout


def run(out="out/fasb", n=16, max_new_tokens=32, strength=2.0, layer=10, probe_layer=22, threshold=0.4,
        backtrack=4, window=16, model=None, reencode_prompt=True, probe_prompts=128, start=0) -> dict:
    import steer
    from steer import backtracking, refusal
    from steer import evaluate as E
    from steer.steering import Steering

    # the evaluation rows first: a bad --start or --n fails before minutes of fitting
    all_harmful, all_harmless = heldout("harmful"), heldout("harmless")
    rows = min(len(all_harmful), len(all_harmless))
    if n < 1 or start < 0 or start + n > rows:
        raise ValueError(f"--start {start} --n {n}: the evaluation files hold {rows} requests of each kind; "
                         f"pick start >= 0 and n >= 1 with start + n <= {rows}.")
    harmful, harmless = all_harmful[start:start + n], all_harmless[start:start + n]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = model or steer.load()
    d = refusal.training_data()
    beh = refusal.behaviour_vector(m, d["harmful"], d["harmless"], d["refusals"], d["compliances"], n=64,
                                   layer=layer, layers=[layer])
    v = beh.vectors[layer]
    probe = refusal.fasb_probe(m, v, layer=probe_layer, steer_layer=layer, strength=strength, n=probe_prompts)
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
                                 backtrack=backtrack, max_new_tokens=max_new_tokens, watch_prompt=True,
                                 window=window, reencode_prompt=reencode_prompt)
    # the same probe and rows, rows that fire at the prompt's end steering only its last token
    other = backtracking.generate(m, prompts, v, layer=layer, strength=strength, probe=probe, threshold=threshold,
                                  backtrack=backtrack, max_new_tokens=max_new_tokens, watch_prompt=True,
                                  window=window, reencode_prompt=not reencode_prompt)
    nh = len(harmful)
    const_tokens = n_tokens(const)
    res = {
        "model": m.name, "first_row": start, "n_harmful": nh, "n_harmless": len(harmless), "layer": layer, "strength": strength,
        "probe_layer": probe_layer, "threshold": threshold, "backtrack": backtrack, "window": window, "max_new_tokens": max_new_tokens,
        "reencode_prompt": reencode_prompt, "probe_prompts": probe_prompts,
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
        "trigger_step_harmless": fasb.trigger_step[nh:].tolist(),
        "reencoded": {"harmful": int(fasb.reencoded[:nh].sum()), "harmless": int(fasb.reencoded[nh:].sum())},
        "steered_tokens": {"constant": const_tokens, "fasb": int(fasb.steered_tokens.sum())},
        "accepted_tokens": {"constant": const_tokens, "fasb": fasb.accepted},
        "tokens_per_second": {"unsteered_hf": n_tokens(plain) / t_plain, "constant_hf": const_tokens / t_const,
                              "fasb": fasb.tokens_per_second},
        "examples": [{"prompt": prompts[i], "unsteered": plain[i], "constant": const[i], "fasb": fasb.texts[i],
                      "fired": bool(fasb.triggered[i])} for i in (0, 1, nh, nh + 1)],
    }
    res["fasb_reencode_prompt=" + str(not reencode_prompt)] = {
        "refusal_harmful": E.refusal_rate(other.texts[:nh]), "refusal_harmless": E.refusal_rate(other.texts[nh:]),
        "steered_tokens": int(other.steered_tokens.sum()), "tokens_per_second": other.tokens_per_second}
    res["steered_fraction_vs_constant"] = res["steered_tokens"]["fasb"] / max(const_tokens, 1)
    res["throughput_vs_constant"] = res["tokens_per_second"]["fasb"] / res["tokens_per_second"]["constant_hf"]

    fasb.plot(out / "fasb.png", groups=["harmful"] * nh + ["harmless"] * len(harmless))
    res["figure"] = str(out / "fasb.png")
    (out / "results.json").write_text(json.dumps(res, indent=1))
    # every row's outcome, to see which requests make up a gap
    refused = {k: E.refusal_substring(t) for k, t in (("unsteered", plain), ("constant", const), ("fasb", fasb.texts))}
    rows_out = [{"row": start + (i % nh), "kind": "harmful" if i < nh else "harmless", "prompt": prompts[i],
                 "fired": bool(fasb.triggered[i]), "trigger_step": int(fasb.trigger_step[i]),
                 "refused": {k: bool(r[i]) for k, r in refused.items()},
                 "texts": {"unsteered": plain[i], "constant": const[i], "fasb": fasb.texts[i]}}
                for i in range(len(prompts))]
    (out / "rows.json").write_text(json.dumps(rows_out, indent=1))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/fasb")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--start", type=int, default=0, help="first evaluation row (rows 16-47 tuned the threshold and window)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--backtrack", type=int, default=4)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--probe-prompts", type=int, default=128)
    p.add_argument("--no-reencode", action="store_true", help="steer only the prompt's last token of rows that fire there")
    a = p.parse_args(argv)
    r = run(a.out, a.n, a.max_new_tokens, threshold=a.threshold, backtrack=a.backtrack, window=a.window,
            reencode_prompt=not a.no_reencode, probe_prompts=a.probe_prompts, start=a.start)
    print(json.dumps({k: v for k, v in r.items() if k != "examples"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
