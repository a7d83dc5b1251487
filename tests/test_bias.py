"""steer.bias and steer.erasure: counterfactual alignment, hand-computed scores, debiasing hooks."""

import json
import math
import types

import pytest
import torch

from conftest import strict_json
from steer import bias
from steer.erasure import LeaceEraser
from steer.hooks import add_hooks

OCC = {"nurse": 87.4, "pilot": 4.6, "cook": 37.9, "librarian": 80.5}
TPL = ["The {occupation} said that", "Then the {occupation} left because"]


# -- counterfactual templates: token alignment ---------------------------------------------
def test_aligned_pairs_handle_different_slot_lengths(tiny):
    # byte tokenizer: "man" is 3 tokens, "grandmother" 11: positions align on the suffix
    (p,) = bias.aligned_pairs(tiny, "The {x} left early.", [("man", "grandmother")])
    assert p.slot == (3, 11)
    a, b = p.positions(0), p.positions(1)
    assert len(a) == len(b) == 1 + p.suffix
    # every aligned suffix position holds the same token in both rows
    assert [p.ids[0][i] for i in a[1:]] == [p.ids[1][i] for i in b[1:]]
    # the first aligned position is the last token of each slot value
    assert tiny.tokenizer.decode([p.ids[0][a[0]]]) == "n"
    assert tiny.tokenizer.decode([p.ids[1][b[0]]]) == "r"


@pytest.mark.slow
def test_aligned_pairs_refuse_merges_across_the_slot(smol):
    tok = smol.tokenizer  # a real BPE tokenizer, where " cats" is one token
    m = types.SimpleNamespace(tokenizer=tok)
    with pytest.raises(ValueError, match="straddles the slot"):
        bias.aligned_pairs(m, "The {x}s left.", [("cat", "dog")])  # " cats" is one token
    (p,) = bias.aligned_pairs(m, "The {x} left.", [("man", "grandmother")])  # leading space is fine
    assert p.suffix == 2


def test_template_errors():
    with pytest.raises(ValueError, match="no slot"):
        bias.Template("The nurse said that", "occupation", ["a"])
    with pytest.raises(ValueError, match="two non-empty strings"):
        bias.Template("The {occupation} said", targets=(" he",))


def test_load_templates_jsonl(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"template": "The {occupation} said that", "slot": "occupation",
                             "values": ["nurse", "pilot"], "targets": [" he", " she"]}) + "\n")
    (t,) = bias.load_templates(f)
    assert t.values == ["nurse", "pilot"] and t.targets == (" he", " she")
    f.write_text(json.dumps({"template": "x", "values": ["a"]}))
    with pytest.raises(ValueError, match="no slot"):
        bias.load_templates(f)


def test_builtin_data_is_split_and_cited():
    train, held = bias.load_occupations("train"), bias.load_occupations("heldout")
    assert len(train) >= 20 and len(held) >= 10 and not set(train) & set(held)
    assert all(0 <= v <= 100 for v in {**train, **held}.values())
    assert "Bureau of Labor Statistics" in bias.occupation_source()
    assert not set(bias.load_templates(split="train")[0].values) & set(held)


# -- scores against a hand computation -------------------------------------------------------
def _hand_logprob(model, prompt, cont):
    ids_p = model.tokenizer(prompt, add_special_tokens=False).input_ids
    ids_c = model.tokenizer(cont, add_special_tokens=False).input_ids
    ids = torch.tensor([ids_p + ids_c])
    with torch.no_grad():
        lp = model.hf(ids).logits[0].log_softmax(-1)
    return sum(float(lp[len(ids_p) - 1 + j, c]) for j, c in enumerate(ids_c))


