"""Occupational gender bias of a model before/after debiasing, decision bias, and the Pareto curve.

    python experiments/bias_occupations.py [--model M] [--out out/bias_occupations] [--grid quick|full]

1. baseline: centred log P(he) − log P(she) per occupation on the training and held-out splits
   (occupations and templates both disjoint), correlation with the BLS share of women;
2. decision bias: P(yes) per group and domain, logit gap from the reference group, relative choice;
3. Pareto sweep on the *training* split: method × direction × layers × strength, bias and
   correlation reduction against neutral-text KL and perplexity ratio;
4. the best point within the budget (KL ≤ 0.05, perplexity ratio ≤ 1.05), chosen on the
   training split, evaluated on the held-out split: bar chart per occupation before/after.

Writes ``results.json``, ``pareto.json``, ``decision_bias.md`` and figures
``occupations_before_after.png``, ``pareto.png``, ``decision_bias.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

COMBINED = {"quick": [(9, 12, 15)], "full": [(6, 9, 12, 15, 18), (6, 9, 12, 15, 18, 21, 24)]}
GRIDS = {
    # (method, direction, where, target, layer sets, strengths)
    "quick": [("clamp", "stereotype", "subject_on", "gap", [(9, 12, 15)], [1.0]),
              ("leace", "gender", "last", "share", [(12,)], [1.0])],
    "full": [
        ("ablate", "gender", "last", "share", [(12,), (15,), (15, 18, 21, 24, 27)], [1.0]),
        ("leace", "gender", "last", "share", [(9,), (12,), (15,)], [1.0]),
        ("clamp", "stereotype", "last", "gap", [(12,), (9, 12, 15)], [1.0]),
        ("clamp", "stereotype", "subject_on", "gap", [(12,), (9, 12, 15), (6, 9, 12, 15, 18), (6, 9, 12, 15, 18, 21, 24)],
         [0.5, 1.0]),
        ("clamp", "stereotype", "subject_on", "share", [(6, 9, 12, 15, 18, 21, 24)], [1.0]),
        ("leace", "stereotype", "subject_on", "gap", [(12,), (9, 12, 15)], [1.0]),
        ("ablate", "stereotype", "subject_on", "gap", [(9, 12, 15)], [1.0]),
    ],
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="out/bias_occupations")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full")
    ap.add_argument("--max-kl", type=float, default=0.05)
    ap.add_argument("--max-ppl", type=float, default=1.05)
    args = ap.parse_args(argv)

    import torch

    import steer
    from steer import bias
    from steer.plotting import plt, save

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = steer.load(args.model)
    res: dict = {"model": model.name, "occupation_source": bias.occupation_source(), "grid": args.grid}

    # 1. baseline
    base = {s: bias.occupational_bias(model, s, s) for s in ("train", "heldout")}
    res["baseline"] = {s: r.to_dict() for s, r in base.items()}
    print(f"[{time.time() - t0:.0f}s] baseline held-out: bias {base['heldout'].bias:.3f}, "
          f"r {base['heldout'].correlation:+.3f}, neutral gap {base['heldout'].neutral_gap:+.3f}", flush=True)

    # 2. decision bias
    dec = bias.decision_bias(model)
    res["decision_bias"] = dec
    groups = list(dec["gap"])
    lines = ["| domain | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    for dom, row in dec["p_yes"].items():
        lines.append(f"| P(yes) {dom} | " + " | ".join(f"{row[g]:.3f}" for g in groups) + " |")
    lines.append("| logit gap vs " + dec["reference"] + " | " + " | ".join(f"{dec['gap'][g]:+.3f}" for g in groups) + " |")
    if "choice" in dec:
        lines.append("| choice vs " + dec["reference"] + " (P−0.5) | " + " | ".join(
            f"{dec['choice'].get(g, 0.0):+.3f}" for g in groups) + " |")
    (out / "decision_bias.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(groups)), [dec["gap"][g] for g in groups])
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel(f"logit P(yes) gap vs {dec['reference']}")
    ax.set_title("decision bias (mean over domains)")
    fig.tight_layout()
    save(fig, out / "decision_bias.png")
    print(f"[{time.time() - t0:.0f}s] decision bias: max |gap| {dec['max_abs_gap']:.3f}", flush=True)

    # 3. Pareto sweep on the training split
    rows = []
    for method, direction, where, target, layer_sets, strengths in GRIDS[args.grid]:
        layer_sets = [tuple(l for l in ls if l < model.n_layers) or (model.n_layers - 1,) for ls in layer_sets]
        for r in bias.pareto_sweep(model, [method], [direction], layer_sets, strengths, "train", where, target):
            r.update(where=where, target=target)
            rows.append(r)
            print(f"[{time.time() - t0:.0f}s] {method:6s} {direction:10s} {where:8s} {str(r['layers']):22s} "
                  f"s={r['strength']:.2f} bias {r['bias_reduction']:+.2f} r {r['correlation_reduction']:+.2f} "
                  f"KL {r['neutral_kl']:.3f} ppl {r['neutral_ppl_ratio']:.3f}", flush=True)
    # the combined edit (gender LEACE + stereotype clamp), same measurements
    before = base["train"]
    se0 = bias.side_effects(model, None)
    cache: dict = {}
    for stereo_layers in COMBINED[args.grid]:
        for s in ([1.0] if args.grid == "quick" else [0.7, 1.0]):
            edit = bias.fit_combined(model, stereo_layers, strength=s, cache=cache)
            r = bias.occupational_bias(model, "train", "train", edit=edit)
            se = bias.side_effects(model, edit, base=se0["_base"])
            row = {"method": "leace+clamp", "direction": "gender+stereotype", "layers": edit.layers,
                   "stereo_layers": list(stereo_layers), "strength": s, "where": "subject_on", "target": "gap",
                   "bias": r.bias, "correlation": r.correlation, "spread": r.spread,
                   "bias_reduction": 1 - r.bias / before.bias,
                   "correlation_reduction": 1 - abs(r.correlation) / abs(before.correlation),
                   "neutral_kl": se["neutral_kl"], "neutral_ppl_ratio": se["neutral_ppl_ratio"]}
            rows.append(row)
            print(f"[{time.time() - t0:.0f}s] combined {str(stereo_layers):22s} s={s:.2f} bias {row['bias_reduction']:+.2f} "
                  f"r {row['correlation_reduction']:+.2f} KL {row['neutral_kl']:.3f} ppl {row['neutral_ppl_ratio']:.3f}",
                  flush=True)
    (out / "pareto.json").write_text(json.dumps(rows, indent=1))
    front = bias.pareto_front(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] + "/" + r["direction"] for r in rows}):
        pts = [r for r in rows if r["method"] + "/" + r["direction"] == method]
        ax.scatter([r["neutral_kl"] for r in pts], [min(r["bias_reduction"], r["correlation_reduction"]) for r in pts],
                   label=method, s=18)
    ax.plot([r["neutral_kl"] for r in front], [min(r["bias_reduction"], r["correlation_reduction"]) for r in front],
            "k--", lw=0.8, label="Pareto front")
    ax.axvline(args.max_kl, color="r", lw=0.5)
    ax.axhline(0.5, color="r", lw=0.5)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("KL on neutral text")
    ax.set_ylabel("min(bias reduction, |r| reduction)")
    ax.set_title("debiasing: reduction vs side effect (training split)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out / "pareto.png")

    # 4. the best point within budget, on held-out data
    best = bias.best_point(rows, args.max_kl, args.max_ppl)
    if best is None:
        best = min(rows, key=lambda r: r["neutral_kl"])
    res["chosen"] = best

    def refit(row):
        if row["method"] == "leace+clamp":
            return bias.fit_combined(model, row["stereo_layers"], strength=row["strength"], cache=cache)
        return bias.fit_edit(model, row["method"], row["layers"], row["direction"], row["strength"],
                             where=row["where"], target=row["target"])

    b = base["heldout"]

    def heldout(edit):
        after = bias.occupational_bias(model, "heldout", "heldout", edit=edit)
        se = bias.side_effects(model, edit)
        se.pop("_base")
        return after, {"bias_before": b.bias, "bias_after": after.bias,
                       "stereotype_correlation_before": b.correlation,
                       "stereotype_correlation_after": after.correlation,
                       "bias_reduction": 1 - after.bias / b.bias,
                       "correlation_reduction": 1 - abs(after.correlation) / abs(b.correlation),
                       "spread_before": b.spread, "spread_after": after.spread, **se,
                       "per_occupation_after": dict(zip(after.values, after.per_value.tolist()))}

    edit = refit(best)
    after, res["heldout"] = heldout(edit)
    # steer's default edit (what `steer bias` and the demo use), also on held-out data
    _, res["heldout_default_edit"] = heldout(bias.fit_default_edit(model, cache=cache))
    res["heldout_default_edit"]["edit"] = "fit_combined defaults (gender LEACE layer 12 + stereotype clamp 6..24)"
    h = res["heldout"]
    res["target_met"] = bool(h["bias_reduction"] >= 0.5 and h["correlation_reduction"] >= 0.5
                             and h["neutral_kl"] <= args.max_kl and h["neutral_ppl_ratio"] <= args.max_ppl)
    save(bias.plot_occupations(b, after, title=f"held-out occupations, {best['method']} layers {best['layers']} "
                                              f"s={best['strength']}"), out / "occupations_before_after.png")
    if args.grid != "quick":
        res["decision_bias_after"] = bias.decision_bias(model, edit=edit)
    res["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(f"[{time.time() - t0:.0f}s] chosen {best['method']}/{best['direction']} layers {best['layers']} "
          f"s={best['strength']}: held-out bias {h['bias_before']:.3f} -> {h['bias_after']:.3f} "
          f"({h['bias_reduction']:+.0%}), r {h['stereotype_correlation_before']:+.3f} -> "
          f"{h['stereotype_correlation_after']:+.3f} ({h['correlation_reduction']:+.0%}), KL {h['neutral_kl']:.4f}, "
          f"ppl ratio {h['neutral_ppl_ratio']:.4f}; target met: {res['target_met']}", flush=True)
    return res


if __name__ == "__main__":
    main()
