"""The experiments' claims, at small sizes (the full runs are the scripts themselves)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments"))


@pytest.mark.slow
def test_refusal_induction_claim(smol, tmp_path):
    import refusal_induction

    r = refusal_induction.run(tmp_path, n_train=8, n_eval=4, strengths=(0.0, 1.0, 2.0), layers=(10,),
                              n_gen=4, gen_tokens=10, model=smol)
    lo = [row["logodds"] for row in r["strength_sweep"]]
    assert lo[0] < lo[1] < lo[2]  # refusal log-odds grow monotonically with strength
    assert r["strength_sweep"][-1]["refusal_harmless"] >= 0.75  # induced refusal on harmless prompts
    assert r["strength_sweep"][0]["refusal_harmless"] <= 0.25
    for f in ("strength_sweep.png", "layer_sweep.png", "projection_hist.png", "results.json"):
        assert (tmp_path / f).exists()


@pytest.mark.slow
def test_cast_claim(smol, tmp_path):
    import cast

    # logistic-probe condition fitted on 120+120 training prompts, layer picked between 10 and 15 by
    # held-out training F1; its threshold transfers to the informal eval prompts (measured offline:
    # layer 15, eval accuracy 0.97 on 16+16, AUROC 1.0)
    r = cast.run(tmp_path, n_train=120, n_eval=16, n_gen=0, condition_layers=(10, 15), kind="probe", model=smol)
    assert r["eval_auroc"] >= 0.95
    assert r["eval_accuracy"] >= 0.9
    assert r["fired_harmful"] >= 0.9 and r["fired_harmless"] <= 0.15
    for f in ("condition_grid.png", "condition_scores_hist.png", "results.json"):
        assert (tmp_path / f).exists()
