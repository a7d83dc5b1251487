"""steer.agents (EAST) on a tiny model: the action distribution and entropy against the model's own
logits, seeded and batched rollouts, the EAST vector against a hand computation, steering hooks."""

import math

import pytest
import torch

import steer
from steer import agents


def test_entropy_and_valid_mass_are_the_models_next_token_distribution():
    m = steer.load("tiny-llama")
    b = agents.Bandit([0.1, 0.9, 0.5])
    prefix, ids = agents.arm_tokens(m, b)
    ep = agents.play(m, b, rounds=2, episodes=2, seed=3)
    hist = [[(int(ep.actions[e, 0]), int(ep.rewards[e, 0]))] for e in range(2)]
    with steer.Steering(m) as s:  # round 2 recomputed by hand from plain logits
        p = s.next_token_logits([b.prompt(h, None, prefix) for h in hist]).softmax(-1)[:, ids]
    d = p / p.sum(-1, keepdim=True)
    assert torch.allclose(ep.valid[:, 1], p.sum(-1), atol=1e-5)
    assert torch.allclose(ep.entropy[:, 1], -(d * d.log()).sum(-1), atol=1e-5)
    assert (ep.entropy <= math.log(3) + 1e-6).all()


def test_rollouts_are_seeded_and_steering_changes_them():
    m = steer.load("tiny-llama")
    b = agents.Bandit([0.3, 0.6], seed=2)
    a1, a2 = agents.play(m, b, rounds=4, episodes=3, seed=5), agents.play(m, b, rounds=4, episodes=3, seed=5)
    assert torch.equal(a1.actions, a2.actions) and torch.equal(a1.entropy, a2.entropy)
    zero = agents.play(m, b, rounds=4, episodes=3, seed=5, steering=steer.steer(m, torch.zeros(64), layer=1))
    assert torch.equal(zero.entropy, a1.entropy)  # a zero vector is the unsteered agent
    big = agents.play(m, b, rounds=4, episodes=3, seed=5, steering=steer.steer(m, torch.randn(64) * 20, layer=1))
    assert not torch.allclose(big.entropy, a1.entropy)


def test_rewards_are_drawn_apart_from_the_actions():
    """Both arms pay half the time: whichever arm was pulled, about half the pulls pay. (With the
    action and reward streams seeded alike, the number that picked arm A also paid it: 0.76
    against 0.00.)"""
    m = steer.load("tiny-llama")
    for seed in (0, 1):
        ep = agents.play(m, agents.Bandit([0.5, 0.5], seed=0), rounds=4, episodes=32, seed=seed)
        a, r = ep.actions.flatten(), ep.rewards.flatten().float()
        assert min((a == 0).sum(), (a == 1).sum()) >= 20
        assert abs(float(r[a == 0].mean() - r[a == 1].mean())) < 0.3, seed


def test_east_vector_is_the_entropy_weighted_mean_minus_the_mean():
    m = steer.load("tiny-llama")
    ep = agents.play(m, agents.Bandit([0.2, 0.8]), rounds=3, episodes=2, layer=1)
    h, w = ep.states.reshape(-1, 64).double(), ep.entropy.reshape(-1).double()
    want = sum(wi * hi for wi, hi in zip(w, h)) / w.sum() - h.mean(0)
    assert torch.allclose(agents.east_vector(ep).double(), want, atol=1e-5)
    # the states are the decision token's resid_post at that layer
    prefix, _ = agents.arm_tokens(m, agents.Bandit([0.2, 0.8]))
    first = steer.capture(m, [agents.Bandit([0.2, 0.8]).prompt([], None, prefix)], layers=[1], positions="last")
    assert torch.allclose(ep.states[0, 0], first.tensor[0, 0], atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="arms"):
        agents.Bandit([0.5])
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        agents.Bandit([0.5, 1.5])
    m = steer.load("tiny-llama")
    ep = agents.play(m, agents.Bandit([0.2, 0.8]), rounds=1, episodes=1)
    with pytest.raises(ValueError, match="layer=L"):
        agents.east_vector(ep)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            agents.play(m, agents.Bandit([0.2, 0.8]), rounds=1, episodes=1, temperature=t)
