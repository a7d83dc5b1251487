"""`steer evaluate` through the real entry point, on a tiny model: its rows are
evaluate_steering's, and bad input is refused with a message naming the fix."""

import json

import pytest
import torch

import steer
import steer.cli
from conftest import strict_json
from steer.evaluate import evaluate_steering

ITEMS = [{"question": "Hi?", "matching": "Hello, lovely to see you!", "non_matching": "Go away."},
         {"question": "How are you?", "matching": "Wonderful, thanks!", "non_matching": "Terrible."}]


def test_cli_evaluate_matches_the_library(tmp_path, capsys):
    m = steer.load("tiny-llama")
    d = steer.extract(m, ["I love it", "Great day"], ["I hate it", "Awful day"], layer=1)
    d.save(tmp_path / "d.safetensors")
    (tmp_path / "items.json").write_text(json.dumps(ITEMS))
    rc = steer.cli.main(["evaluate", "--direction", str(tmp_path / "d.safetensors"), "--items", str(tmp_path / "items.json"),
                         "--strengths", "2,4", "--system", "Be warm.", "--positions", "all", "--model", "tiny-llama",
                         "--json", str(tmp_path / "o.json")])
    assert rc == 0
    doc = json.loads((tmp_path / "o.json").read_text())
    assert json.loads(capsys.readouterr().out) == doc
    from steer.bias import load_neutral_text
    from steer.refusal import training_data
    ev = evaluate_steering(m, ITEMS, lambda a: steer.steer(m, d, layer=1, strength=a), [2.0, 4.0], system_prompt="Be warm.",
                           neutral_prompts=training_data()["harmless"][-8:], unrelated_texts=load_neutral_text()[:8])
    assert [r["setting"] for r in doc["rows"]] == ["steer 2", "steer 4", "prompt"]
    for got, want in zip(doc["rows"], ev.rows):
        assert got["effect"] == pytest.approx(want["effect"], abs=1e-5)
        assert got["neutral_kl"] == pytest.approx(want["neutral_kl"], abs=1e-5)


