import argparse
import json

import pytest

import steer.cli
from conftest import strict_json
from steer.cli import patch as cli


def test_cli_patch_json_and_plot(tmp_path):
    ap = argparse.ArgumentParser()
    cli.add_parser(ap.add_subparsers())
    task = tmp_path / "t.jsonl"
    task.write_text("\n".join(json.dumps({"clean": c, "corrupt": x, "answer": a, "wrong": w}) for c, x, a, w in
                              [("M and Y; Y to", "M and Y; N to", "M", "Y"), ("B and Q; B to", "B and Q; K to", "Q", "B")]))
    args = ap.parse_args(["patch", "--task", str(task), "--nodes", "heads", "--method", "activation,atp,atp*",
                          "--model", "tiny-llama", "--json", str(tmp_path / "o.json"), "--plot", str(tmp_path / "p.png")])
    args.func(args)
    doc = json.loads((tmp_path / "o.json").read_text())
    assert set(doc["methods"]) == {"activation", "atp", "atp*"}
    assert len(doc["methods"]["atp"]["labels"]) == 8 and doc["methods"]["atp"]["seconds"] > 0
    assert set(doc["comparison"]["atp"]) >= {"pearson", "spearman", "topk_recovery"}
    assert (tmp_path / "p.png").stat().st_size > 0


def test_console_entry_point_exits_zero(tmp_path, capsys):
    """`steer patch` through the real entry point (its status is what the shell sees)."""
    rc = steer.cli.main(["patch", "--task", "ioi", "--n", "2", "--nodes", "resid", "--method", "activation,atp",
                         "--model", "tiny-gemma3"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "tiny-gemma3" and set(doc["methods"]) == {"activation", "atp"}


def test_cli_patch_rejects_non_positive_k_and_chunk(monkeypatch, capsys):
    """--k 0 / -3 reported a top-0 / "top-(-3)" recovery cost and --chunk 0 ran unchunked: both refused."""
    def load(*a, **k):
        raise AssertionError("bad arguments must be refused before a model is loaded")

    monkeypatch.setattr(steer, "load", load)
    for flag, bad in (("--k", "0"), ("--k", "-3"), ("--chunk", "0"), ("--chunk", "-1")):
        with pytest.raises(SystemExit) as e:
            steer.cli.main(["patch", "--model", "tiny-llama", "--n", "2", f"{flag}={bad}"])
        assert e.value.code == 2 and f"{flag}: must be an integer >= 1" in capsys.readouterr().err


def test_cli_patch_writes_strict_json(tmp_path, monkeypatch, capsys):
    """A correlation that could not be computed (NaN) is null in the JSON, not a bare NaN."""
    import types

    import steer.patching


    nan = float("nan")
    res = types.SimpleNamespace(to_dict=lambda: {"scores": [nan, 1.0], "labels": ["a", "b"]}, seconds=0.1)
    monkeypatch.setattr(steer, "load", lambda name=None: types.SimpleNamespace(name="fake"))
    monkeypatch.setattr(steer.patching, "ioi_task", lambda model, n: types.SimpleNamespace(name="ioi", n_prompts=n))
    monkeypatch.setattr(steer.patching, "patch", lambda *a, **k: {
        "results": {"activation": res, "atp": res},
        "comparison": {"atp": {"pearson": nan, "spearman": nan, "topk_recovery": {"k": 2, "cost": float("inf")}}}})
    assert steer.cli.main(["patch", "--model", "tiny-llama", "--n", "2", "--method", "activation,atp"]) == 0
    doc = strict_json(capsys.readouterr().out)
    assert doc["comparison"]["atp"] == {"pearson": None, "spearman": None, "topk_recovery": {"k": 2, "cost": None}}
    assert doc["methods"]["atp"]["scores"] == [None, 1.0]
    assert steer.cli.main(["patch", "--model", "tiny-llama", "--n", "2", "--json", str(tmp_path / "o.json")]) == 0
    assert strict_json((tmp_path / "o.json").read_text())["comparison"]["atp"]["pearson"] is None
