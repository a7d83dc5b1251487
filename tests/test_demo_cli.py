"""`steer demo` argument checks through the real entry point (the tour itself is exercised by
the notebooks and README tests), and the strict JSON every subcommand writes."""

import ast
from pathlib import Path

import pytest

import steer
import steer.cli


def test_cli_demo_n_must_be_positive(tmp_path, monkeypatch, capsys):
    """--n 0 divided by zero after loading the model; --n -5 silently used ~350 prompts per group."""
    def load(*a, **k):
        raise AssertionError("bad arguments must be refused before a model is loaded")

    monkeypatch.setattr(steer, "load", load)
    for bad in ("0", "-5"):
        with pytest.raises(SystemExit) as e:
            steer.cli.main(["demo", "--model", "tiny-llama", f"--n={bad}", "--out", str(tmp_path / "demo")])
        assert e.value.code == 2 and "--n: must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_cli_json_goes_through_the_strict_writer():
    """No subcommand calls json.dumps itself (that wrote bare NaN / Infinity): each writes through
    steer.cli.dumps / emit, which write a non-finite number as null."""
    cli = Path(steer.cli.__file__).parent
    for f in sorted(cli.glob("*.py")):
        if f.name == "__init__.py":
            continue
        calls = [n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute) and n.func.attr == "dumps"
                 and isinstance(n.func.value, ast.Name) and n.func.value.id == "json"]
        assert not calls, f"{f.name}:{calls[0].lineno} calls json.dumps; use steer.cli.dumps or emit"
    assert steer.cli.dumps({"a": float("nan"), "b": [float("inf"), 1.0]}) == '{\n "a": null,\n "b": [\n  null,\n  1.0\n ]\n}'
