"""experiments/persona.py: runs end to end and writes its figures and numbers."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("persona_experiment", ROOT / "experiments" / "persona.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(out: Path, trait: str):
    for f in ("results.json", f"{trait}_monitor.png", f"{trait}_steering.png", f"{trait}_layers.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())["traits"][trait]
    assert 0 <= res["monitor_auroc"] <= 1 and len(res["trait_score_by_strength"]) >= 3
    return res


def test_persona_experiment_runs_on_tiny_model(tmp_path):
    _load().main(["--model", "tiny-llama", "--traits", "formal", "--out", str(tmp_path), "--quick",
                  "--strengths=-2,0,2"])
    _check(tmp_path, "formal")


@pytest.mark.slow
def test_persona_experiment_embedded_quick(tmp_path):
    _load().main(["--traits", "optimistic", "--out", str(tmp_path), "--quick", "--strengths=-4,0,4"])
    res = _check(tmp_path, "optimistic")
    assert res["monitor_auroc"] >= 0.9  # held-out questions, eliciting vs suppressing prompts
    assert res["steering_monotonic"]
