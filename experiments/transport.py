"""Linear-AcT against mean-difference steering on the embedded SmolLM2-135M-Instruct: inducing
refusal on harmless prompts, as a Pareto curve of behaviour effect against side effect.

Both are fitted on the same prompts (steer's training prompts, ``--n-fit`` harmful and harmless,
at the chat template's post-instruction tokens, layer ``--layer``) and applied at every position
but the attention sink:

* **Linear-AcT** (Rodriguez et al., 2024; :mod:`steer.transport`): per-unit affine maps carrying
  the harmless activations' quantiles onto the harmful ones', at strength ``λ ∈ [0, 1]``;
* **mean difference**: ``+α (μ_harmful − μ_harmless)``.

Behaviour effect: the rise of the refusal log-odds of the first answer token (Arditi et al.'s
refusal score, a likelihood, not sampled text) on held-out harmless prompts. Side effect: mean
next-token KL on other held-out harmless prompts. At each AcT point the mean-difference effect at
the same KL is read off its curve (linear interpolation). Writes ``pareto.png`` and
``results.json`` to ``--out`` (default ``out/transport/``).

    python experiments/transport.py [--out DIR] [--n-fit 64] [--n-eval 24] [--layer 10]

* **LinEAS** (:func:`steer.transport.fit_lineas`): the same affine family at layers 6, 8 and 10,
  fitted jointly (60 Adam steps from the Linear-AcT maps) on the summed per-layer Wasserstein
  loss, at strength ``λ``.

Measured (n-fit 64, n-eval 24, layer 10, CPU fp32). steer's prompt files are sorted by category,
so the prompts are taken one category after another (``training_data(balanced=True)``): the fit,
evaluation and neutral sets each hold every category of their kind. The two curves are close in
effect per unit of strength (λ = 1: +0.195 at KL 0.0101; α = 1: +0.167 at KL 0.0063), and at
equal KL AcT's effect is 0.92-0.98x mean difference's (λ = 1 .. 0.25): AcT's claim of a better
trade-off does not reproduce in this setting. ω averages 0.99, so the maps are mostly the mean
shift; what they add (per-unit rescaling) costs side effect without adding refusal. LinEAS does
worse: its joint loss falls from 0.00726 to 0.00463 in 60 steps from the Linear-AcT start, its
effect at λ = 1 is +0.179 at KL 0.0166, and at equal KL it reaches 0.64-0.70x mean difference's.
The target (at equal KL, at least mean difference's effect) is not met by either transport method.

With the files' first prompts instead (fitted on weapons, explosives and cybercrime against
cooking, travel and science requests; evaluated on the last harmless categories), as this
experiment ran until stop 28: λ = 1 +0.376 at KL 0.0148, α = 1 +0.376 at KL 0.0101; AcT 0.85-0.88x
and LinEAS 0.56-0.65x mean difference's effect at equal KL (LinEAS loss 0.00924 → 0.00907).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(out="out/transport", n_fit=64, n_eval=24, layer=10, lambdas=(0.25, 0.5, 0.75, 1.0),
        alphas=(0.25, 0.5, 1.0, 1.5, 2.0), lineas_layers=(6, 8, 10), lineas_steps=60, model=None) -> dict:
    import steer
    from steer import evaluate as E
    from steer import plotting, refusal
    from steer.steering import Steering, steer as steer_ctx
    from steer.transport import fit_lineas, fit_linear_act, transport

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = model or steer.load()
    data = refusal.training_data(balanced=True)  # the files are sorted by category: every split covers them all
    H, S = data["harmful"], data["harmless"]
    if len(S) < n_fit + 2 * n_eval:
        raise ValueError(f"{len(S)} harmless prompts: too few for n_fit={n_fit} + 2 x n_eval={n_eval}.")
    fit_h, fit_s = H[:n_fit], S[:n_fit]
    eval_s, neutral = S[-n_eval:], S[-2 * n_eval:-n_eval]  # held out from the fit

    maps = fit_linear_act(m, fit_s, fit_h, layers=[layer], positions="post_instruction", progress=False)
    lin = fit_lineas(m, fit_s, fit_h, layers=lineas_layers, positions="post_instruction", steps=lineas_steps,
                     progress=False) if lineas_steps else []
    a = steer.capture(m, fit_h, layers=[layer], positions="post_instruction", reduce="mean", progress=False)
    b = steer.capture(m, fit_s, layers=[layer], positions="post_instruction", reduce="mean", progress=False)
    v = a.tensor[:, 0].mean(0) - b.tensor[:, 0].mean(0)

    base = refusal.refusal_scores(m, eval_s)
    curves = {"mean difference (α)": {al: steer_ctx(m, v, layer=layer, strength=al) for al in alphas},
              "Linear-AcT (λ)": {lam: Steering(m, transport(maps, lam)) for lam in lambdas}}
    if lin:
        curves["LinEAS, layers " + ", ".join(map(str, lineas_layers)) + " (λ)"] = {
            lam: Steering(m, transport(lin, lam)) for lam in lambdas}
    p = E.pareto(m, curves, lambda st: float((refusal.refusal_scores(m, eval_s, st) - base).mean()), neutral,
                 name=f"{m.name}: inducing refusal (layer {layer})")
    md, act, *rest = [[{("alpha" if i == 0 else "lambda"): r["strength"], **r} for r in rows]
                      for i, rows in enumerate(p.curves.values())]
    lineas = rest[0] if rest else []
    for rows in (act, lineas):
        for r in rows:
            r["mean_diff_effect_at_same_kl"] = r.pop("reference_effect_at_same_kl")
    plotting.save(p.plot(xlabel="side effect: next-token KL on held-out harmless prompts",
                         ylabel="refusal log-odds rise (held-out harmless)"), out / "pareto.png")
    res = {"model": m.name, "layer": layer, "n_fit": n_fit, "n_eval": n_eval, "base_refusal_score": float(base.mean()),
           "omega_mean": float(maps[0].omega.mean()), "beta_abs_mean": float(maps[0].beta.abs().mean()),
           "linear_act": act, "mean_difference": md, "lineas": lineas, "lineas_layers": list(lineas_layers),
           "lineas_loss": [lin[0].meta["loss_first"], lin[0].meta["loss_last"]] if lin else None,
           "figure": str(out / "pareto.png")}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/transport")
    p.add_argument("--n-fit", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=24)
    p.add_argument("--layer", type=int, default=10)
    a = p.parse_args(argv)
    res = run(a.out, a.n_fit, a.n_eval, a.layer)
    for r in res["linear_act"]:
        same = r["mean_diff_effect_at_same_kl"]
        print(f"AcT λ={r['lambda']:<4g} effect {r['effect']:+.3f}  KL {r['kl']:.4f}  mean-diff at same KL: "
              + ("outside its range" if same is None else f"{same:+.3f}"))
    for r in res["lineas"]:
        same = r["mean_diff_effect_at_same_kl"]
        print(f"LinEAS λ={r['lambda']:<4g} effect {r['effect']:+.3f}  KL {r['kl']:.4f}  mean-diff at same KL: "
              + ("outside its range" if same is None else f"{same:+.3f}"))
    for r in res["mean_difference"]:
        print(f"mean-diff α={r['alpha']:<4g} effect {r['effect']:+.3f}  KL {r['kl']:.4f}")
    print(f"figure: {res['figure']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