def test_cli_evaluate_bad_input(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "Hi?"}]))
    with pytest.raises(SystemExit, match="non_matching"):
        steer.cli.main(["evaluate", "--direction", "x.safetensors", "--items", str(tmp_path / "bad.json"),
                        "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match="no direction file"):
        steer.cli.main(["evaluate", "--direction", str(tmp_path / "none.safetensors"), "--items", "optimistic",
                        "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match="pass --direction FILE"):
        steer.cli.main(["evaluate", "--items", "optimistic", "--model", "tiny-llama"])
    # flags another method reads were ignored
    with pytest.raises(SystemExit, match="--direction is for --method add"):
        steer.cli.main(["evaluate", "--method", "act", "--direction", "d.safetensors", "--items", "optimistic",
                        "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match="--layers is for --method lineas"):
        steer.cli.main(["evaluate", "--method", "act", "--layers", "0,1", "--items", "optimistic", "--model", "tiny-llama"])
    (tmp_path / "ok.json").write_text(json.dumps(ITEMS))
    with pytest.raises(SystemExit, match=r"must lie in 0..1"):
        steer.cli.main(["evaluate", "--method", "act", "--items", "optimistic", "--strengths", "1", "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match="built-in trait"):
        steer.cli.main(["evaluate", "--method", "act", "--items", str(tmp_path / "ok.json"), "--strengths", "1",
                        "--model", "tiny-llama"])


@pytest.mark.parametrize("method", ["act", "lineas"])
def test_cli_evaluate_fitted_maps_match_the_library(method, capsys):
    """--method act|lineas fits maps from the trait's suppressing → eliciting prompts and
    evaluates them as the library does with the same maps."""
    from steer import persona, transport
    from steer.bias import load_neutral_text
    from steer.refusal import training_data

    m = steer.load("tiny-llama")
    rc = steer.cli.main(["evaluate", "--method", method, "--items", "optimistic", "--layer", "1", "--strengths", "0.5,1",
                         "--positions", "all", "--model", "tiny-llama"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    t = persona.load_trait("optimistic")
    qs = t.train_questions
    src = [persona._messages(t.negative[i % len(t.negative)], q) for i, q in enumerate(qs)]
    tgt = [persona._messages(t.positive[i % len(t.positive)], q) for i, q in enumerate(qs)]
    fit = transport.fit_linear_act if method == "act" else transport.fit_lineas
    maps = fit(m, src, tgt, layers=[1], progress=False)
    ev = evaluate_steering(m, t.ab, lambda a: steer.Steering(m, transport.transport(maps, a)), [0.5, 1.0],
                           system_prompt=t.positive[0], neutral_prompts=training_data()["harmless"][-8:],
                           unrelated_texts=load_neutral_text()[:8])
    assert doc["method"] == method and doc["layers"] == [1]
    for got, want in zip(doc["rows"], ev.rows):
        assert got["effect"] == pytest.approx(want["effect"], abs=1e-4)
        assert got["neutral_kl"] == pytest.approx(want["neutral_kl"], abs=1e-5)
    with pytest.raises(SystemExit, match=r"λ in \[0, 1\]"):
        steer.cli.main(["evaluate", "--method", method, "--items", "optimistic", "--strengths", "2", "--model", "tiny-llama"])


def _no_model(monkeypatch):
    def load(*a, **k):
        raise AssertionError("bad arguments must be refused before a model is loaded")
    monkeypatch.setattr(steer, "load", load)


def test_cli_emit_writes_non_finite_numbers_as_null(tmp_path, capsys):
    from steer.cli import emit

    nan, inf = float("nan"), float("inf")
    emit({"a": nan, "b": [inf, 1.5, (-inf, 2)], "c": {"d": nan, "e": "x"}, "f": 3}, tmp_path / "o.json")
    want = {"a": None, "b": [None, 1.5, [None, 2]], "c": {"d": None, "e": "x"}, "f": 3}
    assert strict_json(capsys.readouterr().out) == want
    assert strict_json((tmp_path / "o.json").read_text()) == want


def test_cli_evaluate_one_item_writes_strict_json(tmp_path, capsys):
    """One item: its paired d_z is NaN; the JSON says null (a bare NaN is not JSON)."""
    m = steer.load("tiny-llama")
    steer.extract(m, ["I love it", "Great day"], ["I hate it", "Awful day"], layer=1).save(tmp_path / "d.safetensors")
    (tmp_path / "one.json").write_text(json.dumps(ITEMS[:1]))
    assert steer.cli.main(["evaluate", "--direction", str(tmp_path / "d.safetensors"), "--items", str(tmp_path / "one.json"),
                           "--strengths", "1", "--neutral", "1", "--model", "tiny-llama",
                           "--json", str(tmp_path / "o.json")]) == 0
    doc = strict_json((tmp_path / "o.json").read_text())
    assert strict_json(capsys.readouterr().out) == doc
    assert doc["rows"][0]["effect_d"] is None and isinstance(doc["rows"][0]["effect"], float)


def test_cli_evaluate_rejects_non_finite_strengths(monkeypatch):
    _no_model(monkeypatch)
    for bad in ("nan,1", "1,inf", "-inf"):
        with pytest.raises(SystemExit, match="not a finite number"):
            steer.cli.main(["evaluate", "--direction", "d.safetensors", "--items", "optimistic", f"--strengths={bad}",
                            "--model", "tiny-llama"])


def test_cli_evaluate_neutral_takes_the_last_n(tmp_path, monkeypatch, capsys):
    """--neutral N: the last N harmless requests; 0, negative or more than there are is an error."""
    import steer.evaluate
    from steer.refusal import training_data

    class Called(Exception):
        pass

    seen = []

    def fake(model, items, make, strengths, *, neutral_prompts, **kw):
        seen.append(list(neutral_prompts))
        raise Called

    monkeypatch.setattr(steer.evaluate, "evaluate_steering", fake)
    m = steer.load("tiny-llama")
    steer.extract(m, ["I love it", "Great day"], ["I hate it", "Awful day"], layer=1).save(tmp_path / "d.safetensors")
    argv = ["evaluate", "--direction", str(tmp_path / "d.safetensors"), "--items", "optimistic", "--strengths", "1",
            "--model", "tiny-llama", "--neutral"]
    harmless = training_data()["harmless"]
    with pytest.raises(Called):
        steer.cli.main([*argv, "3"])
    assert seen == [harmless[-3:]]
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as e:
            steer.cli.main([*argv, bad])
        assert e.value.code == 2 and "--neutral: must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=f"--neutral {len(harmless) + 1}: steer has {len(harmless)}"):
        steer.cli.main([*argv, str(len(harmless) + 1)])
    assert len(seen) == 1
