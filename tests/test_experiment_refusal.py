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

    r = cast.run(tmp_path, n_train=24, n_eval=16, n_gen=0, condition_layers=(8, 10), model=smol)
    # the condition ranks held-out eval prompts well (measured AUROC 0.91), but its training-set
    # threshold does not transfer to the differently worded eval set (accuracy target not met yet)
    assert r["eval_auroc"] >= 0.85
    for f in ("condition_grid.png", "condition_scores_hist.png", "results.json"):
        assert (tmp_path / f).exists()
