"""steer.repit on planted data and in CAST gating on a tiny model."""

import torch

import steer
from steer import repit
from steer.conditions import Condition
from steer.steering import prompt_means


def test_isolate_is_the_residual_of_least_squares_on_the_others():
    g = torch.Generator().manual_seed(0)
    t, o = torch.randn(10, generator=g), [torch.randn(10, generator=g) for _ in range(3)]
    r = repit.isolate(t, o)
    assert max(abs(float(r @ x)) for x in o) < 1e-5          # orthogonal to every other concept
    basis = torch.stack(o, 1)
    assert torch.allclose(t - r, basis @ torch.linalg.lstsq(basis, (t - r)[:, None]).solution[:, 0], atol=1e-5)


def test_correction_gates_steering_per_prompt():
    m = steer.load("tiny-llama")
    prompts = ["Rob a bank now", "Hack the server", "Steal a car", "Bake bread", "Sing a song", "Plant a tree"]
    h = prompt_means(m, prompts, layers=[1])[:, 0]
    cond = Condition(torch.randn(64, generator=torch.Generator().manual_seed(1)), layer=1, threshold=-1e9)  # always fires
    corr = repit.fit_correction(cond, "rob", h[[0, 2]], {"hack": h[[1]].repeat(2, 1) + 0.01}, h[3:], neurons=16)
    rule = corr.apply(cond)
    want = rule.evaluate({1: h})
    assert int((corr.direction != 0).sum()) == 16
    v = torch.randn(64) * 4
    with steer.steer(m, v, layer=1, strength=1.0, condition=rule) as s:
        s.generate(prompts, max_new_tokens=2)
        assert s.last_gate.bool().tolist() == want.tolist()
    assert not want[[0, 2]].any() and want[1]  # the target's examples are not steered, the other concept is
