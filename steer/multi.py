"""Several behaviours at once: summed at one layer, each at its own layer, or in orthogonalised
subspaces with a shared component.

"Extending Activation Steering to Broad Skills and Multiple Behaviours" (van der Weij et al., 2024)
found that combining the vectors of several behaviours into one steering vector was "largely
unsuccessful", while injecting each vector at a different place in the model "is promising".
MSRS ("Adaptive Multi-Subspace Representation Steering") gives each behaviour its own subspace,
orthogonal to the others, plus a shared subspace for what they have in common; the paper trains
these and weights them per token. :func:`msrs` is steer's closed-form baseline of that idea (steer's
own construction, stated here), from each behaviour's contrast samples ``D_i`` (``[n_i, d]``, one
row per pair: activation with the behaviour minus without):

1. behaviour subspace ``B_i``: the top ``rank`` right singular vectors of ``D_i`` (uncentred, so
   the mean difference lies in it);
2. shared subspace ``S``: the eigenvectors of ``Σ_i B_iᵀB_i`` with eigenvalue ≥ ``shared · k``
   (directions lying in nearly all ``k`` behaviour subspaces; an exact common direction has
   eigenvalue ``k``), at most ``rank`` of them;
3. private subspaces ``Q_i``: each ``B_i`` with ``S`` projected out (keeping the directions at
   least 30° away from ``S``), orthonormalised within itself, then all of them together symmetrically (Löwdin, ``Q = (QQᵀ)^{-1/2} Q``: the orthonormal set
   closest to the per-behaviour bases, independent of their order), so ``Q_i ⟂ Q_j`` and
   ``Q_i ⟂ S``;
4. behaviour ``i``'s vector ``v_i = mean(D_i)`` is split into its shared part ``SᵀS v_i`` and its
   private part ``Q_iᵀQ_i v_i``; steering behaviours at strengths ``α_i`` adds every active
   private part ``α_i Q_iᵀQ_i v_i`` and the shared part once, ``mean_i(α_i SᵀS v_i)`` over the
   active behaviours (summing it would count what they share once per behaviour).

(With one direction per behaviour, ``rank=1``, nothing can be shared: ``k`` private directions and
a shared one would need ``k + 1`` dimensions inside a ``k``-dimensional span.)

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> common = torch.randn(32, generator=g)
>>> d = [3 * common + torch.randn(20, 32, generator=g) * 0.3 + torch.randn(32, generator=g) for _ in range(3)]
>>> s = msrs(d, rank=3)
>>> s.shared.shape[0], float((s.private[0] @ s.private[1].T).abs().max()) < 1e-5
(1, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .display import Rich
from .interventions import Intervention

__all__ = ["trait_behaviour", "Behaviour", "MSRS", "msrs", "interventions", "MODES", "evaluate_multi", "MultiEvaluation",
           "behaviour_from_pairs"]

MODES = ("sum", "layers", "msrs")


@dataclass
class Behaviour:
    """One behaviour to steer.

    ``samples`` are its per-pair contrasts ``[n, n_layers, d_model]`` (activation with the behaviour
    minus without); its vector at each layer is their mean. ``layer`` is its own layer, ``strength``
    its multiplier, ``items`` its evaluation items (``{"question", "matching", "non_matching"}`` or
    a trait's ``ab`` items) and ``system_prompt`` asks for it (the prompting baseline).
    """

    name: str
    samples: Float[Tensor, "n n_layers d_model"]
    layer: int
    strength: float
    items: Sequence[dict] = ()
    system_prompt: Optional[str] = None

    def __post_init__(self):
        self.samples = torch.as_tensor(self.samples, dtype=torch.float32)
        if self.samples.ndim != 3 or len(self.samples) < 1:
            raise ValueError(f"Behaviour {self.name!r}: samples must be [n, n_layers, d_model], got "
                             f"{tuple(self.samples.shape)}.")
        if not 0 <= self.layer < self.samples.shape[1]:
            raise ValueError(f"Behaviour {self.name!r}: layer {self.layer} outside 0..{self.samples.shape[1] - 1}.")

    @property
    def vectors(self) -> Float[Tensor, "n_layers d_model"]:
        """The mean-difference vector at every layer."""
        return self.samples.mean(0)


def behaviour_from_pairs(model, name: str, with_: Sequence, without: Sequence, *, layer: int, strength: float,
                         items: Sequence[dict] = (), system_prompt: Optional[str] = None,
                         batch_size: int = 16) -> Behaviour:
    """A :class:`Behaviour` from paired ``(prompt, completion)`` inputs with and without it: the
    per-pair difference of the completion tokens' mean ``resid_post`` at every layer.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> b = behaviour_from_pairs(m, "glad", [("Hi", "Great!")], [("Hi", "Meh.")], layer=1, strength=1.0)
    >>> tuple(b.samples.shape)
    (1, 2, 64)
    """
    from .capture import capture

    if len(with_) != len(without) or not with_:
        raise ValueError(f"Need as many pairs with ({len(with_)}) as without ({len(without)}) the behaviour, ≥ 1.")
    kw = dict(layers="all", positions="completion", reduce="mean", batch_size=batch_size, progress=False)
    a, b = capture(model, list(with_), **kw), capture(model, list(without), **kw)
    return Behaviour(name, a.tensor - b.tensor, layer, strength, items, system_prompt)


def trait_behaviour(model, trait, *, layer: int, strength: float, n_questions: int = 6,
                    max_new_tokens: int = 24) -> Behaviour:
    """A persona trait (:func:`steer.persona.load_trait`) as a :class:`Behaviour`: answers
    generated under its eliciting and suppressing system prompts (pairs 0 and 1) for its first
    ``n_questions`` training questions, evaluated on its ``ab`` items, prompted by its first
    eliciting system prompt.

    >>> import steer
    >>> b = trait_behaviour(steer.load("tiny-llama"), "formal", layer=1, strength=1.0, n_questions=1, max_new_tokens=2)
    >>> b.name, b.samples.shape[1:]
    ('formal', torch.Size([2, 64]))
    """
    from . import persona

    t = persona.load_trait(trait)
    pairs = persona.generate_pairs(model, t, t.train_questions[:n_questions], prompt_pairs=[0, 1],
                                   max_new_tokens=max_new_tokens)
    pos, neg = persona.pair_prompts(pairs)
    return behaviour_from_pairs(model, t.name, pos, neg, layer=layer, strength=strength, items=t.ab,
                                system_prompt=t.positive[0])


@dataclass(repr=False)
class MSRS(Rich):
    """Closed-form multi-subspace decomposition of ``k`` behaviours at one layer (see the module
    doc): orthonormal ``shared`` rows ``S``, orthonormal ``private`` bases ``Q_i`` (mutually
    orthogonal and orthogonal to ``S``), and each behaviour's shared / private vector parts."""

    shared: Float[Tensor, "n_shared d_model"]
    private: list  # k tensors [r_i, d_model]
    shared_part: Float[Tensor, "k d_model"]   # S^T S v_i
    private_part: Float[Tensor, "k d_model"]  # Q_i^T Q_i v_i
    names: list = field(default_factory=list)
    captured: Optional[Float[Tensor, "k"]] = None  # ‖parts‖² / ‖v_i‖²: how much of v_i the subspaces keep

    def vector(self, strengths: Float[Tensor, "k"]) -> Float[Tensor, "d_model"]:
        """The steering vector with behaviour ``i`` at strength ``strengths[i]`` (0 = off).

        >>> import torch
        >>> g = torch.Generator().manual_seed(1)
        >>> s = msrs([torch.randn(8, 16, generator=g) + 1 for _ in range(2)], rank=2)
        >>> bool(torch.allclose(s.vector(torch.tensor([2., 0.])), 2 * (s.shared_part[0] + s.private_part[0])))
        True
        """
        a = torch.as_tensor(strengths, dtype=self.shared_part.dtype)
        if a.shape != (len(self.shared_part),):
            raise ValueError(f"strengths has shape {tuple(a.shape)}; need one per behaviour ({len(self.shared_part)}).")
        on = a != 0
        if not on.any():
            return torch.zeros_like(self.shared_part[0])
        shared = (a[:, None] * self.shared_part)[on].mean(0)
        return shared + a @ self.private_part

    def _fields(self):
        q = torch.cat(self.private)
        gram = float((q @ q.T - torch.eye(len(q))).abs().max()) if len(q) else 0.0
        cross = float((q @ self.shared.T).abs().max()) if len(q) and len(self.shared) else 0.0
        kept = [] if self.captured is None else [round(x, 3) for x in self.captured.tolist()]
        return [("behaviours", ", ".join(self.names) or len(self.private)), ("shared dimensions", len(self.shared)),
                ("private dimensions", [len(p) for p in self.private]),
                ("kept of each vector (‖parts‖²/‖v‖²)", kept),
                ("max |QQᵀ − I|, |Q·S|", f"{gram:.1e}, {cross:.1e}")]


def _top_right_singular(d: Tensor, rank: int) -> Tensor:
    _, sv, vh = torch.linalg.svd(d, full_matrices=False)
    keep = (sv > sv[0] * 1e-6).sum()
    return vh[: min(rank, int(keep))]


def msrs(samples: Sequence[Float[Tensor, "n d_model"]], rank: int = 4, shared: float = 0.75,
         names: Sequence[str] = ()) -> MSRS:
    """Shared subspace plus mutually orthogonal private subspaces of ``k ≥ 2`` behaviours, from
    each behaviour's contrast samples ``[n_i, d_model]`` at one layer (float64 inside).

    >>> import torch
    >>> e = torch.eye(6)
    >>> d1 = torch.stack([e[0] + e[1], e[0] + 2 * e[1]]); d2 = torch.stack([e[0] + e[2], e[0] - e[2]])
    >>> s = msrs([d1, d2], rank=2)
    >>> s.shared.abs().round(decimals=6).tolist()            # e0 is in both subspaces
    [[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    >>> [p.abs().round().tolist() for p in s.private]
    [[[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 0.0, 0.0, 0.0]]]
    """
    ds = [torch.as_tensor(d).double() for d in samples]
    if len(ds) < 2:
        raise ValueError(f"msrs needs at least 2 behaviours, got {len(ds)}.")
    if any(d.ndim != 2 or len(d) == 0 or d.shape[1] != ds[0].shape[1] for d in ds):
        raise ValueError(f"Each behaviour's samples must be [n ≥ 1, d_model] with one d_model; got "
                         f"{[tuple(d.shape) for d in ds]}.")
    if not all(torch.isfinite(d).all() and d.abs().sum() > 0 for d in ds):
        raise ValueError("msrs: every behaviour's samples must be finite and not all zero.")
    k, dim = len(ds), ds[0].shape[1]
    bases = [_top_right_singular(d, rank) for d in ds]
    stack = torch.cat(bases)
    w, e = torch.linalg.eigh(stack.T @ stack) if dim <= stack.shape[0] * 4 else _eig_in_span(stack)
    order = w.argsort(descending=True)
    sel = order[w[order] >= shared * k - 1e-9][:rank]
    s = e[:, sel].T  # [n_shared, d]
    priv = []
    for b in bases:  # b's directions that lie mostly outside S (singular value = sine of the angle to S)
        _, sv, vh = torch.linalg.svd(b - (b @ s.T) @ s, full_matrices=False)
        priv.append(vh[sv >= 0.5])
    q = torch.cat(priv)
    g = q @ q.T
    gw, ge = torch.linalg.eigh(g)
    if len(q) and gw.min() < 0.05:  # two private directions within ~13° of each other
        raise ValueError("The behaviours' private subspaces overlap beyond the shared one: lower `rank` or "
                         "`shared` (more is shared), or drop a behaviour.")
    q = (ge @ torch.diag(gw.rsqrt()) @ ge.T) @ q if len(q) else q
    sizes = [len(p) for p in priv]
    qs = list(q.split(sizes))
    v = torch.stack([d.mean(0) for d in ds])
    sp = (v @ s.T) @ s
    pp = torch.stack([(vi @ qi.T) @ qi for vi, qi in zip(v, qs)])
    kept = ((sp + pp) ** 2).sum(1) / (v ** 2).sum(1)
    return MSRS(s.float(), [x.float() for x in qs], sp.float(), pp.float(), list(names), kept.float())


def _eig_in_span(stack: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of ``stackᵀ stack`` (d × d) through the small ``stack stackᵀ`` Gram matrix."""
    w, u = torch.linalg.eigh(stack @ stack.T)
    keep = w > 1e-12
    w, u = w[keep], u[:, keep]
    return w, (stack.T @ u) / w.sqrt()


def interventions(behaviours: Sequence[Behaviour], mode: str, *, on: Optional[Sequence[bool]] = None,
                  layer: Optional[int] = None, positions="all", include_sink: bool = False, rank: int = 4,
                  shared: float = 0.75) -> list[Intervention]:
    """Interventions steering the behaviours switched ``on`` (default: all) together.

    * ``"sum"``: ``Σ α_i v_i`` as one vector at ``layer`` (default: the first behaviour's layer);
    * ``"layers"``: each ``α_i v_i`` at the behaviour's own layer;
    * ``"msrs"``: the :func:`msrs` vector at ``layer`` (subspaces of ``rank``, ``shared`` threshold).

    A behaviour alone is the same call with only it switched on.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> bs = [Behaviour("a", torch.randn(3, 2, 64), 0, 1.0), Behaviour("b", torch.randn(3, 2, 64), 1, 2.0)]
    >>> [iv.layers for iv in interventions(bs, "layers")], [iv.layers for iv in interventions(bs, "sum")]
    ([[0], [1]], [[0]])
    """
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}: use one of {MODES}.")
    if not behaviours:
        raise ValueError("No behaviours given.")
    on = [True] * len(behaviours) if on is None else list(on)
    if len(on) != len(behaviours):
        raise ValueError(f"`on` has {len(on)} entries for {len(behaviours)} behaviours.")
    meta = {"method": f"multi-{mode}", "behaviours": [b.name for b, o in zip(behaviours, on) if o]}
    kw = dict(positions=positions, include_sink=include_sink, meta=meta)
    if mode == "layers":
        return [Intervention("add", b.vectors[b.layer], layers=[b.layer], strength=b.strength, **kw)
                for b, o in zip(behaviours, on) if o]
    lay = behaviours[0].layer if layer is None else layer
    if mode == "sum":
        vec = sum(b.strength * b.vectors[lay] for b, o in zip(behaviours, on) if o)
    else:
        s = msrs([b.samples[:, lay] for b in behaviours], rank=rank, shared=shared, names=[b.name for b in behaviours])
        vec = s.vector(torch.tensor([b.strength if o else 0.0 for b, o in zip(behaviours, on)]))
    if not isinstance(vec, Tensor):  # nothing switched on
        return []
    return [Intervention("add", vec, layers=[lay], strength=1.0, **kw)]


def evaluate_multi(model, behaviours: Sequence[Behaviour], modes: Sequence[str] = MODES, *, layer: Optional[int] = None,
                   positions="all", neutral_prompts: Sequence = (), history=None) -> "MultiEvaluation":
    """Each behaviour's likelihood effect (:func:`steer.evaluate.behaviour_gaps` on its items,
    minus the unsteered gaps) when steered alone and together with the others, per mode, with the
    neutral next-token KL of each setting and the prompting baseline (its own system prompt alone;
    all system prompts joined for the combination).

    ``retained`` = effect together / effect alone (same mode and placement): 1 means no
    interference; ``cross`` = the effect on a behaviour's items of steering the *other* behaviours
    (without it).

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> it = [{"question": "Hi?", "matching": "Hello!", "non_matching": "Go away."}]
    >>> bs = [Behaviour("a", torch.randn(3, 2, 64), 0, 1.0, it), Behaviour("b", torch.randn(3, 2, 64), 1, 1.0, it)]
    >>> ev = evaluate_multi(m, bs, modes=["layers"], neutral_prompts=["Yo"])
    >>> sorted(ev.rows[0])[:4]
    ['behaviour', 'cross', 'effect_alone', 'effect_together']
    """
    from .evaluate import DEFAULT_HISTORY, behaviour_gaps, next_token_kl
    from .steering import Steering

    history = DEFAULT_HISTORY if history is None else history
    for b in behaviours:
        if not b.items:
            raise ValueError(f"Behaviour {b.name!r} has no evaluation items.")
    k = len(behaviours)
    base = [behaviour_gaps(model, b.items, history=history) for b in behaviours]
    neutral0 = None
    if neutral_prompts:
        with Steering(model) as s:
            neutral0 = s.next_token_logits(neutral_prompts)

    def effects(ivs) -> tuple[list[float], float]:
        st = Steering(model, ivs)
        eff = [float((behaviour_gaps(model, b.items, st, history=history) - g0).mean())
               for b, g0 in zip(behaviours, base)]
        kl = float("nan")
        if neutral0 is not None:
            with st as s:
                kl = float(next_token_kl(neutral0, s.next_token_logits(neutral_prompts)).mean())
        return eff, kl

    rows, settings = [], []
    for mode in modes:
        alone = []
        for i in range(k):
            eff, kl = effects(interventions(behaviours, mode, on=[j == i for j in range(k)], layer=layer,
                                            positions=positions))
            alone.append((eff, kl))
            settings.append({"mode": mode, "on": behaviours[i].name, "neutral_kl": kl})
        together, kl_all = effects(interventions(behaviours, mode, layer=layer, positions=positions))
        settings.append({"mode": mode, "on": "all", "neutral_kl": kl_all})
        for i, b in enumerate(behaviours):
            a = alone[i][0][i]
            rows.append({"mode": mode, "behaviour": b.name, "effect_alone": a, "effect_together": together[i],
                         "retained": together[i] / a if a else float("nan"),
                         "cross": sum(alone[j][0][i] for j in range(k) if j != i),
                         "neutral_kl_alone": alone[i][1], "neutral_kl_together": kl_all})
    prompts = [b.system_prompt for b in behaviours]
    if all(prompts):
        joined = " ".join(prompts)
        for b, g0 in zip(behaviours, base):
            own = float((behaviour_gaps(model, b.items, system=b.system_prompt, history=history) - g0).mean())
            both = float((behaviour_gaps(model, b.items, system=joined, history=history) - g0).mean())
            rows.append({"mode": "prompt", "behaviour": b.name, "effect_alone": own, "effect_together": both,
                         "retained": both / own if own else float("nan"), "cross": float("nan"),
                         "neutral_kl_alone": 0.0, "neutral_kl_together": 0.0})
    return MultiEvaluation(rows, settings, [b.name for b in behaviours])


class MultiEvaluation(Rich):
    """Rows of :func:`evaluate_multi`: per mode and behaviour, the effect alone and together."""

    def __init__(self, rows, settings, names):
        self.rows, self.settings, self.names = rows, settings, names

    def retained(self, mode: str) -> dict[str, float]:
        """``{behaviour: effect together / effect alone}`` for one mode."""
        return {r["behaviour"]: r["retained"] for r in self.rows if r["mode"] == mode}

    def to_dict(self) -> dict:
        return {"behaviours": self.names, "rows": self.rows, "settings": self.settings}

    def _title(self) -> str:
        return "MultiEvaluation " + " + ".join(self.names)

    def _fields(self):
        modes = list(dict.fromkeys(r["mode"] for r in self.rows))
        return [(f"mean retained ({m})", sum(self.retained(m).values()) / len(self.names)) for m in modes]

    def _table(self):
        cols = ["mode", "behaviour", "effect_alone", "effect_together", "retained", "cross", "neutral_kl_together"]
        return cols, [[r[c] for c in cols] for r in self.rows]
