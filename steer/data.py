"""Prompts in, token batches out: chat templating, completions, left padding, token spans.

A prompt is one of
* a string — a user instruction, rendered through the model's chat template;
* a list of chat messages ``[{"role": ..., "content": ...}, ...]``;
* a ``(prompt, completion)`` pair — the completion is appended after the generation prompt
  (the assistant's answer); its tokens are the ``"completion"`` span;
* :class:`Raw` text — used verbatim (no chat template), e.g. for base models or patching tasks.

Every tokenized example keeps the token ranges of its parts (``instruction``,
``post_instruction``, ``completion``) so position selectors can find them after padding.

Files: JSON list of strings or of ``{"instruction": ...}`` objects, or JSONL of the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["Raw", "Batch", "tokenize", "pad_left", "position_ids", "load_prompts", "batches", "casual", "Prompt"]


class Raw(str):
    """Text used verbatim: no chat template is applied."""


Prompt = Union[str, Raw, list, tuple]


@dataclass
class Batch:
    """A left-padded token batch with each example's named token spans.

    ``spans[i][name] = (start, stop)`` in *padded* coordinates of row ``i``.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    spans: list[dict[str, tuple[int, int]]]
    texts: list[str]

    @property
    def position_ids(self) -> Int[Tensor, "batch pos"]:
        """Positions that ignore left padding: a padded prompt sees the positions it sees alone."""
        return position_ids(self.attention_mask)

    @property
    def lengths(self) -> Int[Tensor, "batch"]:
        return self.attention_mask.sum(-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.spans, self.texts)


def _render(model, prompt: Prompt) -> tuple[str, dict[str, tuple[int, int]], bool]:
    """Text of one prompt, the character spans of its parts, and whether a template made it.

    Templated text already holds its special tokens (BOS, role markers); raw text gets the
    tokenizer's own (e.g. Gemma's ``<bos>``, without which it degrades badly).
    """
    completion = None
    if isinstance(prompt, tuple):
        if len(prompt) != 2:
            raise ValueError(f"A pair prompt must be (prompt, completion), got {len(prompt)} items.")
        prompt, completion = prompt
    if isinstance(prompt, Raw) or (isinstance(prompt, str) and not model.has_chat_template):
        text, spans = str(prompt), {"instruction": (0, len(prompt))}
        spans["post_instruction"] = (len(text), len(text))
        templated = False
    else:
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            messages = prompt
        else:
            raise TypeError(
                "A prompt must be a string, a list of chat messages {'role','content'}, a "
                f"(prompt, completion) pair or steer.Raw text; got {type(prompt).__name__}."
            )
        if not messages:
            raise ValueError("Empty chat message list.")
        text = model.chat(messages)
        spans = _last_message_spans(model, messages, text)
        # without a template the messages are joined as plain text: the tokenizer adds its BOS
        templated = model.has_chat_template
    if completion is not None:
        spans["completion"] = (len(text), len(text) + len(completion))
        text = text + completion
    return text, spans, templated


def _last_message_spans(model, messages: list[dict], text: str) -> dict[str, tuple[int, int]]:
    """Character spans of the last message's text (``instruction``) and of the rest of ``text``
    (``post_instruction``). It is looked for in the conversation rendered without the generation
    prompt, where the user's text is last (it may also occur in that prompt: "assistant"); a
    template that changes it (some strip whitespace) leaves it found stripped or not at all (then
    there are no such spans, and selecting them is an error)."""
    content = messages[-1]["content"]
    head = text
    if model.has_chat_template:
        try:
            head = model.chat(messages, add_generation_prompt=False)
        except Exception:  # a template that insists on a generation prompt: search the whole text
            head = text
        if not text.startswith(head):
            head = text
    for c in dict.fromkeys((content, content.strip())):
        i = head.rfind(c) if c else -1
        if i >= 0:
            return {"instruction": (i, i + len(c)), "post_instruction": (i + len(c), len(text))}
    return {}


