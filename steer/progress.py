"""Progress bars on long work (patching sweeps, layer/strength sweeps, capture, bias sweeps).

One rule everywhere: a bar shows when asked (``progress=True``), never when ``progress=False``,
and by default (``None``) only where someone watches: a terminal or a notebook (tqdm's
notebook-aware bar), not a log file or a pipe. ``STEER_PROGRESS=0`` silences every bar.

>>> list(bar(range(3), desc="demo", enabled=False))
[0, 1, 2]
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _watched() -> bool:
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget (or text) there
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(items: Iterable[T], *, desc: str = "", total: Optional[int] = None, enabled: Optional[bool] = None,
        min_items: int = 2) -> Iterable[T]:
    """``items`` wrapped in a progress bar when ``enabled`` (``None``: when watched, with at least
    ``min_items`` steps); the bar disappears when done."""
    if os.environ.get("STEER_PROGRESS", "1") == "0":
        enabled = False
    if enabled is None:
        n = total if total is not None else (len(items) if hasattr(items, "__len__") else min_items)
        enabled = _watched() and n >= min_items
    if not enabled:
        return items
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
