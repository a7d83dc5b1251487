"""`steer multi` through the real entry point on a tiny model: its rows are evaluate_multi's on
the same trait behaviours, and bad input is refused with a message naming the fix."""

import json

import pytest

import steer
import steer.cli
from steer import multi
from steer.refusal import training_data


def test_cli_multi_matches_the_library(tmp_path, capsys):
    m = steer.load("tiny-llama")
    rc = steer.cli.main(["multi", "--traits", "optimistic:1:2,formal:0:1", "--modes", "sum,layers", "--layer", "1",
                         "--n-questions", "2", "--model", "tiny-llama", "--json", str(tmp_path / "o.json")])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "o.json").read_text()) == doc
    bs = [multi.trait_behaviour(m, "optimistic", layer=1, strength=2.0, n_questions=2),
          multi.trait_behaviour(m, "formal", layer=0, strength=1.0, n_questions=2)]
    ev = multi.evaluate_multi(m, bs, ["sum", "layers"], layer=1, neutral_prompts=training_data()["harmless"][-8:])
    assert len(doc["rows"]) == len(ev.rows)
    for got, want in zip(doc["rows"], ev.rows):
        assert (got["behaviour"], got["mode"]) == (want["behaviour"], want["mode"])
        assert got["effect_together"] == pytest.approx(want["effect_together"], abs=1e-4)
        assert got["effect_alone"] == pytest.approx(want["effect_alone"], abs=1e-4)


def test_cli_multi_bad_input():
    with pytest.raises(SystemExit, match="NAME:LAYER:STRENGTH"):
        steer.cli.main(["multi", "--traits", "optimistic:1,formal:0:1", "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match="at least two"):
        steer.cli.main(["multi", "--traits", "optimistic:1:2", "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match="unknown --modes"):
        steer.cli.main(["multi", "--traits", "optimistic:1:2,formal:0:1", "--modes", "blend", "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match="outside 0..1"):
        steer.cli.main(["multi", "--traits", "optimistic:5:2,formal:0:1", "--model", "tiny-llama"])
    for layer in ("2", "-1"):  # the shared layer was not checked: -1 wrapped, 2 failed in a traceback
        with pytest.raises(SystemExit, match="--layer .* is outside 0..1"):
            steer.cli.main(["multi", "--traits", "optimistic:1:2,formal:0:1", "--layer", layer, "--model", "tiny-llama"])


def test_cli_multi_neutral_takes_the_last_n_and_strengths_are_finite(monkeypatch, capsys):
    """--neutral N: the last N harmless requests (0 or negative is an error, not "all" or "all but
    the first |N|"); a trait's strength must be a finite number."""

    class Called(Exception):
        pass

    seen = []

    def fake(model, bs, modes, *, layer, neutral_prompts):
        seen.append(list(neutral_prompts))
        raise Called

    monkeypatch.setattr(multi, "trait_behaviour", lambda model, name, **kw: name)
    monkeypatch.setattr(multi, "evaluate_multi", fake)
    argv = ["multi", "--traits", "optimistic:1:2,formal:0:1", "--model", "tiny-llama", "--neutral"]
    harmless = training_data()["harmless"]
    with pytest.raises(Called):
        steer.cli.main([*argv, "3"])
    assert seen == [harmless[-3:]]
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit) as e:
            steer.cli.main([*argv, bad])
        assert e.value.code == 2 and "--neutral: must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=f"steer has {len(harmless)} harmless"):
        steer.cli.main([*argv, str(len(harmless) + 1)])
    for bad in ("nan", "inf"):
        with pytest.raises(SystemExit, match="finite"):
            steer.cli.main(["multi", "--traits", f"optimistic:1:{bad},formal:0:1", "--model", "tiny-llama"])
    assert len(seen) == 1
