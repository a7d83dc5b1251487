"""Patching tasks: clean prompts, corrupt prompts and a metric on the final-position logits.

A :class:`PatchTask` holds two token batches of identical shape (pair ``i`` of the clean and the
corrupt batch tokenizes to the same length, so positions line up) and a metric. The metric sees
the logits at each prompt's last token, ``[prompt, vocab]``, and returns one value per prompt
(or a scalar); the task's score is the mean over prompts. Patching results are reported
normalised: ``(patched - corrupt) / (clean - corrupt)`` (0 = corrupt behaviour, 1 = clean).

>>> import steer
>>> from steer.patching import PatchTask
>>> m = steer.load("tiny-llama")
>>> task = PatchTask.from_pairs(m, [("ab", "ac")], answers=["x"], wrongs=["y"])
>>> task.clean.input_ids.shape == task.corrupt.input_ids.shape
True
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data import Batch, Raw, tokenize

__all__ = ["PatchTask", "LogitDiff", "load_task", "ioi_task", "IOI_NAMES", "IOI_TEMPLATES"]

MetricFn = Callable[[Tensor], Tensor]


class LogitDiff:
    """Logit of the correct answer minus logit of the wrong answer, per prompt.

    >>> import torch
    >>> LogitDiff(torch.tensor([1]), torch.tensor([0]))(torch.tensor([[0.5, 2.0]]))
    tensor([1.5000])
    """

    batched = True  # accepts logits [..., prompt, vocab]

    def __init__(self, answer_ids: Int[Tensor, "prompt"], wrong_ids: Int[Tensor, "prompt"]):
        self.answer_ids = answer_ids.long()
        self.wrong_ids = wrong_ids.long()

    @property
    def token_ids(self) -> Tensor:
        """The vocabulary columns this metric reads (sorted, unique)."""
        return torch.unique(torch.cat([self.answer_ids, self.wrong_ids]))

    def on_columns(self, columns: Tensor) -> "LogitDiff":
        """The same metric on logits restricted to ``columns`` (which must hold :attr:`token_ids`).

        >>> m = LogitDiff(torch.tensor([7]), torch.tensor([3]))
        >>> cols = m.token_ids
        >>> full = torch.arange(10.0)[None]
        >>> bool(m.on_columns(cols)(full[:, cols]) == m(full))
        True
        """
        pos = {int(c): i for i, c in enumerate(columns.tolist())}
        return LogitDiff(torch.tensor([pos[int(i)] for i in self.answer_ids]),
                         torch.tensor([pos[int(i)] for i in self.wrong_ids]))

    def subset(self, rows: Sequence[int]) -> "LogitDiff":
        """The metric of prompts ``rows`` only (for :meth:`PatchTask.subset`)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return LogitDiff(self.answer_ids[idx], self.wrong_ids[idx])

    def __call__(self, logits: Float[Tensor, "... prompt vocab"]) -> Float[Tensor, "... prompt"]:
        a = self.answer_ids.to(logits.device)
        w = self.wrong_ids.to(logits.device)
        shape = logits.shape[:-1]
        ga = logits.gather(-1, a.expand(shape).unsqueeze(-1)).squeeze(-1)
        gw = logits.gather(-1, w.expand(shape).unsqueeze(-1)).squeeze(-1)
        return ga - gw


