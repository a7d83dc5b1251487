"""Position selectors: which tokens of each prompt to read or edit.

A selector turns a tokenized :class:`~steer.data.Batch` into a boolean mask ``[batch, pos]``.

=====================  ===============================================================
``"last"``             the last token (one position; the result has no ``pos`` axis)
``"all"``              every real (non-pad) token
``"instruction"``      the tokens of the user's text
``"instruction_last"`` the last token of the user's text (one position)
``"post_instruction"`` the chat-template tokens after the user's text
                       (``<|im_end|>\\n<|im_start|>assistant\\n`` for ChatML)
``"completion"``       the tokens of the completion of a ``(prompt, completion)`` pair
``Last(k)``            the last ``k`` tokens
``int`` / ``[int]``    explicit indices into the unpadded prompt (negative: from the end)
callable               ``f(batch) -> Bool[Tensor, "batch pos"]``
=====================  ===============================================================

The first real token of a prompt is an *attention sink* in many models (SmolLM2 carries
activations of ~22,500 there against a median of 2.7): :func:`mask` can drop it
(``include_sink=False``), which interventions do by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from jaxtyping import Bool
from torch import Tensor

from .data import Batch

__all__ = ["Last", "Selector", "mask", "is_single", "NAMED"]

NAMED = ("last", "all", "instruction", "instruction_last", "post_instruction", "completion")


@dataclass(frozen=True)
class Last:
    """The last ``k`` tokens of each prompt.

    >>> import steer
    >>> from steer.data import tokenize
    >>> mask(Last(3), tokenize(steer.load("tiny-llama"), ["Hi"])).sum().item()
    3"""

    k: int

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"Last(k) needs k >= 1, got {self.k}.")


Selector = Union[str, int, Sequence[int], Last, Callable[[Batch], Tensor]]


def is_single(sel: Selector) -> bool:
    """True when the selector picks exactly one token per prompt (no ``pos`` axis)."""
    return sel in ("last", "instruction_last") or isinstance(sel, int)


def mask(sel: Selector, batch: Batch, include_sink: bool = True) -> Bool[Tensor, "batch pos"]:
    """Boolean mask ``[batch, pos]`` of the selected tokens.

    >>> import steer
    >>> from steer.data import tokenize
    >>> b = tokenize(steer.load("tiny-llama"), ["Hi", "Hello"])
    >>> mask("last", b).sum(-1).tolist()
    [1, 1]
    """
    n, width = batch.input_ids.shape
    dev = batch.input_ids.device
    real = batch.attention_mask.bool()
    out = torch.zeros((n, width), dtype=torch.bool, device=dev)
    if callable(sel) and not isinstance(sel, Last):
        out = sel(batch).to(dev).bool()
        if out.shape != (n, width):
            raise ValueError(f"Position callable returned shape {tuple(out.shape)}, expected {(n, width)}.")
        out &= real
    elif isinstance(sel, str):
        if sel not in NAMED:
            raise ValueError(f"Unknown position selector {sel!r}. Use one of {NAMED}, Last(k), ints or a callable.")
        for i, spans in enumerate(batch.spans):
            if sel == "last":
                out[i, width - 1] = True
            elif sel == "all":
                out[i] = real[i]
            elif sel == "instruction_last":
                if "instruction" not in spans:
                    raise ValueError(_unfound(i, batch))
                s, e = spans["instruction"]
                if e <= s:
                    raise ValueError(f"Prompt {i} has no instruction tokens.")
                out[i, e - 1] = True
            else:
                if sel not in spans:
                    raise ValueError(_unfound(i, batch) if sel != "completion" else
                                     f"Prompt {i} has no 'completion' tokens: they need (prompt, completion) pairs.")
                s, e = spans[sel]
                if e <= s:
                    hint = (": the tokens after the instruction come from a chat template, and this prompt "
                            "has none (a model without a template, or steer.Raw); use 'last' or "
                            "'instruction_last'") if sel == "post_instruction" else ""
                    raise ValueError(f"Prompt {i} has no {sel!r} tokens ({batch.texts[i]!r}){hint}.")
                out[i, s:e] = True
    elif isinstance(sel, Last):
        lengths = batch.lengths
        for i in range(n):
            if sel.k > int(lengths[i]):
                raise ValueError(f"Last({sel.k}) but prompt {i} has only {int(lengths[i])} tokens.")
            out[i, width - sel.k :] = True
    else:
        idx = [sel] if isinstance(sel, int) else list(sel)
        if not idx or not all(isinstance(j, int) for j in idx):
            raise TypeError(f"Bad position selector {sel!r}.")
        starts = width - batch.lengths
        for i in range(n):
            length = int(batch.lengths[i])
            for j in idx:
                if not -length <= j < length:
                    raise IndexError(f"Position {j} out of range for prompt {i} with {length} tokens.")
                out[i, int(starts[i]) + (j % length)] = True
    if not include_sink:
        first = (width - batch.lengths).long()
        out[torch.arange(n, device=dev), first] = False
    return out


def _unfound(i: int, batch) -> str:
    return (f"Prompt {i}: steer did not find the user's text in the rendered prompt {batch.texts[i]!r} (the chat "
            "template changes it), so it cannot tell which tokens are the instruction: use 'last' or Last(k).")

