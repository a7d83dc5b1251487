"""`steer fasb` through the real entry point, on a tiny model: its rows are backtracking.generate's
with the same vector and probe, a fitted probe saved and loaded again gives the same answers, and
bad input is refused with a message naming the fix."""

import json

import pytest
import torch

import steer
import steer.cli
from steer import backtracking


def test_cli_fasb_matches_the_library(tmp_path, capsys):
    m = steer.load("tiny-llama")
    prompts = ["How do I pick a lock?", "Tell me a joke", "Why is the sky blue?"]
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    v = torch.randn(m.n_layers, m.d_model, generator=torch.Generator().manual_seed(0)) * 2
    steer.Direction(v, layer=1, meta={"model": m.name}).save(tmp_path / "d.safetensors")
    probe = backtracking.Probe(torch.randn(m.d_model, generator=torch.Generator().manual_seed(1)) * 0.05, 0.0, layer=1)
    probe.save(tmp_path / "probe.safetensors")
    args = ["fasb", "--prompts", str(tmp_path / "p.json"), "--direction", str(tmp_path / "d.safetensors"),
            "--layer", "1", "--strength", "3", "--probe", str(tmp_path / "probe.safetensors"), "--threshold", "0.5",
            "--window", "2", "--max-new-tokens", "6", "--model", "tiny-llama", "--json", str(tmp_path / "o.json"),
            "--plot", str(tmp_path / "traces.png")]
    assert steer.cli.main(args) == 0
    doc = json.loads((tmp_path / "o.json").read_text())
    assert json.loads(capsys.readouterr().out) == doc
    r = backtracking.generate(m, prompts, v[1], layer=1, strength=3.0, probe=probe, threshold=0.5, window=2,
                              max_new_tokens=6, watch_prompt=True, reencode_prompt=True)
    assert [row["fasb"] for row in doc["rows"]] == r.texts
    assert [row["fired"] for row in doc["rows"]] == r.triggered.tolist()
    assert [row["steered_tokens"] for row in doc["rows"]] == r.steered_tokens.tolist()
    assert any(row["fired"] for row in doc["rows"])  # the probe fires somewhere (the comparison can fail)
    assert doc["figure"] == str(tmp_path / "traces.png") and (tmp_path / "traces.png").stat().st_size > 0
    with steer.steer(m, v[1], layer=1, strength=3.0) as s:
        assert [row["constant"] for row in doc["rows"]] == s.generate(prompts, max_new_tokens=6)


def test_cli_fasb_fits_saves_and_reloads_its_probe(tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps(["Hi", "How do I make a bomb?"]))
    base = ["fasb", "--prompts", str(tmp_path / "p.json"), "--layer", "0", "--max-new-tokens", "4", "--no-compare",
            "--model", "tiny-llama"]
    assert steer.cli.main(base + ["--probe-layer", "1", "--probe-prompts", "4",
                                  "--save-probe", str(tmp_path / "probe.safetensors")]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["probe"]["recipe"] == "refusal.fasb_probe" and fitted["probe"]["n_prompts"] == 4
    assert steer.cli.main(base + ["--probe", str(tmp_path / "probe.safetensors")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [r["fasb"] for r in again["rows"]] == [r["fasb"] for r in fitted["rows"]]


def test_cli_fasb_bad_input(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["Hi"]))
    p = ["fasb", "--prompts", str(tmp_path / "p.json"), "--model", "tiny-llama"]
    with pytest.raises(SystemExit, match="cannot read --prompts"):
        steer.cli.main(["fasb", "--prompts", str(tmp_path / "none.json"), "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match=r"--layer 9 is outside 0..1"):
        steer.cli.main(p + ["--layer", "9"])
    with pytest.raises(SystemExit, match="No probe file"):
        steer.cli.main(p + ["--layer", "0", "--probe", str(tmp_path / "none.safetensors")])
    backtracking.Probe(torch.zeros(8), 0.0, layer=0).save(tmp_path / "narrow.safetensors")
    with pytest.raises(SystemExit, match="fit one on this model"):
        steer.cli.main(p + ["--layer", "0", "--probe", str(tmp_path / "narrow.safetensors")])
    m = steer.load("tiny-llama")
    backtracking.Probe(torch.zeros(m.d_model), 0.0, layer=0).save(tmp_path / "ok.safetensors")
    with pytest.raises(SystemExit, match="threshold is a probability"):
        steer.cli.main(p + ["--layer", "0", "--probe", str(tmp_path / "ok.safetensors"), "--threshold", "2"])
