"""experiments/fasb.py on the embedded model (a reduced run): rows whose probe never fired are
generated exactly as without steering, FASB steers fewer tokens than constant steering, and it
raises refusal on harmful requests above the unsteered model's, with fewer refusals of harmless
requests than constant steering."""

import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("fasb_exp", Path(__file__).resolve().parents[1] / "experiments" / "fasb.py")
exp = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(exp)


@pytest.mark.slow
def test_fasb_against_constant_steering(smol, tmp_path):
    res = exp.run(tmp_path, n=8, max_new_tokens=24, model=smol, probe_prompts=64)
    assert res["refusal_harmful"]["fasb"] > res["refusal_harmful"]["unsteered"]
    assert res["steered_tokens"]["fasb"] < res["steered_tokens"]["constant"]
    # less side effect than constant steering on the requests that did not need it
    assert res["refusal_harmless"]["fasb"] < res["refusal_harmless"]["constant"]
    assert res["harmless_identical_to_unsteered"]["fasb"] > res["harmless_identical_to_unsteered"]["constant"]
    # rows that never needed steering are the unsteered answer, token for token
    assert res["unfired_identical_to_unsteered"] == res["unfired_rows"]
    assert (tmp_path / "fasb.png").exists()
    # rows.json: one record per row, adding up to the summary's rates
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["row"] for r in rows] == list(range(8)) * 2 and [r["kind"] for r in rows] == ["harmful"] * 8 + ["harmless"] * 8
    for kind in ("harmful", "harmless"):
        mine = [r for r in rows if r["kind"] == kind]
        for run in ("unsteered", "constant", "fasb"):
            assert sum(r["refused"][run] for r in mine) / 8 == pytest.approx(res["refusal_" + kind][run])
        assert sum(r["fired"] for r in mine) / 8 == pytest.approx(res["fired"][kind])


def test_bad_rows_fail_before_any_fitting(tmp_path):
    class NoModel:  # any use of the model fails the test
        def __getattr__(self, name):
            pytest.fail(f"the model was used ({name}) before the rows were checked")

    for kw in ({"start": 100, "n": 64}, {"start": -1}, {"n": 0}):
        with pytest.raises(ValueError, match="the evaluation files hold 120 requests of each kind"):
            exp.run(tmp_path, model=NoModel(), **kw)
