"""Linear-AcT (steer.transport): the maps equal the sorted-sample optimal transport fit, computed
by hand; under Steering they move exactly the non-sink tokens, by λ of the way."""

import numpy as np
import pytest
import torch

import steer
from steer.transport import LinearTransport, fit_linear_act, transport


def test_map_is_least_squares_on_sorted_pairs():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(50, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    tgt = torch.randn(50, 4, generator=g).exp()  # skewed: no affine relation between the samples
    t = LinearTransport.fit(src, tgt, layer=0)
    for i in range(4):  # numpy's least-squares line through (sorted source, sorted target)
        w, b = np.polyfit(np.sort(src[:, i].numpy()), np.sort(tgt[:, i].numpy()), 1)
        assert abs(float(t.omega[i]) - w) < 1e-5 and abs(float(t.beta[i]) - b) < 1e-5
    # λ = 1 carries the source's quantiles onto the target's affine fit; λ = 0 is the identity
    x = src[:3]
    torch.testing.assert_close(t(x, 1.0), x * t.omega + t.beta)
    assert torch.equal(t(x, 0.0), x)


def test_unequal_sample_counts_match_quantiles():
    src = torch.arange(5.0)[:, None]  # quantiles 0,1,2,3,4
    tgt = torch.linspace(10, 20, 9)[:, None]  # read at 5 levels: 10, 12.5, 15, 17.5, 20
    t = LinearTransport.fit(src, tgt, layer=0)
    assert abs(float(t.omega) - 2.5) < 1e-6 and abs(float(t.beta) - 10.0) < 1e-6
    with pytest.raises(ValueError, match="same d"):
        LinearTransport.fit(torch.zeros(4, 2), torch.zeros(4, 3), layer=0)


def test_transport_under_steering_moves_non_sink_tokens_by_lambda(tiny):
    prompts = ["I hate rainy days", "This is awful", "Terrible news"], ["I love sunny days", "This is great", "Lovely news"]
    (t,) = fit_linear_act(tiny, *prompts, layers=[1])
    b = steer.tokenize(tiny, ["Hello there friend", "Hi"])
    seen = {}

    def grab(key):
        return lambda act, site: seen.__setitem__(key, act.clone())

    with steer.add_hooks(tiny, {"resid_post.1": grab("plain")}):
        tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
    with steer.Steering(tiny, transport([t], 0.25)), steer.add_hooks(tiny, {"resid_post.1": grab("act")}):
        tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
    x, y = seen["plain"], seen["act"]
    edit = b.attention_mask.bool().clone()
    sink = b.attention_mask.shape[1] - b.attention_mask.sum(-1)
    edit[torch.arange(2), sink] = False
    torch.testing.assert_close(y[edit], x[edit] + 0.25 * (x[edit] * t.omega + t.beta - x[edit]))
    assert torch.equal(y[~edit], x[~edit])  # the sink and the padding are untouched
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        transport([t], 1.5)


# -- LinEAS ------------------------------------------------------------------------------------
from steer.transport import fit_lineas, wasserstein_1d

SRC = ["I hate this so much", "Awful day, truly bad", "This is terrible news", "What a horrible idea"]
TGT = ["I love this so much", "Lovely day, truly good", "This is wonderful news", "What a brilliant idea"]


def test_wasserstein_1d_is_the_sorted_sample_distance():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 3, generator=g), torch.randn(50, 3, generator=g) * 2 + 1
    want = ((x.sort(0).values - y.sort(0).values) ** 2).mean(0).mean()
    assert torch.allclose(wasserstein_1d(x, y.sort(0).values), want)
    x.requires_grad_(True)
    wasserstein_1d(x, y.sort(0).values).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _distance_under(m, maps, layers):
    """The LinEAS objective recomputed independently: capture the source under the maps (steer's
    Steering) and compare with the target, layer by layer."""
    import steer
    from steer.transport import transport as tr

    def toks(prompts, st=None):
        ctx = st if st is not None else steer.Steering(m)
        with ctx:
            a = steer.capture(m, prompts, layers=layers, positions="all", include_sink=False, progress=False)
        return a.tensor.permute(0, 2, 1, 3)[a.mask]

    t = toks(TGT)
    s = toks(SRC, steer.Steering(m, tr(maps, 1.0)) if maps else None)
    return sum(float(wasserstein_1d(s[:, j], t[:, j].sort(0).values, t[:, j].var(0).mean())) for j in range(len(layers))) / len(layers)


def test_lineas_lowers_the_joint_distributional_loss():
    import steer

    m = steer.load("tiny-llama")
    before = _distance_under(m, None, [0, 1])
    maps = fit_lineas(m, SRC, TGT, layers=[0, 1], steps=40, lr=0.1, init="identity")
    after = _distance_under(m, maps, [0, 1])
    local = _distance_under(m, fit_lineas(m, SRC, TGT, layers=[0, 1], steps=0), [0, 1])  # = Linear-AcT per layer
    assert after < 0.8 * before, (before, after)
    assert after < local, (after, local)  # fitted jointly, it beats the local maps on the joint objective
    assert maps[0].meta["loss_first"] == pytest.approx(before, rel=1e-3)  # the objective it optimised is this one
    assert maps[0].meta["active_units"] == m.d_model


def test_lineas_upstream_map_accounts_for_downstream_layers():
    """Fitted jointly, the layer-0 map differs from the one fitted to layer 0 alone: the layer-1
    term of the loss reaches it through the model."""
    import steer

    m = steer.load("tiny-llama")
    alone = fit_lineas(m, SRC, TGT, layers=[0], steps=15, lr=0.05, init="identity")[0]
    joint = fit_lineas(m, SRC, TGT, layers=[0, 1], steps=15, lr=0.05, init="identity")[0]
    assert (alone.omega - joint.omega).abs().max() > 1e-3


def test_lineas_keeps_the_chosen_number_of_units():
    import steer

    m = steer.load("tiny-llama")
    trainable = m.layers[1].mlp.down_proj.weight  # e.g. an adapter the user trains: it stays trainable
    trainable.requires_grad_(True)
    try:
        maps = fit_lineas(m, SRC, TGT, layers=[0, 1], steps=20, lr=0.05, units=5, init="identity")
        assert trainable.requires_grad and trainable.grad is None
    finally:
        trainable.requires_grad_(False)
    assert [t.meta["active_units"] for t in maps] == [5, 5]
    assert ((maps[1].omega != 1) | (maps[1].beta != 0)).sum() == 5
    with pytest.raises(ValueError, match="init"):
        fit_lineas(m, SRC, TGT, layers=[1], init="zeros")
