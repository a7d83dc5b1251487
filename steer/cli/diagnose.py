"""``steer diagnose``: look before steering or patching (:mod:`steer.diagnostics`); writes JSON.

    steer diagnose massive [--text T ...|--prompts FILE] [--raw] [--json OUT] [--plot PNG]
    steer diagnose lens    --text T [--targets " Mary"," John"] [--positions last|all] [--raw]
    steer diagnose trace   --direction FILE --layer L [--text T ...|--prompts FILE]
                           [--steer-layer L --strength A] [--max-new-tokens N] [--heads K]
    steer diagnose trajectory --prompts FILE   (rows: {"instruction", "task"[, "refused"]})
                           [--direction FILE --steer-layer L --strength A] [--max-new-tokens N]

``massive``: the largest activations per layer, their tokens and dimensions, the ratio to the
median, their spread across prompts and the attention each head puts on them. ``lens``: each
layer's residual decoded through the final norm and unembedding (top tokens, targets'
probabilities). ``trace``: a saved direction read at every token of prompt and generation, with
and (``--strength``) without steering along it; ``--heads K`` ranks the heads whose ablation
raises the (steered, if ``--strength``) trace and verifies the top K by ablation.
``trajectory``: last-token trajectories per task and outcome and each prompt's distance to its
task's refusal and non-refusal trajectories; rows without ``"refused"`` are generated (under the
steering, if given) and labelled by refusal phrases. Prompts are chat-templated unless ``--raw``;
without ``--text`` or ``--prompts``, a few built-in harmless requests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import finite_float


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="massive activations, logit lens, probe traces and the heads behind them, layer trajectories",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("view", choices=["massive", "lens", "trace", "trajectory"])
    p.add_argument("--text", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--prompts", default=None, help="a JSON/JSONL file of prompts")
    p.add_argument("--raw", action="store_true", help="use the text as it is, without the chat template")
    p.add_argument("--model", default=None, help="model name (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--targets", default="", help="lens: comma-separated target tokens to follow per layer")
    p.add_argument("--positions", choices=["last", "all"], default="last", help="lens: which tokens to decode")
    p.add_argument("--direction", default=None, help="trace: a saved steer.Direction file")
    p.add_argument("--layer", type=int, default=None, help="trace: the layer to read (default: the direction's)")
    p.add_argument("--steer-layer", type=int, default=None, help="trace: steer along the direction at this layer")
    p.add_argument("--strength", type=finite_float, default=None, help="trace: steering strength (then both traces)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--heads", type=int, default=None, help="trace: rank heads and verify the top K by ablation")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here (also printed)")
    p.add_argument("--plot", default=None, help="save the figure here (PNG)")
    p.set_defaults(func=run)


def _prompts(args) -> list:
    import steer
    from steer.refusal import training_data

    if args.text and args.prompts:
        raise SystemExit("steer diagnose: give --text or --prompts, not both.")
    if args.prompts:
        texts = steer.load_prompts(args.prompts)
    elif args.text:
        texts = list(args.text)
    else:
        texts = training_data()["harmless"][-4:]
    return [steer.Raw(t) if args.raw and isinstance(t, str) else t for t in texts]


def _direction(args, model):
    import steer

    if not args.direction or not Path(args.direction).exists():
        raise SystemExit(f"steer diagnose {args.view}: pass --direction FILE (a saved steer.Direction).")
    return steer.Direction.load(args.direction, model=model)


def _task_rows(args) -> list[dict]:
    import json

    if not args.prompts or not Path(args.prompts).exists():
        raise SystemExit('steer diagnose trajectory: pass --prompts FILE, a JSON list or JSONL of '
                         '{"instruction": ..., "task": ...[, "refused": true|false]} rows.')
    text = Path(args.prompts).read_text()
    rows = [json.loads(x) for x in text.splitlines() if x.strip()] if args.prompts.endswith(".jsonl") else json.loads(text)
    bad = [i for i, r in enumerate(rows) if not (isinstance(r, dict) and "instruction" in r and "task" in r)]
    if bad or not rows:
        raise SystemExit(f'steer diagnose trajectory: rows {bad[:5]} of {args.prompts} lack "instruction" or "task".')
    return rows


def run(args) -> int:
    import steer
    from steer import diagnostics as D
    from steer.plotting import save

    if args.view == "trajectory":
        rows = _task_rows(args)
        prompts = [steer.Raw(r["instruction"]) if args.raw else r["instruction"] for r in rows]
    else:
        prompts = _prompts(args)
    if args.strength is None and (args.steer_layer is not None or (args.view == "trajectory" and args.direction)):
        raise SystemExit(f"steer diagnose {args.view}: --direction / --steer-layer steer the run only with --strength "
                         "(they were ignored without it).")
    model = steer.load(args.model)
    fig = None
    if args.view == "trajectory":
        steering = None
        if args.strength is not None:
            d = _direction(args, model)
            sl = d.layer if args.steer_layer is None else args.steer_layer
            steering = lambda: steer.steer(model, d, layer=sl, strength=args.strength)  # noqa: E731
        refused = [r.get("refused") for r in rows]
        todo = [i for i, r in enumerate(refused) if r is None]
        if todo:
            from steer.evaluate import refusal_substring

            with (steering() if steering else steer.Steering(model, [])) as s:
                texts = s.generate([prompts[i] for i in todo], max_new_tokens=args.max_new_tokens)
            for i, r in zip(todo, refusal_substring(texts)):
                refused[i] = r
        r = D.trajectories(model, prompts, tasks=[row["task"] for row in rows], refused=refused,
                           steering=steering() if steering else None)
        out = r.to_dict()
        print(repr(r), file=sys.stderr)
        fig = r.plot() if args.plot else None
    elif args.view == "massive":
        r = D.massive_activations(model, prompts)
        out = r.to_dict()
        print(repr(r), file=sys.stderr)
        fig = r.plot() if args.plot else None
    elif args.view == "lens":
        targets = [t for t in args.targets.split(",") if t] if args.targets else []
        r = D.logit_lens(model, prompts, positions=args.positions, targets=targets)
        out = r.to_dict()
        print(repr(r), file=sys.stderr)
        fig = r.plot(path=None) if args.plot else None
    else:
        d = _direction(args, model)
        layer = d.layer if args.layer is None else args.layer
        if layer is None:
            raise SystemExit("steer diagnose trace: the direction has no chosen layer; pass --layer.")
        plain = D.probe_trace(model, prompts, d, layer=layer, max_new_tokens=args.max_new_tokens)
        out = {"unsteered": plain.to_dict()}
        other, steering = None, lambda: None  # noqa: E731
        if args.strength is not None:
            sl = layer if args.steer_layer is None else args.steer_layer
            steering = lambda: steer.steer(model, d, layer=sl, strength=args.strength)  # noqa: E731
            other = D.probe_trace(model, prompts, d, layer=layer, max_new_tokens=args.max_new_tokens,
                                  steering=steering())
            out["steered"] = {**other.to_dict(), "steer_layer": sl, "strength": args.strength}
        if args.heads is not None:
            th = D.trace_heads(model, other or plain, d, steering=steering(), top=args.heads)
            out["heads"] = th.to_dict()
            print(repr(th), file=sys.stderr)
        print(repr(plain), file=sys.stderr)
        fig = plain.plot(other=other) if args.plot else None
    if fig is not None:
        save(fig, args.plot)
        out["figure"] = args.plot
        print(f"figure: {args.plot}", file=sys.stderr)
    from steer.cli import emit

    emit(out, args.json_out)
    return 0
