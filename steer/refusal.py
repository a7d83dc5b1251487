"""Refusal recipes: the refusal direction (Arditi et al.), the refusal behaviour vector (CAST),
the harmfulness direction and its Latent-Guard classifier, refusal scoring, and the conditional
refusal evaluation behind ``steer refusal``.

>>> import steer
>>> from steer import refusal
>>> m = steer.load("tiny-llama")
>>> d = refusal.behaviour_vector(m, ["How do I pick a lock?"], ["How do I bake bread?"], n=2, layer=1)
>>> d.vectors.shape
torch.Size([2, 64])

All extraction uses steer's own training prompts (``steer/datasets/``); evaluation prompts are
passed in separately and never used for extraction.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from . import evaluate as E
from .capture import capture
from .conditions import Condition, fit_condition
from .data import prompt_list
from .directions import Direction, extract, from_activations, sweep_layers
from .interventions import Intervention
from .progress import bar
from .steering import Steering, steer

__all__ = [
    "training_data", "behaviour_vector", "refusal_direction", "select_refusal_direction",
    "harmfulness_direction", "LatentGuard", "latent_guard", "refusal_scores", "evaluate_refusal",
    "fit_refusal", "harmfulness_condition", "RefusalSetup", "demo", "DEFAULT_LAYER", "DEFAULT_STRENGTH",
    "fasb_probe",
]

DATA_DIR = Path(__file__).parent / "datasets"
DEFAULT_LAYER = 10  # behaviour layer on the embedded SmolLM2 (sweep in experiments/refusal_induction.py)
DEFAULT_STRENGTH = 2.0
CONDITION_RECALL = 0.95  # out-of-fold recall the harmfulness condition's threshold keeps (fit_refusal)


def training_data(limit: Optional[int] = None, balanced: Optional[bool] = None) -> dict[str, list[str]]:
    """steer's own training prompts: ``harmful``, ``harmless`` instructions and ``refusals``,
    ``compliances`` completion openings (``limit`` caps each list).

    The instruction files are sorted by category (weapons first, ...), so their first ``n``
    prompts cover only a few categories. ``balanced=True`` orders each instruction list one
    category after another in turn, so that any prefix covers them all. The default,
    ``balanced=None``, is balanced exactly when ``limit`` is given: a capped list covers every
    category unless ``balanced=False`` asks for the files' first prompts.

    >>> d = training_data(limit=3)
    >>> sorted(d), len(d["harmful"])
    (['compliances', 'harmful', 'harmless', 'refusals'], 3)
    >>> [p[:20] for p in training_data(limit=3)["harmful"]]  # weapons, explosives, cybercrime
    ['Write a guide to con', 'How do I make a pipe', 'Write ransomware tha']
    >>> [p[:20] for p in training_data(limit=3, balanced=False)["harmful"]]  # the file's first: weapons
    ['Write a guide to con', 'How can I build an u', 'Explain how to buy a']
    """
    from .data import load_prompts

    if balanced is None:
        balanced = limit is not None

    out = {k: load_prompts(DATA_DIR / f"{k}.json", balanced=balanced) for k in ("harmful", "harmless")}
    for k in ("refusals", "compliances"):
        out[k] = json.loads((DATA_DIR / f"{k}.json").read_text())
    if limit is not None:
        out = {k: v[:limit] for k, v in out.items()}
    return out


def behaviour_vector(
    model,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusals: Optional[Sequence[str]] = None,
    compliances: Optional[Sequence[str]] = None,
    *,
    n: Optional[int] = None,
    layer: Optional[int] = DEFAULT_LAYER,
    layers="all",
    batch_size: int = 32,
) -> Direction:
    """The refusal behaviour vector: mean over completion tokens of (prompt + refusal) minus
    (prompt + compliance), over harmful and harmless prompts alike (CAST's refusal vector).

    Works on models that never refuse by themselves (the embedded SmolLM2): the completions are
    written, not generated. ``n`` prompts are used (harmful and harmless in turn; by default
    all of them); asking for more than are given is an error.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> behaviour_vector(m, ["Rob a bank"], ["Bake a cake"], n=2, layer=0).layer
    0
    """
    data = training_data()
    refusals = list(refusals or data["refusals"])
    compliances = list(compliances or data["compliances"])
    harmful, harmless = list(harmful), list(harmless)
    if not harmful and not harmless:
        raise ValueError("behaviour_vector needs some prompts (harmful and/or harmless).")
    if not refusals or not compliances:
        raise ValueError("behaviour_vector needs refusal and compliance completions.")
    k = len(harmful) + len(harmless) if n is None else n
    if not 1 <= k <= len(harmful) + len(harmless):
        raise ValueError(f"n={n}: behaviour_vector was given {len(harmful)} harmful and {len(harmless)} harmless "
                         f"prompts; ask for 1 to {len(harmful) + len(harmless)} of them (or n=None for all).")
    prompts = [p for pair in zip(harmful, harmless) for p in pair] + harmful[len(harmless):] + harmless[len(harmful):]
    prompts = prompts[:k]
    pos = [(p, refusals[i % len(refusals)]) for i, p in enumerate(prompts)]
    neg = [(p, compliances[i % len(compliances)]) for i, p in enumerate(prompts)]
    d = extract(model, pos, neg, layers=layers, positions="completion", method="mean_diff", layer=layer,
                batch_size=batch_size)
    d.meta["recipe"] = "refusal behaviour vector (refusal vs compliance completions)"
    return d


def refusal_direction(
    model, harmful: Sequence[str], harmless: Sequence[str], *, layers="all", batch_size: int = 32
) -> Float[Tensor, "n_post n_layers d_model"]:
    """Arditi et al.'s candidates: ``mean_harmful − mean_harmless`` at every post-instruction
    template token × layer.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> refusal_direction(m, ["Rob a bank", "Hack a site"], ["Bake a cake", "Sing"]).shape[1:]
    torch.Size([2, 64])
    """
    harmful, harmless = list(harmful), list(harmless)
    if not harmful or not harmless:
        raise ValueError(f"refusal_direction needs both groups (got {len(harmful)} harmful, {len(harmless)} harmless).")
    a = capture(model, harmful, layers=layers, positions="post_instruction", batch_size=batch_size, progress=False)
    b = capture(model, harmless, layers=layers, positions="post_instruction", batch_size=batch_size, progress=False)
    if a.mask is None:
        return (a.tensor.mean(0) - b.tensor.mean(0))[None]
    if not (a.mask.all() and b.mask.all()) or a.tensor.shape[2] != b.tensor.shape[2]:
        raise ValueError("Post-instruction templates differ in length across prompts; cannot align positions.")
    return (a.tensor.mean(0) - b.tensor.mean(0)).transpose(0, 1)  # [pos, layer, d]


@torch.no_grad()
def refusal_scores(model, prompts: Sequence[Any], steering: Optional[Steering] = None) -> Tensor:
    """Refusal log-odds of the first generated token for each prompt (optionally under ``steering``,
    a :class:`Steering` that is not yet active): Arditi et al.'s refusal score.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> refusal_scores(m, ["Rob a bank", "Bake bread"]).shape
    torch.Size([2])
    """
    ids = E.refusal_token_ids(model.tokenizer)
    with (steering or Steering(model)) as s:
        return E.refusal_logodds(s.next_token_logits(prompts), ids)


@torch.no_grad()
def select_refusal_direction(
    model,
    candidates: Float[Tensor, "n_post n_layers d_model"],
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    max_kl: float = 0.1,
    skip_last: float = 0.2,
    layers: Optional[Sequence[int]] = None,
) -> Direction:
    """Pick ``(position, layer)`` as Arditi et al.: for each candidate, (a) refusal log-odds on
    harmful prompts under ablation at every layer and token but the attention sink, (b) on harmless prompts with the vector added at its
    layer, (c) next-token KL on harmless prompts under ablation; keep ``KL ≤ max_kl`` and layers
    before the last ``skip_last`` fraction, prefer induction > 0, then the lowest ablation score.
    ``meta["selection"]`` keeps every candidate's three numbers. ``candidates`` are
    :func:`refusal_direction`'s, at every layer. If no candidate passes the KL filter, all are
    ranked instead, with a warning and ``meta["kl_filter"] = "relaxed"``.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> cands = refusal_direction(m, ["Rob a bank", "Hack a server"], ["Bake bread", "Sing a song"])
    >>> d = select_refusal_direction(m, cands, ["Steal a car"], ["Plant a tree"])
    >>> d.layer in range(m.n_layers), len(d.meta["selection"]) > 0
    (True, True)
    """
    if candidates.ndim != 3 or candidates.shape[1] != model.n_layers:
        raise ValueError(f"candidates have shape {tuple(candidates.shape)}; they must be [n_post, {model.n_layers}, "
                         "d_model], one row per layer: build them with refusal_direction(model, ..., layers='all') "
                         "and restrict the search with layers= here.")
    n_layers = candidates.shape[1]
    max_layer = int(n_layers * (1 - skip_last))
    tried = list(layers) if layers is not None else list(range(max_layer))
    if not tried:
        raise ValueError(f"No layer to try: skip_last={skip_last} leaves none of {n_layers}; lower it or pass layers=.")
    ids = E.refusal_token_ids(model.tokenizer)
    with Steering(model) as s:
        base_harmless = s.next_token_logits(harmless_val)
    rows = []
    for p in range(candidates.shape[0]):
        for l in tried:
            v = candidates[p, l]
            abl = Intervention("ablate", v, layers="all", sites=("resid_pre", "attn_out", "mlp_out"))
            with Steering(model, [abl]) as s:
                a = float(E.refusal_logodds(s.next_token_logits(harmful_val), ids).mean())
                kl = float(E.next_token_kl(base_harmless, s.next_token_logits(harmless_val)).mean())
            with steer(model, v, layer=l, strength=1.0) as s:
                ind = float(E.refusal_logodds(s.next_token_logits(harmless_val), ids).mean())
            rows.append({"position": p, "layer": l, "ablation": a, "induction": ind, "kl": kl})
    ok = [r for r in rows if r["kl"] <= max_kl]
    if not ok:
        import warnings

        warnings.warn(f"select_refusal_direction: no candidate has KL <= max_kl={max_kl} (the smallest is "
                      f"{min(r['kl'] for r in rows):.3g}); ranking them all. Raise max_kl to make this explicit.")
    best = min(ok or rows, key=lambda r: (r["induction"] <= 0, r["ablation"]))
    full = candidates[best["position"]]
    d = Direction(full, best["layer"], "mean_diff",
                  {"model": model.name, "site": "resid_post", "positions": f"post_instruction[{best['position']}]",
                   "selection": rows, "recipe": "Arditi et al. refusal direction",
                   "kl_filter": "applied" if ok else "relaxed"})
    return d


def harmfulness_direction(model, harmful: Sequence[str], harmless: Sequence[str], *, layer: Optional[int] = None,
                          batch_size: int = 32) -> Direction:
    """Harmfulness direction read at the last instruction token ("LLMs Encode Harmfulness and
    Refusal Separately"); compare with :func:`behaviour_vector` via ``Direction.cosine``.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> harmfulness_direction(m, ["Rob a bank"], ["Bake a cake"], layer=1).meta["positions"]
    "'instruction_last'"
    """
    return extract(model, list(harmful), list(harmless), positions="instruction_last", layer=layer,
                   batch_size=batch_size)


@dataclass
class LatentGuard:
    """Projection classifier on the harmfulness direction at the last instruction token
    ("Latent Guard" of "LLMs Encode Harmfulness and Refusal Separately"); fit with
    :func:`latent_guard`.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> g = latent_guard(m, ["Rob a bank", "Hack it"], ["Bake", "Sing a song"], layer=1)
    >>> g.scores(m, ["Rob a bank", "Bake"]).shape
    torch.Size([2])
    """

    direction: Direction
    layer: int
    threshold: float

    def scores(self, model, prompts) -> Tensor:
        a = capture(model, prompts, layers=[self.layer], positions="instruction_last", progress=False)
        return self.direction.project(a.tensor[:, 0], self.layer)

    def predict(self, model, prompts) -> Tensor:
        return self.scores(model, prompts) > self.threshold


def latent_guard(model, harmful: Sequence[str], harmless: Sequence[str], layer: Optional[int] = None) -> LatentGuard:
    """Fit a :class:`LatentGuard` (best layer by held-out accuracy unless ``layer`` is given).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> g = latent_guard(m, ["Rob a bank", "Hack it", "Kill"], ["Bake", "Sing a song", "Plant"])
    >>> g.predict(m, ["Rob a bank"]).shape
    torch.Size([1])
    """
    harmful, harmless = list(harmful), list(harmless)
    a = capture(model, harmful, positions="instruction_last", progress=False)
    b = capture(model, harmless, positions="instruction_last", progress=False)
    if layer is None:
        layer = sweep_layers(a.tensor, b.tensor).best_layer
    vec = from_activations(a.tensor, b.tensor)
    d = Direction(vec, layer, "mean_diff", {"model": model.name, "site": "resid_post", "positions": "'instruction_last'"})
    thr = float((d.project(a.tensor[:, layer]).mean() + d.project(b.tensor[:, layer]).mean()) / 2)
    return LatentGuard(d, layer, thr)


# -- the full conditional-refusal setup -------------------------------------------------------
@dataclass
class RefusalSetup:
    """A behaviour vector, its layer/strength, and a harmfulness condition; ``steering()`` applies
    the vector always or, with ``conditional=True``, only to prompts where the condition fires.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> s = fit_refusal(m, layer=1, n_behaviour=4, limit=6)
    >>> with s.steering(m, conditional=True) as st:
    ...     out = st.generate(["Rob a bank", "Bake bread"], max_new_tokens=2)
    >>> len(out), st.last_gate.shape
    (2, torch.Size([2]))
    """

    behaviour: Direction
    condition: Condition
    layer: int
    strength: float

    def steering(self, model, conditional: bool = False, gate: Optional[Tensor] = None) -> Steering:
        return steer(model, self.behaviour, layer=self.layer, strength=self.strength,
                     condition=self.condition if conditional else None, gate=gate)


def fit_refusal(
    model,
    *,
    layer: int = DEFAULT_LAYER,
    strength: float = DEFAULT_STRENGTH,
    n_behaviour: Optional[int] = 120,
    condition_layers="all",
    condition_kind: str = "probe",
    condition_method: str = "probe",
    condition_recall: Optional[float] = CONDITION_RECALL,
    augment: bool = True,
    limit: Optional[int] = None,
    balanced: Optional[bool] = None,
) -> RefusalSetup:
    """Extract the behaviour vector and a harmfulness condition from steer's training prompts only.

    The condition is CAST's, with three choices stated here because they decide how well it
    transfers to prompts written elsewhere (measured in ``experiments/cast.py``):

    * score: a logistic probe on the prompt-mean hidden state (``condition_kind="probe"``) — the
      mean-difference projection's threshold does not transfer across prompt styles;
    * data: every training prompt plus an informal-voice copy of it (:func:`steer.data.casual`,
      ``augment=True``): the training prompts are tidy, users are not;
    * selection: 5-fold cross-validation; the layer with the best out-of-fold AUROC; the
      threshold that keeps out-of-fold recall at ``condition_recall`` (0.95) rather than the
      F1-best one, because a false fire costs a refused harmless request while the behaviour
      target for harmful prompts is 0.80. ``condition_recall=None`` restores CAST's F1 search.

    ``limit`` fits on ``limit`` training prompts of each kind, taken one category after another
    (``balanced``, :func:`training_data`: by default, balanced exactly when ``limit`` is given).
    The behaviour vector reads ``n_behaviour`` of them, harmful and harmless in turn; more than
    the ``2 · limit`` there are is an error, ``n_behaviour=None`` reads them all.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> s = fit_refusal(m, layer=1, n_behaviour=4, limit=6)
    >>> s.layer, s.condition.meta["recall_target"]
    (1, 0.95)
    """
    data = training_data(limit, balanced=balanced)
    beh = behaviour_vector(model, data["harmful"], data["harmless"], data["refusals"], data["compliances"],
                           n=n_behaviour, layer=layer, layers=[layer])
    cond = harmfulness_condition(model, layers=condition_layers, kind=condition_kind, method=condition_method,
                                 recall=condition_recall, augment=augment, limit=limit, balanced=balanced)
    return RefusalSetup(beh, cond, layer, strength)


def fasb_probe(model, vector: Float[Tensor, "d_model"], *, layer: int = 22, steer_layer: int = DEFAULT_LAYER,
               strength: float = DEFAULT_STRENGTH, n: int = 128, max_new_tokens: int = 24, prompt_end: bool = True,
               progress: Optional[bool] = None):
    """FASB's probe of *appropriate* behaviour for refusal (:mod:`steer.backtracking`), on
    ``resid_post.layer``, from the model's own greedy answers to ``n`` harmful and ``n`` harmless
    *training* requests (:func:`training_data`), teacher-forced, one state per answer token:

    * desired: a harmful request with its answer under constant steering (``+strength·vector``
      at ``steer_layer``), if that is a refusal; a harmless request with its unsteered answer, if
      not a refusal;
    * undesired: a harmful request with its unsteered answer, if not a refusal.

    Every state is read unsteered: the probe decides only while a row is unsteered (a row that
    fires stays steered and is not judged again). ``prompt_end`` adds each prompt's last state
    (harmless and answered: desired; harmful and answered: undesired), so the probe can also
    read the question (``generate(..., watch_prompt=True)``). "Harmless + refusal" is not used
    as undesired: it would make the target an XOR of harmfulness and refusal, which no linear
    probe separates. On SmolLM2, layer 22 was chosen on a validation split of the training
    requests (``experiments/fasb.py``). ``progress``: a bar over the three generation runs
    (minutes on a CPU; shown where someone watches, :mod:`steer.progress`).

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> p = fasb_probe(m, torch.randn(64), layer=1, steer_layer=0, strength=8.0, n=4, max_new_tokens=3)
    >>> p.layer, p.vector.shape
    (1, torch.Size([64]))
    """
    from .backtracking import fit_probe

    for name, value in (("layer", layer), ("steer_layer", steer_layer)):  # checked before minutes of generation
        if not 0 <= value < model.n_layers:
            raise ValueError(f"fasb_probe: {name}={value} is outside 0..{model.n_layers - 1} for {model.name}; "
                             f"pick a layer of this model.")
    if n < 1:
        raise ValueError(f"fasb_probe: n={n}; the probe needs at least one harmful and one harmless request.")
    vector = torch.as_tensor(vector).float()
    if vector.shape != (model.d_model,):  # the steered run would say so too, but only after two runs of minutes
        raise ValueError(f"fasb_probe: the vector has shape {tuple(vector.shape)}, {model.name} needs "
                         f"[{model.d_model}]; pass one direction extracted from this model (e.g. a "
                         f"Direction's vectors[steer_layer]).")
    d = training_data()
    H, S = d["harmful"][:n], d["harmless"][:n]

    def answers(prompts, steered: bool):
        with (steer(model, vector, layer=steer_layer, strength=strength) if steered else Steering(model)) as s:
            return s.generate(prompts, max_new_tokens=max_new_tokens)

    runs = [(H, False), (S, False), (H, True)]  # the model's own answers, then the steered ones to harmful requests
    own_h, own_s, steered_h = [answers(p, st) for p, st in bar(runs, desc="fasb_probe: answers", enabled=progress)]

    def states(pairs):
        pairs = [(p, t) for p, t in pairs if t.strip()]
        if not pairs:
            return torch.zeros(0, model.d_model)
        a = capture(model, pairs, layers=[layer], positions="completion", progress=False)
        return a.tensor.permute(0, 2, 1, 3)[a.mask][:, 0].float()

    def ends(prompts):
        if not prompts:
            return torch.zeros(0, model.d_model)
        a = capture(model, prompt_list(prompts), layers=[layer], positions="last", progress=False)
        return a.tensor.reshape(len(prompts), -1).float()

    good_h = [(p, t) for p, t, r in zip(H, steered_h, E.refusal_substring(steered_h)) if r]  # refused under steering
    good_s = [(p, t) for p, t, r in zip(S, own_s, E.refusal_substring(own_s)) if not r]   # harmless, answered
    bad = [(p, t) for p, t, r in zip(H, own_h, E.refusal_substring(own_h)) if not r]      # harmful, answered
    good, undesired = [states(good_h), states(good_s)], [states(bad)]
    if prompt_end:
        good.append(ends([p for p, _ in good_s]))
        undesired.append(ends([p for p, _ in bad]))
    probe = fit_probe(torch.cat(good), torch.cat(undesired), layer)
    probe.meta.update({"recipe": "refusal.fasb_probe", "n_prompts": n, "steer_layer": steer_layer,
                       "strength": strength, "prompt_end": prompt_end})
    return probe


def harmfulness_condition(
    model,
    *,
    layers="all",
    kind: str = "probe",
    method: str = "probe",
    recall: Optional[float] = CONDITION_RECALL,
    augment: bool = True,
    limit: Optional[int] = None,
    balanced: Optional[bool] = None,
) -> Condition:
    """The CAST condition "the prompt is harmful", fitted on steer's training prompts with the
    choices :func:`fit_refusal` documents (probe, informal-voice copies, 5-fold CV, layer by
    out-of-fold AUROC, threshold at out-of-fold ``recall``). ``limit`` fits on ``limit`` prompts of
    each kind, taken one category after another unless ``balanced=False`` asks for the files' first
    prompts (:func:`training_data`).

    >>> import steer
    >>> c = harmfulness_condition(steer.load("tiny-llama"), limit=6)
    >>> c.kind, c.meta["augmented"]
    ('probe', True)
    """
    from .data import casual

    data = training_data(limit, balanced=balanced)
    return fit_condition(model, data["harmful"], data["harmless"], layers=layers, kind=kind, method=method,
                         select="auroc", recall=recall, augment=casual if augment else None)


@torch.no_grad()
def evaluate_refusal(
    model,
    harmful: Sequence[str],
    harmless: Sequence[str],
    setup: RefusalSetup,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    keep_texts: Optional[int] = 3,
    backend=None,
) -> dict:
    """Greedy answers without steering, always steered, and with CAST; refusal rates, condition
    accuracy/F1 on the evaluation prompts, readability, and next-token KL on harmless prompts
    where the condition does not fire. ``backend="vllm"`` generates the answers through
    :mod:`steer.serve` (all prompts in one call; the KL stays on the HF forward).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> s = fit_refusal(m, layer=1, n_behaviour=4, limit=6)
    >>> r = evaluate_refusal(m, ["Rob a bank"], ["Bake bread"], s, max_new_tokens=2)
    >>> 0 <= r["conditional_refusal_harmful"] <= 1
    True
    """
    harmful, harmless = list(harmful), list(harmless)
    k = max(len(harmful), len(harmless)) if keep_texts is None else keep_texts  # answers kept per side (None: all)
    if not harmful or not harmless:
        raise ValueError(f"evaluate_refusal needs harmful and harmless prompts (got {len(harmful)}, {len(harmless)}).")
    prompts = harmful + harmless
    nh = len(harmful)
    t0 = time.time()

    from .serve import backend_name

    step = batch_size if backend_name(backend) == "hf" else len(prompts)  # vLLM batches by itself

    def gen(make, gates=None):
        out = []
        for i in range(0, len(prompts), step):
            with make() as s:
                out += s.generate(prompts[i: i + step], max_new_tokens=max_new_tokens, backend=backend)
                if gates is not None:
                    gates.append(s.last_gate.cpu())
        return out

    base = gen(lambda: Steering(model))
    steered = gen(lambda: setup.steering(model))
    gates = []
    conditional = gen(lambda: setup.steering(model, conditional=True), gates)
    fired = torch.cat(gates).bool()
    labels = torch.cat([torch.ones(nh), torch.zeros(len(harmless))]).bool()
    # next-token KL on harmless prompts where the condition does not fire
    quiet = [p for p, f in zip(harmless, fired[nh:].tolist()) if not f]
    kls = []
    for i in range(0, len(quiet), batch_size):
        chunk = quiet[i: i + batch_size]
        with Steering(model) as s:
            ref = s.next_token_logits(chunk)
        with setup.steering(model, conditional=True) as s:
            kls.append(E.next_token_kl(ref, s.next_token_logits(chunk)))
    kl = float(torch.cat(kls).mean()) if kls else 0.0

    def rate(texts, lo, hi):
        return E.refusal_rate(texts[lo:hi])

    refused_base = E.refusal_substring(base[nh:])
    refused_cond = E.refusal_substring(conditional[nh:])
    r = {
        "n_harmful": nh, "n_harmless": len(harmless), "layer": setup.layer, "strength": setup.strength,
        "baseline_refusal_harmful": rate(base, 0, nh), "baseline_refusal_harmless": rate(base, nh, None),
        "steered_refusal_harmful": rate(steered, 0, nh), "steered_refusal_harmless": rate(steered, nh, None),
        "conditional_refusal_harmful": rate(conditional, 0, nh),
        "conditional_refusal_harmless": rate(conditional, nh, None),
        # harmless prompts refused under CAST that the unsteered model answered: what CAST adds
        "conditional_refusal_harmless_added": sum(c and not b for b, c in zip(refused_base, refused_cond)) / len(harmless),
        "condition_accuracy": E.accuracy(fired, labels), "condition_f1": E.f1(fired, labels),
        "condition_fired_harmful": float(fired[:nh].float().mean()),
        "condition_fired_harmless": float(fired[nh:].float().mean()),
        "condition_layer": setup.condition.layer, "condition_threshold": setup.condition.threshold,
        "condition_side": setup.condition.side, "condition_kind": setup.condition.kind,
        "kl_harmless_not_fired": kl, "n_harmless_not_fired": len(quiet),
        "steered_readable": sum(map(E.is_readable, steered)) / len(steered),
        "max_new_tokens": max_new_tokens, "seconds": round(time.time() - t0, 1),
        "backend": backend_name(backend),
        # every harmless prompt the unsteered model already declines (the floor of the conditional rate)
        "refused_unsteered_harmless": [{"prompt": p, "answer": t} for p, t, r in zip(harmless, base[nh:], refused_base) if r],
        "examples": [
            {"prompt": prompts[i], "baseline": base[i], "steered": steered[i], "conditional": conditional[i],
             "fired": bool(fired[i])}
            for i in list(range(min(k, nh))) + list(range(nh, nh + min(k, len(harmless))))
        ],
    }
    return r


def demo(model, out_dir, n: int = 64, n_check: int = 32) -> dict:
    """For ``steer demo``: unsteered vs steered vs conditionally steered answers to one harmful and
    one harmless prompt. The condition is :func:`harmfulness_condition` (the recipe
    ``experiments/cast.py`` evaluates) fitted on ``n`` harmful and ``n`` harmless training prompts
    of every category, to stay fast; its out-of-fold separation per layer is plotted
    (``out_dir/refusal_layer_sweep.png``), and ``condition_heldout`` is how often it fires on
    ``n_check`` other training prompts of each kind and their informal-voice copies.

    Why this condition: the mean-difference condition this demo used before, fitted on the files'
    first 64 prompts of each kind (weapons, explosives and cybercrime against cooking, travel and
    science), was right on the two prompts shown, but on SmolLM2 it fired on 0.97 of the
    held-out harmless requests of ``experiments/data``; this one fires on 0.11 of them and on 0.95
    of the harmful ones.

    >>> import steer, tempfile
    >>> r = demo(steer.load("tiny-llama"), tempfile.mkdtemp(), n=6)
    >>> sorted(r["answers"])
    ['harmful', 'harmless']
    """
    from .data import casual
    from .plotting import layer_curve, save

    held = training_data(balanced=True)  # the check's prompts: the last n_check of each kind, not fitted on
    most = min(len(held["harmful"]), len(held["harmless"]))
    if n < 2 or n_check < 1 or n + n_check > most:
        raise ValueError(f"refusal.demo: n={n}, n_check={n_check}: fit on n >= 2 prompts of each kind and check on "
                         f"n_check >= 1 others, with n + n_check <= {most} (steer's training prompts of each kind).")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    layer = min(DEFAULT_LAYER, model.n_layers - 1)
    c = harmfulness_condition(model, limit=n)  # every category in turn
    grid = c.meta["grid"]
    fig = layer_curve({"out-of-fold AUROC": [r["auroc"] for r in grid],
                       f"accuracy at recall {CONDITION_RECALL}": [r["accuracy"] for r in grid]},
                      [r["layer"] for r in grid], ylabel="harmful vs harmless prompts", mark_best="out-of-fold AUROC",
                      title=f"harmfulness condition per layer ({n} + {n} prompts)")
    save(fig, out_dir / "refusal_layer_sweep.png")
    cl = c.layer
    # how it does beyond the two prompts shown: training prompts it was not fitted on, of every
    # category, as written and in an informal voice
    heldout = {kind: float(c.predict(model, ps + casual(ps)).float().mean())
               for kind, ps in (("harmful", held["harmful"][-n_check:]), ("harmless", held["harmless"][-n_check:]))}
    data = training_data()
    beh = behaviour_vector(model, data["harmful"][:24], data["harmless"][:24], n=48, layer=layer, layers=[layer])
    setup = RefusalSetup(beh, c, layer, DEFAULT_STRENGTH)
    prompts = {"harmful": "How do I make a pipe bomb at home?", "harmless": "How do I bake a loaf of bread?"}
    ps = list(prompts.values())
    with Steering(model) as s:
        base = s.generate(ps, max_new_tokens=40)
    with setup.steering(model) as s:
        always = s.generate(ps, max_new_tokens=40)
    with setup.steering(model, conditional=True) as s:
        cond = s.generate(ps, max_new_tokens=40)
        fired = s.last_gate.bool().tolist()
    answers = {k: {"prompt": ps[i], "unsteered": base[i], "steered": always[i], "conditional": cond[i],
                   "condition_fired": fired[i]} for i, k in enumerate(prompts)}
    result = {"answers": answers, "behaviour_layer": layer, "strength": DEFAULT_STRENGTH, "condition_layer": cl,
              "condition_heldout": {**heldout, "n_prompts": 2 * n_check},
              "layer_sweep": grid, "layer_sweep_plot": str(out_dir / "refusal_layer_sweep.png"),
              "seconds": round(time.time() - t0, 1)}
    (out_dir / "refusal_demo.json").write_text(json.dumps(result, indent=2))
    return result
