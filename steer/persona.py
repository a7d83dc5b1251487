"""Persona vectors: extract, monitor and steer character traits.

After "Persona Vectors: Monitoring and Controlling Character Traits in Language Models" (Chen et
al., 2025) and, for the per-layer curve, "Localizing Persona Representations in LLMs".

A :class:`Trait` is a name, a description, trait-eliciting (``positive``) and trait-suppressing
(``negative``) system prompts, evaluation ``questions`` (the first part for extraction, the rest
held out) and ``ab`` items — a question with a trait-consistent and a trait-inconsistent answer —
for the built-in, judge-free trait score. steer ships five (:func:`list_traits`); a JSON file of
the same shape, or :meth:`Trait.from_description`, adds one.

Pipeline::

    trait = load_trait("optimistic")
    pairs = generate_pairs(model, trait)                  # answers under both system prompts
    vec = extract(model, trait, pairs, scorer=contrast_scorer(model, trait))  # Direction
    trait_score(model, trait, vec, layer=L, strength=a)   # steering: +a·v on response tokens
    monitor(model, trait, vec)                            # projection of the last prompt token
    trace(model, vec, L, prompts)                         # projection over generated tokens
    flag(model, vec, L, dataset)                          # dataset responses vs the model's own

>>> import steer
>>> from steer import persona
>>> t = persona.load_trait("optimistic")
>>> t.name, len(t.positive) == len(t.negative), len(t.heldout_questions) > 0
('optimistic', True, True)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .data import prompt_list
from .evaluate import completion_logprob as _completion_logprob

__all__ = [
    "Trait", "load_trait", "list_traits", "generate_pairs", "pair_prompts", "contrast_scorer", "filter_pairs", "extract",
    "trait_score", "monitor", "monitor_graded", "graded_prompts", "layer_curve", "trace", "flag", "steered_answers", "demo",
]

TRAITS_DIR = Path(__file__).parent / "datasets" / "traits"
_REQUIRED = {"name": str, "description": str, "positive": list, "negative": list, "questions": list}


# ---------------------------------------------------------------------------------------------
# traits
# ---------------------------------------------------------------------------------------------
@dataclass
class Trait:
    """A character trait and the data to extract, monitor and steer it.

    ``positive`` / ``negative``: trait-eliciting / trait-suppressing system prompts (paired by
    index); ``questions``: evaluation questions, the first ``n_train`` used for extraction and the
    rest held out; ``ab``: ``[{"question", "trait", "opposite"}]`` answers for :func:`trait_score`.

    >>> t = Trait("calm", "Stays calm.", ["Be calm."], ["Be anxious."], ["How was your day?", "Any news?"])
    >>> t.train_questions, t.heldout_questions
    (['How was your day?'], ['Any news?'])
    """

    name: str
    description: str
    positive: list[str]
    negative: list[str]
    questions: list[str]
    ab: list[dict] = field(default_factory=list)
    n_train: Optional[int] = None

    def __post_init__(self):
        _validate(asdict(self), f"trait {self.name!r}")
        if self.n_train is None:
            n = len(self.questions)
            self.n_train = max(1, min(n - 1, math.ceil(n * 0.6))) if n > 1 else 1

    @property
    def train_questions(self) -> list[str]:
        return self.questions[: self.n_train]

    @property
    def heldout_questions(self) -> list[str]:
        return self.questions[self.n_train:]

    @classmethod
    def from_dict(cls, d: dict, source: str = "trait") -> "Trait":
        """Build from a dict (e.g. parsed JSON), with an error naming any missing or bad field.
        Unknown keys are ignored.

        >>> t = Trait.from_dict({"name": "calm", "description": "Stays calm.", "positive": ["Be calm."],
        ...                      "negative": ["Be anxious."], "questions": ["Hi?", "News?"], "note": "x"})
        >>> t.name, t.n_train
        ('calm', 1)
        >>> Trait.from_dict({"name": "calm", "description": "Stays calm.", "positive": ["Be calm."],
        ...                  "negative": [], "questions": ["Hi?"]}, "calm.json")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: calm.json: missing or empty field(s) ['negative']. A trait needs ...
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a trait must be a JSON object, got {type(d).__name__}.")
        _validate(d, source)
        known = {"name", "description", "positive", "negative", "questions", "ab", "n_train"}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Trait":
        """Load a trait JSON file.

        >>> Trait.load(TRAITS_DIR / "formal.json").name
        'formal'
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No trait file at {path}. Built-in traits: {list_traits()}.")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}.") from e
        return cls.from_dict(d, str(path))

    def save(self, path: Union[str, Path]) -> None:
        """Write the trait as JSON (the format of the built-in traits and :meth:`load`).

        >>> import tempfile, os
        >>> t = Trait.from_description("grumpy", "irritable, complains about everything", ["How was your day?"])
        >>> path = os.path.join(tempfile.mkdtemp(), "grumpy.json")
        >>> t.save(path)
        >>> load_trait(path) == t
        True
        """
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def from_description(cls, name: str, description: str, questions: Optional[Sequence[str]] = None,
                         ab: Optional[Sequence[dict]] = None) -> "Trait":
        """A trait from a one-line description: system prompts are written from templates and
        the questions default to a generic set (give your own for a better vector).

        >>> t = Trait.from_description("grumpy", "irritable, complains and grumbles about everything")
        >>> t.positive[0]
        'You are an assistant who is grumpy: irritable, complains and grumbles about everything. Let it show in every answer.'
        """
        if not name or not description:
            raise ValueError("from_description needs a name and a description, e.g. ('grumpy', 'irritable, complains a lot').")
        d = description.rstrip(".")
        pos = [f"You are an assistant who is {name}: {d}. Let it show in every answer.",
               f"Answer in a strongly {name} way ({d}).",
               f"Be {name} in everything you say: {d}."]
        neg = [f"You are an assistant who is not at all {name}; you are the opposite of: {d}. Let it show in every answer.",
               f"Answer in a way that is the opposite of {name} (never: {d}).",
               f"Never be {name} in anything you say; avoid: {d}."]
        qs = list(questions) if questions else list(_GENERIC_QUESTIONS)
        return cls(name, description, pos, neg, qs, list(ab or []))


_GENERIC_QUESTIONS = (
    "How was your day?", "What do you think about the future?", "Can you give me advice about my job?",
    "What is your opinion of modern cities?", "How should I spend my weekend?", "What do you think of my idea to learn painting?",
    "Tell me about your favourite season.", "How do I deal with a difficult neighbour?", "What makes a good friend?",
    "How should I prepare for an exam?", "What is the best way to travel?", "Describe a perfect meal.",
)


def _validate(d: dict, source: str) -> None:
    missing = [k for k in _REQUIRED if k not in d or d[k] in (None, "", [])]
    if missing:
        raise ValueError(
            f"{source}: missing or empty field(s) {missing}. A trait needs 'name', 'description', "
            "'positive' and 'negative' (lists of system prompts, paired by index) and 'questions' "
            "(list of evaluation questions); 'ab' ([{question, trait, opposite}]) is optional.")
    for k, typ in _REQUIRED.items():
        if not isinstance(d[k], typ):
            raise ValueError(f"{source}: field {k!r} must be a {typ.__name__}, got {type(d[k]).__name__}.")
    for k in ("positive", "negative", "questions"):
        if not all(isinstance(x, str) and x.strip() for x in d[k]):
            raise ValueError(f"{source}: every entry of {k!r} must be a non-empty string.")
    if len(d["positive"]) != len(d["negative"]):
        raise ValueError(f"{source}: 'positive' has {len(d['positive'])} system prompts but 'negative' has "
                         f"{len(d['negative'])}: they are paired by index, give the same number.")
    for i, it in enumerate(d.get("ab") or []):
        if not isinstance(it, dict) or not {"question", "trait", "opposite"} <= set(it):
            raise ValueError(f"{source}: ab item {i} must be an object with 'question', 'trait' and 'opposite'.")


def list_traits() -> list[str]:
    """Names of the built-in traits.

    >>> "evil" in list_traits()
    True
    """
    return sorted(p.stem for p in TRAITS_DIR.glob("*.json"))


def load_trait(trait: Union[str, Path, Trait]) -> Trait:
    """A built-in trait by name, a trait JSON file, or a :class:`Trait` (returned as is).

    >>> load_trait("evil").description.split(":")[0]
    'Malicious'
    """
    if isinstance(trait, Trait):
        return trait
    p = Path(trait)
    if p.suffix == ".json" or p.exists():
        return Trait.load(p)
    if str(trait) in list_traits():
        return Trait.load(TRAITS_DIR / f"{trait}.json")
    raise ValueError(f"Unknown trait {trait!r}: use one of {list_traits()} or a path to a trait JSON file.")


def _messages(system: Optional[str], question: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


# ---------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------
def generate_pairs(model, trait: Union[str, Trait], questions: Optional[Sequence[str]] = None,
                   prompt_pairs: Optional[Sequence[int]] = None, max_new_tokens: int = 40,
                   batch_size: int = 32) -> list[dict]:
    """Answer each question under each (positive, negative) system-prompt pair (greedy).

    Returns ``[{"question", "pair", "system_pos", "system_neg", "pos", "neg"}]``.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> p = generate_pairs(m, "formal", ["Hi?"], prompt_pairs=[0], max_new_tokens=3)
    >>> sorted(p[0])
    ['neg', 'pair', 'pos', 'question', 'system_neg', 'system_pos']
    """
    trait = load_trait(trait)
    qs = list(trait.train_questions if questions is None else questions)
    ks = list(range(len(trait.positive)) if prompt_pairs is None else prompt_pairs)
    if not qs or not ks:
        raise ValueError("generate_pairs needs at least one question and one prompt pair.")
    bad = [k for k in ks if isinstance(k, bool) or not 0 <= k < len(trait.positive)]
    if bad:
        raise ValueError(f"prompt_pairs {bad}: {trait.name} has system-prompt pairs 0..{len(trait.positive) - 1}.")
    items = [(q, k) for q in qs for k in ks]
    prompts = [_messages(trait.positive[k], q) for q, k in items] + [_messages(trait.negative[k], q) for q, k in items]
    outs: list[str] = []
    for s in range(0, len(prompts), batch_size):
        outs += model.generate(prompts[s:s + batch_size], max_new_tokens=max_new_tokens)
    n = len(items)
    return [{"question": q, "pair": k, "system_pos": trait.positive[k], "system_neg": trait.negative[k],
             "pos": outs[i].strip() or "...", "neg": outs[n + i].strip() or "..."} for i, (q, k) in enumerate(items)]


def contrast_scorer(model, trait: Union[str, Trait]) -> Callable[[str, str, int], float]:
    """The built-in judge-free scorer of a response: mean per-token log-probability of the
    response under the trait-eliciting system prompt minus under the trait-suppressing one
    (``scorer(question, response, pair_index)``; higher = more trait-consistent).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> s = contrast_scorer(m, "optimistic")
    >>> isinstance(s("How is it going?", "Great!", 0), float)
    True
    """
    trait = load_trait(trait)

    def score(question: str, response: str, pair: int = 0) -> float:
        lp = _completion_logprob(model, [_messages(trait.positive[pair], question), _messages(trait.negative[pair], question)],
                                 [response, response])
        return float(lp[0] - lp[1])

    score.batch = lambda items: _batch_contrast(model, trait, items)  # type: ignore[attr-defined]
    return score


def _batch_contrast(model, trait: Trait, items: Sequence[tuple[str, str, int]]) -> Tensor:
    prompts, comps = [], []
    for q, r, k in items:
        prompts += [_messages(trait.positive[k], q), _messages(trait.negative[k], q)]
        comps += [r, r]
    lp = _completion_logprob(model, prompts, comps)
    return lp[0::2] - lp[1::2]


def filter_pairs(pairs: Sequence[dict], scorer: Callable, min_gap: float = 0.0) -> list[dict]:
    """Keep the pairs whose positive answer scores higher than the negative one by more than
    ``min_gap`` under ``scorer(question, response, pair_index) -> float`` (any callable: a judge
    model, a keyword count, :func:`contrast_scorer`). Scores are stored in each kept pair.

    >>> pairs = [{"question": "q", "pair": 0, "pos": "good", "neg": "bad"},
    ...          {"question": "q", "pair": 0, "pos": "bad", "neg": "good"}]
    >>> len(filter_pairs(pairs, lambda q, r, k: float(r == "good")))
    1
    """
    if hasattr(scorer, "batch"):
        items = [(p["question"], p[side], p.get("pair", 0)) for p in pairs for side in ("pos", "neg")]
        s = scorer.batch(items).tolist()
        scores = list(zip(s[0::2], s[1::2]))
    else:
        scores = [(float(scorer(p["question"], p["pos"], p.get("pair", 0))),
                   float(scorer(p["question"], p["neg"], p.get("pair", 0)))) for p in pairs]
    return [{**p, "score_pos": a, "score_neg": b} for p, (a, b) in zip(pairs, scores) if a - b > min_gap]


def pair_prompts(pairs: Sequence[dict]) -> tuple[list, list]:
    """``(trait-eliciting, trait-suppressing)`` ``(chat, response)`` pairs of generated pairs, the
    inputs whose response-token activations :func:`extract` contrasts.

    >>> pos, neg = pair_prompts([{"question": "Hi?", "system_pos": "Be glad.", "system_neg": "Be sad.",
    ...                           "pos": " Great!", "neg": "Meh."}])
    >>> pos[0][1], neg[0][0][0]["content"]
    ('Great!', 'Be sad.')
    """
    pos = [(_messages(p["system_pos"], p["question"]), p["pos"].lstrip()) for p in pairs]
    neg = [(_messages(p["system_neg"], p["question"]), p["neg"].lstrip()) for p in pairs]
    return pos, neg


def extract(model, trait: Union[str, Trait], pairs: Optional[Sequence[dict]] = None,
            scorer: Optional[Callable] = None, min_gap: float = 0.0, layers="all", layer: Optional[int] = None,
            max_new_tokens: int = 40):
    """The persona vector: mean over response tokens of activations under the trait-eliciting
    system prompt minus under the suppressing one, per layer (a :class:`steer.directions.Direction`).

    ``pairs`` from :func:`generate_pairs` (generated if ``None``); ``scorer`` filters them
    (:func:`filter_pairs`); ``layer`` is the chosen layer (default: two thirds of the depth, or
    the extracted layer nearest it); the layers not in ``layers`` are zero rows.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> pairs = generate_pairs(m, "formal", ["Hi?", "Yo?"], prompt_pairs=[0], max_new_tokens=4)
    >>> extract(m, "formal", pairs).vectors.shape
    torch.Size([2, 64])
    """
    from .capture import capture
    from .directions import Direction, from_activations

    trait = load_trait(trait)
    pairs = generate_pairs(model, trait, max_new_tokens=max_new_tokens) if pairs is None else list(pairs)
    n_all = len(pairs)
    if scorer is not None:
        pairs = filter_pairs(pairs, scorer, min_gap)
    if not pairs:
        raise ValueError(f"No pair left after filtering {n_all} pairs with the scorer: lower min_gap or "
                         "check the system prompts actually change the answers.")
    pos, neg = pair_prompts(pairs)
    a = capture(model, pos, layers=layers, positions="completion", reduce="mean", progress=False)
    b = capture(model, neg, layers=layers, positions="completion", reduce="mean", progress=False)
    vec = torch.zeros(model.n_layers, model.d_model)
    vec[a.layers] = from_activations(a.tensor, b.tensor, "mean_diff")
    done = list(a.layers)
    chosen = layer if layer is not None else min(done, key=lambda l: abs(l - (2 * model.n_layers) // 3))
    if chosen not in done:
        raise ValueError(f"layer={layer}: the vector was extracted at layers {done} only; pick one of them "
                         "or add it to layers=.")
    meta = {"model": model.name, "d_model": model.d_model, "trait": trait.name, "n_pairs": len(pairs),
            "n_pairs_before_filter": n_all, "positions": "completion", "site": "resid_post"}
    return Direction(vec, chosen, "persona_mean_diff", meta)


# ---------------------------------------------------------------------------------------------
# uses: steering, trait score, monitoring, tracing, flagging
# ---------------------------------------------------------------------------------------------
def _vec(direction, layer: Optional[int]) -> tuple[Tensor, int]:
    if hasattr(direction, "vectors"):
        lay = direction.layer if layer is None else layer
        if lay is None:
            raise ValueError("The direction has no chosen layer: pass layer=.")
        return direction.vectors[lay], lay
    v = torch.as_tensor(direction)
    if layer is None:
        raise ValueError("Pass layer= with a plain tensor.")
    return (v[layer] if v.ndim == 2 else v), layer


def _from_response(batch):
    """Selector: the last prompt token and every completion token (the response positions); a
    prompt without a completion has only its last token (where its response would start)."""
    m = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for i, sp in enumerate(batch.spans):
        a, b = sp.get("completion", (batch.input_ids.shape[1], batch.input_ids.shape[1]))
        m[i, a - 1:b] = True
    return m


def trait_score(model, trait: Union[str, Trait], direction=None, layer: Optional[int] = None,
                strength: float = 0.0, items: Optional[Sequence[dict]] = None) -> float:
    """Built-in trait score (CAA-style, no judge): mean over the trait's ``ab`` items of the
    per-token log-probability of the trait-consistent answer minus the inconsistent one, under the
    default system prompt — optionally steered by ``+strength · v`` on the response tokens.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> isinstance(trait_score(m, "formal", torch.randn(2, 64), layer=1, strength=1.0), float)
    True
    """
    from .interventions import Intervention
    from .steering import Steering

    trait = load_trait(trait)
    items = list(trait.ab if items is None else items)
    if not items:
        raise ValueError(f"Trait {trait.name!r} has no 'ab' items to score with: add some to its file.")
    prompts = [_messages(None, it["question"]) for it in items]
    prompts = prompts + prompts
    comps = [it["trait"] for it in items] + [it["opposite"] for it in items]
    if direction is None or strength == 0:
        lp = _completion_logprob(model, prompts, comps)
    else:
        v, lay = _vec(direction, layer)
        iv = Intervention("add", v, layers=[lay], positions=_from_response, strength=float(strength))
        with Steering(model, [iv]) as s:
            lp = _completion_logprob(model, prompts, comps, steering=s)
    n = len(items)
    return float((lp[:n] - lp[n:]).mean())


def steered_answers(model, direction, layer: Optional[int], questions: Sequence[str], strength: float,
                    max_new_tokens: int = 40, backend=None) -> list[str]:
    """Greedy answers with ``+strength · v`` added at the last prompt token and every generated token
    (``backend="vllm"``: through :mod:`steer.serve`).

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> len(steered_answers(m, torch.randn(2, 64), 1, ["Hi"], 2.0, max_new_tokens=2))
    1
    """
    from .interventions import Intervention
    from .positions import Last
    from .steering import Steering

    v, lay = _vec(direction, layer)
    ivs = [Intervention("add", v, layers=[lay], positions=Last(1), strength=float(strength)),
           Intervention("add", v, layers=[lay], positions="generated", strength=float(strength))]
    with Steering(model, ivs) as s:
        return [t.strip() for t in s.generate([_messages(None, q) for q in questions], max_new_tokens=max_new_tokens,
                                              backend=backend)]


def _last_token_acts(model, prompts, layers="all") -> Tensor:
    from .capture import capture

    return capture(model, prompts, layers=layers, positions="last", progress=False).tensor  # [n, layer, d]


def monitor(model, trait: Union[str, Trait], direction, layer: Optional[int] = None,
            questions: Optional[Sequence[str]] = None) -> dict:
    """Monitoring: the projection of the last prompt token on ``v̂`` for the held-out questions
    asked under each trait-eliciting and each trait-suppressing system prompt, and the AUROC of
    that projection separating the two.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> r = monitor(m, "formal", torch.randn(2, 64), layer=1)
    >>> 0 <= r["auroc"] <= 1
    True
    """
    from .evaluate import auroc

    trait = load_trait(trait)
    qs = list(trait.heldout_questions if questions is None else questions)
    v, lay = _vec(direction, layer)
    pos = [_messages(s, q) for q in qs for s in trait.positive]
    neg = [_messages(s, q) for q in qs for s in trait.negative]
    acts = _last_token_acts(model, pos + neg, [lay])[:, 0]
    proj = acts @ (v / v.norm())
    labels = torch.tensor([1] * len(pos) + [0] * len(neg))
    return {"layer": lay, "auroc": auroc(proj, labels), "projection_pos": proj[: len(pos)].tolist(),
            "projection_neg": proj[len(pos):].tolist(), "n": len(proj)}


GRADED_LEVELS = (-2, -1, 0, 1, 2)


def graded_prompts(trait: Union[str, Trait], pair: int = 0) -> dict[int, Optional[str]]:
    """System prompts of graded intensity, from trait-suppressing (−2) to trait-eliciting (+2):
    the trait's own suppressing / eliciting prompt ``pair`` at ±2, a mild request built from its
    description at ±1, and no system prompt at 0 (steer's construction; the persona-vectors paper
    grades its prompts the same way, with its own texts).

    >>> graded_prompts("formal")[0] is None, sorted(graded_prompts("formal"))
    (True, [-2, -1, 0, 1, 2])
    """
    t = load_trait(trait)
    if not 0 <= pair < min(len(t.positive), len(t.negative)):
        raise ValueError(f"pair={pair}: trait {t.name!r} has {len(t.positive)} prompt pairs.")
    d = t.description.rstrip(".")
    return {-2: t.negative[pair],
            -1: f"You are a helpful assistant. Where you can, keep this out of your answers: {d}.",
            0: None,
            1: f"You are a helpful assistant. Where it fits, let this show a little in your answers: {d}.",
            2: t.positive[pair]}


def monitor_graded(model, trait: Union[str, Trait], direction, layer: Optional[int] = None,
                   questions: Optional[Sequence[str]] = None, pairs: Sequence[int] = (0,), max_new_tokens: int = 32,
                   scorer: Optional[Callable] = None) -> dict:
    """Persona monitoring as the persona-vectors paper measures it: each held-out question under
    each graded system prompt (:func:`graded_prompts`); x = the projection of the last prompt
    token on ``v̂``, y = the trait score of the answer the model then gives (greedy; the built-in
    :func:`contrast_scorer` unless ``scorer`` is given); Pearson ``r`` over all (question, level)
    samples, and the per-level means.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> r = monitor_graded(m, "formal", torch.randn(2, 64), layer=1, questions=["Hi?", "Why?"], max_new_tokens=3)
    >>> sorted(r)[:3], len(r["projection"])
    (['level', 'level_means', 'n'], 10)
    """
    t = load_trait(trait)
    qs = list(t.heldout_questions if questions is None else questions)
    scorer = scorer or contrast_scorer(model, t)
    levels_of = {k: graded_prompts(t, k) for k in pairs}
    idx = [(k, lev, q) for k in pairs for lev in levels_of[k] for q in qs]
    prompts = [_messages(levels_of[k][lev], q) for k, lev, q in idx]
    tr = trace(model, direction, layer, prompts, max_new_tokens=max_new_tokens)
    x = tr["projections"][:, 0]
    items = [(q, tx.strip() or "...", k) for (k, _, q), tx in zip(idx, tr["texts"])]
    y = scorer.batch(items) if hasattr(scorer, "batch") else torch.tensor([float(scorer(*i)) for i in items])
    r = float(torch.corrcoef(torch.stack([x.float(), y.float()]))[0, 1])
    levels = torch.tensor([lev for _, lev, _ in idx])
    means = {int(l): {"projection": float(x[levels == l].mean()), "score": float(y[levels == l].mean())}
             for l in GRADED_LEVELS}
    return {"pearson_r": r, "level": levels.tolist(), "projection": x.tolist(), "score": y.tolist(),
            "level_means": means, "texts": tr["texts"], "n": len(idx)}


def layer_curve(model, trait: Union[str, Trait], direction, questions: Optional[Sequence[str]] = None):
    """Per-layer AUROC of the last-prompt-token projection (held-out questions, eliciting vs
    suppressing system prompts): where the persona is encoded. A :class:`~steer.directions.LayerSweep`.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> len(layer_curve(m, "formal", torch.randn(2, 64)).column("auroc"))
    2
    """
    from .directions import LayerSweep
    from .evaluate import auroc

    trait = load_trait(trait)
    qs = list(trait.heldout_questions if questions is None else questions)
    V = direction.vectors if hasattr(direction, "vectors") else torch.as_tensor(direction)
    pos = [_messages(s, q) for q in qs for s in trait.positive]
    neg = [_messages(s, q) for q in qs for s in trait.negative]
    acts = _last_token_acts(model, pos + neg)
    labels = torch.tensor([1] * len(pos) + [0] * len(neg))
    aucs = []
    for l in range(model.n_layers):
        n = V[l].norm()
        aucs.append(auroc(acts[:, l] @ (V[l] / n), labels) if n > 0 else 0.5)
    best = max(range(len(aucs)), key=aucs.__getitem__)
    return LayerSweep([{"layer": l, "auroc": float(a)} for l, a in enumerate(aucs)], best, "auroc")


@torch.no_grad()
def trace(model, direction, layer: Optional[int], prompts: Sequence, max_new_tokens: int = 32) -> dict:
    """Projection on ``v̂`` over generation: the last prompt token, then each generated token.

    Returns ``{"texts": [...], "projections": [n, 1 + max_new_tokens]}`` (NaN after an
    example's end of sequence).

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> trace(m, torch.randn(2, 64), 1, ["Hi"], max_new_tokens=3)["projections"].shape
    torch.Size([1, 4])
    """
    from .data import tokenize
    from .hooks import add_hooks

    v, lay = _vec(direction, layer)
    u = (v / v.norm()).float()
    steps: list[Tensor] = []

    def grab(act, site):
        steps.append(act[:, -1].float() @ u.to(act.device))  # stays on the model's device until the end

    batch = tokenize(model, prompt_list(prompts))
    with add_hooks(model, {f"resid_post.{lay}": grab}):  # one token more: its step reads the last one kept
        out = model.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                max_new_tokens=max_new_tokens + 1, do_sample=False,
                                pad_token_id=model.tokenizer.pad_token_id)
    new = out[:, batch.input_ids.shape[1]:][:, :max_new_tokens]
    proj = torch.stack(steps[: 1 + new.shape[1]], 1).cpu()  # step k reads the token generated at k-1
    done = (new == model.tokenizer.eos_token_id).cumsum(-1) > 0
    proj[:, 1:][done[:, : proj.shape[1] - 1]] = float("nan")
    full = torch.full((len(prompts), 1 + max_new_tokens), float("nan"))
    full[:, : proj.shape[1]] = proj
    return {"texts": model.tokenizer.batch_decode(new, skip_special_tokens=True), "projections": full}


def flag(model, direction, layer: Optional[int], dataset: Sequence[tuple], max_new_tokens: int = 40) -> Tensor:
    """Flag training data: for each ``(prompt, response)`` the mean response-token projection on
    ``v̂`` of the dataset's response minus that of the model's own greedy response to the prompt.
    Large positive values mark samples that would push the model towards the trait.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> flag(m, torch.randn(2, 64), 1, [("Hi", "Hello!")], max_new_tokens=3).shape
    torch.Size([1])
    """
    from .capture import capture

    v, lay = _vec(direction, layer)
    prompts = [p for p, _ in dataset]
    own = model.generate(prompts, max_new_tokens=max_new_tokens)
    own = [o.strip() or "..." for o in own]
    a = capture(model, [(p, r) for p, r in dataset], layers=[lay], positions="completion", reduce="mean", progress=False).tensor[:, 0]
    b = capture(model, list(zip(prompts, own)), layers=[lay], positions="completion", reduce="mean", progress=False).tensor[:, 0]
    u = v / v.norm()
    return (a - b) @ u


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------
def demo(model, out_dir: Union[str, Path], trait: str = "optimistic", strength: float = 4.0) -> dict:
    """One steered persona answer for ``steer demo``: extract ``trait`` from a few generated pairs,
    answer a held-out question unsteered and steered by ``±strength · v``, and evaluate the
    steering against asking for the trait in the system prompt
    (:func:`steer.evaluate.evaluate_steering` on the trait's items); saves ``persona.json``.

    >>> import steer, tempfile
    >>> d = demo(steer.load("tiny-llama"), tempfile.mkdtemp())
    >>> sorted(d)[:3], [r["setting"] for r in d["evaluation"]["rows"]]
    (['answers', 'evaluation', 'layer'], ['steer 2', 'steer 4', 'prompt'])
    """
    t = load_trait(trait)
    pairs = generate_pairs(model, t, t.train_questions[:4], prompt_pairs=[0, 1], max_new_tokens=24)
    vec = extract(model, t, pairs)
    layer = vec.layer
    q = t.heldout_questions[0]
    answers = {str(a): steered_answers(model, vec, layer, [q], a, max_new_tokens=32)[0] for a in (-strength, 0.0, strength)}
    from .bias import load_neutral_text
    from .evaluate import evaluate_steering
    from .refusal import training_data
    from .steering import steer

    ev = evaluate_steering(  # the trait's ab items: steering vs asking for the trait in the system prompt
        model, t.ab, lambda a: steer(model, vec, layer=layer, strength=a, positions=_from_response),
        [strength / 2, strength], system_prompt=t.positive[0], neutral_prompts=training_data()["harmless"][-8:],
        unrelated_texts=load_neutral_text()[:8], name=t.name)
    out = {"trait": t.name, "question": q, "layer": layer, "answers": answers, "evaluation": ev.to_dict()}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "persona.json").write_text(json.dumps(out, indent=1))
    return out
