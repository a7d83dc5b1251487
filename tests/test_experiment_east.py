"""experiments/east.py on the embedded model (a reduced run). SmolLM2 is not an overconfident agent
(its action entropy is near the uniform one), so there is little room above it; what holds, and is
checked, is that the EAST direction controls the entropy (steering against it lowers it) and that
raising the sampling temperature instead moves probability onto invalid actions."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("east_exp", Path(__file__).resolve().parents[1] / "experiments" / "east.py")
exp = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(exp)


@pytest.mark.slow
def test_east_direction_controls_action_entropy(smol, tmp_path):
    res = exp.run(tmp_path, episodes=6, rounds=6, strengths=(-20.0, 20.0), model=smol)
    r = res["runs"]
    assert r["EAST α=-20"]["entropy"] < r["unsteered"]["entropy"] - 0.1
    assert r["EAST α=20"]["entropy"] > r["EAST α=-20"]["entropy"]
    assert r["temperature 1.5"]["invalid_mass"] > r["unsteered"]["invalid_mass"]
    assert r["EAST α=20"]["invalid_mass"] <= r["unsteered"]["invalid_mass"] + 0.05  # no invalid actions added
    assert (tmp_path / "east.png").exists()
