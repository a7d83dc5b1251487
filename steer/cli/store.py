"""``steer store``: capture a prompt file into an activation store on disk; writes JSON.

    steer store --prompts prompts.jsonl --out acts/ --layers all --site resid_post --positions last
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m steer store --prompts p.jsonl --out acts/ --shard auto
"""

from __future__ import annotations

from . import positive_int


def add_parser(subparsers):
    """Register the ``store`` subcommand."""
    p = subparsers.add_parser("store", help="capture activations of a prompt file into an ActivationStore")
    p.add_argument("--prompts", required=True, help="JSON / JSONL prompt file (steer.load_prompts)")
    p.add_argument("--key", default="instruction", help="field holding the prompt in JSON objects")
    p.add_argument("--out", required=True, help="the store's directory (a rerun resumes an interrupted write)")
    p.add_argument("--model", default=None, help="model name for steer.load (default: embedded SmolLM2)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layer numbers")
    p.add_argument("--site", default="resid_post", help="a site, or several comma-separated (steer.SITES)")
    p.add_argument("--positions", default="last", help="a position selector name: last, all, post_instruction, ...")
    p.add_argument("--reduce", default=None, choices=[None, "mean"], help="'mean': average the selected tokens")
    p.add_argument("--no-sink", action="store_true", help="leave the first (attention-sink) token out")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="prompts per shard file")
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts per forward")
    p.add_argument("--shard", default="none", choices=["none", "auto"],
                   help="'auto': split the shards across the processes torchrun started")
    p.add_argument("--json", default=None, help="also write the summary here")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Entry point of ``steer store``: write (or finish) the store; rank 0 prints its summary."""
    import steer
    from steer.cli import emit
    from steer.positions import NAMED
    from steer.store import ActivationStore
    from steer.sweep import Shards

    if args.layers == "all":
        layers = "all"
    else:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            layers = []
        if not layers:
            raise SystemExit(f"steer store: --layers {args.layers!r}: give 'all' or comma-separated integers like 0,4,8.")
    if args.positions not in NAMED:
        raise SystemExit(f"steer store: --positions {args.positions!r}: use one of {', '.join(NAMED)}.")
    try:
        prompts = steer.load_prompts(args.prompts, key=args.key)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"steer store: cannot read --prompts: {e}")
    model = steer.load(args.model)
    if layers != "all" and not all(-model.n_layers <= l < model.n_layers for l in layers):
        raise SystemExit(f"steer store: --layers {args.layers!r}: the model has layers 0..{model.n_layers - 1}.")
    shards = Shards.auto() if args.shard == "auto" else Shards()
    try:
        store = ActivationStore.write(model, prompts, args.out, layers=layers, site=args.site.split(","),
                                      positions=args.positions, reduce=args.reduce, include_sink=not args.no_sink,
                                      shard_size=args.shard_size, batch_size=args.batch_size, shards=shards)
    except ValueError as e:
        raise SystemExit(f"steer store: {e}")
    if shards.rank == 0:
        ix = store.index
        emit({"path": str(store.path), "model": ix["model"], "sites": ix["sites"], "layers": ix["layers"],
              "positions": ix["positions"], "reduce": ix["reduce"], "n_prompts": len(store),
              "shards": len(ix["shards"]), "dtype": ix["dtype"], "world": shards.world}, args.json)
    return 0
