"""Peak resident memory of one call, for the CPU benchmarks (no allocator statistics on CPU)."""

from __future__ import annotations

import threading
import time


def rss() -> int:
    """This process's resident set in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_mib(fn) -> tuple[object, float]:
    """``(fn(), MiB)``: the largest resident set sampled every 2 ms during the call, minus the one
    just before it."""
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = fn()
    done.set()
    th.join()
    return out, (max(peak[0], rss()) - base) / 2**20
