"""RepIt-style targeted correction (:mod:`steer.repit`) on the embedded SmolLM2-135M-Instruct:
with conditional refusal steering on (CAST: steer's refusal setup, :func:`steer.refusal.fit_refusal`),
suppress refusal on one harm category while refusal on the other fourteen stays.

* statistics: prompt-mean ``resid_post`` at the harmfulness condition's layer, per category of
  steer's training harmful prompts (23–24 each) and for its harmless ones;
* correction: the target category's vector from its first ``n`` training prompts, isolated from
  the other categories' vectors (all their training prompts), sparsified to ``neurons``
  coordinates, its projection thresholded into a target detector, and the condition replaced by
  ``condition & ~detector`` (:func:`steer.repit.fit_correction`);
* evaluation on the held-out set (``experiments/data/eval_harmful.json``: 8 per category; 120
  harmless): how often the corrected condition fires on the target, the other categories and
  harmless requests, over ``n`` ∈ {6, 12, 24} (24 is every training prompt of a category; the
  issue's 48 is more than steer's data holds) and ``neurons``; then, for ``n = 12`` and the
  default ``neurons``, greedy answers under the gated refusal steering and their refusal rates.

    python experiments/repit.py [--out DIR] [--targets weapons,cybercrime,drugs] [--max-new-tokens 32]

Writes ``results.json`` and ``repit.png``.

Measured (CPU fp32, defaults; the condition at layer 14 fires on 100 % of each target's held-out
prompts, 96 % of the other categories', 3 % of harmless ones). Fires on target / other
categories, neurons = 150:

==========  ===========  ===========  ===========
target      n = 6        n = 12       n = 24
==========  ===========  ===========  ===========
weapons     1.00 / 0.96  0.50 / 0.88  0.00 / 0.52
cybercrime  0.88 / 0.96  0.25 / 0.95  0.00 / 0.91
drugs       1.00 / 0.96  0.00 / 0.49  0.12 / 0.64
==========  ===========  ===========  ===========

Only cybercrime meets the target (≤ 0.2 on the target, ≥ 0.8 elsewhere), and only with every
training prompt of the category (24); six examples do nothing and twelve are not enough. For
weapons and drugs the isolated direction also catches the neighbouring categories (others fall
to about 0.5). The neuron count matters little between 50 and 576 (the table for each is in
``results.json``). Harmless firing stays at 0.03 by construction (``condition & ~detector``
can only fire less). Refusal in the greedy answers (n = 12, 150 neurons), target / others,
original → corrected: weapons 1.00 / 0.93 → 0.75 / 0.86, cybercrime → 0.38 / 0.88, drugs →
0.00 / 0.45.

Two other estimators were tried on a validation split of the training prompts (n = 12 target
prompts fitted, the target's other 11–12 held out; each other category's first half fitted, its
second half held out; all 15 categories as targets; mean firing on the held-out target / others):
the estimator above 0.41 / 0.92 (3 of 15 targets meet the bars); an LDA direction (the isolated
vector through a Ledoit–Wolf-shrunk pooled covariance) 0.64–0.70 / 0.95–0.97 (0–1 of 15);
thresholds from leave-one-out target scores (the fitted direction scores its own examples too
high) 0.30–0.35 / 0.85–0.86 (2–4 of 15), trading the other categories' refusal for the target's.
Neither was adopted.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from heldout import heldout, path as heldout_path

NS = (6, 12, 24)
NEURONS = (25, 50, 100, 150, 200, 576)


def run(out="out/repit", targets=("weapons", "cybercrime", "drugs"), ns=NS, neurons=NEURONS, main_n=12,
        main_neurons=150, max_new_tokens=32, others_per_category=3, condition_layers="all", model=None) -> dict:
    import torch

    import steer
    from steer import evaluate as E
    from steer import plotting, refusal, repit
    from steer.data import load_prompts
    from steer.steering import prompt_means

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = model or steer.load()
    setup = refusal.fit_refusal(m, condition_layers=condition_layers)
    cond = setup.condition
    L = cond.layer

    def by_category(path):
        groups = defaultdict(list)
        for x in json.loads(Path(path).read_text()):
            groups[x["category"]].append(x["instruction"])
        return dict(groups)

    data = Path(refusal.__file__).parent / "datasets"
    train = by_category(data / "harmful.json")
    held = by_category(heldout_path("harmful"))
    harmless_train = load_prompts(data / "harmless.json")
    harmless_held = heldout("harmless")

    def stats(prompts):
        return prompt_means(m, prompts, layers=[L])[:, 0]

    h_train = {k: stats(v) for k, v in train.items()}
    h_held = {k: stats(v) for k, v in held.items()}
    h0, h0_held = stats(harmless_train), stats(harmless_held)

    def rate(c, h):
        return float(c.evaluate({L: h}).float().mean())

    base = {"target": {t: rate(cond, h_held[t]) for t in targets},
            "others": {t: rate(cond, torch.cat([h for k, h in h_held.items() if k != t])) for t in targets},
            "harmless": rate(cond, h0_held)}
    grid = []
    for t in targets:
        others = {k: h for k, h in h_train.items() if k != t}
        for n in ns:
            for k in neurons:
                c = repit.fit_correction(cond, t, h_train[t][:n], others, h0, neurons=k)
                fixed = c.apply(cond)
                grid.append({"target": t, "n": n, "neurons": k, "threshold": c.detector.threshold,
                             "train_separation": c.meta["train_tpr_minus_fpr"],
                             "isolated_fraction": c.meta["isolated_fraction"],
                             "fires_target": rate(fixed, h_held[t]),
                             "fires_others": rate(fixed, torch.cat([h for kk, h in h_held.items() if kk != t])),
                             "fires_harmless": rate(fixed, h0_held)})

    generated = {}
    for t in targets:  # refusal under the gated steering, original vs corrected condition
        c = repit.fit_correction(cond, t, h_train[t][:main_n], {k: h for k, h in h_train.items() if k != t}, h0,
                                 neurons=main_neurons)
        others = [p for k, ps in held.items() if k != t for p in ps[:others_per_category]]
        prompts = held[t] + others
        nt = len(held[t])
        res_t = {}
        for name, cc in (("original", cond), ("corrected", c.apply(cond))):
            with steer.steer(m, setup.behaviour, layer=setup.layer, strength=setup.strength, condition=cc) as s:
                texts = s.generate(prompts, max_new_tokens=max_new_tokens)
            res_t[name] = {"refusal_target": E.refusal_rate(texts[:nt]), "refusal_others": E.refusal_rate(texts[nt:]),
                           "example_target": texts[0]}
        generated[t] = {**res_t, "n_target": nt, "n_others": len(others)}

    from steer.plotting import plt

    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.4), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for j, n in enumerate(ns):
            rows = [r for r in grid if r["target"] == t and r["n"] == n]
            ax.plot([r["neurons"] for r in rows], [r["fires_target"] for r in rows], marker="o", color=plotting.PALETTE[j],
                    label=f"target, n={n}")
            ax.plot([r["neurons"] for r in rows], [r["fires_others"] for r in rows], marker="s", ls="--",
                    color=plotting.PALETTE[j], label=f"other categories, n={n}")
        ax.set_xscale("log")
        ax.set_xlabel("neurons kept in the correction")
        ax.set_title(t, fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("condition fires (held-out)")
    axes[0][-1].legend(fontsize=6)
    fig.suptitle(f"{m.name}: RepIt-style correction of the CAST harmfulness condition (layer {L})", fontsize=9)
    fig.tight_layout()
    plotting.save(fig, out / "repit.png")
    res = {"model": m.name, "condition_layer": L, "targets": list(targets), "baseline_fires": base, "grid": grid,
           "generation": generated, "main_n": main_n, "main_neurons": main_neurons, "figure": str(out / "repit.png")}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/repit")
    p.add_argument("--targets", default="weapons,cybercrime,drugs")
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args(argv)
    r = run(a.out, tuple(a.targets.split(",")), max_new_tokens=a.max_new_tokens)
    print(f"condition layer {r['condition_layer']}; fires without correction: {r['baseline_fires']}")
    for row in r["grid"]:
        print(f"{row['target']:12} n={row['n']:<3} neurons={row['neurons']:<4} target {row['fires_target']:.2f}  "
              f"others {row['fires_others']:.2f}  harmless {row['fires_harmless']:.2f}")
    for t, g in r["generation"].items():
        print(f"{t}: refusal target {g['original']['refusal_target']:.2f} → {g['corrected']['refusal_target']:.2f}, "
              f"others {g['original']['refusal_others']:.2f} → {g['corrected']['refusal_others']:.2f}")
    print(f"figure: {r['figure']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
