"""``steer persona``: extract a trait's persona vector, steer with it and monitor it; writes JSON.

    steer persona --trait NAME|FILE [--model M] [--layer L] [--strengths -4,-2,0,2,4] [--json OUT]

NAME is a built-in trait (evil, formal, hallucinating, optimistic, sycophantic); FILE a trait
JSON file of the same shape. Reports the monitoring AUROC (last-prompt-token projection,
held-out questions, eliciting vs suppressing system prompts), the built-in trait score at each
steering strength, and the per-layer separability curve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import dumps, finite_floats, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("persona", help="extract, steer and monitor a persona trait; JSON out", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trait", required=True, help="built-in trait name or a trait JSON file")
    p.add_argument("--model", default=None, help="model name (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--layer", type=int, default=None, help="steering/monitoring layer (default: 2/3 of the depth)")
    p.add_argument("--strengths", default="-4,-2,0,2,4", help="comma-separated steering strengths")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length when generating pairs")
    p.add_argument("--prompt-pairs", type=positive_int, default=None, help="use only the first N system-prompt pairs")
    p.add_argument("--no-filter", action="store_true", help="keep every pair (skip the built-in scorer)")
    p.add_argument("--answers", action="store_true", help="also generate a steered answer per strength")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here (also printed)")
    p.set_defaults(func=run)


def run(args) -> int:
    import steer
    from steer import persona

    try:
        trait = persona.load_trait(args.trait)
        strengths = finite_floats(args.strengths, "--strengths")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"steer persona: {e}")
    if not strengths:
        raise SystemExit("steer persona: --strengths is empty.")
    if len(set(strengths)) < len(strengths):
        raise SystemExit(f"steer persona: --strengths {args.strengths!r} repeats a strength; give each once.")
    if args.prompt_pairs is not None and args.prompt_pairs > len(trait.positive):
        raise SystemExit(f"steer persona: --prompt-pairs {args.prompt_pairs}: {trait.name} has {len(trait.positive)} pairs.")
    model = steer.load(args.model)
    if args.layer is not None and not 0 <= args.layer < model.n_layers:
        raise SystemExit(f"--layer {args.layer}: the model has layers 0..{model.n_layers - 1}.")
    ks = list(range(len(trait.positive)))[: args.prompt_pairs] if args.prompt_pairs is not None else None
    pairs = persona.generate_pairs(model, trait, prompt_pairs=ks, max_new_tokens=args.max_new_tokens)
    scorer = None if args.no_filter else persona.contrast_scorer(model, trait)
    vec = persona.extract(model, trait, pairs, scorer=scorer, layer=args.layer)
    layer = vec.layer
    mon = persona.monitor(model, trait, vec, layer)
    curve = persona.layer_curve(model, trait, vec)
    scores = {str(a): persona.trait_score(model, trait, vec, layer, a) for a in strengths}
    vals = [scores[str(a)] for a in sorted(strengths)]
    out = {"trait": trait.name, "model": model.name, "layer": layer,
           "n_pairs": vec.meta["n_pairs"], "n_pairs_generated": vec.meta["n_pairs_before_filter"],
           "monitor_auroc": mon["auroc"], "monitor_layer": layer,
           "trait_score_by_strength": scores,
           "steering_monotonic": all(b > a for a, b in zip(vals, vals[1:])),
           "layer_curve": {"layers": curve.layers, "auroc": curve.column("auroc"), "best_layer": curve.best_layer},
           "monitor_auroc_best_layer": max(curve.column("auroc"))}
    if args.answers:
        q = trait.heldout_questions[0]
        out["answers"] = {"question": q, **{str(a): persona.steered_answers(model, vec, layer, [q], a)[0]
                                            for a in strengths}}
    text = dumps(out, indent=1)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text)
        print(f"written to {args.json_out}", file=sys.stderr)
    print(f"trait {trait.name}: layer {layer}, {out['n_pairs']}/{out['n_pairs_generated']} pairs kept")
    print(f"monitor AUROC (held-out) {mon['auroc']:.3f}; best layer {curve.best_layer} "
          f"AUROC {out['monitor_auroc_best_layer']:.3f}")
    print("trait score by strength: " + ", ".join(f"{a:+g}: {scores[str(a)]:+.3f}" for a in sorted(strengths))
          + ("  (monotonic)" if out["steering_monotonic"] else "  (NOT monotonic)"))
    return 0
