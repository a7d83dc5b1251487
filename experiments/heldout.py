"""The held-out requests the experiments evaluate on: ``experiments/data/eval_harmful.json`` (120
requests in 15 categories) and ``eval_harmless.json`` (120 in 12), each sorted by category. Nothing
in steer is fitted on them (steer's training prompts are ``steer/datasets``;
``tests/test_refusal.py`` checks the two sets share no request).

    >>> from heldout import heldout
    >>> len(heldout("harmful")), len(heldout("harmless", 24, balanced=True))
    (120, 24)
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).parent / "data"
KINDS = ("harmful", "harmless")


def path(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"held-out requests are {' or '.join(map(repr, KINDS))}, not {kind!r}.")
    return DATA / f"eval_{kind}.json"


def heldout(kind: str, n: int | None = None, *, balanced: bool = False) -> list[str]:
    """The first ``n`` (default: all) held-out ``kind`` requests, in the file's order, or with
    ``balanced=True`` one category after another (so that any first ``n`` spans the categories)."""
    from steer.data import load_prompts

    prompts = load_prompts(path(kind), balanced=balanced)
    if n is not None and not 0 <= n <= len(prompts):
        raise ValueError(f"{n} held-out {kind} requests asked for: the file holds {len(prompts)}.")
    return prompts if n is None else prompts[:n]
