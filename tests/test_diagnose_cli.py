"""`steer diagnose` through the real entry point, on a tiny model: each view's JSON is the
library's result, figures are written, and bad input is refused with a message naming the fix."""

import json

import pytest
import torch

import steer
import steer.cli
from steer import diagnostics as D
from steer.data import Raw

TEXTS = ["The sky is blue", "Hello there"]


def _run(capsys, *argv):
    assert steer.cli.main(["diagnose", *argv, "--model", "tiny-llama"]) == 0
    return json.loads(capsys.readouterr().out)


def test_massive_and_lens_are_the_librarys(tmp_path, capsys):
    m = steer.load("tiny-llama")
    args = [a for t in TEXTS for a in ("--text", t)] + ["--raw"]
    doc = _run(capsys, "massive", *args, "--plot", str(tmp_path / "m.png"), "--json", str(tmp_path / "m.json"))
    ref = D.massive_activations(m, [Raw(t) for t in TEXTS]).to_dict()
    assert doc["top1_abs_by_layer"] == pytest.approx(ref["top1_abs_by_layer"]) and doc["entries"] == ref["entries"]
    assert (tmp_path / "m.png").stat().st_size > 1000 and json.loads((tmp_path / "m.json").read_text()) == doc
    doc = _run(capsys, "lens", *args, "--targets", "e,a", "--positions", "all")
    ref = D.logit_lens(m, [Raw(t) for t in TEXTS], positions="all", targets=["e", "a"]).to_dict()
    assert doc["targets"] == ref["targets"] and doc["prompts"][1]["top"] == ref["prompts"][1]["top"]
    torch.testing.assert_close(torch.tensor(doc["prompts"][0]["target_logprobs"]),
                               torch.tensor(ref["prompts"][0]["target_logprobs"]))


def test_trace_with_and_without_steering(tmp_path, capsys):
    m = steer.load("tiny-llama")
    d = steer.extract(m, ["I love it", "Great day"], ["I hate it", "Awful day"], layer=1)
    d.save(tmp_path / "d.safetensors")
    doc = _run(capsys, "trace", "--direction", str(tmp_path / "d.safetensors"), "--text", "Hi", "--max-new-tokens", "4",
               "--strength", "3", "--steer-layer", "0", "--plot", str(tmp_path / "t.png"))
    plain = D.probe_trace(m, ["Hi"], d, layer=1, max_new_tokens=4)
    steered = D.probe_trace(m, ["Hi"], d, layer=1, max_new_tokens=4, steering=steer.steer(m, d, layer=0, strength=3.0))
    got = [x for x in doc["unsteered"]["rows"][0]["scores"] if x is not None]
    assert got == pytest.approx([x for x in plain.scores[0].tolist() if x == x])
    got = [x for x in doc["steered"]["rows"][0]["scores"] if x is not None]
    assert got == pytest.approx([x for x in steered.scores[0].tolist() if x == x])
    assert doc["steered"]["strength"] == 3.0 and (tmp_path / "t.png").exists()
    doc = _run(capsys, "trace", "--direction", str(tmp_path / "d.safetensors"), "--text", "Hi there", "--raw",
               "--max-new-tokens", "4", "--heads", "3")
    ref = D.trace_heads(m, D.probe_trace(m, [Raw("Hi there")], d, layer=1, max_new_tokens=4), d, top=3)
    assert doc["heads"]["heads"] == [list(h) for h in ref.heads]
    assert doc["heads"]["measured"] == pytest.approx(ref.measured.tolist(), abs=1e-5)


def test_trajectory(tmp_path, capsys):
    m = steer.load("tiny-llama")
    rows = [{"instruction": "translate: cat", "task": "tr", "refused": True},
            {"instruction": "translate: dog", "task": "tr", "refused": False},
            {"instruction": "sentiment: ok", "task": "se", "refused": False}]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    doc = _run(capsys, "trajectory", "--prompts", str(f), "--raw", "--plot", str(tmp_path / "tr.png"))
    ref = D.trajectories(m, [Raw(r["instruction"]) for r in rows], tasks=["tr", "tr", "se"], refused=[True, False, False])
    assert doc["to_comply"] == pytest.approx(ref.distances()["to_comply"].tolist(), nan_ok=True)
    assert (tmp_path / "tr.png").stat().st_size > 1000
    # without labels: generated and labelled by refusal phrases (a random model never refuses)
    f.write_text(json.dumps([{k: v for k, v in r.items() if k != "refused"} for r in rows]))
    f2 = tmp_path / "p.json"
    f2.write_text(f.read_text())
    doc = _run(capsys, "trajectory", "--prompts", str(f2), "--raw", "--max-new-tokens", "3")
    assert doc["refused"] == [False, False, False]


def test_bad_input(capsys):
    with pytest.raises(SystemExit, match="--direction"):
        steer.cli.main(["diagnose", "trace", "--model", "tiny-llama", "--text", "Hi"])
    with pytest.raises(SystemExit, match="not both"):
        steer.cli.main(["diagnose", "lens", "--model", "tiny-llama", "--text", "Hi", "--prompts", "x.json"])
    with pytest.raises(SystemExit, match="--prompts FILE"):
        steer.cli.main(["diagnose", "trajectory", "--model", "tiny-llama"])
    with pytest.raises(SystemExit, match="only with --strength"):  # ignored before
        steer.cli.main(["diagnose", "trace", "--model", "tiny-llama", "--text", "Hi", "--direction", "d.safetensors",
                        "--steer-layer", "0"])
