"""``steer patch``: localise a behaviour with activation patching, AtP and AtP*; writes JSON.

    steer patch --task ioi --nodes heads --method activation,atp,atp* --n 8 --json out.json --plot heads.png
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m steer patch --method activation --shard auto
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import dumps, positive_int


def add_parser(subparsers):
    """Register the ``patch`` subcommand."""
    p = subparsers.add_parser("patch", help="activation patching / AtP / AtP* over a node set")
    p.add_argument("--task", default="ioi", help="'ioi' (built-in generator) or a JSONL file of {clean, corrupt, answer, wrong}")
    p.add_argument("--nodes", default="heads", help="heads|resid|attn_out|mlp_out|neurons (or any steer.patching.NODE_KINDS)")
    p.add_argument("--method", default="activation,atp,atp*", help="comma-separated: activation,atp,atp*,relp")
    p.add_argument("--model", default=None, help="model name for steer.load (default: embedded SmolLM2)")
    p.add_argument("--n", "--n-prompts", dest="n", type=int, default=8,
                   help="number of IOI prompts (--task ioi); under torchrun spell it --n-prompts")
    p.add_argument("--direction", default="denoising", choices=["denoising", "noising"])
    p.add_argument("--k", type=positive_int, default=10, help="top-K for the recovery cost")
    p.add_argument("--batch-size", type=int, default=None, help="rows per patched forward (default: automatic)")
    p.add_argument("--shard", default="none", choices=["none", "auto"],
                   help="'auto': split activation patching across the processes torchrun started (rank 0 writes)")
    p.add_argument("--resume-dir", default=None, help="keep finished patched runs here; a rerun resumes from them")
    p.add_argument("--chunk", type=positive_int, default=None,
                   help="AtP, AtP* and RelP over chunks of this many prompts (split across processes with --shard auto)")
    p.add_argument("--json", default=None, help="write the JSON here (default: stdout)")
    p.add_argument("--plot", default=None, help="heatmap PNG of the first method's scores")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Entry point of ``steer patch``: :func:`report`, exit status 0."""
    report(args)
    return 0


def report(args) -> dict:
    """Run the methods and emit JSON: per method the scores, node labels and time; with
    ``activation`` among the methods, Pearson/Spearman of each fast method and top-K recovery cost.
    Returns the JSON document."""
    import steer
    from steer.patching import ioi_task, load_task, patch

    model = steer.load(args.model)
    if args.task == "ioi":
        task = ioi_task(model, n=args.n)
    elif Path(args.task).exists():
        task = load_task(model, args.task)
    else:
        raise SystemExit(f"--task {args.task!r}: use 'ioi' or the path of a JSONL task file.")
    from steer.sweep import Shards

    shards = Shards.auto() if args.shard == "auto" else Shards()
    out = patch(model, task, args.nodes, args.method, args.direction, k=args.k, batch_size=args.batch_size,
                shards=shards, directory=args.resume_dir, chunk=args.chunk)
    doc = {"task": task.name, "model": model.name, "nodes": args.nodes, "direction": args.direction,
           "n_prompts": task.n_prompts, "methods": {m: r.to_dict() for m, r in out["results"].items()},
           "comparison": out["comparison"]}
    if shards.rank != 0:  # every rank holds the whole result; one writes it
        return doc
    if args.plot:
        first = next(iter(out["results"].values()))
        first.plot(args.plot)
        doc["plot"] = args.plot
    text = dumps(doc, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
        for m, r in out["results"].items():
            print(f"{m}: {r.seconds:.2f} s", file=sys.stderr)
        for m, c in out["comparison"].items():
            print(f"{m} vs activation: pearson {c['pearson']:.3f} spearman {c['spearman']:.3f} "
                  f"top-{c['topk_recovery']['k']} cost {c['topk_recovery']['cost']:.1f}", file=sys.stderr)
    else:
        print(text)
    return doc
