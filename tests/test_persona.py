"""steer.persona: trait files, extraction, scorer filtering, steering/monitoring on a tiny model."""

import json

import pytest
import torch

from conftest import strict_json
from steer import persona
from steer.persona import Trait

GOOD = {"name": "calm", "description": "Stays calm.", "positive": ["Be calm.", "Stay serene."],
        "negative": ["Be anxious.", "Panic."], "questions": ["How was your day?", "Any news?", "Plans?"],
        "ab": [{"question": "News?", "trait": "All is fine.", "opposite": "Disaster!"}]}


def test_builtin_traits_load_and_are_complete():
    names = persona.list_traits()
    assert len(names) >= 5 and {"evil", "sycophantic", "hallucinating", "optimistic", "formal"} <= set(names)
    for n in names:
        t = persona.load_trait(n)
        assert len(t.positive) == len(t.negative) >= 3
        assert len(t.train_questions) >= 8 and len(t.heldout_questions) >= 5
        assert not set(t.train_questions) & set(t.heldout_questions)
        assert len(t.ab) >= 5


@pytest.mark.parametrize("field", ["name", "description", "positive", "negative", "questions"])
def test_trait_file_with_missing_field_gives_clear_error(tmp_path, field):
    d = {k: v for k, v in GOOD.items() if k != field}
    f = tmp_path / "t.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"missing or empty field.*{field}"):
        persona.load_trait(f)


