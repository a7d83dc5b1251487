"""steer.evaluate's steering evaluation: likelihood effects in a multi-turn context, a prompting
baseline, standardised effects and side effects, checked against a hand computation; on the
embedded model, a persona vector's effect next to asking for the persona in a system prompt."""

import pytest
import torch

import steer
from steer import evaluate as E

ITEMS = [{"question": "How was your day?", "matching": "Wonderful, thank you!", "non_matching": "Awful."},
         {"question": "Will it rain?", "matching": "Maybe, but the sun will come.", "non_matching": "Storms, surely."},
         {"question": "Any plans?", "matching": "A lovely walk.", "non_matching": "Nothing good."}]


def test_gaps_and_rows_are_the_hand_computed_ones(tiny):
    hist = list(E.DEFAULT_HISTORY)
    prompts = [hist + [{"role": "user", "content": it["question"]}] for it in ITEMS]
    by_hand = (E.completion_logprob(tiny, prompts, [it["matching"] for it in ITEMS])
               - E.completion_logprob(tiny, prompts, [it["non_matching"] for it in ITEMS]))
    torch.testing.assert_close(E.behaviour_gaps(tiny, ITEMS), by_hand)

    sys_prompts = [[{"role": "system", "content": "Be cheerful."}] + p for p in prompts]
    prompted = (E.completion_logprob(tiny, sys_prompts, [it["matching"] for it in ITEMS])
                - E.completion_logprob(tiny, sys_prompts, [it["non_matching"] for it in ITEMS]))
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(5)) * 4
    ev = E.evaluate_steering(tiny, ITEMS, lambda a: steer.steer(tiny, v, layer=1, strength=a), [0.0, 1.0],
                             system_prompt="Be cheerful.", neutral_prompts=["Hi", "What is 2+2?"],
                             unrelated_texts=["The river runs to the sea."])
    zero, one, prompt = ev.rows
    assert zero["effect"] == 0.0 and zero["neutral_kl"] == 0.0 and zero["ppl_ratio"] == 1.0
    d = prompted - by_hand
    assert abs(prompt["effect"] - float(d.mean())) < 1e-5 and abs(prompt["effect_d"] - float(d.mean() / d.std())) < 1e-4
    assert prompt["neutral_kl"] == 0.0  # asking in the prompt changes nothing elsewhere
    with steer.steer(tiny, v, layer=1, strength=1.0) as s:
        steered = s.next_token_logits(["Hi", "What is 2+2?"])
    with steer.Steering(tiny) as s:
        plain = s.next_token_logits(["Hi", "What is 2+2?"])
    assert abs(one["neutral_kl"] - float(E.next_token_kl(plain, steered).mean())) < 1e-6 and one["neutral_kl"] > 0
    assert "prompt" in repr(ev) and "text/html" in ev._repr_mimebundle_()


def test_pareto_against_a_hand_computation(tiny):
    """Each point's KL is the next-token KL of that Steering; the reference's effect at the same
    KL is the linear interpolation along the reference curve from the unsteered origin (0, 0)."""
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1)) * 2
    neutral = ["Hi", "What is 2+2?", "Tell me a joke"]
    effects = {}

    def effect(st):  # a behaviour score we can compute again by hand: the mean logit of token 5
        with st as s:
            e = float(s.next_token_logits(["Hello"])[:, 5].mean())
        effects[id(st)] = e
        return e

    ref = {a: steer.steer(tiny, v, layer=1, strength=a) for a in (1.0, 2.0)}
    other = {a: steer.steer(tiny, -v, layer=0, strength=a) for a in (0.5, 1.0, 50.0)}
    p = E.pareto(tiny, {"ref": ref, "other": other}, effect, neutral)
    with steer.Steering(tiny) as s:
        plain = s.next_token_logits(neutral)
    for name, curve in (("ref", ref), ("other", other)):
        for r, (a, st) in zip(p.curves[name], curve.items()):
            with st as s:
                kl = float(E.next_token_kl(plain, s.next_token_logits(neutral)).mean())
            assert r["strength"] == a and abs(r["kl"] - kl) < 1e-6 and r["effect"] == effects[id(st)]
    (k1, e1), (k2, e2) = [(r["kl"], r["effect"]) for r in p.curves["ref"]]
    assert 0 < k1 < k2
    for r, ratio in zip(p.curves["other"], p.ratio_at_same_kl("other")):
        if r["kl"] > k2:
            assert r["reference_effect_at_same_kl"] is None and ratio is None
            continue
        by_hand = e1 * r["kl"] / k1 if r["kl"] <= k1 else e1 + (e2 - e1) * (r["kl"] - k1) / (k2 - k1)
        assert abs(r["reference_effect_at_same_kl"] - by_hand) < 1e-6
        assert ratio == pytest.approx(r["effect"] / by_hand)
    assert p.curves["other"][-1]["reference_effect_at_same_kl"] is None  # strength 50: past the reference's KL
    assert "ref at same KL" in repr(p)
    with pytest.raises(ValueError, match="reference"):
        E.pareto(tiny, {"ref": ref}, effect, neutral, reference="nope")


@pytest.mark.slow
def test_persona_steering_next_to_its_prompting_baseline(smol):
    """The 'optimistic' persona vector raises the likelihood of optimistic answers over
    pessimistic ones in a multi-turn context; the result carries the prompting baseline and KL."""
    from steer import persona

    t = persona.load_trait("optimistic")
    pairs = persona.generate_pairs(smol, t, t.train_questions[:4], prompt_pairs=[0, 1], max_new_tokens=24)
    vec = persona.extract(smol, t, pairs)
    ev = E.evaluate_steering(
        smol, t.ab, lambda a: steer.steer(smol, vec, strength=a), [0.0, 1.0, 2.0],
        system_prompt=t.positive[0], neutral_prompts=steer.refusal.training_data()["harmless"][:8],
        unrelated_texts=persona.load_trait("formal").train_questions[:8], name="optimistic")
    s0, s1, s2, prompt = ev.rows
    assert s0["effect"] == 0.0 and 0 < s1["effect"] < s2["effect"], ev.rows
    assert s2["neutral_kl"] > 0 and prompt["neutral_kl"] == 0.0
    print(ev)
