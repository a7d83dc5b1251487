"""One call for several methods on one node set, and the demo figure (IOI head heatmap)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence, Union

from .activation import activation_patch
from .attribution import atp, atp_star
from .diagnostic import topk_recovery_cost
from .relevance import relp
from .result import PatchingResult
from .sharded import over_prompts
from .tasks import PatchTask, ioi_task

__all__ = ["patch", "demo_figure", "METHODS"]

METHODS = ("activation", "atp", "atp*", "relp")


def patch(model, task: PatchTask, nodes: str = "heads", methods: Union[str, Sequence[str]] = METHODS,
          direction: str = "denoising", k: int = 10, batch_size=None, shards=None, directory=None,
          chunk=None) -> dict:
    """Run several methods on one node set; compare the fast ones against ``activation``.
    ``shards``, ``directory``: activation patching split across processes and resumable (see
    :func:`~steer.patching.activation_patch`; each method keeps its own subdirectory);
    ``chunk``: AtP, AtP* and RelP over chunks of that many prompts, split the same way
    (:func:`~steer.patching.sharded.over_prompts`).

    Returns ``{"results": {method: PatchingResult}, "comparison": {method: {pearson, spearman,
    pearson_abs, spearman_abs, topk_recovery}}}`` (comparison only when ``activation`` ran).

    >>> import steer
    >>> from steer.patching import ioi_task, patch
    >>> m = steer.load("tiny-llama")
    >>> out = patch(m, ioi_task(m, n=2), "heads", ["activation", "atp"], k=2)
    >>> sorted(out["comparison"]["atp"])[:2]
    ['pearson', 'pearson_abs']
    """
    if isinstance(methods, str):
        methods = [x.strip() for x in methods.split(",") if x.strip()]
    bad = [x for x in methods if x not in METHODS]
    if bad or not methods:
        raise ValueError(f"Unknown method(s) {bad}: choose from {', '.join(METHODS)}.")
    results: dict[str, PatchingResult] = {}
    sub = (lambda name: None) if directory is None else (lambda name: Path(directory) / name.replace("*", "_star"))
    for meth in methods:
        if meth == "activation":
            results[meth] = activation_patch(model, task, nodes, direction, batch_size=batch_size, shards=shards,
                                             directory=sub(meth))
        elif chunk and meth in ("atp", "relp", "atp*"):
            results[meth] = over_prompts(meth, model, task, nodes, chunk=chunk, shards=shards, directory=sub(meth),
                                         direction=direction)
        elif meth == "atp":
            results[meth] = atp(model, task, nodes, direction)
        elif meth == "relp":
            results[meth] = relp(model, task, nodes, direction)
        else:
            results[meth] = atp_star(model, task, nodes, direction)
    comparison = {}
    if "activation" in results:
        ref = results["activation"]
        for meth, r in results.items():
            if meth == "activation":
                continue
            c = r.correlation(ref)
            ca = r.correlation(ref, absolute=True)
            comparison[meth] = {**c, "pearson_abs": ca["pearson"], "spearman_abs": ca["spearman"],
                                "topk_recovery": topk_recovery_cost(ref, r, k=k)}
    return {"results": results, "comparison": comparison}


def demo_figure(model, path, n: int = 2):
    """Draw the IOI head heatmap (activation patching of every head's z, all positions) and save
    it at ``path``; returns the figure. About 10-30 s on the embedded model on 2 CPU cores.

    >>> import steer, tempfile, os
    >>> from steer.patching import demo_figure
    >>> fig = demo_figure(steer.load("tiny-llama"), os.path.join(tempfile.mkdtemp(), "ioi.png"), n=2)
    """
    task = ioi_task(model, n=n)
    t0 = time.perf_counter()
    r = activation_patch(model, task, "heads")
    title = f"IOI: patching each head's z (clean→corrupt, n={n}, {time.perf_counter() - t0:.0f}s)"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return r.plot(path, title=title)
