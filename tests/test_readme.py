"""README's code runs as written: its Python blocks (those on the HF path; the vLLM one needs
``make test-vllm``'s venv) executed in order in one namespace, on the embedded model, and the
shapes its comments state are the ones it gets."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run(monkeypatch, capsys):
    hf = [b for b in blocks() if "steer.serve" not in b and "backend=\"vllm\"" not in b]
    assert len(hf) >= 2, "README lost its quick-start blocks"
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository root
    ns: dict = {}
    for b in hf:
        exec(compile(b, "README.md", "exec"), ns)
    assert tuple(ns["acts"].tensor.shape) == (1, 30, 576)  # as its comment says
    assert tuple(ns["post"].tensor.shape) == (2, 1, 6, 576) and ns["post"].mask.sum(-1).tolist() == [6, 6]
    assert "Paris" in capsys.readouterr().out  # the hooked generation still answers
