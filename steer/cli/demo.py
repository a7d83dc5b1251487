"""``steer demo``: what steer does, end to end, on the embedded model (a few minutes on 2 CPUs)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import plotting


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end tour on the embedded model; figures + summary.json")
    p.add_argument("--model", default=None, help="model name (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="out/demo", help="folder for figures and summary.json")
    p.add_argument("--n", type=int, default=48, help="prompts per group for the separability curve")
    p.set_defaults(func=run)


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def run(args) -> int:
    import steer
    from steer.directions import sweep_layers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    t_all = time.time()

    _section("1. load")
    t0 = time.time()
    model = steer.load(args.model)
    summary["model"] = {"name": model.name, "n_layers": model.n_layers, "d_model": model.d_model,
                        "n_heads": model.n_heads, "load_s": round(time.time() - t0, 1)}
    print(model, f"loaded in {time.time() - t0:.1f} s")

    _section("2. capture: where do harmful and harmless instructions separate?")
    data = Path(steer.__file__).parent / "datasets"
    harmful = steer.load_prompts(data / "harmful.json")[:: max(1, 320 // args.n)][: args.n]
    harmless = steer.load_prompts(data / "harmless.json")[:: max(1, 320 // args.n)][: args.n]
    t0 = time.time()
    reads = {  # two places to read a prompt: its own words, and the template token after them
        "mean over instruction tokens": dict(positions="instruction", reduce="mean"),
        "last token (template)": dict(positions="last"),
    }
    seps = {}
    for label, kw in reads.items():
        a = steer.capture(model, harmful, layers="all", **kw)
        b = steer.capture(model, harmless, layers="all", **kw)
        seps[label] = sweep_layers(a.tensor, b.tensor, method="mean_diff")
    dt = time.time() - t0
    acc = {label: [r["accuracy"] for r in sep.rows] for label, sep in seps.items()}
    fig = plotting.layer_curve({f"{k} (acc)": v for k, v in acc.items()}, a.layers,
                               ylabel="held-out accuracy", mark_best="mean over instruction tokens (acc)",
                               title=f"{model.name}: harmful vs harmless, resid_post")
    png = plotting.save(fig, out / "separability.png")
    print(f"captured resid_post at {len(a.layers)} layers, {len(harmful)} + {len(harmless)} prompts, "
          f"two position choices in {dt:.1f} s -> tensors {tuple(a.tensor.shape)}")
    summary["separability"] = {"figure": str(png), "capture_s": round(dt, 1)}
    for label, sep in seps.items():
        best = sep.rows[sep.best_layer]
        print(f"  {label:30s} held-out accuracy by layer: " + " ".join(f"{x:.2f}" for x in acc[label]))
        print(f"  {'':30s} best layer {sep.best_layer}: accuracy {best['accuracy']:.2f}, AUROC {best['auroc']:.3f}")
        summary["separability"][label] = {"rows": sep.rows, "best_layer": sep.best_layer}
    print(f"  figure: {png}")

    _section("3. refusal: unsteered vs steered vs conditionally steered (CAST)")
    t0 = time.time()
    r = steer.refusal.demo(model, out)
    for kind, a in r["answers"].items():
        print(f"[{kind}] {a['prompt']}   (condition fired: {a['condition_fired']})")
        for mode in ("unsteered", "steered", "conditional"):
            print(f"  {mode:>11}: {a[mode].strip()[:110]!r}")
    print(f"  behaviour layer {r['behaviour_layer']}, strength {r['strength']}, condition layer "
          f"{r['condition_layer']}  [{r['layer_sweep_plot']}]  ({time.time() - t0:.0f} s)")
    summary["refusal"] = r

    _section("4. patching: which heads carry IOI?")
    t0 = time.time()
    steer.patching.demo_figure(model, out / "ioi_heads.png")
    print(f"  activation patching of every head's z, clean->corrupt  [{out / 'ioi_heads.png'}]  "
          f"({time.time() - t0:.0f} s)")
    summary["patching"] = {"figure": str(out / "ioi_heads.png"), "seconds": round(time.time() - t0, 1)}

    _section("5. bias: occupational gender gap before/after debiasing (held-out occupations)")
    t0 = time.time()
    b = steer.bias.demo(model, out)
    print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in b.items() if not isinstance(v, (dict, list))))
    print(f"  ({time.time() - t0:.0f} s)")
    summary["bias"] = b

    _section("6. persona: one answer steered along a trait vector")
    t0 = time.time()
    pz = steer.persona.demo(model, out)
    print(f"  trait {pz['trait']!r}, layer {pz['layer']}: {pz['question']}")
    for strength, text in pz["answers"].items():
        print(f"  {float(strength):+5.1f}: {text.strip()[:110]!r}")
    print(f"  ({time.time() - t0:.0f} s)")
    summary["persona"] = pz

    summary["total_s"] = round(time.time() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _section(f"done in {summary['total_s']} s — figures and summary.json in {out}/")
    return 0
