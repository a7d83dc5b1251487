"""``steer bias``: occupational gender bias before and after debiasing; writes JSON.

    steer bias [--templates FILE] [--shares FILE] [--model M] [--method leace]
               [--direction stereotype] [--layers 9,12,15] [--strength 1.0] [--decisions] [--json OUT]

FILE is JSONL of ``{"template": "The {occupation} said that", "slot": "occupation", "values":
[...], "targets": [" he", " she"]}`` (default: steer's held-out templates and occupations). The
debiasing edit is fitted on steer's *training* templates and occupations, so a held-out file
measures generalisation. The stereotype correlation uses the occupations that have a
share-of-women figure (steer's table, plus ``--shares``); the JSON says how many were used and
which were skipped, and a correlation that cannot be computed is ``null`` with a reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import dumps, finite_float


def add_parser(sub) -> None:
    from ..bias import DEFAULT_DIRECTION, DEFAULT_LAYERS, DEFAULT_METHOD, DEFAULT_TARGET, DEFAULT_WHERE, DIRECTIONS, METHODS

    p = sub.add_parser("bias", help="measure counterfactual gender bias before/after debiasing; JSON out",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--templates", default=None, help="JSONL template file (default: built-in held-out set)")
    p.add_argument("--model", default=None, help="model name (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--method", choices=METHODS + ("combined",), default=DEFAULT_METHOD,
                   help="debiasing method; 'combined' = LEACE of the gender concept at layer 12 + clamping the "
                        "stereotype direction to the neutral subject at --layers (default)")
    p.add_argument("--direction", choices=DIRECTIONS, default=DEFAULT_DIRECTION,
                   help="gender (gendered-word pairs) or stereotype (occupation prompts)")
    p.add_argument("--layers", default=None,
                   help=f"comma-separated layers to edit (default: {','.join(map(str, DEFAULT_LAYERS))}, clipped to the model)")
    p.add_argument("--strength", type=finite_float, default=1.0, help="edit strength (1 = full)")
    p.add_argument("--where", choices=("last", "subject", "subject_on"), default=DEFAULT_WHERE,
                   help="stereotype direction: fit on the last token, the subject tokens, or subject and after")
    p.add_argument("--target", choices=("share", "gap"), default=DEFAULT_TARGET,
                   help="stereotype direction: regress the share of women or the model's own gap")
    p.add_argument("--shares", default=None,
                   help="JSON of your own share-of-women figures, {\"word\": percent, ...}; they add to and "
                        "override steer's table for the stereotype correlation")
    p.add_argument("--decisions", action="store_true", help="also measure decision bias before/after")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here (also printed)")
    p.set_defaults(func=run)


def _layers(text: str, n: int) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--layers {text!r}: give comma-separated integers like 9,12,15.")
    if not layers or not all(-n <= l < n for l in layers):
        raise SystemExit(f"--layers {text!r}: the model has layers 0..{n - 1}.")
    return [l % n for l in layers]


def run(args) -> int:
    import steer
    from steer import bias

    model = steer.load(args.model)
    if args.layers is None:
        from steer.bias import DEFAULT_LAYERS

        layers = sorted({min(l, model.n_layers - 1) for l in DEFAULT_LAYERS})
    else:
        layers = _layers(args.layers, model.n_layers)
    if args.method == "combined":
        edit = bias.fit_combined(model, layers, strength=args.strength)
    else:
        edit = bias.fit_edit(model, args.method, layers, args.direction, args.strength, where=args.where,
                             target=args.target)
    if args.templates:
        if not Path(args.templates).exists():
            raise SystemExit(f"--templates {args.templates}: no such file.")
        ts = bias.load_templates(args.templates)
        groups: dict = {}
        for t in ts:  # one table per (values, targets)
            groups.setdefault((tuple(t.values), t.targets), []).append(t)
        shares = bias.load_occupations()
        if args.shares:
            if not Path(args.shares).exists():
                raise SystemExit(f"--shares {args.shares}: no such file.")
            shares.update(bias.load_occupations(path=args.shares))
        before = [bias.counterfactual_gaps(model, g, None, shares) for g in groups.values()]
        after = [bias.counterfactual_gaps(model, g, edit, shares) for g in groups.values()]
        w = [len(r.values) for r in before]

        def avg(rs, weights):
            vals = [(v, k) for v, k in zip(rs, weights) if k > 0]
            return sum(v * k for v, k in vals) / sum(k for _, k in vals) if vals else None

        # the correlation of a table counts with the number of values that have a figure
        cw = [0 if r.correlation_note else int(r.has_share.sum()) for r in before]
        skipped = sorted({v for r in before for v in r.correlation_skipped})
        notes = sorted({r.correlation_note for r in before if r.correlation_note})
        se = bias.side_effects(model, edit)
        out = {"bias_before": avg([r.bias for r in before], w), "bias_after": avg([r.bias for r in after], w),
               "stereotype_correlation_before": avg([r.correlation for r in before], cw),
               "stereotype_correlation_after": avg([r.correlation for r in after], cw),
               "stereotype_correlation_n": sum(cw),
               "stereotype_correlation_skipped": skipped,
               "stereotype_correlation_note": None if any(cw) else "; ".join(notes),
               "neutral_kl": se["neutral_kl"], "neutral_ppl_ratio": se["neutral_ppl_ratio"],
               "method": edit.method, "direction": edit.name, "layer": edit.layers, "strength": edit.strength,
               "templates": args.templates,
               "tables": [{"before": b.to_dict(), "after": a.to_dict()} for b, a in zip(before, after)]}
    else:
        out = bias.debias_report(model, edit, "heldout")
        out["templates"] = "built-in held-out"
    out["model"] = model.name
    out["occupation_source"] = bias.occupation_source()
    if args.decisions:
        out["decision_before"] = bias.decision_bias(model)
        out["decision_after"] = bias.decision_bias(model, edit=edit)
    text = dumps(out, indent=1)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text)
    keys = ("bias_before", "bias_after", "stereotype_correlation_before", "stereotype_correlation_after",
            "neutral_kl", "neutral_ppl_ratio", "method", "direction", "layer")
    for k in keys:
        v = out[k]
        if v is None and k.startswith("stereotype_correlation"):
            v = f"n/a ({out.get('stereotype_correlation_note')})"
        print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    if out.get("stereotype_correlation_skipped"):
        print(f"{'no share-of-women figure for':32s} {', '.join(out['stereotype_correlation_skipped'])} "
              "(left out of the correlation; add them with --shares FILE)")
    if args.json_out:
        print(f"written to {args.json_out}", file=sys.stderr)
    return 0
