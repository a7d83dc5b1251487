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