def test_bias_scores_match_hand_computation(tiny):
    r = bias.occupational_bias(tiny, OCC, TPL)
    gaps = torch.tensor([[_hand_logprob(tiny, t.replace("{occupation}", o), " he")
                          - _hand_logprob(tiny, t.replace("{occupation}", o), " she") for o in OCC] for t in TPL])
    neutral = torch.tensor([_hand_logprob(tiny, t.replace("{occupation}", "person"), " he")
                            - _hand_logprob(tiny, t.replace("{occupation}", "person"), " she") for t in TPL])
    assert torch.allclose(r.gaps, gaps, atol=1e-4)
    assert torch.allclose(r.neutral, neutral, atol=1e-4)
    per = (gaps - neutral[:, None]).mean(0)
    assert r.bias == pytest.approx(float(per.abs().mean()), abs=1e-4)
    shares = torch.tensor(list(OCC.values()), dtype=torch.float64)
    pc, sc = per.double() - per.double().mean(), shares - shares.mean()
    assert r.correlation == pytest.approx(float(pc @ sc / (pc.norm() * sc.norm())), abs=1e-4)


def test_single_token_fast_path_matches_sequence_scoring(tiny):
    # with single-token targets the last-position shortcut must equal full sequence scoring
    targets = ("a", "b")  # one byte each
    texts = ["The nurse said that ", "A much longer prompt about the pilot "]
    fast = bias._target_gaps(tiny, texts, targets)
    slow = bias.sequence_logprobs(tiny, texts * 2, ["a"] * 2 + ["b"] * 2)
    assert torch.allclose(fast, slow[:2] - slow[2:], atol=1e-4)


def test_decision_bias_reference_gap_is_zero(tiny):
    d = bias.decision_bias(tiny, ["Should we hire the {person}? Answer yes or no."], ["man", "woman"], "man",
                           choice=["Candidate A is a {a}, B is a {b}. Who? Answer A or B."])
    assert d["gap"]["man"] == 0.0
    p = d["p_yes"]["t0"]["woman"]
    assert 0 < p < 1
    assert set(d["choice"]) == {"woman"} and -0.5 <= d["choice"]["woman"] <= 0.5
    with pytest.raises(ValueError, match="reference"):
        bias.decision_bias(tiny, ["Hire the {person}?"], ["man"], "woman")


# -- debiasing hooks ----------------------------------------------------------------------------
def _capture_after_edit(model, edit, rows):
    ids, att = bias._pad(model, rows)
    mask = att.bool().clone()  # what the edit must touch: every real token but each row's first
    mask[torch.arange(len(rows)), att.shape[1] - att.sum(-1)] = False
    seen = {}
    with edit.hooks(model), add_hooks(model, {f"resid_post.{l}": (lambda a, s: seen.__setitem__(s.layer, a.clone()))
                                                    for l in range(model.n_layers)}):
        model.hf(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0))
    return seen, mask


def test_ablation_hook_removes_direction_at_every_hooked_site(tiny):
    v = torch.randn(tiny.n_layers, tiny.d_model)
    edit = bias.Edit("ablate", [0, 1], vectors={0: v[0], 1: v[1]})
    rows = [tiny.to_tokens("The nurse said that"), tiny.to_tokens("Hi")]
    seen, mask = _capture_after_edit(tiny, edit, rows)
    for layer in (0, 1):
        u = v[layer] / v[layer].norm()
        proj = seen[layer] @ u
        assert proj[mask].abs().max() < 1e-4
        first = ~mask & bias._pad(tiny, rows)[1].bool()  # the sink tokens are left alone
        assert proj[first].abs().min() > 1e-3


def test_clamp_and_leace_hooks(tiny):
    v = torch.randn(tiny.d_model)
    edit = bias.Edit("clamp", [1], vectors={1: v}, values={1: 2.5})
    rows = [tiny.to_tokens("The pilot said")]
    seen, mask = _capture_after_edit(tiny, edit, rows)
    assert torch.allclose(seen[1][mask] @ (v / v.norm()), torch.full((int(mask.sum()),), 2.5), atol=1e-4)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, tiny.d_model, generator=g)
    z = (x[:, :3].sum(-1) > 0).long()
    er = LeaceEraser.fit(x, z)
    edit = bias.Edit("leace", [0], erasers={0: er})
    seen, mask = _capture_after_edit(tiny, edit, rows)
    resid = (seen[0][mask] - er.mean) @ er.B  # the erased coordinates are zero everywhere edited
    assert resid.abs().max() < 1e-3


