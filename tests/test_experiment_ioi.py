"""IOI localisation experiment: a smoke run on the tiny model, and the paper's claims checked on
a fresh run on the embedded SmolLM2 (4 IOI prompts, all node kinds; ~30 s on 2 CPU cores) and
on Gemma-3-270M (heads, attention outputs, queries, keys; ~20 s)."""

import json

import pytest

import ioi_localisation  # experiments/ is on sys.path (tests/conftest.py)


def test_experiment_runs_on_tiny_model(tmp_path):
    doc = ioi_localisation.run("tiny-llama", n=2, out=tmp_path, kinds=("heads", "resid"))
    assert set(doc["kinds"]) == {"heads", "resid"}
    assert (tmp_path / "heads_activation.png").exists() and (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_ioi_claims_on_embedded_model(tmp_path):
    doc = ioi_localisation.run(None, n=4, out=tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["n_prompts"] == 4
    heads = doc["kinds"]["heads"]
    assert heads["atp*_top20_contains_activation_top10"]
    for kind in ("heads", "attn_out", "mlp_out", "resid"):
        e = doc["kinds"][kind]
        # AtP* is a magnitude estimate (GradDrop): compare it to AtP on |effect|
        assert e["atp*"]["pearson_abs"] >= e["atp"]["pearson_abs"] - 0.02, kind
    # heads and attention outputs: AtP is already close to exhaustive patching on IOI
    assert doc["kinds"]["heads"]["atp"]["pearson"] > 0.9
    # RelP (LN-rule, identity rule, half-rule) repairs much of AtP's failure on MLP outputs and
    # residual nodes without losing the heads
    for kind in ("mlp_out", "resid"):
        e = doc["kinds"][kind]
        assert e["relp"]["pearson"] > e["atp"]["pearson"] + 0.1, kind
    assert doc["kinds"]["heads"]["relp"]["pearson"] > 0.95
    # integrated gradients (4 points on the input path, 10 forward-equivalents) follow the large,
    # saturating MLP and residual patches that every single-gradient estimate misses
    for kind in ("mlp_out", "resid"):
        e = doc["kinds"][kind]
        assert e["ig-4"]["pearson"] >= 0.6 and e["ig-4"]["pearson"] > e["relp"]["pearson"], kind
    # queries and keys are where linearising through the softmax fails; the QK fix repairs it
    for kind in ("q", "k"):
        e = doc["kinds"][kind]
        assert e["atp*"]["pearson"] > e["atp"]["pearson"] + 0.05, kind
        assert e["atp*"]["pearson"] > 0.95, kind


@pytest.mark.slow
def test_graddrop_helps_on_gemma3(tmp_path):
    """On Gemma-3-270M (where AtP underestimates L11 H3 through cancellation) AtP* beats AtP on
    heads and attention outputs, as the AtP* paper claims; the QK fix helps queries and keys."""
    doc = ioi_localisation.run("gemma-3-270m", n=4, out=tmp_path, kinds=("heads", "attn_out", "q", "k"))
    for kind in ("heads", "attn_out", "q", "k"):
        e = doc["kinds"][kind]
        assert e["atp*"]["pearson"] > e["atp"]["pearson"], kind
    assert doc["kinds"]["heads"]["atp*_top20_contains_activation_top10"]
