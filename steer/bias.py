"""Social bias: counterfactual measurement, decision bias, bias directions and debiasing.

Measurement
-----------
* :func:`occupational_bias` — "The {occupation} said that" → ``log P(" he") − log P(" she")`` per
  occupation and template, *centred* on the same template with a gender-neutral subject
  ("The person said that") so the model's overall pronoun preference is not counted. Bias =
  mean absolute centred gap over occupations; its Pearson correlation with the occupations'
  share of women (U.S. BLS CPS 2023, table 11) measures how stereotyped it is.
* :func:`counterfactual_gaps` — the same for any :class:`Template` (slot × values × targets).
* :func:`aligned_pairs` — counterfactual prompt pairs with their tokens aligned around the slot
  (a slot value with a different number of tokens is handled, a merge across the slot boundary
  raises).
* :func:`decision_bias` — yes/no decision prompts (hiring, loans, housing, ...) with a
  demographic slot: ``P(yes)`` per group, the logit gap from a reference group, and relative
  choices between two candidates (both orders).

Debiasing
---------
Directions (:func:`gender_direction`, :func:`stereotype_direction`), edits (:class:`Edit`:
directional ablation, projection clamping to the neutral value, LEACE erasure from
:mod:`steer.erasure`) applied at chosen layers to every position but the first real token
(the attention sink), the side effect on neutral text (:func:`side_effects`: KL and perplexity
ratio) and :func:`pareto_sweep` over methods × layers × strengths. :func:`fit_combined` (the
default, :func:`fit_default_edit`) joins LEACE of the gender concept at layer 12 with clamping,
at layers 6-24, the projection on a stereotype direction — fitted on the subject and following
tokens of the training occupation prompts against the model's own gap — to its value on the
neutral subject. On SmolLM2-135M-Instruct, held-out occupations and templates: centred bias
0.98 → 0.36 (−63 %), correlation with the share of women −0.88 → −0.44 (−50 %), neutral-text KL
0.040, perplexity ratio 1.043.

>>> import steer
>>> from steer import bias
>>> m = steer.load("tiny-llama")
>>> r = bias.occupational_bias(m, occupations={"nurse": 87.4, "pilot": 4.6, "cook": 37.9},
...                            templates=["The {occupation} said that"], targets=(" he", " she"))
>>> r.gaps.shape        # [templates, occupations]
torch.Size([1, 3])
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .data import batches, pad_left, position_ids, prompt_list
from .display import Rich
from .progress import bar

from .erasure import LeaceEraser
from .hooks import add_hooks

__all__ = [
    "Template", "OccupationResult", "Edit", "load_occupations", "load_templates",
    "load_gendered_pairs", "load_neutral_text", "load_decisions", "sequence_logprobs",
    "counterfactual_gaps", "occupational_bias", "aligned_pairs", "AlignedPair", "decision_bias",
    "gender_direction", "stereotype_direction", "fit_edit", "side_effects", "pareto_sweep",
    "pareto_front", "debias_report", "Edits", "fit_combined", "fit_default_edit", "plot_occupations", "demo", "pearson",
]

DATA = Path(__file__).parent / "datasets" / "bias"
METHODS = ("ablate", "clamp", "leace")
DIRECTIONS = ("gender", "stereotype")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class Template:
    """A counterfactual template: ``template`` with ``{slot}`` filled by each of ``values``.

    ``targets``: the continuations compared (``log P(targets[0]) − log P(targets[1])``);
    ``neutral``: the value the gaps are centred on (e.g. ``"person"``), or ``None``.

    >>> t = Template("The {occupation} said that", values=["nurse", "pilot"])
    >>> t.fill("nurse"), t.targets, t.neutral
    ('The nurse said that', (' he', ' she'), 'person')
    >>> t = Template("Should the {group} get the loan? Answer:", slot="group", values=["man", "woman"],
    ...              targets=[" Yes", " No"], neutral="person")
    >>> [t.fill(v) for v in t.values][1], t.targets        # targets become a tuple
    ('Should the woman get the loan? Answer:', (' Yes', ' No'))
    >>> Template("The doctor said that")
    Traceback (most recent call last):
    ...
    ValueError: Template 'The doctor said that' has no slot {occupation}: add it or set 'slot'.
    """

    template: str
    slot: str = "occupation"
    values: list[str] = field(default_factory=list)
    targets: tuple[str, str] = (" he", " she")
    neutral: Optional[str] = "person"

    def __post_init__(self):
        if "{" + self.slot + "}" not in self.template:
            raise ValueError(f"Template {self.template!r} has no slot {{{self.slot}}}: add it or set 'slot'.")
        if len(self.targets) != 2 or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets must be two non-empty strings like [' he', ' she'], got {self.targets!r}.")
        self.targets = tuple(self.targets)

    def fill(self, value: str) -> str:
        """The template with its slot replaced by ``value``.

        >>> Template("The {x} left.", slot="x").fill("woman")
        'The woman left.'
        """
        return self.template.replace("{" + self.slot + "}", value)


def _read_json(path: Path):
    if not path.exists():
        raise FileNotFoundError(f"No file at {path}.")
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def load_occupations(split: Optional[str] = None, path: Union[str, Path, None] = None) -> dict[str, float]:
    """``{occupation word: percent women}`` from the built-in BLS table (``split``: train/heldout/None).

    ``path``: a file of your own figures, either ``{"word": percent, ...}`` or the built-in
    table's form (``{"occupations": [{"word", "women_pct"[, "split"]}, ...]}`` or that list).

    >>> occ = load_occupations("heldout"); 0 < occ["plumber"] < 10
    True
    """
    data = _read_json(Path(path) if path else DATA / "occupations.json")
    if isinstance(data, dict) and "occupations" not in data:  # {word: percent}
        if split is not None:
            raise ValueError(f"{path} maps words to percentages and has no splits: use split=None.")
        bad = {k: v for k, v in data.items() if not isinstance(v, (int, float)) or not 0 <= v <= 100}
        if bad:
            raise ValueError(f"{path}: shares of women must be percentages in [0, 100], got {bad}.")
        return {str(k): float(v) for k, v in data.items()}
    rows = data["occupations"] if isinstance(data, dict) else data
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split={split!r}: use 'train', 'heldout' or None (all).")
    return {r["word"]: float(r["women_pct"]) for r in rows if split is None or r.get("split") == split}


def occupation_source() -> str:
    """The citation of the occupation statistics.

    >>> occupation_source().startswith("U.S. Bureau of Labor Statistics")
    True
    """
    return _read_json(DATA / "occupations.json")["source"]


def load_templates(path: Union[str, Path, None] = None, split: str = "heldout") -> list[Template]:
    """Templates from a JSONL/JSON file of ``{"template", "slot", "values", "targets"[, "neutral"]}``
    objects, or the built-in occupation templates (``split``: ``"train"``/``"heldout"``) filled
    with the built-in occupations of the same split.

    >>> ts = load_templates(split="train"); ts[0].template, ts[0].targets
    ('The {occupation} said that', (' he', ' she'))
    """
    if path is None:
        data = _read_json(DATA / "templates.json")
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r}: use 'train' or 'heldout'.")
        values = list(load_occupations(split))
        return [Template(t, "occupation", values, tuple(data["targets"]), data["neutral"]) for t in data[split]]
    items = _read_json(Path(path))
    if isinstance(items, dict):
        items = [items]
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or "template" not in it:
            raise ValueError(f"{path}: item {i} must be an object with a 'template' key, got {it!r}.")
        slot = it.get("slot", "occupation")
        values = it.get("values")
        if values is None and slot == "occupation":
            values = list(load_occupations())
        if not values:
            raise ValueError(f"{path}: item {i} has no 'values' to fill {{{slot}}} with.")
        out.append(Template(it["template"], slot, list(values), tuple(it.get("targets", (" he", " she"))),
                            it.get("neutral", "person")))
    if not out:
        raise ValueError(f"{path} holds no templates.")
    return out


def load_gendered_pairs() -> tuple[list[str], list[tuple[str, str]]]:
    """Built-in (templates with ``{x}``, [(male word, female word)]) for a gender direction.

    >>> templates, pairs = load_gendered_pairs()
    >>> pairs[0], all("{x}" in t for t in templates)
    (('man', 'woman'), True)
    """
    d = _read_json(DATA / "gendered_pairs.json")
    return d["templates"], [tuple(p) for p in d["pairs"]]


def load_neutral_text() -> list[str]:
    """Built-in neutral sentences for side-effect measurement (KL, perplexity).

    >>> texts = load_neutral_text()
    >>> len(texts) >= 10, texts[0].startswith("The river")
    (True, True)
    """
    return list(_read_json(DATA / "neutral.json"))


def load_decisions() -> dict:
    """Built-in decision templates, demographic groups, reference group and choice templates.

    The dict's keys are :func:`decision_bias`'s arguments (``templates``, ``groups``,
    ``reference``, ``choice``); templates have a ``{person}`` slot, choices ``{a}`` and ``{b}``.

    >>> d = load_decisions()
    >>> sorted(d)
    ['choice', 'groups', 'note', 'reference', 'templates']
    >>> d["reference"] in d["groups"], "{person}" in d["templates"][0]["template"]
    (True, True)
    """
    return _read_json(DATA / "decisions.json")


# ---------------------------------------------------------------------------------------------
# running the model with an optional edit, sink-safe
# ---------------------------------------------------------------------------------------------
def _ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False).input_ids


def _pad(model, rows: Sequence[Sequence[int]]):
    return pad_left(rows, model.tokenizer.pad_token_id, model.device)


@torch.no_grad()
def _forward(model, rows: Sequence[Sequence[int]], edit: "Optional[Edit]" = None,
             capture_layers: Sequence[int] = (), batch_size: int = 32, last_only: bool = False) -> Iterator[tuple]:
    """Yield ``(indices, log_probs [b, pos, vocab], attention_mask, {layer: resid_post})`` per batch
    (left padded). ``edit`` is applied to every real position but the first (the attention sink)
    by :class:`~steer.steering.Steering`, which reads them from each call's attention mask.
    ``last_only``: log-probs of the last position only (``pos`` = 1; skips the unembedding elsewhere)."""
    for idx in batches(len(rows), batch_size, [len(r) for r in rows]):
        ids, att = _pad(model, [rows[i] for i in idx])
        grabbed: dict[int, Tensor] = {}
        hooks: dict = {}
        for layer in capture_layers:
            hooks.setdefault(f"resid_post.{layer}", []).append(
                lambda act, site: grabbed.__setitem__(site.layer, act.detach().float().cpu()))
        ctx = edit.hooks(model) if edit is not None else nullcontext()
        with ctx, add_hooks(model, hooks):
            pos_ids = position_ids(att)
            if last_only:
                base = model.base
                h = base(input_ids=ids, attention_mask=att, position_ids=pos_ids, use_cache=False).last_hidden_state
                logits = model.hf.get_output_embeddings()(h[:, -1:])
                cap = getattr(model.config, "final_logit_softcapping", None)
                if cap:
                    logits = cap * torch.tanh(logits / cap)
            else:
                logits = model.hf(input_ids=ids, attention_mask=att, position_ids=pos_ids, use_cache=False).logits
        yield idx, logits.float().log_softmax(-1), att, grabbed


def sequence_logprobs(model, prompts: Sequence[str], continuations: Sequence[str],
                      edit: "Optional[Edit]" = None, batch_size: int = 32) -> Float[Tensor, "n"]:
    """``log P(continuation | prompt)`` summed over the continuation's tokens, for raw text (no chat
    template). The continuation is tokenized on its own and appended, so the prompt's tokens are the
    same for every continuation (multi-token continuations such as a byte-level " he" work).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> sequence_logprobs(m, ["The cook said that"] * 2, [" he", " she"]).shape
    torch.Size([2])
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations: pass one each.")
    rows, spans = [], []
    for p, c in zip(prompts, continuations):
        pi, ci = _ids(model, p), _ids(model, c)
        if not pi or not ci:
            raise ValueError(f"Empty prompt or continuation: {p!r} + {c!r}.")
        rows.append(pi + ci)
        spans.append(len(ci))
    out = torch.zeros(len(rows))
    for idx, lp, att, _ in _forward(model, rows, edit, batch_size=batch_size):
        width = lp.shape[1]
        sums = []
        for j, i in enumerate(idx):
            k = spans[i]
            tgt = torch.tensor(rows[i][-k:], device=lp.device)
            sums.append(lp[j, width - k - 1: width - 1].gather(-1, tgt[:, None]).sum())
        out[torch.as_tensor(list(idx))] = torch.stack(sums).float().cpu()  # one transfer per batch
    return out


