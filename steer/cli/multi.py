"""``steer multi``: several persona traits steered at once (:mod:`steer.multi`), each alone and
together, summed into one vector, each at its own layer, or as MSRS subspaces; writes JSON.

    steer multi --traits optimistic:14:2,formal:6:1 [--modes sum,layers,msrs] [--layer 10]
                [--n-questions 6] [--model M] [--json OUT]

Each ``--traits`` entry is ``NAME:LAYER:STRENGTH`` (a built-in or JSON-file trait, its own
layer, its strength). ``sum`` and ``msrs`` steer every trait at ``--layer``; ``layers`` each at
its own. Per trait and mode: the likelihood effect alone and together, ``retained`` (together /
alone), the cross-talk, the neutral KL, and the prompting baseline (its system prompt).
"""

from __future__ import annotations

import argparse
import math

from . import neutral_requests, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("multi", help="several traits at once: summed, per layer, MSRS; effects, interference, KL",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traits", required=True, help="comma-separated NAME:LAYER:STRENGTH")
    p.add_argument("--modes", default="sum,layers,msrs", help="comma-separated: sum, layers, msrs")
    p.add_argument("--layer", type=int, default=None, help="the shared layer of sum and msrs (default: the first trait's)")
    p.add_argument("--n-questions", type=int, default=6, help="training questions per trait (answer pairs generated)")
    p.add_argument("--neutral", type=positive_int, default=8, help="held-out harmless requests for the neutral KL")
    p.add_argument("--model", default=None, help="model name (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here (also printed)")
    p.set_defaults(func=run)


def parse_traits(spec: str) -> list[tuple[str, int, float]]:
    """``"a:14:2,b:6:1"`` → ``[("a", 14, 2.0), ("b", 6, 1.0)]``."""
    out = []
    for part in [x for x in spec.split(",") if x.strip()]:
        bits = part.strip().split(":")
        try:
            name, layer, strength = bits
            out.append((name, int(layer), float(strength)))
        except ValueError:
            raise SystemExit(f"steer multi: --traits entry {part!r} is not NAME:LAYER:STRENGTH (e.g. optimistic:14:2).")
        if not math.isfinite(out[-1][2]):
            raise SystemExit(f"steer multi: --traits entry {part!r}: the strength must be a finite number.")
    if len(out) < 2:
        raise SystemExit("steer multi: give at least two traits (NAME:LAYER:STRENGTH, comma-separated).")
    return out


def run(args) -> int:
    import steer
    from steer import multi

    traits = parse_traits(args.traits)
    neutral = neutral_requests(args.neutral, "multi")
    modes = [m for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in multi.MODES]
    if bad or not modes:
        raise SystemExit(f"steer multi: unknown --modes {bad}; use {', '.join(multi.MODES)}.")
    model = steer.load(args.model)
    for name, layer, _ in traits:
        if not 0 <= layer < model.n_layers:
            raise SystemExit(f"steer multi: {name}'s layer {layer} is outside 0..{model.n_layers - 1}.")
    if args.layer is not None and not 0 <= args.layer < model.n_layers:
        raise SystemExit(f"steer multi: --layer {args.layer} is outside 0..{model.n_layers - 1}.")
    try:
        bs = [multi.trait_behaviour(model, n, layer=l, strength=s, n_questions=args.n_questions) for n, l, s in traits]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"steer multi: {e}")
    layer = traits[0][1] if args.layer is None else args.layer
    ev = multi.evaluate_multi(model, bs, modes, layer=layer, neutral_prompts=neutral)
    from steer.cli import emit

    emit({"model": model.name, "traits": [{"name": n, "layer": l, "strength": s} for n, l, s in traits],
          "layer": layer, **ev.to_dict()}, args.json_out)
    return 0