def prompt_repr(p) -> str:
    """``repr(p)`` that tells ``Raw("x")`` (verbatim) from ``"x"`` (chat-templated), for the hashes
    that say which prompts a capture, store or sweep read; unchanged for prompts without Raw.

    >>> prompt_repr("Hi"), prompt_repr(Raw("Hi")), prompt_repr(("Hi", " there"))
    ("'Hi'", "Raw('Hi')", "('Hi', ' there')")
    """
    def canon(x):
        if isinstance(x, Raw):
            return _Tagged(f"Raw({str(x)!r})")
        if isinstance(x, (list, tuple)):
            return type(x)(canon(y) for y in x)
        if isinstance(x, dict):
            return {k: canon(v) for k, v in x.items()}
        return x

    return repr(canon(p))


class _Tagged(str):
    def __repr__(self) -> str:
        return str(self)


def prompt_list(prompts) -> list:
    """``prompts`` as a list, where a lone prompt (a string, a chat message list) is an error:
    ``list("Hello")`` would be five one-letter prompts.

    >>> prompt_list(("Hi", Raw("Hello")))
    ['Hi', 'Hello']
    >>> prompt_list("Hi")
    Traceback (most recent call last):
    ...
    TypeError: Expected a list of prompts, got one prompt (str 'Hi'): pass ['Hi'].
    """
    lone = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and all(isinstance(m, dict) for m in prompts))
    if lone:
        raise TypeError(f"Expected a list of prompts, got one prompt ({type(prompts).__name__} {prompts!r:.60}): "
                        f"pass [{prompts!r:.60}].")
    return list(prompts)


def tokenize(model, prompts: Sequence[Prompt], max_length: int | None = None) -> Batch:
    """Render and tokenize prompts into one left-padded :class:`Batch`.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> b = tokenize(m, ["Hi", "Hello there"])
    >>> b.input_ids.shape[0], int(b.attention_mask[0].sum()) < int(b.attention_mask[1].sum())
    (2, True)
    """
    prompts = prompt_list(prompts)
    if not prompts:
        raise ValueError("No prompts given: pass at least one prompt.")
    tok = model.tokenizer
    rendered = [_render(model, p) for p in prompts]
    texts = [t for t, _, _ in rendered]
    rows, spans = [], []
    for i, (text, _, templated) in enumerate(rendered):
        enc = tok(text, add_special_tokens=not templated, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"Prompt {i} has {len(ids)} tokens > max_length={max_length}.")
        if not ids:
            raise ValueError(f"Prompt {i} tokenizes to nothing: {prompts[i]!r}.")
        rows.append(ids)
        spans.append({name: _char_to_token_span(offsets, s, e) for name, (s, e) in rendered[i][1].items()})
    input_ids, mask = pad_left(rows, tok.pad_token_id, model.device)
    width = input_ids.shape[1]
    for i, r in enumerate(rows):
        shift = width - len(r)
        spans[i] = {k: (s + shift, e + shift) for k, (s, e) in spans[i].items()}
        spans[i]["all"] = (shift, width)
    return Batch(input_ids, mask, spans, texts)


