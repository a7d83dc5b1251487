"""Cross-model diagnostics on a pair whose difference is known: a tiny random model and a copy
whose layer-1 MLP (and nothing else) was finetuned for a few steps to answer 'z' after 'q'."""

import copy
import random

import pytest
import torch

import steer
from steer import diagnostics as D
from steer.data import Raw, tokenize

LETTERS = "abcdefghijklmnoprstuvwy"


def _prompts(n, seed):
    r = random.Random(seed)
    return [Raw("".join(r.choice(LETTERS) for _ in range(r.randint(3, 8))) + "q") for _ in range(n)]


@pytest.fixture(scope="module")
def pair():
    a = steer.load("tiny-llama")
    hf = copy.deepcopy(a.hf)
    b = steer.Model.from_hf(hf, a.tokenizer, name="tiny-llama-qz")
    z = a.to_tokens("z")[0]
    train = tokenize(b, _prompts(32, 0))
    mlp = b.arch.mlp_module(b.layers[1])
    for p in hf.parameters():
        p.requires_grad_(False)
    for p in mlp.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    for _ in range(40):
        logits = hf(input_ids=train.input_ids, attention_mask=train.attention_mask,
                    position_ids=train.position_ids).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, torch.full((len(train),), z))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in hf.parameters():
        p.requires_grad_(False)
    return a, b, z


def _logprob_z(z):
    return lambda logits: logits.log_softmax(-1)[:, z]


def test_cross_patching_localises_the_finetuned_layer(pair):
    a, b, z = pair
    held = _prompts(12, 1)
    cp = D.cross_patch(a, b, held, _logprob_z(z))
    assert cp.b > cp.a + 3  # the finetuned copy learnt the pattern, on held-out prompts too
    r = dict(zip(cp.sites, cp.restored))
    # a's MLP output at layer 1 (the only changed part) removes the behaviour entirely ...
    assert float(r["mlp_out"][1]) == pytest.approx(1.0, abs=1e-4)
    assert float(r["resid_post"][1]) == pytest.approx(1.0, abs=1e-4)
    # ... patching parts the two models share changes nothing
    for site, layer in [("mlp_out", 0), ("attn_out", 0), ("attn_out", 1), ("resid_post", 0)]:
        assert float(r[site][layer]) == pytest.approx(0.0, abs=1e-4), (site, layer)
    # per-prompt values are what running b with the hook by hand gives
    acts = {}
    with steer.add_hooks(a, {"mlp_out.1": lambda act, site: acts.__setitem__("m", act)}), torch.no_grad():
        bt = tokenize(a, held)
        a.hf(input_ids=bt.input_ids, attention_mask=bt.attention_mask, position_ids=bt.position_ids)
    with steer.add_hooks(b, {"mlp_out.1": lambda act, site: acts["m"]}), torch.no_grad():
        lg = b.hf(input_ids=bt.input_ids, attention_mask=bt.attention_mask, position_ids=bt.position_ids).logits[:, -1]
    torch.testing.assert_close(cp.per_prompt[cp.sites.index("mlp_out"), 1], _logprob_z(z)(lg), atol=1e-4, rtol=1e-4)


def test_layer_groups_and_errors(pair):
    a, b, z = pair
    cp = D.cross_patch(a, b, _prompts(4, 2), _logprob_z(z), sites=["mlp_out"], layers=[0, (0, 1)], batch_size=4)
    assert cp.groups == [(0,), (0, 1)] and cp._labels() == ["0", "0-1"]
    assert float(cp.restored[0, 0]) == pytest.approx(0.0, abs=1e-4)
    assert float(cp.restored[0, 1]) == pytest.approx(1.0, abs=1e-4)
    assert "CrossPatch" in cp._text() and cp.to_dict()["groups"] == [[0], [0, 1]]
    with pytest.raises(ValueError, match="site"):
        D.cross_patch(a, b, _prompts(2, 2), _logprob_z(z), sites=["neuron"])
    with pytest.raises(ValueError, match="one architecture"):
        D.cross_patch(a, steer.load("tiny-gpt2"), _prompts(2, 2), _logprob_z(z))


def test_direction_cosines_and_transfer(pair):
    """A 'q'-vs-other direction: identical in both models up to the finetuned layer, different
    after it; transferring it at layer 0 is exactly steering with b's own."""
    a, b, z = pair
    pos = _prompts(16, 3)
    neg = [Raw(p[:-1] + "x") for p in pos]
    da, db = (steer.extract(m, pos, neg, include_sink=True) for m in (a, b))
    cos = D.direction_cosines(da, db)
    assert float(cos[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(cos[1]) < 0.999
    held = _prompts(6, 4)
    bt = tokenize(b, held)

    def effect(steering):
        with (steering if steering is not None else steer.Steering(b, [])) as s:
            s.batch = bt
            with torch.no_grad():
                lg = b.hf(input_ids=bt.input_ids, attention_mask=bt.attention_mask, position_ids=bt.position_ids).logits
        return float(lg[:, -1].log_softmax(-1)[:, z].mean())

    t = D.transfer(b, db, da, effect, layer=0, strengths=[-2.0, 2.0])
    assert t.cosine == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(t.other, t.own, atol=1e-4, rtol=1e-4)
    t1 = D.transfer(b, db, da, effect, layer=1, strengths=[2.0])
    v = da.vector(1) * (db.vector(1).norm() / da.vector(1).norm())
    assert float(t1.other[0]) == pytest.approx(effect(steer.steer(b, v, layer=1, strength=2.0)), abs=1e-5)
    assert t1.baseline == pytest.approx(effect(None))
    assert "retained" in t1.to_dict() and t1._repr_mimebundle_()["text/html"]
    with pytest.raises(ValueError, match="same layers"):
        D.direction_cosines(da, db.vectors[:1])
