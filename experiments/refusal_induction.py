"""Refusal induction on the embedded SmolLM2-135M-Instruct with the refusal behaviour vector.

Writes to ``--out`` (default ``out/refusal_induction/``): ``strength_sweep.png`` (refusal log-odds
and generated refusal rate vs strength), ``layer_sweep.png`` (log-odds change and KL per layer),
``projection_hist.png`` (harmful vs harmless eval prompts on the harmfulness direction) and
``results.json``. Extraction uses steer's training prompts; evaluation uses experiments/data. Both
are taken one category after another (the files are sorted by category).

    python experiments/refusal_induction.py [--out DIR] [--n-train 64] [--n-eval 24]

Measured (CPU fp32, defaults; behaviour layer 10):

* refusal log-odds of the first answer token (24 + 24 evaluation requests) at α = 0 / 1 / 2 / 3:
  −2.60 / −1.17 / +0.27 / +1.30; refusal in 8 generated answers to harmless requests 0.00 / 0.38
  / 1.00 / 0.88, all readable;
* per layer at α = 2 (log-odds change, KL): layer 6 +1.43, 0.93; 10 +3.24, 2.07; 14 +3.40, 3.53;
* the harmfulness direction (last instruction token, layer 10) against the refusal vector:
  cosine 0.12, as the paper has them, nearly separate. It classifies the next 24 + 24 training
  prompts, held out and worded as the ones it was fitted on, at AUROC 0.81
  (``harmfulness_auroc_heldout_training``; the slow test holds ≥ 0.75 with 32 + 32 fitted, where
  it is 0.87, and |cosine| ≤ 0.3). But it does not transfer to the evaluation
  requests, which are written in an informal voice: AUROC 0.51 between harmful and harmless ones
  (Latent Guard at the midpoint: accuracy 0.48). Measured per layer on all 120 + 120 (fitted on
  64 + 64 training prompts), it separates held-out *training* prompts at 0.83 at layer 10 but the
  evaluation requests at 0.55, rising to 0.83 at layer 28; read at the prompt's last token
  instead, the evaluation requests separate at 0.77 (layer 10) to 0.94 (layer 24). A single
  token at the end of the user's words depends on how they end ("pls", no question mark).
  The CAST condition (``experiments/cast.py``) reads a prompt mean, fitted on informal copies
  too, for this reason.

With the files' first prompts instead (weapons, explosives and cybercrime evaluation requests;
as this script ran until stop 28): log-odds −2.51 / −1.29 / +0.09 / +1.15, refusal 0.00 / 0.25 /
1.00 / 0.88, harmfulness AUROC 0.57.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from heldout import heldout


def run(out="out/refusal_induction", n_train=64, n_eval=24, layer=10, strengths=(0.0, 1.0, 2.0, 3.0),
        layers=(4, 6, 8, 10, 12, 14, 16), gen_tokens=24, n_gen=8, model=None, n_harm=None, n_heldout=24) -> dict:
    """``n_train`` training prompts of each kind fit the harmfulness direction (``n_harm`` if given)
    and half as many the behaviour vector; the direction is also read on the next ``n_heldout``
    training prompts of each kind (held out, worded as it was fitted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import steer
    from steer import evaluate as E
    from steer import refusal
    from steer.directions import steering_sweep
    from steer.steering import steer as steer_ctx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model or steer.load()
    data = refusal.training_data(balanced=True)  # every category in any prefix
    H, S = data["harmful"][: n_train // 2], data["harmless"][: n_train // 2]
    layers = sorted(set(layers) | {layer})
    beh = refusal.behaviour_vector(model, H, S, n=n_train, layer=layer, layers=layers)
    eh, es = heldout("harmful", n_eval, balanced=True), heldout("harmless", n_eval, balanced=True)
    ids = E.refusal_token_ids(model.tokenizer)
    score = lambda lg: E.refusal_logodds(lg, ids)  # noqa: E731

    # strength sweep at the chosen layer: next-token log-odds on all eval prompts + generations
    rows = []
    for a in strengths:
        with steer_ctx(model, beh, layer=layer, strength=a) as s:
            lo = float(score(s.next_token_logits(eh + es)).mean())
            texts = s.generate(es[:n_gen], max_new_tokens=gen_tokens)
        rows.append({"strength": a, "logodds": lo, "refusal_harmless": E.refusal_rate(texts),
                     "readable": sum(map(E.is_readable, texts)) / len(texts), "example": texts[0]})
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot([r["strength"] for r in rows], [r["logodds"] for r in rows], marker="o")
    ax[0].set(xlabel="strength α", ylabel="refusal log-odds (next token)", title=f"layer {layer}")
    ax[1].plot([r["strength"] for r in rows], [r["refusal_harmless"] for r in rows], marker="o", label="refusal")
    ax[1].plot([r["strength"] for r in rows], [r["readable"] for r in rows], marker="s", label="readable")
    ax[1].set(xlabel="strength α", ylabel="rate (harmless eval prompts)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "strength_sweep.png", dpi=120)

    # layer sweep: behaviour change vs side effect
    sweep = steering_sweep(model, beh, es, es, score, layers, [strengths[len(strengths) // 2]])
    sweep.plot(out / "layer_sweep.png", keys=["change", "kl"])

    # harmfulness direction vs refusal behaviour vector, projection histogram of eval prompts
    n_harm = n_harm or n_train
    harm = refusal.harmfulness_direction(model, data["harmful"][:n_harm], data["harmless"][:n_harm], layer=layer)
    cap = lambda ps: steer.capture(model, ps, layers=[layer], positions="instruction_last", progress=False)  # noqa
    ph, ps_ = harm.project(cap(eh).tensor[:, 0]), harm.project(cap(es).tensor[:, 0])
    held = [data[k][n_harm:n_harm + n_heldout] for k in ("harmful", "harmless")]
    qh, qs = (harm.project(cap(p).tensor[:, 0]) for p in held)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(ph.numpy(), bins=20, alpha=0.6, label="harmful (eval)")
    ax.hist(ps_.numpy(), bins=20, alpha=0.6, label="harmless (eval)")
    ax.set(xlabel=f"projection on harmfulness direction, layer {layer}", ylabel="count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "projection_hist.png", dpi=120)
    thr = float((ph.mean() + ps_.mean()) / 2)
    result = {
        "layer": layer, "strength_sweep": rows, "layer_sweep": sweep.rows,
        "cos_harmfulness_refusal": harm.cosine(beh, layer),
        "harmfulness_auroc_eval": E.auroc(torch.cat([ph, ps_]), [1] * len(ph) + [0] * len(ps_)),
        "harmfulness_auroc_heldout_training": E.auroc(torch.cat([qh, qs]), [1] * len(qh) + [0] * len(qs)),
        "latent_guard_accuracy_eval_midpoint": E.accuracy(torch.cat([ph, ps_]) > thr, [1] * len(ph) + [0] * len(ps_)),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/refusal_induction")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=24)
    a = p.parse_args()
    r = run(a.out, a.n_train, a.n_eval)
    print(json.dumps({k: v for k, v in r.items() if k != "layer_sweep"}, indent=2))
