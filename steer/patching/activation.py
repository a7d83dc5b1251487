"""Exhaustive activation patching, batched.

Denoising (default): run the *corrupt* prompts and put one node's *clean* value back.
Noising: run the *clean* prompts and put one node's *corrupt* value in. Either way the score is
the normalised metric ``(patched - corrupt) / (clean - corrupt)``.

Speed: many variants (one per node) run in one forward, stacked on the batch axis, and a
variant at layer ``l`` starts from the base run's cached residual entering layer ``l`` (layers
below are not recomputed). Only last-token logits are computed. ``batch_size`` (rows, i.e.
variants x prompts, per forward) bounds memory; by default it is chosen from the sequence
length and model width (about 256 MB of activations per forward).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..sites import Site, resolve_layers
from ..sweep import Shards, map_units, sweep_key
from ._runner import Runner
from .nodes import NodeSet, resolve_nodes
from .result import PatchingResult
from .tasks import PatchTask

__all__ = ["activation_patch", "run_metrics", "capture_sites", "auto_batch_size", "first_difference"]

DIRECTIONS = ("denoising", "noising")


def _check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: use 'denoising' (clean into corrupt) or 'noising' (corrupt into clean).")
    return direction


def auto_batch_size(model, n_pos: int, budget_bytes: int = 2**28) -> int:
    """Rows per patched forward so that one forward's activations stay near ``budget_bytes``.

    >>> import steer
    >>> auto_batch_size(steer.load("tiny-llama"), 10) > 0
    True
    """
    per_row = 4 * n_pos * (4 * model.d_model + 3 * model.d_mlp + 3 * model.n_heads * n_pos)
    return int(max(1, min(4096, budget_bytes // max(per_row, 1))))


@torch.no_grad()
def capture_sites(model, runner: Runner, sites: Sequence[str], record: bool = False) -> tuple[dict, list[Tensor], Tensor]:
    """Run the full model once; return ``{(site, layer): act}``, the residuals entering each
    layer (plus the final residual) and last-token logits. Activations are ``[P, *act_shape]``.

    >>> import steer
    >>> from steer.patching import ioi_task
    >>> from steer.patching._runner import Runner
    >>> m = steer.load("tiny-llama"); t = ioi_task(m, n=2)
    >>> acts, resid, logits = capture_sites(m, Runner(m, t.clean), ["z"])
    >>> len(resid) == m.n_layers + 1, acts[("z", 0)].shape[-2:] == (m.n_heads, m.d_head)
    (True, True)
    """
    store: dict = {}

    def grab(act, site: Site):
        store[(site.name, site.layer)] = act.detach().clone()

    hooks = [(Site(s, l), grab) for s in set(sites) if s != "resid_pre" for l in range(model.n_layers)]
    logits, resid = runner.run(runner.embeds, 0, hooks, keep_resid=True, record=record)
    for l, h in enumerate(resid[:-1]):
        store[("resid_pre", l)] = h
    return store, resid, logits


def run_metrics(task: PatchTask, clean_logits, corrupt_logits) -> tuple[float, float]:
    """Mean metric on the clean and corrupt runs; errors if they coincide."""
    mc = float(task.scores(clean_logits[None].float())[0])
    mx = float(task.scores(corrupt_logits[None].float())[0])
    if abs(mc - mx) < 1e-6:
        raise ValueError(
            f"The metric is the same on clean and corrupt prompts ({mc:.4g}): nothing to localise; "
            "check that the corrupt prompts change the answer."
        )
    return mc, mx


def first_difference(task: PatchTask) -> int:
    """First position where any clean and corrupt prompt differ (earlier positions are shared,
    so every run agrees there and patching them changes nothing).

    >>> import steer
    >>> from steer.patching import PatchTask
    >>> first_difference(PatchTask.from_pairs(steer.load("tiny-llama"), [("abc", "abd")], ["x"], ["y"]))
    2
    """
    diff = (task.clean.input_ids != task.corrupt.input_ids).any(0).nonzero()
    return int(diff.min()) if len(diff) else 0


def activation_patch(
    model,
    task: PatchTask,
    nodes: Union[str, NodeSet] = "resid",
    direction: str = "denoising",
    batch_size: Optional[int] = None,
    layers: Optional[Sequence[int]] = None,
    progress: Optional[bool] = None,
    shards: Union[Shards, str, None] = None,
    directory: Union[str, Path, None] = None,
) -> PatchingResult:
    """Patch every node of a kind (one at a time) and return the normalised metric per node.

    Positions before the first clean/corrupt difference are shared by every run: nodes there
    get the base score without a forward, and patched runs recompute only later positions
    (attending to the base run's cached keys/values for the shared prefix).

    Args:
        nodes: a kind from :data:`~steer.patching.nodes.NODE_KINDS` (``resid``, ``attn_out``,
            ``mlp_out``, ``heads``, ``heads_by_pos``, ``q``/``k``/``v`` (+ ``_by_pos``), ``neurons``).
        direction: ``"denoising"`` (clean value into the corrupt run) or ``"noising"``.
        batch_size: rows (variants x prompts) per forward; ``None`` picks one from memory.
        layers: only these layers (others are NaN); default all.
        progress: a progress bar over the patched runs (default: in a terminal or notebook).
        shards: split the patched runs across processes (``"auto"``: the ``torchrun``
            environment; see :mod:`steer.sweep`); every rank returns the whole result, equal to
            one process's.
        directory: keep each finished run there, so an interrupted sweep resumes (a rerun
            computes only the missing runs).

    Returns a :class:`PatchingResult` with ``scores: Float[Tensor, "layer *units"]``.

    >>> import steer
    >>> from steer.patching import ioi_task, activation_patch
    >>> m = steer.load("tiny-llama")
    >>> r = activation_patch(m, ioi_task(m, n=2), "heads")
    >>> tuple(r.scores.shape)
    (2, 4)
    """
    direction = _check_direction(direction)
    ns = resolve_nodes(model, nodes, task.n_pos)
    t0 = time.perf_counter()
    base_b, other_b = (task.corrupt, task.clean) if direction == "denoising" else (task.clean, task.corrupt)
    d0 = first_difference(task)
    base, other = Runner(model, base_b, prefix=d0, verify=False), Runner(model, other_b, verify=False)
    base_acts, base_resid, base_logits = capture_sites(model, base, [ns.site], record=True)
    other_acts, _, other_logits = capture_sites(model, other, [ns.site])
    base.verify(base_logits)  # each runner reproduces HF's forward on its batch
    other.verify(other_logits)
    clean_logits, corrupt_logits = (other_logits, base_logits) if direction == "denoising" else (base_logits, other_logits)
    m_clean, m_corrupt = run_metrics(task, clean_logits, corrupt_logits)

    P, L = task.n_prompts, model.n_layers
    rows = auto_batch_size(model, task.n_pos) if batch_size is None else int(batch_size)
    if rows < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1 row.")
    per_chunk = max(1, rows // P)
    m_base = m_corrupt if direction == "denoising" else m_clean
    scores = torch.full(ns.shape, float("nan"))
    layer_list = range(L) if layers is None else sorted(set(resolve_layers(model, [int(l) for l in layers])))
    fe = 2.0
    all_masks = ns.masks()
    by_pos = ns.mask_shape[0] == task.n_pos
    if by_pos:  # nodes before the first differing position are no-ops: score = base run
        all_masks = all_masks[:, d0:]
        active = all_masks.flatten(1).any(1).nonzero().flatten()
    else:
        active = torch.arange(ns.per_layer)
    Tq = task.n_pos - d0
    columns, score = task.column_scorer()
    for l in layer_list:
        scores[l] = torch.full((ns.per_layer,), m_base).view(ns.unit_shape)
    runs = list(_pack(layer_list, active, per_chunk, P, merge=ns.site != "resid_pre"))

    @torch.no_grad()
    def patched(run) -> Tensor:  # one patched forward: the metric of each of its variants
        start = run[0][0]
        blocks = _blocks(run)
        V = blocks[-1].stop
        h = base_resid[start][:, d0:]
        if ns.site == "resid_pre":  # one layer per run: the patch is the starting residual itself
            (l, idx), = run
            mask = all_masks[idx].to(h.device)[:, None]  # [V, 1, *mask]
            h = torch.where(mask, other_acts[(ns.site, l)][:, d0:][None], h[None]).flatten(0, 1)
            hooks = None
        else:  # variants of consecutive layers share one run; each is patched at its own layer
            h = h.repeat(V, 1, 1)
            hooks = {}
            for (l, idx), rows in zip(run, blocks):
                mask = torch.zeros((V, 1, *all_masks.shape[1:]), dtype=torch.bool, device=h.device)
                mask[rows] = all_masks[idx].to(h.device)[:, None]
                hooks[Site(ns.site, l)] = _patcher(mask, other_acts[(ns.site, l)][:, d0:], V, P)
        return score(base.run_suffix(h, start, hooks, columns).float().view(V, P, -1)).cpu()  # metric in fp32

    key = None if directory is None else sweep_key(  # only a directory to resume needs the sweep's name
        "activation_patch", model.name, task.clean.input_ids.tolist(), task.corrupt.input_ids.tolist(), ns.kind,
        direction, per_chunk, list(layer_list), m_clean, m_corrupt)
    results = map_units(patched, runs, shards=shards, directory=directory, key=key,
                        desc=f"activation patching {ns.kind}", progress=progress)
    for run, vals in zip(runs, results):
        start, V = run[0][0], sum(len(idx) for _, idx in run)
        for (l, idx), rows in zip(run, _blocks(run)):
            scores[l].view(-1)[idx] = vals[rows]
        fe += V * (L - start) / L * Tq / task.n_pos
    norm = (scores - m_corrupt) / (m_clean - m_corrupt)
    return PatchingResult(
        scores=norm,
        nodes=ns,
        tokens=task.column_tokens(model),
        method="activation",
        direction=direction,
        seconds=time.perf_counter() - t0,
        forward_equivalents=fe,
        meta={"metric_clean": m_clean, "metric_corrupt": m_corrupt, "n_prompts": P, "task": task.name},
    )


def _blocks(run) -> list[slice]:
    """The rows of each layer's variants in a patched run."""
    ends = torch.tensor([len(idx) for _, idx in run]).cumsum(0).tolist()
    return [slice(e - len(idx), e) for (_, idx), e in zip(run, ends)]


MERGE_ROWS = 64  # patched runs smaller than this absorb the next layer's variants (CPU matmuls batch better)


def _pack(layers, active: Tensor, per_chunk: int, P: int, merge: bool) -> list[list[tuple[int, Tensor]]]:
    """Group ``(layer, node indices)`` work into runs: chunks of at most ``per_chunk`` variants;
    with ``merge``, a run of fewer than :data:`MERGE_ROWS` rows takes the next layer's chunk too
    (its variants then recompute the layers in between: a few percent of wasted work buys
    fuller batches).

    >>> [[(l, i.tolist()) for l, i in r] for r in _pack([0, 1, 2], torch.arange(3), 8, 4, merge=True)]
    [[(0, [0, 1, 2]), (1, [0, 1, 2])], [(2, [0, 1, 2])]]
    """
    runs: list[list[tuple[int, Tensor]]] = []
    for l in layers:
        for c0 in range(0, len(active), per_chunk):
            idx = active[c0: c0 + per_chunk]
            if runs and merge:
                last = runs[-1]
                n = sum(len(i) for _, i in last)
                if last[-1][0] == l - 1 and n * P < MERGE_ROWS and n + len(idx) <= per_chunk:
                    last.append((l, idx))
                    continue
            runs.append([(l, idx)])
    return runs


def _patcher(mask: Tensor, other_act: Tensor, V: int, P: int):
    """Hook: the rows of a ``V``-variant run take ``other_act`` where ``mask`` ``[V, 1, *unit]``."""

    def patch(act, site):
        view = act.view(V, P, *act.shape[1:])
        return torch.where(mask, other_act[None], view).view(act.shape)

    return patch
