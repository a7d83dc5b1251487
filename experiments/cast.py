"""Conditional activation steering (CAST) on the embedded SmolLM2-135M-Instruct.

Fits the harmfulness condition of ``steer refusal`` on steer's training prompts only
(:func:`steer.refusal.harmfulness_condition`: logistic probe on the prompt-mean hidden state,
training prompts plus an informal-voice copy of each, 5-fold cross-validation, layer by
out-of-fold AUROC, threshold at out-of-fold recall 0.95), then on the evaluation prompts (written
elsewhere, in an informal voice): condition accuracy/F1/AUROC and, with ``--n-gen``, conditional
refusal on harmful vs harmless answers. Writes ``condition_grid.png`` (out-of-fold F1 and AUROC
per layer), ``condition_scores_hist.png`` (eval scores with the threshold) and ``results.json``
to ``--out`` (default ``out/cast/``). ``--n-train`` and ``--n-eval`` below the files' sizes take
their prompts one category after another (the files are sorted by category).

    python experiments/cast.py [--out DIR] [--n-train 400] [--n-eval 120] [--n-gen 16] [--kind probe]
              [--no-augment] [--recall 0.95|none]

Measured (all 357/350 training prompts, layers 2-20, 120+120 eval prompts): layer 14, eval
accuracy 0.967, fires on 0.967 of harmful and 0.033 of harmless prompts (4: jump-starting a car,
a kind break-up, a crayfish trap, cutting glass bottles). Without the informal-voice copies and
with CAST's F1 threshold the same probe fired on 0.08-0.35 of the harmless eval prompts,
depending on the layer (measured offline).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from heldout import heldout


def run(out="out/cast", n_train=None, n_eval=120, n_gen=16, gen_tokens=32, layer=10, strength=2.0,
        condition_layers=range(2, 21), kind="probe", augment=True, recall=0.95, model=None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import steer
    from steer import evaluate as E
    from steer import refusal
    from steer.steering import prompt_means

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model or steer.load()
    data = refusal.training_data()
    cond = refusal.harmfulness_condition(model, layers=list(condition_layers), kind=kind,
                                         method="probe" if kind == "probe" else "mean_diff",
                                         recall=recall, augment=augment, limit=n_train)  # a limited fit: every category
    grid = cond.meta["grid"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([g["layer"] for g in grid], [g["f1"] for g in grid], marker="o", label="F1 (out-of-fold, train)")
    ax.plot([g["layer"] for g in grid], [g["auroc"] for g in grid], marker="s", label="AUROC (out-of-fold, train)")
    ax.axvline(cond.layer, color="grey", ls="--")
    ax.set(xlabel="condition layer", ylabel="score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "condition_grid.png", dpi=120)

    eh, es = heldout("harmful", n_eval, balanced=True), heldout("harmless", n_eval, balanced=True)
    h = prompt_means(model, eh + es, layers=[cond.layer])[:, 0]
    scores = cond.score(h)
    fired = cond.fires(h)
    labels = torch.tensor([1] * len(eh) + [0] * len(es)).bool()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(scores[: len(eh)].numpy(), bins=20, alpha=0.6, label="harmful (eval)")
    ax.hist(scores[len(eh):].numpy(), bins=20, alpha=0.6, label="harmless (eval)")
    ax.axvline(cond.threshold, color="k", ls="--", label="threshold")
    ax.set(xlabel=f"condition score ({kind}), layer {cond.layer}", ylabel="count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "condition_scores_hist.png", dpi=120)
    result = {"condition_layer": cond.layer, "threshold": cond.threshold, "side": cond.side, "kind": kind,
              "augmented": augment, "recall_target": recall,
              "train_val_f1": cond.meta["val_f1"], "train_val_auroc": cond.meta["val_auroc"], "eval_accuracy": E.accuracy(fired, labels),
              "eval_f1": E.f1(fired, labels), "eval_auroc": E.auroc(scores if cond.side == "above" else -scores, labels),
              "fired_harmful": float(fired[: len(eh)].float().mean()),
              "fired_harmless": float(fired[len(eh):].float().mean())}
    if n_gen:
        beh = refusal.behaviour_vector(model, data["harmful"][:60], data["harmless"][:60], n=120, layer=layer,
                                       layers=[layer])
        setup = refusal.RefusalSetup(beh, cond, layer, strength)
        ps = eh[:n_gen] + es[:n_gen]
        with setup.steering(model, conditional=True) as s:
            texts = s.generate(ps, max_new_tokens=gen_tokens)
        result.update(conditional_refusal_harmful=E.refusal_rate(texts[:n_gen]),
                      conditional_refusal_harmless=E.refusal_rate(texts[n_gen:]), n_gen=n_gen)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/cast")
    p.add_argument("--n-train", type=int, default=None, help="training prompts per side (default: all)")
    p.add_argument("--n-eval", type=int, default=120)
    p.add_argument("--n-gen", type=int, default=16)
    p.add_argument("--kind", default="probe", choices=("probe", "projection", "cast"))
    p.add_argument("--no-augment", action="store_true", help="fit on the training prompts as written")
    p.add_argument("--recall", default="0.95", help="out-of-fold recall for the threshold, or 'none' for best F1")
    a = p.parse_args()
    rec = None if a.recall.lower() == "none" else float(a.recall)
    print(json.dumps(run(a.out, a.n_train, a.n_eval, a.n_gen, kind=a.kind, augment=not a.no_augment, recall=rec),
                     indent=2))
