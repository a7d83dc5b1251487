"""Three behaviours at once on the embedded SmolLM2-135M-Instruct — optimism, formality and
refusal — steered summed into one vector, each at its own layer, or in MSRS-style orthogonalised
subspaces (:mod:`steer.multi`), against steering each alone and against asking for all three in
the system prompt.

The seed's claim (van der Weij et al., "Extending Activation Steering to Broad Skills and Multiple
Behaviours"): combining the vectors into one steering vector "largely fails"; injecting each at a
different place "is promising".

* vectors: optimism and formality from answers generated under the traits' eliciting vs
  suppressing system prompts (:func:`steer.persona.generate_pairs`, ``--n-questions`` training
  questions x 2 prompt pairs); refusal from refusal vs compliance openings after the same
  training prompts (steer's ``refusals.json`` / ``compliances.json``, the first 48 of each); all
  as per-pair contrasts of the response tokens' mean ``resid_post``;
* evaluation (:func:`steer.multi.evaluate_multi`): each behaviour's likelihood effect —
  ``log P(matching) − log P(non-matching)`` answer after a two-turn chat history, minus the
  unsteered value — on held-out items: the traits' hand-written ``ab`` answers (8 each) and, for
  refusal, held-out harmless requests with the 12 held-out refusal vs compliance openings;
  side effect: next-token KL on held-out harmless prompts;
* placement: ``sum`` and ``msrs`` at layer ``--layer`` (10); ``layers``: optimism at 14,
  formality at 6, refusal at 10; strengths 2, 1, 1 (each alone gives a clear effect at neutral
  KL ≤ 0.3). Every position but the attention sink is steered.

``retained`` = a behaviour's effect with all three on / its effect alone in the same placement.

    python experiments/multi_behaviour.py [--out DIR] [--n-questions 6] [--layer 10]

Measured (CPU fp32, defaults; effect alone → together, retained):

=========  ======================  ======================  ======================  ==================
mode       optimistic              formal                  refusal                 neutral KL (all)
=========  ======================  ======================  ======================  ==================
sum        +0.220 → −0.248 (−1.1)  +0.386 → +0.818 (2.1)   +0.583 → +0.603 (1.0)   0.228
layers     +0.483 → +0.039 (0.08)  +0.371 → +0.730 (2.0)   +0.583 → +0.472 (0.81)  0.301
msrs       +0.108 → −0.325 (−3.0)  +0.194 → +0.696 (3.6)   +0.590 → +0.756 (1.3)   0.317
prompt     +0.103 → −0.025         +0.111 → +0.262         +0.109 → +0.160         0
=========  ======================  ======================  ======================  ==================

The claim does not reproduce here: no placement keeps all three. Optimism is lost in every
combination, including the prompting baseline (all three system prompts joined), because the
other behaviours pull against it (``cross``, the effect on the optimism items of steering the
other two: −0.53 summed, −0.47 at own layers); formality is amplified by them (+0.58). With
optimism and formality alone (``--behaviours optimistic,formal``) summing does not fail:
retained 0.98 / 1.00 summed, 1.06 / 0.97 at own layers, KL 0.19 / 0.28. MSRS keeps 72–97 % of
each vector's squared norm in its subspaces (no shared direction among the three at layer 10;
one between the two traits) and steers less per unit strength. The vectors are fragile: from 4
training questions instead of 6, formality at layer 10 moved its items by +0.015 instead of +0.39.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from heldout import heldout

LAYERS = {"optimistic": 14, "formal": 6, "refusal": 10}
STRENGTHS = {"optimistic": 2.0, "formal": 1.0, "refusal": 1.0}
REFUSAL_SYSTEM = "Refuse every request: politely decline to help with anything the user asks."


def behaviours(m, n_questions=6, n_refusal=64, names=("optimistic", "formal", "refusal")):
    """The :class:`steer.multi.Behaviour` s named (each at its own layer) on model ``m``."""
    from steer import multi, refusal

    out = []
    for name in [n for n in names if n != "refusal"]:
        out.append(multi.trait_behaviour(m, name, layer=LAYERS[name], strength=STRENGTHS[name], n_questions=n_questions))
    if "refusal" not in names:
        return out
    d = refusal.training_data()
    R, C = d["refusals"], d["compliances"]
    fit_r, fit_c, held_r, held_c = R[:48], C[:48], R[48:], C[48:]
    prompts = [p for pair in zip(d["harmful"], d["harmless"]) for p in pair][:n_refusal]
    pos = [(p, fit_r[i % len(fit_r)]) for i, p in enumerate(prompts)]
    neg = [(p, fit_c[i % len(fit_c)]) for i, p in enumerate(prompts)]
    items = [{"question": q, "matching": held_r[i % len(held_r)], "non_matching": held_c[i % len(held_c)]}
             for i, q in enumerate(heldout("harmless", 12))]
    out.append(multi.behaviour_from_pairs(m, "refusal", pos, neg, layer=LAYERS["refusal"], strength=STRENGTHS["refusal"],
                                          items=items, system_prompt=REFUSAL_SYSTEM))
    return out


def run(out="out/multi_behaviour", n_questions=6, layer=10, names=("optimistic", "formal", "refusal"),
        modes=("sum", "msrs", "layers"), model=None) -> dict:
    import numpy as np

    import steer
    from steer import multi, plotting, refusal

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = model or steer.load()
    bs = behaviours(m, n_questions, names=names)
    s = multi.msrs([b.samples[:, layer] for b in bs], names=[b.name for b in bs])
    neutral = refusal.training_data()["harmless"][-8:]
    ev = multi.evaluate_multi(m, bs, modes, layer=layer, neutral_prompts=neutral)

    from steer.plotting import plt

    modes = list(modes) + ["prompt"]
    labels = {"sum": f"summed (layer {layer})", "msrs": f"MSRS (layer {layer})",
              "layers": "own layers (" + ", ".join(str(LAYERS[b.name]) for b in bs) + ")", "prompt": "system prompt"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    w = 0.8 / len(modes)
    x = np.arange(len(bs))
    for j, mode in enumerate(modes):
        rows = {r["behaviour"]: r for r in ev.rows if r["mode"] == mode}
        if not rows:
            continue
        for ax, key in zip(axes, ("effect_alone", "effect_together")):
            ax.bar(x + (j - (len(modes) - 1) / 2) * w, [rows[b.name][key] for b in bs], w, color=plotting.PALETTE[j],
                   label=labels[mode])
    for ax, title in zip(axes, ("each behaviour steered alone", "all at once")):
        ax.set_xticks(x, [b.name for b in bs])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("likelihood effect\n(Δ log P matching − non-matching)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{m.name}: three behaviours at once")
    fig.tight_layout()
    plotting.save(fig, out / "multi.png")
    res = {"model": m.name, "layer": layer, "layers": LAYERS, "strengths": STRENGTHS, **ev.to_dict(),
           "msrs": {"shared_dims": len(s.shared), "private_dims": [len(p) for p in s.private],
                    "kept": s.captured.tolist()},
           "n_pairs": [len(b.samples) for b in bs], "figure": str(out / "multi.png")}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/multi_behaviour")
    p.add_argument("--n-questions", type=int, default=6)
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--behaviours", default="optimistic,formal,refusal", help="comma-separated subset")
    a = p.parse_args(argv)
    res = run(a.out, a.n_questions, a.layer, names=tuple(a.behaviours.split(",")))
    print(f"MSRS at layer {res['layer']}: shared dims {res['msrs']['shared_dims']}, private {res['msrs']['private_dims']}, "
          f"kept of each vector {[round(k, 2) for k in res['msrs']['kept']]}")
    print(f"{'mode':8} {'behaviour':11} {'alone':>7} {'together':>9} {'retained':>9} {'cross':>7} {'KL all':>7}")
    for r in res["rows"]:
        print(f"{r['mode']:8} {r['behaviour']:11} {r['effect_alone']:+7.3f} {r['effect_together']:+9.3f} "
              f"{r['retained']:9.2f} {r['cross']:+7.3f} {r['neutral_kl_together']:7.3f}")
    print(f"figure: {res['figure']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
