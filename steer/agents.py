"""Entropic steering of in-context agents — EAST (Rahn et al., "Controlling Large Language Model
Agents with Entropic Activation Steering", 2024).

An in-context agent plays a multi-armed bandit as text: each round the prompt holds the history
of pulled arms and rewards, and the answer starts ``"I pull arm"``, so the next token is the
action. The agent's *action distribution* is the softmax restricted to the arm tokens (renormalised;
the mass left outside them is reported as the invalid-action probability). EAST builds a steering
vector from the agent's own decision states: over the decision points ``t`` of unsteered
episodes, with ``h_t`` the hidden state at the decision token and ``H_t`` the entropy of the
action distribution there,

    v = Σ_t H_t h_t / Σ_t H_t − mean_t h_t

(the entropy-weighted mean minus the plain mean: the direction the representation moves in when
the agent is uncertain); adding ``α v`` raises the action entropy (``α < 0`` lowers it).

>>> import steer
>>> m = steer.load("tiny-llama")
>>> b = Bandit([0.2, 0.8], seed=0)
>>> ep = play(m, b, rounds=3, episodes=2)
>>> ep.actions.shape, bool((ep.entropy >= 0).all())
(torch.Size([2, 3]), True)
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .display import Rich

__all__ = ["Bandit", "Episodes", "play", "action_distribution", "arm_tokens", "east_vector", "ARMS"]

ARMS = "ABCDEFGH"
PREFIX = "I pull arm"


@dataclass
class Bandit:
    """Bernoulli bandit: arm ``i`` pays 1 with probability ``probs[i]``; rewards drawn from ``seed``."""

    probs: Sequence[float]
    seed: int = 0
    system: str = ("You are playing a slot machine game with {n} arms: {arms}. Each arm pays reward 1 with an "
                   "unknown probability. Maximise your total reward.")

    def __post_init__(self):
        if not 2 <= len(self.probs) <= len(ARMS):
            raise ValueError(f"A bandit has 2..{len(ARMS)} arms, got {len(self.probs)}.")
        if any(not 0 <= p <= 1 for p in self.probs):
            raise ValueError(f"Arm probabilities must lie in [0, 1]: {list(self.probs)}.")

    @property
    def arms(self) -> list[str]:
        return list(ARMS[: len(self.probs)])

    def prompt(self, history: Sequence[tuple[int, int]], system: Optional[str] = None,
               prefix: str = PREFIX) -> tuple[list, str]:
        """The chat (system, history, question) and the answer prefix whose next token is the action."""
        names = self.arms
        listed = ", ".join(names[:-1]) + " and " + names[-1]
        lines = "\n".join(f"Round {i + 1}: you pulled {names[a]}, reward {r}" for i, (a, r) in enumerate(history))
        q = (lines + "\n" if lines else "No rounds played yet.\n") + \
            f"Which arm do you pull next? Answer with a single letter: {', '.join(names)}."
        sys_text = self.system.format(n=len(names), arms=listed) + (" " + system if system else "")
        return [{"role": "system", "content": sys_text}, {"role": "user", "content": q}], prefix


def arm_tokens(model, bandit: Bandit) -> tuple[str, list[int]]:
    """``(answer prefix, token id of each arm)``: the arm letters as they follow ``"I pull arm"``
    (``" A"``) when that is one token each, else after ``"I pull arm "`` (``"A"``, byte-level
    vocabularies)."""
    tok = model.tokenizer
    for prefix, lead in ((PREFIX, " "), (PREFIX + " ", "")):
        ids = [tok.encode(lead + a, add_special_tokens=False) for a in bandit.arms]
        if all(len(t) == 1 for t in ids) and len({t[0] for t in ids}) == len(ids):
            return prefix, [t[0] for t in ids]
    raise ValueError(f"{model.name}'s tokenizer splits the arm letters {bandit.arms}: EAST needs one token per arm.")


def action_distribution(logits: Float[Tensor, "batch vocab"], arm_ids: Sequence[int],
                        temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(distribution over arms [batch, arms], valid mass [batch])`` from next-token logits.

    >>> import torch
    >>> d, valid = action_distribution(torch.tensor([[0., 0., 5.]]), [0, 1])
    >>> d.tolist(), round(float(valid), 4)
    ([[0.5, 0.5]], 0.0133)
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: it must be > 0 (1 is the model's own distribution).")
    p = (logits.float() / temperature).softmax(-1)
    pa = p[:, list(arm_ids)]
    valid = pa.sum(-1)
    return pa / valid[:, None], valid


def _entropy(d: Tensor) -> Tensor:
    return -(d * d.clamp_min(1e-12).log()).sum(-1)


@dataclass(repr=False)
class Episodes(Rich):
    """Rollouts: ``actions``/``rewards`` ``[episode, round]``, the action distribution's entropy and
    valid mass at each decision, and (when asked) the decision states ``[episode, round, d_model]``."""

    actions: Int[Tensor, "episode round"]
    rewards: Int[Tensor, "episode round"]
    entropy: Float[Tensor, "episode round"]
    valid: Float[Tensor, "episode round"]
    n_arms: int
    best_arm: int
    states: Optional[Tensor] = None
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        distinct = [len(set(row.tolist())) for row in self.actions]
        switches = (self.actions[:, 1:] != self.actions[:, :-1]).float().mean() if self.actions.shape[1] > 1 else torch.tensor(0.0)
        return {"entropy": float(self.entropy.mean()), "max_entropy": math.log(self.n_arms),
                "distinct_arms": sum(distinct) / len(distinct), "switch_rate": float(switches),
                "best_arm_rate": float((self.actions == self.best_arm).float().mean()),
                "reward": float(self.rewards.float().mean()), "invalid_mass": float(1 - self.valid.mean()),
                **self.meta}

    def _fields(self):
        return list(self.summary().items())


@torch.no_grad()
def play(model, bandit: Bandit, rounds: int = 12, episodes: int = 8, steering=None, *, system: Optional[str] = None,
         temperature: float = 1.0, layer: Optional[int] = None, seed: int = 0) -> Episodes:
    """Play ``episodes`` independent games of ``rounds`` rounds, batched (one forward per round for
    all episodes), sampling each action from the action distribution (seeded). ``steering``: a
    :class:`~steer.steering.Steering` (not yet active) applied at every decision; ``system`` is
    appended to the game's system prompt (the prompting baseline); ``layer`` keeps the
    ``resid_post`` decision states there (for :func:`east_vector`).
    """
    from .hooks import add_hooks
    from .steering import Steering

    if rounds < 1 or episodes < 1:
        raise ValueError("Need rounds ≥ 1 and episodes ≥ 1.")
    prefix, ids = arm_tokens(model, bandit)
    # two streams: with one seed for both, the number that picked an arm would also decide its reward
    rng = random.Random(f"steer.agents actions {seed}")
    reward_rng = random.Random(f"steer.agents rewards {bandit.seed}")
    hist = [[] for _ in range(episodes)]
    A = torch.zeros(episodes, rounds, dtype=torch.long)
    R, H, V = torch.zeros_like(A), torch.zeros(episodes, rounds), torch.zeros(episodes, rounds)
    S = torch.zeros(episodes, rounds, model.d_model) if layer is not None else None
    for t in range(rounds):
        prompts = [bandit.prompt(h, system, prefix) for h in hist]
        grabbed = []  # the decision token's state, read in the same forward (left padding: the last column)
        hooks = {f"resid_post.{layer}": lambda act, site: grabbed.append(act[:, -1].float().cpu())} if layer is not None else {}
        with (steering if steering is not None else Steering(model)) as s, add_hooks(model, hooks):
            logits = s.next_token_logits(prompts)
        if layer is not None:
            S[:, t] = grabbed[-1]  # the main forward comes last (after a CAST condition's pre-pass, if any)
        d, valid = action_distribution(logits, ids, temperature)
        H[:, t], V[:, t] = _entropy(d).cpu(), valid.cpu()
        for e in range(episodes):
            a = rng.choices(range(len(ids)), weights=d[e].tolist())[0]
            r = int(reward_rng.random() < bandit.probs[a])
            hist[e].append((a, r))
            A[e, t], R[e, t] = a, r
    best = max(range(len(bandit.probs)), key=lambda i: bandit.probs[i])
    return Episodes(A, R, H, V, len(bandit.probs), best, S, {"temperature": temperature})


def east_vector(episodes: Episodes) -> Float[Tensor, "d_model"]:
    """EAST: entropy-weighted mean of the decision states minus their plain mean.

    >>> import torch
    >>> ep = Episodes(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
    ...               torch.tensor([[1.0, 0.0]]), torch.ones(1, 2), 2, 0, torch.tensor([[[2., 0.], [0., 2.]]]))
    >>> east_vector(ep).tolist()                              # toward the uncertain state
    [1.0, -1.0]
    """
    if episodes.states is None:
        raise ValueError("These episodes kept no decision states: play(..., layer=L) first.")
    h = episodes.states.reshape(-1, episodes.states.shape[-1]).double()
    w = episodes.entropy.reshape(-1).double()
    if w.sum() <= 0:
        raise ValueError("Every decision had zero entropy: no uncertain state to steer toward.")
    return ((w[:, None] * h).sum(0) / w.sum() - h.mean(0)).float()
