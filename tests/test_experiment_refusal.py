"""The experiments' claims, at small sizes (the full runs are the scripts themselves)."""

import pytest


@pytest.mark.slow
def test_refusal_induction_claim(smol, tmp_path):
    import refusal_induction

    r = refusal_induction.run(tmp_path, n_train=8, n_eval=4, strengths=(0.0, 1.0, 2.0), layers=(10,),
                              n_gen=4, gen_tokens=10, model=smol, n_harm=32, n_heldout=24)
    # "LLMs Encode Harmfulness and Refusal Separately": the harmfulness direction at the last
    # instruction token classifies held-out requests worded as its training ones, and is nearly
    # orthogonal to the refusal vector. (It does not transfer to the informally worded evaluation
    # requests: the script's docstring gives those figures.)
    assert r["harmfulness_auroc_heldout_training"] >= 0.75
    assert abs(r["cos_harmfulness_refusal"]) <= 0.3
    lo = [row["logodds"] for row in r["strength_sweep"]]
    assert lo[0] < lo[1] < lo[2]  # refusal log-odds grow monotonically with strength
    assert r["strength_sweep"][-1]["refusal_harmless"] >= 0.75  # induced refusal on harmless prompts
    assert r["strength_sweep"][0]["refusal_harmless"] <= 0.25
    for f in ("strength_sweep.png", "layer_sweep.png", "projection_hist.png", "results.json"):
        assert (tmp_path / f).exists()

@pytest.mark.slow
def test_cast_claim(smol, tmp_path):
    import cast

    # the harmfulness condition of `steer refusal` (probe, informal-voice copies, 5-fold CV, threshold at
    # out-of-fold recall 0.95), fitted on all training prompts at two candidate layers, transfers to 40+40
    # informally worded eval prompts written elsewhere: it fires on harmful ones and almost never on harmless
    r = cast.run(tmp_path, n_eval=40, n_gen=0, condition_layers=(12, 14), kind="probe", model=smol)
    assert r["eval_auroc"] >= 0.95
    assert r["eval_accuracy"] >= 0.9
    assert r["fired_harmful"] >= 0.85 and r["fired_harmless"] <= 0.10
    for f in ("condition_grid.png", "condition_scores_hist.png", "results.json"):
        assert (tmp_path / f).exists()
