"""``steer fasb``: dynamic refusal steering with backtracking (FASB, :mod:`steer.backtracking`)
on a prompt file, next to constant steering; writes JSON.

    steer fasb --prompts FILE [--layer 10] [--strength 2] [--direction FILE]
               [--probe FILE | --probe-layer 22 --probe-prompts 128] [--save-probe FILE]
               [--threshold 0.4] [--window 16] [--backtrack 4] [--no-reencode]
               [--max-new-tokens 32] [--no-compare] [--model M] [--json OUT] [--plot PNG]

The steering vector is ``--direction`` (a saved :class:`~steer.Direction`, its vector at
``--layer``) or steer's refusal behaviour vector at ``--layer``. The probe is ``--probe`` (a
saved :class:`~steer.backtracking.Probe`) or fitted by :func:`steer.refusal.fasb_probe` on
steer's training requests (``--save-probe`` keeps it). Per prompt: the FASB answer, whether and
at which token the probe fired, α, the steered tokens, whether the refusal substrings match; and
(unless ``--no-compare``) the unsteered and constantly steered answers of the same prompts.
"""

from __future__ import annotations

import argparse

from . import finite_float


def add_parser(sub) -> None:
    p = sub.add_parser("fasb", help="FASB: probe-watched refusal steering that backs up and steers per prompt; JSON out",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="JSON/JSONL/text prompt file (steer.data.load_prompts)")
    p.add_argument("--layer", type=int, default=None, help="steering layer (default: steer.refusal.DEFAULT_LAYER)")
    p.add_argument("--strength", type=finite_float, default=None, help="base strength (default: steer.refusal.DEFAULT_STRENGTH)")
    p.add_argument("--direction", default=None, help="a saved Direction (default: the refusal behaviour vector)")
    p.add_argument("--probe", default=None, help="a saved Probe (default: fit steer.refusal.fasb_probe)")
    p.add_argument("--probe-layer", type=int, default=22)
    p.add_argument("--probe-prompts", type=int, default=128, help="training requests of each kind for the probe")
    p.add_argument("--save-probe", default=None, help="write the fitted probe here")
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--backtrack", type=int, default=4)
    p.add_argument("--no-reencode", action="store_true", help="rows firing at the prompt's end steer only its last token")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-compare", action="store_true", help="skip the unsteered and constant-steering answers")
    p.add_argument("--model", default=None, help="model name (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here (also printed)")
    p.add_argument("--plot", default=None, help="save the probe traces here (PNG; BacktrackResult.plot)")
    p.set_defaults(func=run)


def run(args) -> int:
    import steer
    from steer import backtracking, refusal
    from steer import evaluate as E
    from steer.cli import emit
    from steer.data import load_prompts

    try:
        prompts = load_prompts(args.prompts)
    except (OSError, ValueError) as e:
        raise SystemExit(f"steer fasb: cannot read --prompts: {e}")
    if not prompts:
        raise SystemExit(f"steer fasb: {args.prompts} holds no prompts.")
    model = steer.load(args.model)
    layer = refusal.DEFAULT_LAYER if args.layer is None else args.layer
    strength = refusal.DEFAULT_STRENGTH if args.strength is None else args.strength
    if not 0 <= layer < model.n_layers:
        raise SystemExit(f"steer fasb: --layer {layer} is outside 0..{model.n_layers - 1}.")
    if args.direction:
        try:
            v = steer.Direction.load(args.direction, model=model).vectors[layer]
        except (OSError, ValueError) as e:
            raise SystemExit(f"steer fasb: {e}")
    else:
        d = refusal.training_data()
        v = refusal.behaviour_vector(model, d["harmful"], d["harmless"], d["refusals"], d["compliances"], n=64,
                                     layer=layer, layers=[layer]).vectors[layer]
    if args.probe:
        try:
            probe = backtracking.Probe.load(args.probe, model=model)
        except (OSError, ValueError) as e:
            raise SystemExit(f"steer fasb: {e}")
    else:
        if not 0 <= args.probe_layer < model.n_layers:
            raise SystemExit(f"steer fasb: --probe-layer {args.probe_layer} is outside 0..{model.n_layers - 1}.")
        probe = refusal.fasb_probe(model, v, layer=args.probe_layer, steer_layer=layer, strength=strength,
                                   n=args.probe_prompts)
    if args.save_probe:
        probe.save(args.save_probe)
    try:
        r = backtracking.generate(model, prompts, v, layer=layer, strength=strength, probe=probe,
                                  threshold=args.threshold, backtrack=args.backtrack, window=args.window,
                                  max_new_tokens=args.max_new_tokens, watch_prompt=True,
                                  reencode_prompt=not args.no_reencode)
    except ValueError as e:
        raise SystemExit(f"steer fasb: {e}")
    refused = E.refusal_substring(r.texts)
    rows = [{"prompt": p if isinstance(p, str) else str(p), "fasb": t, "fired": bool(r.triggered[i]),
             "at_token": int(r.trigger_step[i]), "alpha": float(r.strength[i]), "reencoded": bool(r.reencoded[i]),
             "steered_tokens": int(r.steered_tokens[i]), "refused": bool(refused[i])}
            for i, (p, t) in enumerate(zip(prompts, r.texts))]
    doc = {"model": model.name, "layer": layer, "strength": strength, "probe": {"layer": probe.layer, **{
        k: v for k, v in probe.meta.items() if isinstance(v, (int, float, str, bool))}},
        "threshold": args.threshold, "window": args.window, "backtrack": args.backtrack,
        "reencode_prompt": not args.no_reencode, "max_new_tokens": args.max_new_tokens,
        "fasb": {"refusal_rate": E.refusal_rate(r.texts), "fired": float(r.triggered.float().mean()),
                 "steered_tokens": int(r.steered_tokens.sum()), "accepted_tokens": r.accepted,
                 "tokens_per_second": r.tokens_per_second}}
    if not args.no_compare:
        with steer.Steering(model) as s:
            plain = s.generate(prompts, max_new_tokens=args.max_new_tokens)
        with steer.steer(model, v, layer=layer, strength=strength) as s:
            const = s.generate(prompts, max_new_tokens=args.max_new_tokens)
        doc["unsteered"] = {"refusal_rate": E.refusal_rate(plain)}
        doc["constant"] = {"refusal_rate": E.refusal_rate(const)}
        for row, a, b in zip(rows, plain, const):
            row["unsteered"], row["constant"] = a, b
    doc["rows"] = rows
    if args.plot:
        r.plot(args.plot)
        doc["figure"] = str(args.plot)
    emit(doc, args.json_out)
    return 0
