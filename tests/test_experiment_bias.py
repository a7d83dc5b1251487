"""experiments/bias_occupations.py: runs end to end and writes its figures and numbers."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bias_occupations", ROOT / "experiments" / "bias_occupations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check_outputs(out: Path, res: dict):
    for f in ("results.json", "pareto.json", "decision_bias.md", "occupations_before_after.png", "pareto.png",
              "decision_bias.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    saved = json.loads((out / "results.json").read_text())
    h = saved["heldout"]
    for k in ("bias_before", "bias_after", "stereotype_correlation_before", "stereotype_correlation_after",
              "neutral_kl", "neutral_ppl_ratio"):
        assert isinstance(h[k], float)
    assert h["neutral_kl"] >= 0 and saved["chosen"]["method"] in ("ablate", "clamp", "leace")
    assert saved["decision_bias"]["gap"][saved["decision_bias"]["reference"]] == 0.0
    rows = json.loads((out / "pareto.json").read_text())
    assert len(rows) >= 2 and {"bias_reduction", "correlation_reduction", "neutral_kl"} <= set(rows[0])
    return saved


def test_bias_experiment_runs_on_tiny_model(tmp_path):
    res = _load().main(["--model", "tiny-llama", "--out", str(tmp_path), "--grid", "quick"])
    _check_outputs(tmp_path, res)


@pytest.mark.slow
def test_bias_experiment_embedded_quick(tmp_path):
    res = _load().main(["--out", str(tmp_path), "--grid", "quick"])
    saved = _check_outputs(tmp_path, res)
    b = saved["baseline"]["heldout"]
    assert b["correlation"] < -0.5 and b["bias"] > 0.3  # the model is stereotyped before debiasing
    assert saved["heldout"]["neutral_kl"] < 0.2