@dataclass
class PatchTask:
    """Clean and corrupt token batches (same shape) and a metric on last-token logits.

    ``metric(logits[prompt, vocab]) -> [prompt]`` (or a scalar, which :func:`over_prompts` cannot
    split into chunks); it must be differentiable for AtP. Build one with :meth:`from_pairs`, :func:`load_task` (JSONL) or :func:`ioi_task`, or
    directly from two :class:`~steer.data.Batch` objects and your own metric:

    >>> import steer, torch
    >>> from steer.data import Raw, tokenize
    >>> m = steer.load("tiny-llama")                 # byte tokenizer: "ab" is 2 tokens
    >>> t = PatchTask(tokenize(m, [Raw("ab")]), tokenize(m, [Raw("ac")]),
    ...               metric=lambda logits: logits[:, 0] - logits[:, 1], name="first-vs-second")
    >>> t.n_prompts, t.n_pos
    (1, 2)

    :meth:`scores` averages the metric over prompts for each variant (a stack of patched runs'
    last-token logits, ``[variant, prompt, vocab]``):

    >>> t.scores(torch.tensor([[[3., 1.]], [[0., 2.]]]))
    tensor([ 2., -2.])

    Clean and corrupt prompts must line up token by token:

    >>> PatchTask(tokenize(m, [Raw("ab")]), tokenize(m, [Raw("abc")]), metric=t.metric)
    Traceback (most recent call last):
    ...
    ValueError: Clean batch (1, 2) and corrupt batch (1, 3) differ in shape: each clean/corrupt pair must tokenize to the same length.
    """

    clean: Batch
    corrupt: Batch
    metric: MetricFn
    name: str = "task"

    def __post_init__(self):
        if self.clean.input_ids.shape != self.corrupt.input_ids.shape:
            raise ValueError(
                f"Clean batch {tuple(self.clean.input_ids.shape)} and corrupt batch "
                f"{tuple(self.corrupt.input_ids.shape)} differ in shape: each clean/corrupt pair "
                "must tokenize to the same length."
            )
        if not torch.equal(self.clean.attention_mask, self.corrupt.attention_mask):
            raise ValueError("Clean and corrupt prompts must have the same padding (same lengths).")

    @property
    def n_prompts(self) -> int:
        return self.clean.input_ids.shape[0]

    def subset(self, rows: Sequence[int]) -> "PatchTask":
        """The task on prompts ``rows`` (same padded width, so positions line up with the whole
        task's). The metric must know its prompts: :class:`LogitDiff` does, and a metric of
        your own needs a ``subset(rows)`` method.

        >>> import steer
        >>> m = steer.load("tiny-llama")
        >>> t = PatchTask.from_pairs(m, [("ab", "ac"), ("cd", "ce"), ("ef", "eg")], ["x", "y", "z"], ["y", "x", "x"])
        >>> s = t.subset([2, 0]); s.n_prompts, s.n_pos == t.n_pos, s.metric.answer_ids.tolist() == t.metric.answer_ids[[2, 0]].tolist()
        (2, True, True)
        """
        rows = list(rows)
        if not hasattr(self.metric, "subset"):
            raise ValueError(f"The metric of task {self.name!r} ({type(self.metric).__name__}) has no subset(rows) "
                             "method, so the task cannot be split by prompts: give it one (returning the metric of "
                             "those prompts), or run the whole task at once.")

        def part(b: Batch) -> Batch:
            idx = torch.as_tensor(rows, dtype=torch.long)
            return Batch(b.input_ids[idx], b.attention_mask[idx], [b.spans[i] for i in rows], [b.texts[i] for i in rows])

        return PatchTask(part(self.clean), part(self.corrupt), self.metric.subset(rows), self.name)

    @property
    def n_pos(self) -> int:
        return self.clean.input_ids.shape[1]

    def column_tokens(self, model) -> list[str]:
        """The clean tokens that name the position columns: the longest prompt's, which has a real
        token in every column (a shorter prompt's would name pads).

        >>> import steer
        >>> m = steer.load("tiny-llama")
        >>> PatchTask.from_pairs(m, [("ab", "ac"), ("abcd", "abce")], ["x", "x"], ["y", "y"]).column_tokens(m)
        ['a', 'b', 'c', 'd']
        """
        row = int(self.clean.attention_mask.sum(-1).argmax())
        return model.to_str_tokens(self.clean.input_ids[row].tolist())

    def scores(self, logits: Float[Tensor, "variant prompt vocab"]) -> Float[Tensor, "variant"]:
        """Mean metric over prompts, for each variant (stack of patched runs).

        >>> import steer, torch
        >>> m = steer.load("tiny-llama")
        >>> t = PatchTask.from_pairs(m, [("ab", "ac"), ("cd", "ce")], answers=["x", "y"], wrongs=["y", "x"])
        >>> logits = torch.zeros(2, t.n_prompts, m.d_vocab)        # two variants
        >>> logits[1, 0, m.to_tokens("x")[0]] = 4.0      # variant 1: prompt 0's answer "x" up by 4
        >>> t.scores(logits)                              # LogitDiff averaged over the 2 prompts
        tensor([0., 2.])
        """
        if getattr(self.metric, "batched", False):
            vals = self.metric(logits)
            return vals.mean(-1) if vals.ndim == 2 else vals
        out = []
        for lg in logits:
            v = self.metric(lg)
            out.append(v.float().mean() if torch.is_tensor(v) else torch.tensor(float(v)))
        return torch.stack(out)

    def column_scorer(self):
        """``(columns, score)``: when the metric reads only a few vocabulary columns (the built-in
        :class:`LogitDiff`), patched runs need logits for those columns only (a ``d_vocab``-wide
        unembedding per variant is ~10% of a patching sweep); ``score`` maps such restricted
        logits ``[variant, prompt, len(columns)]`` to :meth:`scores`. Otherwise ``(None, scores)``.

        >>> import steer, torch
        >>> m = steer.load("tiny-llama")
        >>> t = PatchTask.from_pairs(m, [("ab", "ac")], answers=["x"], wrongs=["y"])
        >>> cols, score = t.column_scorer()
        >>> logits = torch.randn(3, 1, m.d_vocab)                 # 3 variants, 1 prompt
        >>> torch.allclose(score(logits[..., cols]), t.scores(logits))
        True
        """
        if type(self.metric) is LogitDiff:  # a subclass may score the logits otherwise
            cols = self.metric.token_ids
            restricted = self.metric.on_columns(cols)
            return cols, lambda logits: restricted(logits).mean(-1)
        return None, self.scores

    @classmethod
    def from_pairs(
        cls,
        model,
        pairs: Sequence[tuple[str, str]],
        answers: Optional[Sequence[str]] = None,
        wrongs: Optional[Sequence[str]] = None,
        metric: Optional[MetricFn] = None,
        name: str = "task",
        where: Optional[Sequence[str]] = None,
    ) -> "PatchTask":
        """Build a task from ``(clean, corrupt)`` raw-text pairs and answer/wrong strings.

        Either give ``answers`` and ``wrongs`` (single tokens each: the built-in
        :class:`LogitDiff` metric) or a custom ``metric``. ``where[i]`` names pair ``i`` in errors.

        >>> import steer
        >>> m = steer.load("tiny-llama")
        >>> t = PatchTask.from_pairs(m, [("ab", "ac"), ("cd", "ce")], ["x", "y"], ["y", "x"])
        >>> t.n_prompts
        2
        """
        pairs = list(pairs)
        if not pairs:
            raise ValueError("No prompt pairs: give at least one (clean, corrupt) pair.")
        where = list(where) if where is not None else [f"pair {i}" for i in range(len(pairs))]
        for i, (c, x) in enumerate(pairs):
            lc, lx = len(model.to_tokens(str(c))), len(model.to_tokens(str(x)))
            if lc != lx:
                raise ValueError(
                    f"{where[i]}: clean prompt {c!r} has {lc} tokens but corrupt prompt {x!r} has "
                    f"{lx}; patching by position needs equal lengths - reword the corrupt prompt "
                    "(e.g. swap in names that are single tokens)."
                )
        if metric is None:
            if answers is None or wrongs is None:
                raise ValueError("Give answers and wrongs (for the logit-difference metric) or a metric.")
            if len(answers) != len(pairs) or len(wrongs) != len(pairs):
                raise ValueError(f"{len(pairs)} pairs but {len(answers)} answers / {len(wrongs)} wrongs.")
            metric = LogitDiff(
                torch.tensor([_single_token(model, a, where[i], "answer") for i, a in enumerate(answers)]),
                torch.tensor([_single_token(model, w, where[i], "wrong") for i, w in enumerate(wrongs)]),
            )
        clean = tokenize(model, [Raw(c) for c, _ in pairs])
        corrupt = tokenize(model, [Raw(x) for _, x in pairs])
        return cls(clean, corrupt, metric, name)


