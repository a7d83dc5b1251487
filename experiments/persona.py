"""Persona vectors on a model: extraction, monitoring (projection vs trait score) and steering.

    python experiments/persona.py [--model M] [--traits optimistic,evil] [--out out/persona] [--quick]

For each trait: generate answers under the eliciting/suppressing system prompts (training
questions), filter the pairs with the built-in contrast scorer, extract the persona vector, then

* monitoring: held-out questions under every system prompt; x = projection of the last prompt
  token on v̂, y = the trait score of the answer the model then gives (built-in contrast scorer);
  AUROC of x between eliciting and suppressing prompts;
* graded monitoring (the paper's measure): the held-out questions under system prompts of five
  intensities (:func:`steer.persona.graded_prompts`: suppressing, mildly suppressing, none,
  mildly eliciting, eliciting), Pearson r between the projection and the answer's trait score;
* layer curve: that AUROC per layer;
* steering: built-in trait score (A/B answers) at several strengths; one steered answer each.

Writes ``results.json`` and per trait ``<trait>_monitor.png``, ``<trait>_graded.png``,
``<trait>_steering.png``, ``<trait>_layers.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--traits", default="optimistic,evil")
    ap.add_argument("--out", default="out/persona")
    ap.add_argument("--strengths", default="-4,-2,0,2,4")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="few questions and prompt pairs, short answers")
    args = ap.parse_args(argv)

    import torch

    import steer
    from steer import persona, plotting
    from steer.plotting import layer_curve, plt, save

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = steer.load(args.model)
    strengths = [float(s) for s in args.strengths.split(",")]
    n_q, ks, n_tok = (4, [0, 1], 16) if args.quick else (None, None, 32)
    res: dict = {"model": model.name, "quick": args.quick, "traits": {}}
    for name in args.traits.split(","):
        t = persona.load_trait(name)
        qs = t.train_questions[:n_q] if n_q else t.train_questions
        pairs = persona.generate_pairs(model, t, qs, prompt_pairs=ks, max_new_tokens=n_tok)
        scorer = persona.contrast_scorer(model, t)
        vec = persona.extract(model, t, pairs, scorer=scorer, layer=args.layer)
        L = vec.layer
        print(f"[{time.time() - t0:.0f}s] {name}: {vec.meta['n_pairs']}/{len(pairs)} pairs kept, layer {L}", flush=True)

        # monitoring: projection of the last prompt token vs the trait score of the answer
        hq = t.heldout_questions[:3] if args.quick else t.heldout_questions
        mon = persona.monitor(model, t, vec, L, hq)
        sys_prompts = (t.positive[: len(ks)] + t.negative[: len(ks)]) if ks else (t.positive + t.negative)
        idx = [(s, q) for q in hq for s in range(len(sys_prompts))]
        prompts = [[{"role": "system", "content": sys_prompts[s]}, {"role": "user", "content": q}] for s, q in idx]
        tr = persona.trace(model, vec, L, prompts, max_new_tokens=n_tok)
        half = len(sys_prompts) // 2
        items = [(q, tx.strip() or "...", s % half) for (s, q), tx in zip(idx, tr["texts"])]
        scores = scorer.batch(items)
        x = tr["projections"][:, 0]
        r_proj = float(torch.corrcoef(torch.stack([x, scores]))[0, 1])
        fig, ax = plt.subplots(figsize=(5, 4))
        lab = torch.tensor([s < half for s, _ in idx])
        ax.scatter(x[lab], scores[lab], label="eliciting system prompt", s=14)
        ax.scatter(x[~lab], scores[~lab], label="suppressing system prompt", s=14)
        ax.set_xlabel(f"projection of last prompt token on v̂ (layer {L})")
        ax.set_ylabel("trait score of the answer (contrast scorer)")
        ax.set_title(f"{name}: monitoring (AUROC {mon['auroc']:.2f}, r {r_proj:+.2f})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, out / f"{name}_monitor.png")

        # the paper's measure: graded system prompts (−2 suppressing … +2 eliciting), Pearson r
        graded = persona.monitor_graded(model, t, vec, L, hq, pairs=ks or [0, 1], max_new_tokens=n_tok, scorer=scorer)
        fig, ax = plt.subplots(figsize=(5, 4))
        lv = torch.tensor(graded["level"])
        for j, lev in enumerate(persona.GRADED_LEVELS):
            sel = lv == lev
            ax.scatter(torch.tensor(graded["projection"])[sel], torch.tensor(graded["score"])[sel], s=14,
                       color=plotting.PALETTE[j], label=f"system prompt level {lev:+d}")
        ax.set_xlabel(f"projection of last prompt token on v̂ (layer {L})")
        ax.set_ylabel("trait score of the answer (contrast scorer)")
        ax.set_title(f"{name}: graded system prompts, Pearson r {graded['pearson_r']:+.2f}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save(fig, out / f"{name}_graded.png")

        curve = persona.layer_curve(model, t, vec, hq)
        save(layer_curve({"held-out AUROC": curve.column("auroc")}, curve.layers, ylabel="AUROC",
                         title=f"{name}: where the persona is encoded", mark_best="held-out AUROC"),
             out / f"{name}_layers.png")

        ts = {a: persona.trait_score(model, t, vec, L, a) for a in strengths}
        vals = [ts[a] for a in sorted(strengths)]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(sorted(strengths), vals, marker="o")
        ax.set_xlabel("steering strength α (+α·v on response tokens)")
        ax.set_ylabel("trait score (A/B log-prob gap)")
        ax.set_title(f"{name}: steering, layer {L}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save(fig, out / f"{name}_steering.png")
        q = t.heldout_questions[0]
        answers = {str(a): persona.steered_answers(model, vec, L, [q], a, max_new_tokens=n_tok)[0]
                   for a in (min(strengths), 0.0, max(strengths))}
        res["traits"][name] = {
            "layer": L, "n_pairs": vec.meta["n_pairs"], "n_pairs_generated": len(pairs),
            "monitor_auroc": mon["auroc"], "projection_vs_score_r": r_proj,
            "graded_pearson_r": graded["pearson_r"], "graded_level_means": graded["level_means"],
            "layer_curve": curve.column("auroc"), "best_layer": curve.best_layer,
            "trait_score_by_strength": {str(a): ts[a] for a in sorted(strengths)},
            "steering_monotonic": all(b > a for a, b in zip(vals, vals[1:])),
            "question": q, "answers": answers,
        }
        print(f"[{time.time() - t0:.0f}s] {name}: monitor AUROC {mon['auroc']:.3f} (best layer {curve.best_layer} "
              f"{max(curve.column('auroc')):.3f}), proj~score r {r_proj:+.2f}, graded r {graded['pearson_r']:+.2f}, trait score "
              + " ".join(f"{a:+g}:{ts[a]:+.3f}" for a in sorted(strengths)), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
