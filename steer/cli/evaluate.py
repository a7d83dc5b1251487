"""``steer evaluate``: a steering direction judged as "Towards Reliable Evaluation of Behavior
Steering Interventions in LLMs" asks (:func:`steer.evaluate.evaluate_steering`); writes JSON.

    steer evaluate --direction FILE --items TRAIT|FILE [--layer L] [--strengths 1,2,4]
                   [--system TEXT] [--positions response|all] [--model M] [--json OUT]
    steer evaluate --method act|lineas --items TRAIT [--layer L | --layers 6,10,14]
                   [--strengths 0.5,1] ...

FILE for ``--direction``: a saved :class:`steer.Direction` (``.safetensors``/``.pt``, or a GGUF
control vector). ``--items``: a built-in trait name (its hand-written ``ab`` items) or a JSON list
of ``{"question", "matching", "non_matching"}``. For every strength: the likelihood effect
(matching − non-matching answer log-probability after a two-turn history, minus unsteered),
its paired d_z, the matching rate, neutral next-token KL on held-out harmless requests and the
perplexity ratio of unrelated text; then the prompting baseline (``--system``, default: the
trait's first eliciting system prompt).

``--method`` (default ``add``: the saved direction, added) fits the steering instead:
``act`` (Linear-AcT, :func:`steer.transport.fit_linear_act`, one map at ``--layer``) or ``lineas``
(:func:`steer.transport.fit_lineas`, maps at ``--layers`` fitted jointly), both from the built-in
trait's training questions under its suppressing (source) and eliciting (target) system
prompts; strengths are λ in [0, 1].
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import finite_floats, neutral_requests, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="judge a steering direction: likelihood effect, prompting baseline, side effects",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--direction", default=None, help="--method add: a saved steer.Direction file (or GGUF control vector)")
    p.add_argument("--method", choices=["add", "act", "lineas"], default="add",
                   help="add the direction, or fit Linear-AcT / LinEAS maps from the trait's prompts")
    p.add_argument("--layers", default=None, help="--method lineas: comma-separated layers (default: --layer)")
    p.add_argument("--items", required=True, help="built-in trait name or a JSON file of evaluation items")
    p.add_argument("--layer", type=int, default=None, help="steering layer (default: the direction's chosen layer)")
    p.add_argument("--strengths", default="1,2,4", help="comma-separated steering strengths")
    p.add_argument("--system", default=None, help="the prompting baseline's system prompt")
    p.add_argument("--positions", choices=["response", "all"], default="response",
                   help="steer the response tokens (and the last prompt token) or every token but the sink")
    p.add_argument("--neutral", type=positive_int, default=8, help="held-out harmless requests for the neutral KL")
    p.add_argument("--model", default=None, help="model name (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="hf", choices=("hf", "vllm"),
                   help="likelihoods and perplexities through HF (default) or vLLM (steer.serve; the KL stays on HF)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here (also printed)")
    p.set_defaults(func=run)


def _items(spec: str):
    from steer import persona

    path = Path(spec)
    if path.suffix == ".json" and path.exists():
        items = json.loads(path.read_text())
        if not isinstance(items, list) or not items or not all(
                isinstance(i, dict) and "question" in i and "matching" in i and "non_matching" in i for i in items):
            raise ValueError(f"{spec}: expected a non-empty JSON list of {{question, matching, non_matching}} objects.")
        return items, None, path.stem
    t = persona.load_trait(spec)
    return t.ab, t.positive[0], t.name


def _fitted(args, model, pos, strengths):
    """Linear-AcT / LinEAS maps fitted from a built-in trait's suppressing → eliciting prompts."""
    from steer import persona, transport
    from steer.steering import Steering

    if any(not 0 <= a <= 1 for a in strengths):
        raise SystemExit(f"steer evaluate: --method {args.method} takes strengths λ in [0, 1]; got {strengths}.")
    try:
        t = persona.load_trait(args.items)
    except (ValueError, FileNotFoundError):
        raise SystemExit(f"steer evaluate: --method {args.method} fits from a built-in trait's prompts; "
                         f"--items {args.items!r} is not one ({', '.join(persona.list_traits())}).")
    qs = t.train_questions
    src = [persona._messages(t.negative[i % len(t.negative)], q) for i, q in enumerate(qs)]
    tgt = [persona._messages(t.positive[i % len(t.positive)], q) for i, q in enumerate(qs)]
    if args.method == "act":
        layers = [10 if args.layer is None else args.layer]
    else:
        spec = args.layers or (str(args.layer) if args.layer is not None else "6,10,14")
        layers = [int(x) for x in spec.split(",") if x.strip()]
    if not layers or any(not 0 <= l < model.n_layers for l in layers):
        raise SystemExit(f"steer evaluate: layers {layers} must lie in 0..{model.n_layers - 1} (--layer / --layers).")
    fit = transport.fit_linear_act if args.method == "act" else transport.fit_lineas
    maps = fit(model, src, tgt, layers=layers, progress=False)
    return (lambda a: Steering(model, transport.transport(maps, a, positions=pos))), {"layers": layers, "trait": t.name}


def run(args) -> int:
    import steer
    from steer.bias import load_neutral_text
    from steer.directions import Direction
    from steer.evaluate import evaluate_steering
    from steer.persona import _from_response

    try:
        strengths = finite_floats(args.strengths, "--strengths")
        items, system, name = _items(args.items)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"steer evaluate: {e}")
    if not strengths:
        raise SystemExit("steer evaluate: --strengths is empty.")
    if args.method != "add" and args.direction:  # they were ignored
        raise SystemExit(f"steer evaluate: --direction is for --method add; --method {args.method} fits its own maps.")
    if args.method != "lineas" and args.layers:
        raise SystemExit(f"steer evaluate: --layers is for --method lineas; --method {args.method} steers at --layer.")
    neutral = neutral_requests(args.neutral, "evaluate")
    model = steer.load(args.model)
    pos = _from_response if args.positions == "response" else "all"
    if args.method == "add":
        if not args.direction:
            raise SystemExit("steer evaluate: pass --direction FILE (or --method act|lineas to fit maps instead).")
        path = Path(args.direction)
        if not path.exists():
            raise SystemExit(f"steer evaluate: no direction file {path}.")
        d = Direction.from_gguf(path, model.n_layers) if path.suffix == ".gguf" else Direction.load(path, model=model)
        layer = d.layer if args.layer is None else args.layer
        if layer is None or not 0 <= layer < model.n_layers:
            raise SystemExit(f"steer evaluate: pass --layer in 0..{model.n_layers - 1} (the direction has no chosen layer).")
        make = lambda a: steer.steer(model, d, layer=layer, strength=a, positions=pos)  # noqa: E731
        what = {"direction": str(path), "layer": layer}
    else:
        make, what = _fitted(args, model, pos, strengths)
    system = args.system or system
    if args.backend == "vllm":
        from steer.serve import available

        if not available():
            raise SystemExit("steer evaluate: --backend vllm needs vLLM (`make test-vllm` builds .venv-vllm with it; "
                             "elsewhere pip install 'steer[vllm]').")
    ev = evaluate_steering(model, items, make, strengths, system_prompt=system,
                           neutral_prompts=neutral,
                           unrelated_texts=load_neutral_text()[:8], name=name, backend=args.backend)
    out = {"model": model.name, "method": args.method, **what, "positions": args.positions,
           "backend": args.backend, **ev.to_dict()}
    from steer.cli import emit

    emit(out, args.json_out)
    return 0