def pad_left(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists into ``input_ids`` and ``attention_mask``, both ``[batch, pos]``.

    >>> ids, mask = pad_left([[5, 6], [7]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    if not rows:
        raise ValueError("pad_left got no rows.")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return input_ids.to(device), mask.to(device)


def position_ids(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Position of each token counted from its prompt's first real token (pads get 0).

    >>> position_ids(torch.tensor([[0, 1, 1]])).tolist()
    [[0, 0, 1]]
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _char_to_token_span(offsets, start: int, stop: int) -> tuple[int, int]:
    """Tokens whose text starts inside [start, stop) — the token range of a character span."""
    idx = [j for j, (s, e) in enumerate(offsets) if start <= s < stop and e > s]
    if not idx:
        return (len(offsets), len(offsets)) if start >= stop else _nearest(offsets, start)
    return idx[0], idx[-1] + 1


def _nearest(offsets, start):
    for j, (s, e) in enumerate(offsets):
        if e > start:
            return j, j + 1
    return len(offsets), len(offsets)


def batches(n: int, batch_size: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Index batches; with ``lengths``, examples of similar length go together (less padding).

    >>> batches(4, 2, lengths=[9, 1, 8, 2])
    [[1, 3], [2, 0]]"""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1.")
    order = sorted(range(n), key=lambda i: lengths[i]) if lengths is not None else list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def load_prompts(path: str | Path, key: str = "instruction", balanced: bool = False) -> list[Any]:
    """Load prompts from JSON (list of strings or of objects with ``key``) or JSONL.

    Objects with ``"completion"`` become ``(instruction, completion)`` pairs. ``balanced=True``
    takes the objects' ``"category"`` groups one after another in turn, each in the file's order,
    so that any prefix covers every category (steer's own prompt files are sorted by category).

    >>> import steer, pathlib
    >>> p = pathlib.Path(steer.__file__).parent / "datasets" / "harmless.json"
    >>> isinstance(load_prompts(p)[0], str)
    True
    >>> [t[:16] for t in load_prompts(p, balanced=True)[:2]]  # cooking, then travel
    ['Give me a recipe', 'Plan a five-day ']
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No prompt file at {path}.")
    text = path.read_text()
    if path.suffix.lower() == ".jsonl":
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        items = json.loads(text)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of prompts, got {type(items).__name__}.")
    if balanced:  # round-robin over the categories (items without one form a group of their own)
        groups: dict[Any, list] = {}
        for it in items:
            groups.setdefault(it.get("category") if isinstance(it, dict) else None, []).append(it)
        items = [g[i] for i in range(max(map(len, groups.values()), default=0)) for g in groups.values() if i < len(g)]
    out = []
    for i, it in enumerate(items):
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, dict) and isinstance(it.get(key), (str, list)):  # text, or chat messages
            if "completion" in it and not isinstance(it["completion"], str):
                raise ValueError(f"{path}: item {i}'s completion is not text: {it['completion']!r}")
            out.append((it[key], it["completion"]) if "completion" in it else it[key])
        else:
            raise ValueError(f"{path}: item {i} is neither a string nor an object with a text {key!r}: {it!r}")
    if not out:
        raise ValueError(f"{path} holds no prompts.")
    return out


_OPENERS = ("", "", "hey, ", "ok so ", "quick question: ", "hi! ", "so ", "um, ", "can u help? ")
_CLOSERS = ("", "", " pls", " lol", "??", " thanks", " asap", "!")


def casual(prompts: Sequence[str], seed: int = 0) -> list[str]:
    """One informal-voice copy of each prompt: lower case, dropped apostrophes and final
    punctuation, chatty openers and closers ("hey, ", " pls"), each applied at random.

    A style augmentation for fitting classifiers on prompts: steer's training prompts are written
    in a tidy voice, while users (and evaluation sets written elsewhere) often are not; a
    condition fitted on both voices keeps its threshold when the voice changes (see
    :func:`steer.refusal.fit_refusal`). Deterministic for a given ``seed``.

    >>> casual(["What's the capital of France?", "Write a poem."], seed=1)
    ["quick question: what's the capital of france?", 'ok so write a poem.']
    """
    import random

    rng = random.Random(seed)
    out = []
    for text in prompts:
        if not isinstance(text, str):
            raise TypeError(f"casual() takes instruction strings, got {type(text).__name__}.")
        s = text.lower() if rng.random() < 0.7 else text
        if rng.random() < 0.6:
            s = s.replace("'", "").replace("\u2019", "")
        if rng.random() < 0.6:
            s = s.rstrip(".?!")
        informal = rng.choice(_OPENERS) + s + rng.choice(_CLOSERS)
        out.append(Raw(informal) if isinstance(text, Raw) else informal)  # verbatim text stays verbatim
    return out