def _target_gaps(model, texts: Sequence[str], targets: tuple[str, str], edit=None, batch_size: int = 32) -> Tensor:
    """``log P(t0|text) − log P(t1|text)``; one forward per text when both targets are one token."""
    t0, t1 = _ids(model, targets[0]), _ids(model, targets[1])
    if len(t0) == 1 and len(t1) == 1:
        out = torch.zeros(len(texts))
        rows = [_ids(model, t) for t in texts]
        for idx, lp, _, _ in _forward(model, rows, edit, batch_size=batch_size, last_only=True):
            last = lp[:, -1]
            out[torch.tensor(idx)] = (last[:, t0[0]] - last[:, t1[0]]).cpu()
        return out
    texts = list(texts)
    lp = sequence_logprobs(model, texts + texts, [targets[0]] * len(texts) + [targets[1]] * len(texts), edit, batch_size)
    return lp[: len(texts)] - lp[len(texts):]


# ---------------------------------------------------------------------------------------------
# counterfactual measurement
# ---------------------------------------------------------------------------------------------
def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two 1-d tensors (``nan`` if either is constant).

    >>> pearson(torch.tensor([1., 2, 3]), torch.tensor([2., 4, 7]))  # doctest: +ELLIPSIS
    0.99...
    """
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pearson needs two 1-d tensors of equal length, got {tuple(a.shape)}, {tuple(b.shape)}.")
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a @ b) / den) if den > 0 else float("nan")


@dataclass(repr=False)
class OccupationResult(Rich):
    """Gaps ``log P(t0) − log P(t1)`` of each template × value, and the neutral-subject gaps.

    * ``centred = gaps − neutral[:, None]`` (``[templates, values]``)
    * ``per_value``: mean over templates of the centred gap (``[values]``)
    * ``bias``: mean absolute ``per_value`` — the headline bias score
    * ``item_bias``: mean absolute centred gap over all template × value items
    * ``correlation``: Pearson r of ``per_value`` with ``shares``, over the values that have a
      share (``shares`` is NaN where a value has none); ``nan`` when it cannot be computed, and
      then ``correlation_note`` says why (fewer than 3 values with a share, or constant values)

    Usually returned by :func:`occupational_bias` or :func:`counterfactual_gaps`; built by hand
    here to show the arithmetic (one template, four occupations, the neutral subject at +1, no
    share-of-women figure for "zookeeper"):

    >>> r = OccupationResult(["nurse", "pilot", "cook", "zookeeper"], ["The {occupation} said that"],
    ...                      gaps=torch.tensor([[-1.0, 3.0, 1.5, 0.0]]), neutral=torch.tensor([1.0]),
    ...                      shares=torch.tensor([87.4, 4.6, 37.9, float("nan")]))
    >>> r.centred.tolist(), r.per_value.tolist(), r.bias
    ([[-2.0, 2.0, 0.5, -1.0]], [-2.0, 2.0, 0.5, -1.0], 1.375)
    >>> round(r.correlation, 3), r.correlation_skipped  # more " he" where fewer women: stereotyped
    (-1.0, ['zookeeper'])
    >>> r.summary()["correlation_n"], r.to_dict()["shares"]["zookeeper"]
    (3, None)
    >>> OccupationResult(["nurse", "pilot"], ["T"], torch.tensor([[-1.0, 3.0]]), torch.tensor([0.0]),
    ...                  torch.tensor([87.4, 4.6])).correlation_note
    'only 2 of 2 values have a share-of-women figure; a correlation needs at least 3'
    """

    values: list[str]
    templates: list[str]
    gaps: Float[Tensor, "template value"]
    neutral: Float[Tensor, "template"]
    shares: Optional[Float[Tensor, "value"]] = None
    targets: tuple[str, str] = (" he", " she")

    @property
    def centred(self) -> Tensor:
        return self.gaps - self.neutral[:, None]

    @property
    def per_value(self) -> Tensor:
        return self.centred.mean(0)

    @property
    def bias(self) -> float:
        return float(self.per_value.abs().mean())

    @property
    def item_bias(self) -> float:
        return float(self.centred.abs().mean())

    @property
    def spread(self) -> float:
        return float(self.per_value.std()) if len(self.values) > 1 else 0.0

    @property
    def has_share(self) -> Bool[Tensor, "value"]:
        """Which values have a share-of-women figure."""
        if self.shares is None:
            return torch.zeros(len(self.values), dtype=torch.bool)
        return torch.isfinite(torch.as_tensor(self.shares, dtype=torch.float64))

    @property
    def correlation_skipped(self) -> list[str]:
        """The values left out of :attr:`correlation` for want of a share-of-women figure."""
        return [v for v, ok in zip(self.values, self.has_share.tolist()) if not ok]

    @property
    def correlation_note(self) -> Optional[str]:
        """Why :attr:`correlation` could not be computed (``None`` when it was)."""
        keep, n = self.has_share, len(self.values)
        if int(keep.sum()) < 3:
            return (f"only {int(keep.sum())} of {n} values have a share-of-women figure; a correlation "
                    "needs at least 3")
        if math.isnan(pearson(self.per_value[keep], self.shares[keep])):
            return "the gaps or the shares of the values with a figure are constant"
        return None

    @property
    def correlation(self) -> float:
        if self.correlation_note is not None:
            return float("nan")
        keep = self.has_share
        return pearson(self.per_value[keep], self.shares[keep])

    @property
    def neutral_gap(self) -> float:
        return float(self.neutral.mean())

    def summary(self) -> dict:
        note = self.correlation_note
        return {"bias": self.bias, "item_bias": self.item_bias,
                "correlation": None if note else self.correlation, "correlation_note": note,
                "correlation_n": int(self.has_share.sum()), "correlation_skipped": self.correlation_skipped,
                "spread": self.spread, "neutral_gap": self.neutral_gap, "n_values": len(self.values),
                "n_templates": len(self.templates)}

    def _fields(self):
        s = self.summary()
        r = s["correlation_note"] or f"{s['correlation']:+.3f} over {s['correlation_n']} values with a share"
        return [("targets", f"log P({self.targets[0]!r}) − log P({self.targets[1]!r})"),
                ("values x templates", f"{len(self.values)} x {len(self.templates)}"),
                ("bias (mean |per value|)", s["bias"]), ("item bias", s["item_bias"]),
                ("correlation with share", r), ("neutral gap", s["neutral_gap"])]

    def _table(self):
        order = sorted(range(len(self.values)), key=lambda i: -abs(float(self.per_value[i])))[:10]
        return ["value (largest |gap|)", "centred gap", "share %"], [
            [self.values[i], float(self.per_value[i]),
             float(self.shares[i]) if self.shares is not None else float("nan")] for i in order]

    def _figure(self):
        return plot_occupations(self)

    def to_dict(self) -> dict:
        return {**self.summary(), "targets": list(self.targets), "templates": self.templates,
                "per_value": dict(zip(self.values, self.per_value.tolist())),
                "shares": None if self.shares is None else
                {v: (x if x == x else None) for v, x in zip(self.values, self.shares.tolist())}}


def counterfactual_gaps(model, templates: Sequence[Template], edit: "Optional[Edit]" = None,
                        shares: Optional[Mapping[str, float]] = None, batch_size: int = 32) -> OccupationResult:
    """Measure ``log P(t0) − log P(t1)`` for every template × value (and the neutral value).

    All templates must share their values, slot and targets (one table); centring uses each
    template's ``neutral`` value (a template without one is centred on 0).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> t = Template("The {occupation} said that", values=["nurse", "pilot"])
    >>> counterfactual_gaps(m, [t]).centred.shape
    torch.Size([1, 2])
    """
    templates = list(templates)
    if not templates:
        raise ValueError("No templates given.")
    values, targets = templates[0].values, templates[0].targets
    for t in templates:
        if t.values != values or t.targets != targets:
            raise ValueError("All templates of one measurement must share values and targets; measure them separately.")
    if not values:
        raise ValueError("Templates have no values to fill the slot with.")
    texts = [t.fill(v) for t in templates for v in values]
    neutral_texts = [t.fill(t.neutral) for t in templates if t.neutral]
    g = _target_gaps(model, texts + neutral_texts, targets, edit, batch_size)
    gaps = g[: len(texts)].view(len(templates), len(values))
    neutral = torch.zeros(len(templates))
    has = [i for i, t in enumerate(templates) if t.neutral]
    neutral[has] = g[len(texts):]
    sh = None  # NaN where a value has no figure: the correlation uses the others
    if shares is not None:
        sh = torch.tensor([float(shares.get(v, float("nan"))) for v in values])
    return OccupationResult(list(values), [t.template for t in templates], gaps, neutral, sh, targets)


def occupational_bias(
    model,
    occupations: Union[Mapping[str, float], str, None] = "heldout",
    templates: Union[Sequence[str], Sequence[Template], str, None] = "heldout",
    targets: tuple[str, str] = (" he", " she"),
    neutral: str = "person",
    edit: "Optional[Edit]" = None,
    batch_size: int = 32,
) -> OccupationResult:
    """Occupational gender bias: centred ``log P(" he") − log P(" she")`` per occupation.

    ``occupations``: ``{word: percent women}`` or a built-in split (``"train"``, ``"heldout"``,
    ``None`` = all); ``templates``: strings with ``{occupation}`` or a built-in split.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> r = occupational_bias(m, {"nurse": 87.4, "pilot": 4.6}, ["The {occupation} said that"])
    >>> sorted(r.summary())[:3]
    ['bias', 'correlation', 'correlation_n']
    """
    if occupations is None or isinstance(occupations, str):
        occupations = load_occupations(occupations)
    occupations = dict(occupations)
    if not occupations:
        raise ValueError("No occupations given.")
    if templates is None or isinstance(templates, str):
        data = _read_json(DATA / "templates.json")
        split = templates or "heldout"
        if split not in ("train", "heldout"):
            raise ValueError(f"templates={templates!r}: use 'train', 'heldout' or a list of template strings.")
        templates = data[split]
    ts = [t if isinstance(t, Template) else Template(t, "occupation", [], targets, neutral) for t in templates]
    ts = [Template(t.template, t.slot, list(occupations), t.targets, t.neutral) for t in ts]
    return counterfactual_gaps(model, ts, edit, occupations, batch_size)


# ---------------------------------------------------------------------------------------------
# token-aligned counterfactual pairs
# ---------------------------------------------------------------------------------------------
@dataclass
class AlignedPair:
    """Two fillings of one template, token by token: a shared prefix, each value's own slot
    tokens, a shared suffix. ``positions(k)`` gives the indices (in row ``k``'s own tokens) of
    the aligned positions: the slot's last token and every suffix token.

    >>> import steer
    >>> m = steer.load("tiny-llama")            # byte tokenizer: "he" is 2 tokens, "she" 3
    >>> p = aligned_pairs(m, "The {x} left.", [("he", "she")])[0]
    >>> p.texts, p.prefix, p.slot, p.suffix
    (('The he left.', 'The she left.'), 4, (2, 3), 6)
    >>> p.positions(0), p.positions(1)
    ([5, 6, 7, 8, 9, 10, 11], [6, 7, 8, 9, 10, 11, 12])
    >>> [p.ids[0][i] for i in p.positions(0)[1:]] == [p.ids[1][i] for i in p.positions(1)[1:]]
    True
    """

    texts: tuple[str, str]
    ids: tuple[list[int], list[int]]
    prefix: int  # number of shared prefix tokens
    slot: tuple[int, int]  # number of slot tokens in each row
    suffix: int  # number of shared suffix tokens

    def positions(self, k: int) -> list[int]:
        end = self.prefix + self.slot[k]
        return [end - 1] + list(range(end, end + self.suffix))


def _slot_tokens(model, text: str, start: int, stop: int) -> tuple[list[int], int, int]:
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    inside = [j for j, (s, e) in enumerate(offs) if s < stop and e > start]
    if not inside:
        raise ValueError(f"The slot value in {text!r} produced no token of its own.")
    lead = text[offs[inside[0]][0]:start]
    if (lead and not lead.isspace()) or offs[inside[-1]][1] > stop:
        raise ValueError(
            f"In {text!r} a token straddles the slot boundary (the tokenizer merges the value "
            f"{text[start:stop]!r} with its neighbours): put a space or punctuation around the slot.")
    return ids, inside[0], inside[-1] + 1


def aligned_pairs(model, template: str, pairs: Sequence[tuple[str, str]], slot: str = "x") -> list[AlignedPair]:
    """Fill ``template`` with both words of each pair and align their tokens around the slot.

    The slot may take a different number of tokens in each filling ("man" vs "grandmother"):
    positions are aligned on the shared prefix, the slot's last token and the shared suffix. If
    the tokenizer merges the slot with its neighbours differently (so prefix or suffix tokens
    differ), a ``ValueError`` says which pair — nothing is silently misaligned.

    >>> import steer
    >>> m = steer.load("tiny-llama")     # byte tokenizer: "man" is 3 tokens, "woman" 5
    >>> p = aligned_pairs(m, "The {x} left.", [("man", "woman")])[0]
    >>> p.slot, p.suffix, p.positions(0), p.positions(1)
    ((3, 5), 6, [6, 7, 8, 9, 10, 11, 12], [8, 9, 10, 11, 12, 13, 14])
    """
    key = "{" + slot + "}"
    if key not in template:
        raise ValueError(f"Template {template!r} has no slot {key}.")
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"A counterfactual pair needs two values, got {pair!r}.")
        start = template.index(key)
        rows = []
        for v in pair:
            text = template.replace(key, v, 1)
            ids, s, e = _slot_tokens(model, text, start, start + len(v))
            rows.append((text, ids, s, e))
        (t0, i0, s0, e0), (t1, i1, s1, e1) = rows
        if i0[:s0] != i1[:s1] or i0[e0:] != i1[e1:]:
            raise ValueError(
                f"Pair {pair!r} in {template!r} tokenizes differently outside the slot (the tokenizer "
                "merges the value with its neighbours): put a space or punctuation around the slot, "
                "or drop this pair.")
        out.append(AlignedPair((t0, t1), (i0, i1), s0, (e0 - s0, e1 - s1), len(i0) - e0))
    return out


# ---------------------------------------------------------------------------------------------
# decision bias
# ---------------------------------------------------------------------------------------------
def _first_token_ids(model, words: Sequence[str]) -> list[int]:
    out = []
    for w in words:
        ids = _ids(model, w)
        if ids and ids[0] not in out:
            out.append(ids[0])
    return out


def _choice_probs(model, prompts: Sequence[str], options: Sequence[Sequence[str]], edit=None,
                  batch_size: int = 16) -> Float[Tensor, "n option"]:
    """Probability of each option (sum over its spellings' first tokens), normalised over options,
    at the first assistant token of chat prompts. A first token that spellings of two options
    share (" Yes" and " No" both start with a space under a byte-level tokenizer) tells them
    apart no more than it tells anything: it counts for none."""
    from collections import Counter

    from .data import tokenize

    tok_sets = [_first_token_ids(model, o) for o in options]
    seen = Counter(t for ts in tok_sets for t in ts)
    tok_sets = [[t for t in ts if seen[t] == 1] for ts in tok_sets]
    for o, ts in zip(options, tok_sets):
        if not ts:
            raise ValueError(f"Every spelling of the option {list(o)} starts with a token another option starts with "
                             f"under {model.name}'s tokenizer: give spellings whose first tokens differ.")
    batch = tokenize(model, prompt_list(prompts))
    rows = [batch.input_ids[i][batch.attention_mask[i].bool()].tolist() for i in range(len(prompts))]
    out = torch.zeros(len(prompts), len(options))
    for idx, lp, _, _ in _forward(model, rows, edit, batch_size=batch_size, last_only=True):
        p = lp[:, -1].exp()
        mass = torch.stack([p[:, t].sum(-1) for t in tok_sets], -1)
        out[torch.tensor(idx)] = (mass / mass.sum(-1, keepdim=True)).cpu()
    return out


def _logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return (p / (1 - p)).log()


def decision_bias(model, templates: Optional[Sequence] = None, groups: Optional[Sequence[str]] = None,
                  reference: Optional[str] = None, choice: Optional[Sequence] = None,
                  edit: "Optional[Edit]" = None) -> dict:
    """Decision bias: ``P(yes)`` per group and template, the logit gap from ``reference``, and
    relative choices between a group and the reference (asked in both orders).

    ``templates``: strings or ``{"domain", "template"}`` objects with a ``{person}`` slot;
    ``choice``: strings or objects with ``{a}`` and ``{b}`` slots, answered "A" or "B".
    Returns ``{"p_yes": {domain: {group: p}}, "gap": {group: mean logit gap}, "choice":
    {group: P(group chosen over reference) − 0.5}, ...}``.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> d = decision_bias(m, ["Hire the {person}? Answer yes or no."], ["man", "woman"], "man", choice=[])
    >>> sorted(d["gap"])
    ['man', 'woman']
    """
    spec = load_decisions()
    templates = spec["templates"] if templates is None else templates
    groups = list(spec["groups"] if groups is None else groups)
    reference = spec["reference"] if reference is None else reference
    choice = spec["choice"] if choice is None else choice
    if reference not in groups:
        raise ValueError(f"reference={reference!r} is not one of the groups {groups}.")
    ts = [t if isinstance(t, dict) else {"domain": f"t{i}", "template": t} for i, t in enumerate(templates)]
    for t in ts:
        if "{person}" not in t["template"]:
            raise ValueError(f"Decision template {t['template']!r} needs a {{person}} slot.")
    prompts = [t["template"].replace("{person}", g) for t in ts for g in groups]
    p = _choice_probs(model, prompts, [["Yes", "yes", " Yes", " yes"], ["No", "no", " No", " no"]], edit)[:, 0]
    p = p.view(len(ts), len(groups))
    ref = groups.index(reference)
    gap = _logit(p) - _logit(p[:, ref:ref + 1])
    out = {
        "reference": reference,
        "p_yes": {t["domain"]: dict(zip(groups, row.tolist())) for t, row in zip(ts, p)},
        "gap": dict(zip(groups, gap.mean(0).tolist())),
        "gap_per_domain": {t["domain"]: dict(zip(groups, row.tolist())) for t, row in zip(ts, gap)},
        "max_abs_gap": float(gap.mean(0).abs().max()),
    }
    cs = [c if isinstance(c, dict) else {"domain": f"c{i}", "template": c} for i, c in enumerate(choice)]
    if cs:
        others = [g for g in groups if g != reference]
        prompts = []
        for c in cs:
            for g in others:
                prompts.append(c["template"].replace("{a}", g).replace("{b}", reference))
                prompts.append(c["template"].replace("{a}", reference).replace("{b}", g))
        pa = _choice_probs(model, prompts, [["A", " A"], ["B", " B"]], edit)[:, 0].view(len(cs), len(others), 2)
        chosen = (pa[..., 0] + (1 - pa[..., 1])) / 2  # P(group chosen), order-averaged
        out["choice"] = dict(zip(others, (chosen.mean(0) - 0.5).tolist()))
        out["choice_position_bias"] = float(pa.mean() - 0.5)
    return out


# ---------------------------------------------------------------------------------------------
# directions
# ---------------------------------------------------------------------------------------------
def _resid(model, rows: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
           layers: Sequence[int], batch_size: int = 32) -> Float[Tensor, "n layer d_model"]:
    """Mean ``resid_post`` over the given token indices of each row (indices in the row's own tokens)."""
    out = torch.zeros(len(rows), len(layers), model.d_model)
    for idx, _, att, grabbed in _forward(model, rows, None, layers, batch_size):
        width = att.shape[1]
        for j, i in enumerate(idx):
            pos = [width - len(rows[i]) + p for p in positions[i]]
            for k, layer in enumerate(layers):
                out[i, k] = grabbed[layer][j, pos].mean(0)
    return out


def _layers(model, layers) -> list[int]:
    from .sites import resolve_layers

    return resolve_layers(model, layers)


def gender_direction(model, layers="all", templates: Optional[Sequence[str]] = None,
                     pairs: Optional[Sequence[tuple[str, str]]] = None) -> Float[Tensor, "layer d_model"]:
    """Mean over counterfactual gendered pairs of ``x_male − x_female`` (aligned positions:
    the slot's last token and the tokens after it), per layer.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> gender_direction(m, templates=["The {x} left."], pairs=[("man", "woman")]).shape
    torch.Size([2, 64])
    """
    t_default, p_default = load_gendered_pairs()
    templates = t_default if templates is None else templates
    pairs = p_default if pairs is None else pairs
    layer_list = _layers(model, layers)
    rows, pos = [], []
    for t in templates:
        for ap in aligned_pairs(model, t, pairs):
            for k in (0, 1):
                rows.append(ap.ids[k])
                pos.append(ap.positions(k))
    acts = _resid(model, rows, pos, layer_list)
    return (acts[0::2] - acts[1::2]).mean(0)


def _occupation_acts(model, occupations: Mapping[str, float], templates: Sequence[str], layers: Sequence[int],
                     where: str = "last", neutral: str = "person") -> tuple[Tensor, Tensor, list[int]]:
    """Activations of filled occupation templates (and the neutral one): ``[n, layer, d]``, the
    neutral ones ``[templates, layer, d]``, and each row's template index."""
    rows, pos, tidx, nrows, npos = [], [], [], [], []
    for ti, t in enumerate(templates):
        start = t.index("{occupation}")
        for v in list(occupations) + [neutral]:
            text = t.replace("{occupation}", v)
            ids, s, e = _slot_tokens(model, text, start, start + len(v))
            p = list(range(s, len(ids))) if where == "subject_on" else [len(ids) - 1] if where == "last" else list(range(s, e))
            if where not in ("last", "subject", "subject_on"):
                raise ValueError(f"where={where!r}: use 'last', 'subject' or 'subject_on'.")
            if v == neutral:
                nrows.append(ids), npos.append(p)
            else:
                rows.append(ids), pos.append(p), tidx.append(ti)
    acts = _resid(model, rows + nrows, pos + npos, layers)
    return acts[: len(rows)], acts[len(rows):], tidx


def stereotype_direction(model, layers="all", occupations: Union[Mapping[str, float], str] = "train",
                         templates: Union[Sequence[str], str] = "train", target: str = "share",
                         where: str = "last", ridge: float = 1.0, _acts=None, _gap=None) -> Float[Tensor, "layer d_model"]:
    """A direction along which occupation prompts are ordered by stereotype, per layer.

    Ridge regression of ``target`` on the activations of the filled templates (``where``:
    ``"last"`` token, the ``"subject"`` tokens, or ``"subject_on"``: subject and after), after
    removing each template's mean; ``target="share"`` regresses the share of women,
    ``"gap"`` the model's own centred he/she gap. Sign: higher projection = more female.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> stereotype_direction(m, [1], {"nurse": 87., "pilot": 5., "cook": 38.}, ["The {occupation} left."]).shape
    torch.Size([1, 64])
    """
    occ = load_occupations(occupations) if isinstance(occupations, str) else dict(occupations)
    tpl = _read_json(DATA / "templates.json")[templates] if isinstance(templates, str) else list(templates)
    layer_list = _layers(model, layers)
    X, _, tidx = _occupation_acts(model, occ, tpl, layer_list, where) if _acts is None else _acts
    if target == "share":
        y = torch.tensor([occ[v] for _ in tpl for v in occ]) / 100.0
    elif target == "gap":
        # he − she gap is negative for female-typed: flip so + = female
        y = -occupational_bias(model, occ, tpl).centred.reshape(-1) if _gap is None else _gap
    else:
        raise ValueError(f"target={target!r}: use 'share' or 'gap'.")
    t = torch.tensor(tidx)
    out = torch.zeros(len(layer_list), model.d_model)
    for k in range(len(layer_list)):
        x = X[:, k].double()
        for ti in t.unique():  # remove each template's mean (the template is not the concept)
            x[t == ti] -= x[t == ti].mean(0)
        yc = (y - y.mean()).double()
        # ridge in the dual (n < d): w = Xᵀ (X Xᵀ + λ s I)⁻¹ y, λ scaled by the mean sq. norm
        K = x @ x.T
        lam = ridge * K.trace() / len(K)
        w = x.T @ torch.linalg.solve(K + lam * torch.eye(len(K), dtype=K.dtype), yc)
        out[k] = (w / w.norm()).float()
    return out


# ---------------------------------------------------------------------------------------------
# edits
# ---------------------------------------------------------------------------------------------
@dataclass
class Edit:
    """A debiasing edit of ``resid_post`` at ``layers``, applied to every real token but the first.

    ``method``: ``"ablate"`` (``x − s (x·v̂) v̂``), ``"clamp"`` (projection set to ``values[layer]``,
    blended by ``s``) or ``"leace"`` (``x − s · eraser.edit(x)``). ``vectors`` / ``values`` /
    ``erasers`` are keyed by layer. The fitted parameters of steer's interventions: it runs as
    :meth:`interventions` under :class:`~steer.steering.Steering`, the one engine for every edit.

    >>> import torch
    >>> e = Edit("ablate", [0], vectors={0: torch.tensor([1., 0.])})
    >>> e.apply(0, torch.tensor([[[3., 4.]]])).tolist()
    [[[0.0, 4.0]]]
    """

    method: str
    layers: list[int]
    vectors: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    erasers: dict = field(default_factory=dict)
    strength: float = 1.0
    include_sink: bool = False
    name: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown debiasing method {self.method!r}: use one of {METHODS}.")
        need = {"ablate": self.vectors, "clamp": self.vectors, "leace": self.erasers}[self.method]
        missing = [l for l in self.layers if l not in need]
        if missing:
            raise ValueError(f"Edit {self.method!r} has no {'eraser' if self.method == 'leace' else 'vector'} for layers {missing}.")
        if self.method == "clamp" and any(l not in self.values for l in self.layers):
            raise ValueError("clamp needs a value (the neutral projection) for every layer.")

    def apply(self, layer: int, x: Float[Tensor, "batch pos d_model"], mask: Optional[Tensor] = None) -> Tensor:
        """The edited activations at ``layer`` (only where ``mask`` is True, if given).

        >>> x = torch.tensor([[[3., 4.], [1., 1.]]])           # [batch, pos, d_model]
        >>> e = Edit("clamp", [0], vectors={0: torch.tensor([1., 0.])}, values={0: 1.0}, strength=0.5)
        >>> e.apply(0, x).tolist()                             # projection moved halfway to 1.0
        [[[2.0, 4.0], [1.0, 1.0]]]
        >>> e.apply(0, x, mask=torch.tensor([[False, True]])).tolist()
        [[[3.0, 4.0], [1.0, 1.0]]]
        """
        from .interventions import ablate, clamp_toward

        if self.method == "ablate":
            return ablate(x, self.vectors[layer], mask, self.strength)
        if self.method == "clamp":
            return clamp_toward(x, self.vectors[layer], self.values[layer], self.strength, mask)
        return self.erasers[layer](x, self.strength, mask)

    def interventions(self) -> list:
        """The edit as :class:`~steer.interventions.Intervention` s, one per layer.

        >>> [iv.kind for iv in Edit("clamp", [0], vectors={0: torch.ones(2)}, values={0: 1.0}).interventions()]
        ['clamp']
        """
        from .interventions import Intervention

        common = dict(sites="resid_post", strength=self.strength, include_sink=self.include_sink,
                      meta={"edit": self.name or self.method})
        if self.method == "ablate":
            return [Intervention("ablate", self.vectors[l], layers=[l], **common) for l in self.layers]
        if self.method == "clamp":
            return [Intervention("clamp", self.vectors[l], layers=[l], target=float(self.values[l]), **common)
                    for l in self.layers]
        return [Intervention("map", fn=self.erasers[l], layers=[l], **common) for l in self.layers]

    @contextmanager
    def hooks(self, model) -> Iterator[None]:
        """Apply on ``model`` for a ``with`` block (plain forwards and ``generate``): every real
        token but each row's first (the attention sink) is edited, read from each call's
        attention mask by :class:`~steer.steering.Steering`.

        >>> import steer, torch
        >>> m = steer.load("tiny-llama")
        >>> e = Edit("ablate", [1], vectors={1: torch.randn(64)})
        >>> with e.hooks(m):
        ...     len(m.generate(["Hi"], max_new_tokens=2))
        1
        """
        from .steering import Steering

        with Steering(model, self.interventions()):
            yield

    def describe(self) -> dict:
        """A JSON-ready summary of the edit (the fitted vectors and erasers are left out).

        >>> Edit("ablate", [0], vectors={0: torch.ones(2)}, name="ablate/gender").describe()
        {'method': 'ablate', 'layers': [0], 'strength': 1.0, 'name': 'ablate/gender'}
        """
        return {"method": self.method, "layers": list(self.layers), "strength": self.strength, "name": self.name}


@dataclass
class Edits:
    """Several :class:`Edit` s applied together (installed in order).

    >>> import torch
    >>> e = Edits([Edit("ablate", [0], vectors={0: torch.tensor([1., 0.])}),
    ...            Edit("ablate", [0], vectors={0: torch.tensor([0., 1.])})])
    >>> e.layers, e.method
    ([0], 'ablate+ablate')
    """

    edits: list

    def __post_init__(self):
        if not self.edits:
            raise ValueError("Edits needs at least one Edit.")

    @property
    def method(self) -> str:
        return "+".join(e.method for e in self.edits)

    @property
    def name(self) -> str:
        return "+".join(e.name for e in self.edits)

    @property
    def layers(self) -> list[int]:
        return sorted({l for e in self.edits for l in e.layers})

    @property
    def strength(self) -> list[float]:
        return [e.strength for e in self.edits]

    def interventions(self) -> list:
        """Every edit's interventions, in order."""
        return [iv for e in self.edits for iv in e.interventions()]

    @contextmanager
    def hooks(self, model) -> Iterator[None]:
        """Apply every edit on ``model`` for a ``with`` block, in order (see :meth:`Edit.hooks`);
        any function here that takes ``edit=`` accepts an :class:`Edits` too.

        >>> import steer
        >>> m = steer.load("tiny-llama")
        >>> es = Edits([Edit("ablate", [0], vectors={0: torch.ones(64)}),
        ...             Edit("ablate", [1], vectors={1: torch.ones(64)})])
        >>> base = sequence_logprobs(m, ["The cook said that"], [" he"])
        >>> with es.hooks(m):
        ...     edited = sequence_logprobs(m, ["The cook said that"], [" he"])
        >>> bool(edited != base), torch.equal(sequence_logprobs(m, ["The cook said that"], [" he"]), base)
        (True, True)
        """
        from .steering import Steering

        with Steering(model, self.interventions()):
            yield

    def describe(self) -> dict:
        """``{"edits": [each edit's describe()]}``.

        >>> Edits([Edit("ablate", [0], vectors={0: torch.ones(2)})]).describe()["edits"][0]["layers"]
        [0]
        """
        return {"edits": [e.describe() for e in self.edits]}


def fit_edit(model, method: str, layers: Sequence[int], direction: str = "stereotype", strength: float = 1.0,
             *, cache: Optional[dict] = None, where: str = "last", target: str = "share",
             shrinkage: float = 0.1) -> Edit:
    """Fit a debiasing :class:`Edit` on the built-in *training* occupations and templates.

    ``direction``: ``"gender"`` (counterfactual gendered-word pairs) or ``"stereotype"`` (occupation
    prompts regressed on ``target``). ``clamp`` sets the projection to its value on the
    neutral-subject prompts ("The person said that"). ``leace`` fits an eraser on the occupation
    prompts' activations with the concept ``target`` (stereotype) or on the gendered pairs (gender).
    ``shrinkage`` regularises the LEACE covariance (towards its scaled identity; 0 = plain).
    ``cache`` (a dict) reuses activations across calls in a sweep.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> fit_edit(m, "ablate", [1], "gender").method
    'ablate'
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: use one of {DIRECTIONS}.")
    cache = {} if cache is None else cache
    layers = _layers(model, list(layers))
    all_layers = list(range(model.n_layers))
    occ = load_occupations("train")
    tpl = _read_json(DATA / "templates.json")["train"]
    key = ("occ", where)

    def occ_acts():
        if key not in cache:
            cache[key] = _occupation_acts(model, occ, tpl, all_layers, where)
        return cache[key]

    if direction == "gender":
        if "gender" not in cache:
            cache["gender"] = gender_direction(model, all_layers)
        V = cache["gender"]
    else:
        k2 = ("stereo", where, target)
        if k2 not in cache:
            if target == "gap" and ("gapy",) not in cache:
                cache[("gapy",)] = -occupational_bias(model, occ, tpl).centred.reshape(-1)
            cache[k2] = stereotype_direction(model, all_layers, occ, tpl, target, where, _acts=occ_acts(),
                                             _gap=cache.get(("gapy",)))
        V = cache[k2]
    vectors = {l: V[l] for l in layers}
    values, erasers = {}, {}
    if method == "clamp":
        N = occ_acts()[1]
        values = {l: float((N[:, l] @ (V[l] / V[l].norm())).mean()) for l in layers}
    if method == "leace":
        if direction == "gender":
            if "gender_acts" not in cache:
                tg, pg = load_gendered_pairs()
                rows, pos = [], []
                for t in tg:
                    for ap in aligned_pairs(model, t, pg):
                        for k in (0, 1):
                            rows.append(ap.ids[k]), pos.append(ap.positions(k))
                cache["gender_acts"] = _resid(model, rows, pos, all_layers)
            G = cache["gender_acts"]
            z = torch.arange(len(G)) % 2
            erasers = {l: LeaceEraser.fit(G[:, l], z, shrinkage=shrinkage) for l in layers}
        else:
            if target == "share":
                y = torch.tensor([occ[v] for _ in tpl for v in occ]) / 100.0
            else:
                if ("gapy",) not in cache:
                    cache[("gapy",)] = -occupational_bias(model, occ, tpl).centred.reshape(-1)
                y = cache[("gapy",)]
            X, N, tidx = occ_acts()
            t = torch.tensor(tidx)
            for l in layers:
                x = X[:, l].clone()
                for ti in t.unique():
                    x[t == ti] -= x[t == ti].mean(0)
                e = LeaceEraser.fit(x, y.float(), shrinkage=shrinkage)
                # centre the edit on the neutral subject ("person"): the erased coordinates of an
                # occupation prompt are moved to the neutral prompt's values, and a neutral prompt
                # is left (nearly) alone — the eraser still removes all linear information on z.
                erasers[l] = LeaceEraser(N[:, l].mean(0), e.A, e.B)
    return Edit(method, layers, vectors, values, erasers, strength, name=f"{method}/{direction}")


COMBINED_GENDER_LAYERS = (12,)
COMBINED_STEREO_LAYERS = (6, 9, 12, 15, 18, 21, 24)


def fit_combined(model, stereo_layers: Sequence[int] = COMBINED_STEREO_LAYERS,
                 gender_layers: Sequence[int] = COMBINED_GENDER_LAYERS, strength: float = 1.0,
                 *, cache: Optional[dict] = None, shrinkage: float = 0.1) -> Edits:
    """The combined debiasing edit: LEACE erasure of the gendered-word concept at
    ``gender_layers`` (removes the correlation with the share of women) plus clamping, at
    ``stereo_layers``, the projection on the stereotype direction — fitted on the subject and
    following tokens against the model's own centred gap — to its value on the neutral subject
    ("person"), which shrinks the gaps themselves. Layers beyond the model are dropped.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> fit_combined(m, [1], [0]).method
    'leace+clamp'
    """
    cache = {} if cache is None else cache
    n = model.n_layers
    gl = sorted({l for l in gender_layers if l < n} or {n // 2})
    sl = sorted({l for l in stereo_layers if l < n} or {n - 1})
    g = fit_edit(model, "leace", gl, "gender", cache=cache, shrinkage=shrinkage)
    c = fit_edit(model, "clamp", sl, "stereotype", strength, cache=cache, where="subject_on", target="gap")
    return Edits([g, c])


# ---------------------------------------------------------------------------------------------
# side effects and the Pareto sweep
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def side_effects(model, edit: Optional[Edit], texts: Optional[Sequence[str]] = None,
                 base: Optional[dict] = None) -> dict:
    """Side effect of ``edit`` on neutral text: mean next-token ``KL(P_base ‖ P_edit)`` over every
    predicted position and the perplexity ratio ``ppl_edit / ppl_base``. ``base``: the ``"_base"``
    entry of an earlier call on the same texts (the unedited forward, not run again).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> side_effects(m, None, ["Some neutral text."])["neutral_kl"]
    0.0
    """
    texts = load_neutral_text() if texts is None else list(texts)
    rows = [_ids(model, t) for t in texts]
    if base is not None and base.get("rows") != rows:
        raise ValueError("side_effects: `base` was computed on other texts (or another tokenizer); pass the "
                         "texts it was made from, or base=None to run the unedited forward again.")
    if base is None:
        base = {"lp": {}, "rows": rows}
        for idx, lp, att, _ in _forward(model, rows, None):
            for j, i in enumerate(idx):
                n = len(rows[i])
                base["lp"][i] = lp[j, lp.shape[1] - n:].clone()
    if edit is None:
        return {"neutral_kl": 0.0, "neutral_ppl_ratio": 1.0, "_base": base}
    kls, nll_b, nll_e, count = 0.0, 0.0, 0.0, 0
    for idx, lp, att, _ in _forward(model, rows, edit):
        for j, i in enumerate(idx):
            n = len(rows[i])
            e, b = lp[j, lp.shape[1] - n:], base["lp"][i]
            kls += float((b.exp() * (b - e)).sum(-1)[:-1].sum())
            tgt = torch.tensor(rows[i][1:])
            nll_b -= float(b[:-1].gather(-1, tgt[:, None]).sum())
            nll_e -= float(e[:-1].gather(-1, tgt[:, None]).sum())
            count += n - 1
    return {"neutral_kl": kls / count, "neutral_ppl_ratio": math.exp((nll_e - nll_b) / count), "_base": base}


def _reduction(before: float, after: float) -> float:
    return 1.0 - abs(after) / abs(before) if before else float("nan")


def pareto_sweep(model, methods: Sequence[str] = METHODS, directions: Sequence[str] = DIRECTIONS,
                 layer_sets: Sequence[Sequence[int]] = ((12,), (15,), (18,)), strengths: Sequence[float] = (1.0,),
                 split: str = "train", where: str = "last", target: str = "share",
                 progress: Union[bool, None, Callable[[dict], None]] = None) -> list[dict]:
    """Measure every method × direction × layer set × strength: bias and correlation on the
    ``split`` occupations/templates, KL and perplexity ratio on neutral text. Each row has
    ``bias_reduction`` and ``correlation_reduction`` (fractions; 1 = removed). ``progress``: a
    bar (``True``/``False``; default in a terminal or notebook), or a function called with each row.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> rows = pareto_sweep(m, ["ablate"], ["gender"], [[1]], [1.0])
    >>> sorted(rows[0])[:3]
    ['bias', 'bias_before', 'bias_reduction']
    """
    before = occupational_bias(model, split, split)
    se0 = side_effects(model, None)
    cache: dict = {}
    rows = []
    grid = [(m, d, ls, s) for m in methods for d in directions for ls in layer_sets for s in strengths
            if not (m == "leace" and d == "gender" and where != "last")]
    for method, direction, layers, s in bar(grid, desc="bias sweep", enabled=False if callable(progress) else progress):
        edit = fit_edit(model, method, layers, direction, s, cache=cache, where=where, target=target)
        r = occupational_bias(model, split, split, edit=edit)
        se = side_effects(model, edit, base=se0["_base"])
        row = {"method": method, "direction": direction, "layers": list(edit.layers), "strength": s,
               "bias": r.bias, "correlation": r.correlation, "spread": r.spread,
               "bias_reduction": _reduction(before.bias, r.bias),
               "correlation_reduction": _reduction(before.correlation, r.correlation),
               "neutral_kl": se["neutral_kl"], "neutral_ppl_ratio": se["neutral_ppl_ratio"],
               "bias_before": before.bias, "correlation_before": before.correlation}
        rows.append(row)
        if callable(progress):
            progress(row)
    return rows


def pareto_front(rows: Sequence[dict], x: str = "neutral_kl", y: str = "score") -> list[dict]:
    """Rows not dominated in (lower ``x``, higher ``y``); ``y="score"`` is the smaller of the two
    reductions (bias and |correlation|), i.e. how far *both* went down.

    >>> pareto_front([{"neutral_kl": 0.1, "bias_reduction": .5, "correlation_reduction": .5},
    ...               {"neutral_kl": 0.2, "bias_reduction": .4, "correlation_reduction": .9}])[0]["neutral_kl"]
    0.1
    """
    def yv(r):
        return min(r["bias_reduction"], r["correlation_reduction"]) if y == "score" else r[y]

    front, best = [], -float("inf")
    for r in sorted(rows, key=lambda r: (r[x], -yv(r))):
        if yv(r) > best:
            front.append(r)
            best = yv(r)
    return front


def best_point(rows: Sequence[dict], max_kl: float = 0.05, max_ppl: float = 1.05) -> Optional[dict]:
    """The row with the largest ``min(bias_reduction, correlation_reduction)`` within the budget
    (``None`` if no row fits): pick an edit from :func:`pareto_sweep`'s rows.

    >>> rows = [{"neutral_kl": 0.01, "neutral_ppl_ratio": 1.01, "bias_reduction": 0.3, "correlation_reduction": 0.2},
    ...         {"neutral_kl": 0.20, "neutral_ppl_ratio": 1.20, "bias_reduction": 0.9, "correlation_reduction": 0.9}]
    >>> best_point(rows)["bias_reduction"]                   # the second row is over budget
    0.3
    >>> best_point(rows, max_kl=1.0, max_ppl=2.0)["bias_reduction"], best_point(rows, max_kl=0.001)
    (0.9, None)
    """
    ok = [r for r in rows if r["neutral_kl"] <= max_kl and r["neutral_ppl_ratio"] <= max_ppl]
    return max(ok, key=lambda r: min(r["bias_reduction"], r["correlation_reduction"]), default=None)


def debias_report(model, edit: Edit, split: str = "heldout") -> dict:
    """Before/after on ``split`` occupations and templates, with side effects (the CLI's JSON).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> sorted(debias_report(m, fit_edit(m, "ablate", [1], "gender")))[:2]
    ['bias_after', 'bias_before']
    """
    b = occupational_bias(model, split, split)
    a = occupational_bias(model, split, split, edit=edit)
    se = side_effects(model, edit)
    return {"bias_before": b.bias, "bias_after": a.bias,
            "stereotype_correlation_before": b.summary()["correlation"],
            "stereotype_correlation_after": a.summary()["correlation"],
            "stereotype_correlation_note": b.correlation_note,
            "spread_before": b.spread, "spread_after": a.spread,
            "neutral_kl": se["neutral_kl"], "neutral_ppl_ratio": se["neutral_ppl_ratio"],
            "method": edit.method, "direction": edit.name, "layer": list(edit.layers),
            "strength": edit.strength, "split": split,
            "per_occupation_before": dict(zip(b.values, b.per_value.tolist())),
            "per_occupation_after": dict(zip(a.values, a.per_value.tolist())),
            "shares": b.to_dict()["shares"]}


# ---------------------------------------------------------------------------------------------
# figures and demo
# ---------------------------------------------------------------------------------------------
def plot_occupations(before: OccupationResult, after: Optional[OccupationResult] = None, ax=None, title: str = ""):
    """Bar chart of the centred gap per occupation (sorted by share of women), before/after.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> fig = plot_occupations(occupational_bias(m, {"nurse": 87., "pilot": 5.}, ["The {occupation} said"]))
    """
    import numpy as np

    from .plotting import plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(9, 3.8))
    order = list(range(len(before.values)))
    if before.shares is not None:
        order.sort(key=lambda i: float(before.shares[i]))
    x = np.arange(len(order))
    w = 0.4 if after is not None else 0.8
    ax.bar(x - (w / 2 if after is not None else 0), before.per_value[order].numpy(), w,
           label=f"before (bias {before.bias:.2f}, r {before.correlation:+.2f})")
    if after is not None:
        ax.bar(x + w / 2, after.per_value[order].numpy(), w,
               label=f"after (bias {after.bias:.2f}, r {after.correlation:+.2f})")
    labels = [before.values[i] + (f" ({float(before.shares[i]):.0f}%)" if before.shares is not None else "")
              for i in order]
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("log P(he) − log P(she), centred")
    ax.set_title(title or "occupational gender bias (sorted by share of women)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def demo(model, out_dir: Union[str, Path]) -> dict:
    """The bias chart for ``steer demo``: held-out occupations before/after a LEACE stereotype
    eraser fitted on the training occupations. Returns numbers and the figure path.

    >>> import steer, tempfile
    >>> d = demo(steer.load("tiny-llama"), tempfile.mkdtemp())
    >>> sorted(d)[:2]
    ['bias_after', 'bias_before']
    """
    from .plotting import save

    edit = fit_default_edit(model)
    layers = edit.layers
    b = occupational_bias(model, "heldout", "heldout")
    a = occupational_bias(model, "heldout", "heldout", edit=edit)
    se = side_effects(model, edit)
    path = save(plot_occupations(b, a, title=f"gender bias, held-out occupations ({edit.name}, layers {layers})"),
                Path(out_dir) / "bias_occupations.png")
    return {"bias_before": b.bias, "bias_after": a.bias, "stereotype_correlation_before": b.correlation,
            "stereotype_correlation_after": a.correlation, "neutral_kl": se["neutral_kl"],
            "neutral_ppl_ratio": se["neutral_ppl_ratio"], "method": edit.name, "layer": layers, "figure": str(path)}


# The default debiasing edit (CLI, demo): chosen from the Pareto sweep on the embedded model.
DEFAULT_METHOD, DEFAULT_DIRECTION, DEFAULT_LAYERS = "combined", "stereotype", COMBINED_STEREO_LAYERS
DEFAULT_WHERE, DEFAULT_TARGET = "subject_on", "gap"


def fit_default_edit(model, cache: Optional[dict] = None):
    """The default debiasing edit (:func:`fit_combined` with its default layers).

    >>> import steer
    >>> fit_default_edit(steer.load("tiny-llama")).method
    'leace+clamp'
    """
    return fit_combined(model, cache=cache)