def test_leace_removes_linear_covariance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 16, generator=g) @ torch.randn(16, 16, generator=g)
    y = x[:, 0] * 0.5 - x[:, 3] + 0.1 * torch.randn(400, generator=g)  # continuous concept
    er = LeaceEraser.fit(x, y)
    xe = er(x)
    cov = ((xe - xe.mean(0)) * (y - y.mean())[:, None]).mean(0)
    assert cov.abs().max() < 1e-3 * (x.std() * y.std())
    assert er.rank == 1
    with pytest.raises(ValueError, match="one concept value per row"):
        LeaceEraser.fit(x, y[:10])
    with pytest.raises(ValueError, match="single class"):
        LeaceEraser.fit(x, torch.zeros(400, dtype=torch.long))


def test_edit_errors():
    with pytest.raises(ValueError, match="Unknown debiasing method"):
        bias.Edit("erase", [0])
    with pytest.raises(ValueError, match="no vector for layers"):
        bias.Edit("ablate", [0, 1], vectors={0: torch.ones(4)})


def test_fit_edit_and_report_on_tiny(tiny):
    cache = {}
    edits = [bias.fit_edit(tiny, method, [1], "stereotype", cache=cache) for method in bias.METHODS]
    edits.append(bias.fit_combined(tiny, [1], [0], cache=cache))
    rep = bias.debias_report(tiny, bias.Edits(edits))
    assert rep["method"] == "ablate+clamp+leace+leace+clamp" and rep["neutral_kl"] >= 0
    assert rep["neutral_ppl_ratio"] > 0 and rep["layer"] == [0, 1]
    rows = bias.pareto_sweep(tiny, ["ablate"], ["gender"], [[0], [1]], [1.0])
    assert len(rows) == 2 and bias.pareto_front(rows)


