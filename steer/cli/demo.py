"""``steer demo``: what steer does, end to end, on the embedded model (a few minutes on 2 CPUs)."""

from __future__ import annotations

import time
from pathlib import Path

from .. import plotting
from . import dumps, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="end-to-end tour on the embedded model; index.html report, figures, summary.json")
    p.add_argument("--model", default=None, help="model name (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", default="out/demo", help="folder for index.html, figures and summary.json")
    p.add_argument("--n", type=positive_int, default=48, help="prompts per group for the separability curve")
    p.set_defaults(func=run)


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def run(args) -> int:
    import steer
    from steer.directions import sweep_layers
    from steer.report import Report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    t_all = time.time()
    report = Report("steer demo", "What steer does, end to end, on one model. Every figure below was made by this run; "
                    "every number it quotes is in a table.")

    _section("1. load")
    t0 = time.time()
    model = steer.load(args.model)
    summary["model"] = {"name": model.name, "n_layers": model.n_layers, "d_model": model.d_model,
                        "n_heads": model.n_heads, "load_s": round(time.time() - t0, 1)}
    print(model, f"loaded in {time.time() - t0:.1f} s")
    sec = report.section("1. The model", "The model every later section runs on, as steer sees it.")
    sec.parts.append(model._html())
    sec.table(["step", "seconds"], [["load", summary["model"]["load_s"]]])

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
                               ylabel="held-out accuracy", title=f"{model.name}: harmful vs harmless, resid_post")
    ax = fig.axes[0]
    for i, (label, sep) in enumerate(seps.items()):  # the layer sweep_layers picks, as printed below
        ax.scatter([sep.best_layer], [acc[label][sep.best_layer]], s=80, zorder=3, color=plotting.PALETTE[i],
                   edgecolor="k", label=f"best ({label}): layer {sep.best_layer}")
    ax.legend(fontsize=7)
    png = plotting.save(fig, out / "separability.png")
    print(f"captured resid_post at {len(a.layers)} layers, {len(harmful)} + {len(harmless)} prompts, "
          f"two position choices in {dt:.1f} s -> tensors {tuple(a.tensor.shape)}")
    summary["separability"] = {"figure": str(png), "capture_s": round(dt, 1)}
    for label, sep in seps.items():
        best = sep.rows[sep.best_layer]
        print(f"  {label:30s} held-out accuracy by layer: " + " ".join(f"{x:.2f}" for x in acc[label]))
        print(f"  {'':30s} best layer {sep.best_layer}: accuracy {best['accuracy']:.2f}, AUROC {best['auroc']:.3f}")
        summary["separability"][label] = {"rows": sep.rows, "best_layer": sep.best_layer}
    print("  (best layer: highest held-out accuracy, ties broken by AUROC)")
    print(f"  figure: {png}")
    sec = report.section("2. Capture: where harmful and harmless instructions separate",
                         f"Residual-stream activations of {len(harmful)} harmful and {len(harmless)} harmless "
                         "instructions, read two ways; a mean-difference direction fitted per layer, scored on "
                         "held-out prompts. The best layer has the highest held-out accuracy, ties broken by AUROC.")
    sec.image(png, "held-out accuracy per layer; dots: each read's best layer")
    labels = list(seps)
    sec.table(["layer"] + [f"{k}: {c}" for k in labels for c in ("accuracy", "AUROC")],
              [[l] + [seps[k].rows[j][c] for k in labels for c in ("accuracy", "auroc")] for j, l in enumerate(a.layers)],
              caption="held-out accuracy and AUROC of the mean-difference direction at each layer")
    sec.table(["read", "best layer", "accuracy", "AUROC"],
              [[k, seps[k].best_layer, seps[k].rows[seps[k].best_layer]["accuracy"],
                seps[k].rows[seps[k].best_layer]["auroc"]] for k in labels])

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
    sec = report.section("3. Refusal: unsteered, steered, conditionally steered (CAST)",
                         "Greedy answers of the model alone, with the refusal direction added at every prompt, and "
                         "with it added only where the CAST condition (read from the prompt) fires. The condition is a "
                         "probe of harmful vs harmless prompts fitted on 64 + 64 training prompts of every category "
                         "and their informal-voice copies (experiments/cast.py fits it on all of them).")
    sec.side_by_side(["prompt", "condition fired", "unsteered", "steered", "conditional"],
                     [[a["prompt"], "yes" if a["condition_fired"] else "no", a["unsteered"].strip(),
                       a["steered"].strip(), a["conditional"].strip()] for a in r["answers"].values()])
    ho = r["condition_heldout"]
    print(f"  the condition fires on {ho['harmful']:.2f} of {ho['n_prompts']} held-out harmful prompts and "
          f"{ho['harmless']:.2f} of {ho['n_prompts']} harmless ones (as written and informal)")
    sec.table(["behaviour layer", "strength", "condition layer", "condition fires: held-out harmful",
               "held-out harmless"],
              [[r["behaviour_layer"], r["strength"], r["condition_layer"], ho["harmful"], ho["harmless"]]],
              caption=f"held out: {ho['n_prompts']} training prompts of each kind the condition was not fitted on, "
                      "every category, as written and in an informal voice")
    sec.image(r["layer_sweep_plot"], "harmfulness condition: out-of-fold separation per layer")
    sec.table(["layer", "accuracy", "AUROC"], [[x["layer"], x["accuracy"], x["auroc"]] for x in r["layer_sweep"]],
              caption="harmfulness condition per layer, out of fold (the figure above)")

    _section("4. patching: which heads carry IOI?")
    t0 = time.time()
    task = steer.patching.ioi_task(model, n=2)
    pr = steer.patching.activation_patch(model, task, "heads")
    plotting.save(pr.plot(title=f"IOI: patching each head's z (clean→corrupt, n=2, {pr.seconds:.0f}s)"),
                  out / "ioi_heads.png")
    top = pr.top_k(10)
    print(f"  activation patching of every head's z, clean->corrupt  [{out / 'ioi_heads.png'}]  "
          f"({time.time() - t0:.0f} s)")
    print("  top heads: " + ", ".join(f"{n.split(':')[1]} {v:+.3f}" for n, v in top[:5]))
    summary["patching"] = {"figure": str(out / "ioi_heads.png"), "seconds": round(time.time() - t0, 1),
                           "top_heads": top, "metric_clean": pr.meta["metric_clean"],
                           "metric_corrupt": pr.meta["metric_corrupt"]}
    sec = report.section("4. Patching: which heads carry indirect-object identification",
                         "Each head's output patched from the clean prompt into the corrupted one, all heads of all "
                         "layers batched; the score is the recovered fraction of the clean − corrupt logit difference.")
    sec.image(out / "ioi_heads.png", "activation patching score per head (red: restores the clean answer)")
    sec.table(["head", "score"], [[n.split(":")[1], v] for n, v in top], caption="the 10 heads with the largest |score|")
    sec.table(["clean logit diff", "corrupt logit diff", "seconds"],
              [[pr.meta["metric_clean"], pr.meta["metric_corrupt"], pr.seconds]])

    _section("5. bias: occupational gender gap before/after debiasing (held-out occupations)")
    t0 = time.time()
    b = steer.bias.demo(model, out)
    print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in b.items() if not isinstance(v, (dict, list))))
    print(f"  ({time.time() - t0:.0f} s)")
    summary["bias"] = b
    sec = report.section("5. Bias: occupational gender gap before and after debiasing",
                         "log P(he) − log P(she) after occupation templates, centred on a neutral subject, on held-out "
                         f"occupations, before and after the {b['method']} edit fitted on the training occupations.")
    sec.image(b["figure"], "centred gap per occupation, sorted by the share of women in it")
    sec.table(["measure", "value"], [[k, v] for k, v in b.items() if isinstance(v, float)])

    _section("6. persona: one answer steered along a trait vector")
    t0 = time.time()
    pz = steer.persona.demo(model, out)
    print(f"  trait {pz['trait']!r}, layer {pz['layer']}: {pz['question']}")
    for strength, text in pz["answers"].items():
        print(f"  {float(strength):+5.1f}: {text.strip()[:110]!r}")
    for r in pz["evaluation"]["rows"]:
        print(f"  {r['setting']:>9}: trait-answer effect {r['effect']:+.3f} (d {r['effect_d']:+.2f}), "
              f"neutral KL {r['neutral_kl']:.4f}")
    print(f"  ({time.time() - t0:.0f} s)")
    summary["persona"] = pz
    sec = report.section("6. Persona: one answer steered along a trait vector",
                         f"The {pz['trait']!r} persona vector (layer {pz['layer']}) added with a negative, zero and "
                         "positive strength to the answer of one question.")
    sec.side_by_side(["strength", "answer"], [[float(k), v.strip()] for k, v in pz["answers"].items()],
                     caption=pz["question"])
    ev = pz["evaluation"]
    cols = ["setting", "effect", "effect_d", "matching_rate", "neutral_kl", "ppl_ratio"]
    sec.table(cols, [[r[c] for c in cols] for r in ev["rows"]],
              caption=f"likelihood of the trait's answers over the opposite ones on {ev['n_items']} items after a "
                      "two-turn history (effect: change from unsteered; 'prompt': the trait asked for in the system "
                      "prompt instead of steering; neutral_kl: next-token KL on other prompts)")

    _section("7. beyond one vector: Linear-AcT against mean difference (refusal, held-out harmless prompts)")
    t0 = time.time()
    tr = steer.transport.demo(model, out)
    for method, rows in tr["curves"].items():
        print(f"  {method:<20} " + "  ".join(f"{r['strength']:g}: effect {r['effect']:+.3f} KL {r['kl']:.4f}"
                                             for r in rows))
    print(f"  [{tr['figure']}]  ({time.time() - t0:.0f} s)")
    summary["transport"] = tr
    sec = report.section("7. Beyond one vector: Linear-AcT against mean difference",
                         f"Both fitted at layer {tr['layer']} on {tr['n_fit']} harmful and harmless prompts and used "
                         f"to induce refusal on {tr['n_eval']} held-out harmless ones: the rise of the refusal "
                         "log-odds of the first answer token against the next-token KL on other harmless prompts. "
                         "experiments/ holds the full runs of every method of this kind (transport, LinEAS, "
                         "several behaviours at once, RepIt, FASB, EAST) with their measured results.")
    sec.image(tr["figure"], "behaviour effect against side effect, one point per strength")
    sec.table(["method", "strength", "effect", "neutral KL", "mean difference at same KL"],
              [[m_, r["strength"], r["effect"], r["kl"], r.get("reference_effect_at_same_kl")]
               for m_, rows in tr["curves"].items() for r in rows])

    _section("8. diagnostics: massive activations and a logit lens of an IOI prompt")
    t0 = time.time()
    from steer import diagnostics as D

    ioi = steer.patching.ioi_task(model, n=4)
    texts = [steer.Raw(t) for t in ioi.clean.texts]
    ma = D.massive_activations(model, texts)
    ma.plot(out / "massive.png")
    pk = ma.peak()
    io, s_ = int(ioi.metric.answer_ids[0]), int(ioi.metric.wrong_ids[0])
    lens = D.logit_lens(model, texts[:1], targets=[io, s_], k=3)
    lens.plot(path=out / "logit_lens.png", target_names=[f"IO {model.tokenizer.decode([io])!r}",
                                                         f"S {model.tokenizer.decode([s_])!r}"])
    diff = (lens.target_logprobs[0, :, 0, 0] - lens.target_logprobs[0, :, 0, 1]).tolist()
    print(f"  peak activation {pk['value']:,.0f} at layer {pk['layer']}, dim {pk['dim']}, token {pk['token']!r} "
          f"(median {pk['median']:.2f}); attention on it {float(ma.attention_mass.mean()):.2f} "
          f"(uniform {float(ma.uniform_mass.mean()):.2f})  [{out / 'massive.png'}]")
    print(f"  logit lens of {ioi.clean.texts[0]!r}: IO - S log-prob by layer "
          + " ".join(f"{x:+.1f}" for x in diff[::3]) + f"  [{out / 'logit_lens.png'}]  ({time.time() - t0:.0f} s)")
    summary["diagnostics"] = {"massive": ma.to_dict(), "lens": lens.to_dict(), "io_minus_s_by_layer": diff}
    sec = report.section("8. Diagnostics: massive activations and a logit lens",
                         "The largest residual-stream activations of four IOI prompts per layer (against the "
                         "median) and the attention each head puts on their positions; then each layer of the "
                         "first prompt decoded through the final norm and unembedding.")
    sec.image(out / "massive.png", "largest and median |activation| per layer; mean attention on the massive positions")
    sec.table(["layer", "dim", "positions", "tokens", "max |a|", "ratio to median", "spread across prompts (cv)"],
              [[e["layer"], e["dim"], e["positions"], e["tokens"], e["max_abs"], e["ratio_to_median"],
                e["cv_across_prompts"]] for e in ma.entries if e["layer"] % 5 == 0],
              caption="massive entries (|a| ≥ 100 and ≥ 1000x the median), every fifth layer")
    sec.image(out / "logit_lens.png", "top-1 token per layer at the last position, and log P(IO), log P(S) per layer")
    sec.table(["layer", "top-1", "p", "top-3", "entropy", "P(IO)", "P(S)"], lens.table(0, -1)[::3],
              caption=ioi.clean.texts[0])

    summary["total_s"] = round(time.time() - t_all, 1)
    (out / "summary.json").write_text(dumps(summary, indent=1, default=str))
    report.subtitle += f" Total run time {summary['total_s']} s."
    page = report.write(out / "index.html")
    _section(f"done in {summary['total_s']} s — figures and summary.json in {out}/")
    print(f"report: {page.resolve()}")
    return 0
