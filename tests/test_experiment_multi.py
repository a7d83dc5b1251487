"""experiments/multi_behaviour.py on the embedded model (a reduced run: optimism and formality):
each vector steers its behaviour alone in both placements, the results hold the combined effect,
the cross-talk and the prompting baseline, and the MSRS decomposition is orthogonal."""

import importlib.util
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.spec_from_file_location("multi_exp", Path(__file__).resolve().parents[1] / "experiments" / "multi_behaviour.py")
exp = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(exp)


@pytest.mark.slow
def test_two_behaviours_summed_and_at_their_own_layers(smol, tmp_path):
    res = exp.run(tmp_path, n_questions=6, names=("optimistic", "formal"), modes=("sum", "layers"), model=smol)
    rows = {(r["mode"], r["behaviour"]): r for r in res["rows"]}
    for mode in ("sum", "layers"):
        for b in ("optimistic", "formal"):
            r = rows[(mode, b)]
            assert r["effect_alone"] > 0.05, r  # each vector moves its own behaviour's likelihoods
            assert r["neutral_kl_together"] > 0
    assert rows[("prompt", "optimistic")]["effect_alone"] > 0  # the baseline is there and does something
    assert (tmp_path / "multi.png").exists() and res["msrs"]["private_dims"]