def test_side_effects_match_hand_computation(tiny):
    texts = ["The nurse said that she would", "Hi", "A longer neutral sentence about the weather today."]
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1))
    edit = bias.Edit("ablate", [1], vectors={1: v})
    u = v / v.norm()

    def ablate(a, site):  # every token but the first (the sink), one unpadded text at a time
        a[:, 1:] -= (a[:, 1:] @ u)[..., None] * u
        return a

    kl = nll_b = nll_e = count = 0.0
    for t in texts:
        ids = tiny.to_tokens(t)
        b = tiny.hf(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        with add_hooks(tiny, {"resid_post.1": ablate}):
            e = tiny.hf(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        kl += float((b.exp() * (b - e)).sum(-1)[:-1].sum())
        tgt = torch.tensor(ids[1:])[:, None]
        nll_b -= float(b[:-1].gather(-1, tgt).sum())
        nll_e -= float(e[:-1].gather(-1, tgt).sum())
        count += len(ids) - 1
    got = bias.side_effects(tiny, edit, texts)
    assert got["neutral_kl"] == pytest.approx(kl / count, rel=1e-4, abs=1e-7) and got["neutral_kl"] > 1e-6
    assert got["neutral_ppl_ratio"] == pytest.approx(math.exp((nll_e - nll_b) / count), rel=1e-5)
    # the unedited pass is reused only for the texts it was run on
    again = bias.side_effects(tiny, edit, texts, base=got["_base"])
    assert again["neutral_kl"] == pytest.approx(got["neutral_kl"], rel=1e-6)
    with pytest.raises(ValueError, match="other texts"):
        bias.side_effects(tiny, edit, texts[:2], base=got["_base"])


# -- the embedded model (slow) -----------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_occupational_bias(smol):
    r = bias.occupational_bias(smol, "heldout", "heldout")
    assert r.neutral_gap < 0  # prefers " she" after "The person ..." overall
    assert r.correlation < -0.5  # more women in the occupation → more " she"
    assert r.bias > 0.3


def test_cli_bias_writes_json(tmp_path):
    from steer.cli import main

    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"template": "The {occupation} said that", "slot": "occupation",
                             "values": ["nurse", "pilot", "cook"], "targets": [" he", " she"]}) + "\n")
    out = tmp_path / "bias.json"
    assert main(["bias", "--model", "tiny-llama", "--templates", str(f), "--method", "ablate", "--direction",
                 "gender", "--layers", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    for k in ("bias_before", "bias_after", "stereotype_correlation_before", "stereotype_correlation_after",
              "neutral_kl", "neutral_ppl_ratio", "layer", "method"):
        assert k in d
    assert d["method"] == "ablate" and d["layer"] == [1]


def test_cli_bias_correlation_skips_occupations_without_a_figure(tmp_path, capsys):
    """Occupations without a share-of-women figure are left out of the correlation, named in the
    JSON, and can be supplied with --shares; too few figures give null with a reason, never NaN."""
    from steer.cli import main

    occ = bias.load_occupations()
    known = ["nurse", "plumber", "cook", "lawyer"]
    assert all(k in occ for k in known) and "zookeeper" not in occ and "astronaut" not in occ

    def run(values, *extra):
        f, out = tmp_path / "t.jsonl", tmp_path / "bias.json"
        f.write_text(json.dumps({"template": "The {occupation} said that", "slot": "occupation",
                                 "values": values, "targets": [" he", " she"]}) + "\n")
        assert main(["bias", "--model", "tiny-llama", "--templates", str(f), "--method", "ablate",
                     "--direction", "gender", "--layers", "1", "--json", str(out), *extra]) == 0
        text = out.read_text()
        assert "NaN" not in text
        return json.loads(text)

    d = run(known + ["zookeeper", "astronaut"])
    assert d["stereotype_correlation_n"] == 4
    assert d["stereotype_correlation_skipped"] == ["astronaut", "zookeeper"]
    assert d["stereotype_correlation_note"] is None
    per = d["tables"][0]["before"]["per_value"]
    expected = bias.pearson(torch.tensor([per[k] for k in known]), torch.tensor([occ[k] for k in known]))
    assert d["stereotype_correlation_before"] == pytest.approx(expected, abs=1e-9)
    assert "astronaut, zookeeper" in capsys.readouterr().out

    mine = tmp_path / "shares.json"
    mine.write_text(json.dumps({"zookeeper": 50.0, "astronaut": 12.0}))
    d = run(known + ["zookeeper", "astronaut"], "--shares", str(mine))
    assert d["stereotype_correlation_n"] == 6 and d["stereotype_correlation_skipped"] == []

    d = run(["nurse", "zookeeper", "astronaut"])
    assert d["stereotype_correlation_before"] is None and d["stereotype_correlation_after"] is None
    assert "only 1 of 3 values" in d["stereotype_correlation_note"]
    mine.write_text(json.dumps({"zookeeper": 150}))
    with pytest.raises(ValueError, match="percentages"):
        run(known, "--shares", str(mine))


@pytest.mark.slow
def test_embedded_default_debiasing_on_heldout(smol):
    # fitted on the training occupations/templates, measured on the held-out ones
    rep = bias.debias_report(smol, bias.fit_default_edit(smol), "heldout")
    bias_red = 1 - rep["bias_after"] / rep["bias_before"]
    r_red = 1 - abs(rep["stereotype_correlation_after"]) / abs(rep["stereotype_correlation_before"])
    # measured on this machine: bias -63 %, |r| -50 %, KL 0.040, perplexity ratio 1.043
    assert bias_red >= 0.5
    assert r_red >= 0.45
    assert rep["neutral_kl"] <= 0.05 and rep["neutral_ppl_ratio"] <= 1.05


def test_edit_without_mask_leaves_sink_alone_in_generate(tiny):
    v = torch.randn(tiny.d_model)
    edit = bias.Edit("ablate", [1], vectors={1: v})
    seen = []
    ids, att = bias._pad(tiny, [tiny.to_tokens("The nurse"), tiny.to_tokens("Hi")])
    with edit.hooks(tiny), add_hooks(tiny, {"resid_post.1": lambda a, s: seen.append(a.clone())}):
        tiny.hf.generate(input_ids=ids, attention_mask=att, max_new_tokens=2, do_sample=False,
                         pad_token_id=tiny.tokenizer.pad_token_id)
    u = v / v.norm()
    prefill = seen[0] @ u
    first = att.shape[1] - att.sum(-1)
    for i in range(2):
        assert abs(float(prefill[i, first[i]])) > 1e-3  # the sink keeps its component
        assert prefill[i, first[i] + 1:].abs().max() < 1e-4  # the rest is ablated
    assert all((s[:, -1] @ u).abs().max() < 1e-4 for s in seen[1:])  # generated tokens too


def test_erasing_context_manager(tiny):
    from steer.erasure import erasing

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, tiny.d_model, generator=g)
    er = LeaceEraser.fit(x, (x[:, 0] > 0).long())
    seen = []
    with erasing(tiny, {1: er}), add_hooks(tiny, {"resid_post.1": lambda a, s: seen.append(a.clone())}):
        tiny.hf(input_ids=torch.tensor([[5, 6, 7, 8]]))
    coords = (seen[0][0] - er.mean) @ er.B
    assert coords[1:].abs().max() < 1e-3 and coords[0].abs().max() > 1e-3


def test_choice_probabilities_leave_out_first_tokens_the_options_share(tiny):
    """" Yes" and " No" both start with the space token under a byte-level tokenizer: it counted
    for both options (one spelling each: always 0.5). It now counts for neither."""
    from steer.bias import _choice_probs
    from steer.data import tokenize

    prompts = ["Is the sky blue?", "Can a dog fly?"]
    got = _choice_probs(tiny, prompts, [["Yes", " Yes"], ["No", " No"]])
    b = tokenize(tiny, prompts)
    with torch.no_grad():
        p = tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask,
                    position_ids=b.position_ids).logits[:, -1].float().softmax(-1)
    y, n = tiny.tokenizer("Y").input_ids[0], tiny.tokenizer("N").input_ids[0]
    torch.testing.assert_close(got[:, 0], p[:, y] / (p[:, y] + p[:, n]))
    with pytest.raises(ValueError, match="first tokens differ"):
        _choice_probs(tiny, prompts, [[" Yes"], [" No"]])