def test_trait_file_errors(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({**GOOD, "negative": ["only one"]}))
    with pytest.raises(ValueError, match="paired by index"):
        persona.load_trait(f)
    f.write_text(json.dumps({**GOOD, "ab": [{"question": "q"}]}))
    with pytest.raises(ValueError, match="ab item 0"):
        persona.load_trait(f)
    f.write_text(json.dumps({**GOOD, "questions": "not a list"}))
    with pytest.raises(ValueError, match="must be a list"):
        persona.load_trait(f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        persona.load_trait(f)
    with pytest.raises(ValueError, match="Unknown trait"):
        persona.load_trait("no-such-trait")
    with pytest.raises(FileNotFoundError):
        persona.load_trait(tmp_path / "missing.json")


def test_trait_roundtrip_and_from_description(tmp_path):
    t = Trait.from_dict(GOOD)
    t.save(tmp_path / "calm.json")
    assert persona.load_trait(tmp_path / "calm.json") == t
    u = Trait.from_description("grumpy", "irritable and complaining")
    assert "grumpy" in u.positive[0] and len(u.positive) == len(u.negative) and u.heldout_questions


def test_filter_pairs_with_any_scorer():
    pairs = [{"question": "q", "pair": 0, "pos": "great", "neg": "awful"},
             {"question": "q", "pair": 0, "pos": "awful", "neg": "great"}]
    kept = persona.filter_pairs(pairs, lambda q, r, k: 1.0 if r == "great" else 0.0)
    assert [p["pos"] for p in kept] == ["great"] and kept[0]["score_pos"] == 1.0


def test_extraction_is_mean_difference_over_response_tokens(tiny):
    from steer.capture import capture

    pairs = [{"question": "Hi?", "pair": 0, "system_pos": "Be calm.", "system_neg": "Panic.", "pos": "ok", "neg": "no!"},
             {"question": "Yo?", "pair": 0, "system_pos": "Be calm.", "system_neg": "Panic.", "pos": "fine", "neg": "bad"}]
    vec = persona.extract(tiny, Trait.from_dict(GOOD), pairs, layer=1)
    msgs = lambda s, q: [{"role": "system", "content": s}, {"role": "user", "content": q}]
    a = capture(tiny, [(msgs(p["system_pos"], p["question"]), p["pos"]) for p in pairs], layers=[1],
                positions="completion", reduce="mean").tensor[:, 0]
    b = capture(tiny, [(msgs(p["system_neg"], p["question"]), p["neg"]) for p in pairs], layers=[1],
                positions="completion", reduce="mean").tensor[:, 0]
    assert torch.allclose(vec.vectors[1], a.mean(0) - b.mean(0), atol=1e-5)
    # a scorer that rejects everything gives a clear error
    with pytest.raises(ValueError, match="No pair left"):
        persona.extract(tiny, Trait.from_dict(GOOD), pairs, scorer=lambda q, r, k: 0.0)
    # extracted at some layers only: the chosen layer is one of them (it was a zero row: steering did nothing)
    only0 = persona.extract(tiny, Trait.from_dict(GOOD), pairs, layers=[0])
    assert only0.layer == 0 and only0.vectors[0].norm() > 0 and only0.vectors[1].norm() == 0
    with pytest.raises(ValueError, match="extracted at layers \\[0\\]"):
        persona.extract(tiny, Trait.from_dict(GOOD), pairs, layers=[0], layer=1)


def test_trait_score_moves_with_strength_and_zero_is_unsteered(tiny):
    t = Trait.from_dict(GOOD)
    v = torch.randn(tiny.n_layers, tiny.d_model)
    base = persona.trait_score(tiny, t)
    assert persona.trait_score(tiny, t, v, layer=1, strength=0.0) == base
    assert persona.trait_score(tiny, t, v, layer=1, strength=3.0) != pytest.approx(base, abs=1e-4)


def test_monitor_trace_flag_shapes(tiny):
    t = Trait.from_dict(GOOD)
    v = torch.randn(tiny.n_layers, tiny.d_model)
    r = persona.monitor(tiny, t, v, layer=1)
    assert r["n"] == 2 * len(t.heldout_questions) * len(t.positive) and 0 <= r["auroc"] <= 1
    c = persona.layer_curve(tiny, t, v)
    assert c.layers == list(range(tiny.n_layers)) and 0 <= min(c.column("auroc")) <= max(c.column("auroc")) <= 1
    tr = persona.trace(tiny, v, 1, ["Hi", "Hello there"], max_new_tokens=4)
    assert tr["projections"].shape == (2, 5) and torch.isfinite(tr["projections"][:, 0]).all()
    f = persona.flag(tiny, v, 1, [("Hi", "Hello!"), ("Yo", "What?")], max_new_tokens=3)
    assert f.shape == (2,)


def test_trace_first_entry_is_last_prompt_token_projection(tiny):
    from steer.capture import capture

    v = torch.randn(tiny.n_layers, tiny.d_model)
    tr = persona.trace(tiny, v, 1, ["Hi there"], max_new_tokens=2)
    last = capture(tiny, ["Hi there"], layers=[1], positions="last").tensor[0, 0]
    assert float(tr["projections"][0, 0]) == pytest.approx(float(last @ (v[1] / v[1].norm())), abs=1e-4)


def test_trace_reads_every_generated_token(tiny):
    """Entry k (k ≥ 1) is generated token k−1's state, the last one included (it is never fed
    back by generate itself), as a forward over prompt + answer gives it."""
    from steer.data import tokenize
    from steer.hooks import add_hooks

    v = torch.randn(tiny.n_layers, tiny.d_model)
    u = v[1] / v[1].norm()
    b = tokenize(tiny, ["Hi there"])
    got = []
    with torch.no_grad():
        ids = tiny.hf.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=3,
                               do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
        with add_hooks(tiny, {"resid_post.1": lambda act, site: got.append(act[0])}):
            tiny.hf(input_ids=ids)
    states = got[0]
    n = ids.shape[1] - b.input_ids.shape[1]
    assert n == 3 and tiny.tokenizer.eos_token_id not in ids[0, -n:].tolist()
    want = states[-n - 1:] @ u  # the last prompt token, then each generated one
    torch.testing.assert_close(persona.trace(tiny, v, 1, ["Hi there"], max_new_tokens=3)["projections"][0], want,
                               atol=1e-4, rtol=1e-4)


def test_cli_persona_writes_json(tmp_path):
    from steer.cli import main

    out = tmp_path / "p.json"
    assert main(["persona", "--model", "tiny-llama", "--trait", "formal", "--prompt-pairs", "1",
                 "--max-new-tokens", "3", "--strengths=-2,0,2", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert set(d["trait_score_by_strength"]) == {"-2.0", "0.0", "2.0"}
    assert 0 <= d["monitor_auroc"] <= 1 and len(d["layer_curve"]["auroc"]) == 2


def test_cli_persona_prompt_pairs_must_be_positive(monkeypatch, capsys):
    """--prompt-pairs N: the first N pairs; 0 is not "all" and -1 not "all but the last": both refused."""
    import types

    import steer
    from steer.cli import main

    class Called(Exception):
        pass

    seen = []
    real_generate_pairs = persona.generate_pairs

    def fake(model, trait, prompt_pairs=None, **kw):
        seen.append(prompt_pairs)
        raise Called

    monkeypatch.setattr(steer, "load", lambda name=None: types.SimpleNamespace(n_layers=2, name="fake"))
    monkeypatch.setattr(persona, "generate_pairs", fake)
    argv = ["persona", "--model", "tiny-llama", "--trait", "optimistic", "--prompt-pairs"]
    with pytest.raises(Called):
        main([*argv, "2"])
    assert seen == [[0, 1]]
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as e:
            main([*argv, bad])
        assert e.value.code == 2 and "--prompt-pairs: must be an integer >= 1" in capsys.readouterr().err
    n = len(persona.load_trait("optimistic").positive)
    with pytest.raises(SystemExit, match="has 5 pairs" if n == 5 else "pairs"):  # more than there are meant "all"
        main([*argv, str(n + 1)])
    with pytest.raises(ValueError, match="system-prompt pairs"):  # checked before the model is used
        real_generate_pairs(None, "optimistic", ["Hi?"], prompt_pairs=[n])
    assert seen == [[0, 1]]


def test_cli_persona_rejects_repeated_and_non_finite_strengths(monkeypatch):
    """A repeated strength made steering_monotonic false (its score compared with itself); nan is no strength."""
    import steer
    from steer.cli import main

    def load(*a, **k):
        raise AssertionError("bad arguments must be refused before a model is loaded")

    monkeypatch.setattr(steer, "load", load)
    for bad, msg in (("-1,1,1", "repeats a strength"), ("0,-0", "repeats a strength"), ("1,1.0", "repeats"),
                     ("nan,1", "not a finite number"), ("-inf,1", "not a finite number"), ("", "empty")):
        with pytest.raises(SystemExit, match=msg):
            main(["persona", "--model", "tiny-llama", "--trait", "optimistic", f"--strengths={bad}"])


def test_cli_persona_writes_strict_json(tmp_path, monkeypatch):
    """A score that could not be computed (NaN) is written as null, not as a bare NaN."""
    from steer.cli import main


    monkeypatch.setattr(persona, "trait_score", lambda *a, **k: float("nan"))
    out = tmp_path / "p.json"
    assert main(["persona", "--model", "tiny-llama", "--trait", "formal", "--prompt-pairs", "1", "--no-filter",
                 "--max-new-tokens", "2", "--strengths=-1,1", "--json", str(out)]) == 0
    d = strict_json(out.read_text())
    assert d["trait_score_by_strength"] == {"-1.0": None, "1.0": None}
