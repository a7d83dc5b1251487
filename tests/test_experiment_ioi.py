"""IOI localisation experiment: a fast smoke run on the tiny model, and the claims checked on
the saved results of the full run (``python experiments/ioi_localisation.py --out out/ioi/``),
which takes minutes and so is not rerun here."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ioi_localisation  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "out" / "ioi" / "results.json"


def test_experiment_runs_on_tiny_model(tmp_path):
    doc = ioi_localisation.run("tiny-llama", n=2, out=tmp_path, kinds=("heads", "resid"))
    assert set(doc["kinds"]) == {"heads", "resid"}
    assert (tmp_path / "heads_activation.png").exists() and (tmp_path / "results.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not RESULTS.exists(), reason="run experiments/ioi_localisation.py first")
def test_ioi_claims_on_embedded_model():
    doc = json.loads(RESULTS.read_text())
    heads = doc["kinds"]["heads"]
    assert heads["atp*_top20_contains_activation_top10"]
    for kind in ("heads", "attn_out", "mlp_out", "resid"):
        e = doc["kinds"][kind]
        # AtP* is a magnitude estimate (GradDrop): compare it to AtP on |effect|
        assert e["atp*"]["pearson_abs"] >= e["atp"]["pearson_abs"] - 0.02, kind