def test_cli_bias_writes_strict_json_and_refuses_non_finite_strength(tmp_path, monkeypatch, capsys):
    """A correlation that could not be computed (NaN) is null in the JSON, not a bare NaN; --strength nan
    is refused before anything runs."""
    import steer
    from steer.cli import main


    nan = float("nan")
    monkeypatch.setattr(steer, "load", lambda name=None: types.SimpleNamespace(n_layers=2, name="fake"))
    monkeypatch.setattr(bias, "fit_combined", lambda model, layers, strength=1.0: "edit")
    monkeypatch.setattr(bias, "debias_report", lambda model, edit, split="heldout": {
        "bias_before": 0.5, "bias_after": nan, "stereotype_correlation_before": nan,
        "stereotype_correlation_after": float("-inf"), "stereotype_correlation_note": "too few",
        "neutral_kl": 0.1, "neutral_ppl_ratio": 1.0, "method": "combined", "direction": "stereotype", "layer": [1]})
    assert main(["bias", "--model", "tiny-llama", "--json", str(tmp_path / "o.json")]) == 0
    d = strict_json((tmp_path / "o.json").read_text())
    assert d["bias_after"] is None and d["stereotype_correlation_before"] is None
    assert d["stereotype_correlation_after"] is None and d["bias_before"] == 0.5
    for bad in ("nan", "inf"):
        with pytest.raises(SystemExit) as e:
            main(["bias", "--model", "tiny-llama", f"--strength={bad}"])
        assert e.value.code == 2 and "--strength: must be a finite number" in capsys.readouterr().err
