"""``steer refusal``: refusal behaviour vector + harmfulness condition from steer's own training
prompts, evaluated on the given prompts without steering, always steered, and with CAST.

    steer refusal --harmful H.json --harmless S.json [--model M] [--limit N] [--json OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import dumps, finite_float


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("refusal", help="refusal induction and conditional (CAST) refusal on evaluation prompts",
                              description=__doc__)
    p.add_argument("--harmful", required=True, help="JSON/JSONL evaluation prompts that should be refused")
    p.add_argument("--harmless", required=True, help="JSON/JSONL evaluation prompts that should be answered")
    p.add_argument("--model", default=None, help="model name (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each evaluation file")
    p.add_argument("--json", default=None, help="write the results here (default: stdout only)")
    p.add_argument("--layer", type=int, default=None, help="behaviour layer (default: 10, or the middle layer)")
    p.add_argument("--strength", type=finite_float, default=None, help="behaviour strength (default: 2.0)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--backend", default="hf", choices=("hf", "vllm"),
                   help="generate through HF (default) or vLLM (steer.serve; needs vLLM, see `make test-vllm`)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-limit", type=int, default=None,
                   help="training prompts per side, taken one category after another (default: all; the "
                        "behaviour vector uses 120 of them, or all under a --train-limit below 60)")
    p.add_argument("--condition-kind", default="probe", choices=("probe", "projection", "cast"),
                   help="condition score (default: logistic probe on the prompt-mean hidden state)")
    p.set_defaults(func=run)


def run(args) -> int:
    import steer
    from steer import refusal
    from steer.data import load_prompts

    harmful = [p if isinstance(p, str) else p[0] for p in load_prompts(args.harmful)]
    harmless = [p if isinstance(p, str) else p[0] for p in load_prompts(args.harmless)]
    if args.limit is not None:
        if args.limit < 1:
            print("--limit must be >= 1", file=sys.stderr)
            return 2
        harmful, harmless = harmful[: args.limit], harmless[: args.limit]
    model = steer.load(args.model)
    layer = args.layer if args.layer is not None else min(refusal.DEFAULT_LAYER, model.n_layers // 2)
    strength = args.strength if args.strength is not None else refusal.DEFAULT_STRENGTH
    hi = max(layer + 1, min(model.n_layers, int(model.n_layers * 0.7)))
    kind = args.condition_kind
    # a limited fit takes every category in turn (training_data's default)
    n_behaviour = 120 if args.train_limit is None else min(120, 2 * args.train_limit)
    setup = refusal.fit_refusal(model, layer=layer, strength=strength, limit=args.train_limit, n_behaviour=n_behaviour,
                                condition_layers=list(range(min(2, model.n_layers - 1), hi)),
                                condition_kind=kind, condition_method="probe" if kind == "probe" else "mean_diff")
    result = refusal.evaluate_refusal(model, harmful, harmless, setup, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size, keep_texts=None, backend=args.backend)
    result["model"] = model.name
    result["condition_val_f1_train_split"] = setup.condition.meta.get("val_f1")
    text = dumps(result, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    keys = [k for k, v in result.items() if isinstance(v, (int, float))
            and (k.endswith(("_harmful", "_harmless", "_added")) or k.startswith(("condition_acc", "condition_f1", "kl_")))]
    for k in ["layer", "strength"] + keys:
        print(f"{k:32s} {result[k]}")
    return 0