def _single_token(model, text: str, where: str, what: str) -> int:
    ids = model.to_tokens(text)
    if len(ids) != 1:
        pieces = model.to_str_tokens(ids)
        raise ValueError(
            f"{where}: {what} {text!r} is {len(ids)} tokens {pieces}, not one; the logit "
            "difference needs single-token answers - use a word that is one token (often with a "
            "leading space, e.g. ' Mary')."
        )
    return ids[0]


def load_task(model, path: Union[str, Path], name: Optional[str] = None) -> PatchTask:
    """Read a JSONL task: one ``{"clean", "corrupt", "answer", "wrong"}`` object per line.

    >>> import steer, tempfile, json, os
    >>> m = steer.load("tiny-llama")
    >>> p = os.path.join(tempfile.mkdtemp(), "t.jsonl")
    >>> _ = open(p, "w").write(json.dumps({"clean": "ab", "corrupt": "ac", "answer": "x", "wrong": "y"}))
    >>> load_task(m, p).n_prompts
    1
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No task file at {path}.")
    pairs, answers, wrongs, where = [], [], [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e}).") from None
        missing = [k for k in ("clean", "corrupt", "answer", "wrong") if k not in obj]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing key(s) {missing}; each line needs clean, corrupt, answer, wrong.")
        pairs.append((obj["clean"], obj["corrupt"]))
        answers.append(obj["answer"])
        wrongs.append(obj["wrong"])
        where.append(f"{path}:{lineno}")
    if not pairs:
        raise ValueError(f"{path} holds no tasks.")
    return PatchTask.from_pairs(model, pairs, answers, wrongs, name=name or path.stem, where=where)


# -- IOI ----------------------------------------------------------------------------------
IOI_NAMES = (
    "Mary John Tom James Anna Paul Sarah David Lisa Mark Emma Peter Kate Alice Bob Jack Mike "
    "Sam Tim Dan Amy Ben Max Joe Jane Laura Ryan Chris Kevin Jim Luke Adam Eric Rose Grace"
).split()

IOI_TEMPLATES = (
    "When {A} and {B} went to the store, {S} gave a drink to",
    "When {A} and {B} went to the park, {S} gave a ball to",
    "When {A} and {B} went to the shop, {S} gave a book to",
    "When {A} and {B} went to the beach, {S} gave a towel to",
    "When {A} and {B} went to the house, {S} gave a key to",
    "When {A} and {B} went to the school, {S} gave a pen to",
)


def ioi_task(model, n: int = 36, seed: int = 0, templates: Sequence[str] = IOI_TEMPLATES,
             names: Sequence[str] = IOI_NAMES) -> PatchTask:
    """Indirect-object-identification task: ``"When Mary and John went to the store, John gave a
    drink to"`` → answer ``" Mary"`` (IO), wrong ``" John"`` (S).

    Half the prompts are ABBA (IO first), half BABA. The corrupt prompt replaces the second
    subject mention with a third name C, so it no longer says who the indirect object is.
    Names must be single tokens with a leading space; templates are filtered to the most common
    token length so positions line up across prompts.

    >>> import steer
    >>> t = ioi_task(steer.load("tiny-llama"), n=4)
    >>> t.n_prompts, t.clean.texts[0].startswith("When")
    (4, True)
    """
    if n < 1:
        raise ValueError(f"n={n}: ask for at least one IOI prompt.")
    names = [x for x in names if len(model.to_tokens(" " + x)) == 1]
    space = " "
    if len(names) < 3:  # e.g. byte tokenizers of the tiny test models: one-letter names
        names, space = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if len(model.to_tokens(c)) == 1], ""
        if len(names) < 3:
            raise ValueError("Fewer than 3 single-token names for this tokenizer: pass names=[...].")
    lengths = {t: len(model.to_tokens(t.format(A=names[0], B=names[1], S=names[2]))) for t in templates}
    common = max(set(lengths.values()), key=list(lengths.values()).count)
    templates = [t for t in templates if lengths[t] == common]
    rng = random.Random(seed)
    pairs, answers, wrongs = [], [], []
    for i in range(n):
        io, s, c = rng.sample(names, 3)
        tpl = templates[i % len(templates)]
        a, b = (io, s) if i % 2 == 0 else (s, io)  # ABBA / BABA
        clean, corrupt = tpl.format(A=a, B=b, S=s), tpl.format(A=a, B=b, S=c)
        pairs.append((clean, corrupt))
        answers.append(space + io)
        wrongs.append(space + s)
    return PatchTask.from_pairs(model, pairs, answers, wrongs, name="ioi")
