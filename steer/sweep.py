"""Sweeps split across processes with ``torch.distributed``, resumable from finished shards.

A sweep is a list of *units* of work fixed by the sweep itself (chunks of patched variants,
batches of prompts, cells of a layer × strength grid), never by the number of processes: a unit
computes the same numbers whichever process runs it, so results are identical to one process.
Under ``torchrun`` (or any launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
``MASTER_PORT``) unit ``i`` runs on rank ``i % world``; results are gathered so that every rank
returns the whole answer (rank 0 usually writes it). gloo on the CPU, NCCL on GPUs.

With ``directory``, each finished unit is written there at once (atomically: a unit's file is
complete or absent), and a rerun of the same sweep (same key) loads finished units and computes
only the others, so an interrupted sweep resumes where it stopped.

>>> from steer.sweep import Shards, map_units
>>> map_units(lambda x: x * x, [1, 2, 3], shards=Shards(0, 1))
[1, 4, 9]

Launch a sharded sweep over two processes, one thread each::

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m steer patch --task ioi --nodes heads --shard auto
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .progress import bar

__all__ = ["Shards", "map_units", "sweep_key"]


@dataclass(frozen=True)
class Shards:
    """This process's place in a sharded run: ``rank`` of ``world`` processes.

    >>> Shards(1, 4).mine(10)
    [1, 5, 9]
    """

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"Shards(rank={self.rank}, world={self.world}): need 0 <= rank < world.")

    @classmethod
    def auto(cls, backend: Optional[str] = None) -> "Shards":
        """From the launcher's environment (``RANK``, ``WORLD_SIZE``); one process without it.
        Starts the default process group when there are several processes and none is running
        (``backend``: ``"gloo"``, or ``"nccl"`` when CUDA is available)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
                if missing:
                    raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun "
                                       "(torchrun --nproc-per-node N script.py), which sets them.")
                dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
                # the group steer started is closed before the interpreter goes: left to its
                # destructor, gloo's threads sometimes abort the process at exit
                # ("terminate called without an active exception", seen under load)
                atexit.register(_close_group)
            rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank, world)

    def mine(self, n: int) -> list[int]:
        """Indices of the units this rank runs (round robin: neighbouring units, often of similar
        cost, go to different ranks)."""
        return list(range(self.rank, n, self.world))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, local: dict) -> dict:
        """Every rank's ``{unit: result}`` merged, on every rank."""
        if self.world == 1:
            return dict(local)
        import torch.distributed as dist

        parts: list = [None] * self.world
        dist.all_gather_object(parts, local)
        merged: dict = {}
        for p in parts:
            merged.update(p)
        return merged


def _close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def sweep_key(*parts: Any) -> str:
    """A short hash naming a sweep's definition (what must match for a rerun to resume).

    >>> sweep_key("ioi", 8, "heads") == sweep_key("ioi", 8, "heads") != sweep_key("ioi", 9, "heads")
    True
    """
    return hashlib.sha256(json.dumps([repr(p) for p in parts]).encode()).hexdigest()[:16]


def _unit_path(directory: Path, i: int) -> Path:
    return directory / f"unit-{i:06d}.pt"


def _claim(directory: Path, key: str, n: int, shards: Shards) -> None:
    """Make ``directory`` this sweep's (first run) or check it is (rerun)."""
    manifest = directory / "sweep.json"
    if shards.rank == 0 and not manifest.exists():
        from .capture import _atomic

        directory.mkdir(parents=True, exist_ok=True)
        _atomic(manifest, lambda tmp: Path(tmp).write_text(json.dumps({"key": key, "units": n})))
    shards.barrier()  # then every rank checks (no rank raises alone and leaves the others waiting)
    old = json.loads(manifest.read_text())
    if old.get("key") != key or old.get("units") != n:
        raise ValueError(f"{directory} holds another sweep (key {old.get('key')}, {old.get('units')} units; this "
                         f"one: {key}, {n}): give this sweep its own directory, or delete that one.")


def map_units(
    fn: Callable[[Any], Any], units: Sequence[Any], *, shards: Union[Shards, str, None] = None,
    directory: Union[str, Path, None] = None, key: Optional[str] = None, desc: str = "sweep",
    progress: Optional[bool] = None,
) -> list:
    """``[fn(u) for u in units]``, each unit run by one rank of ``shards`` (``"auto"``:
    :meth:`Shards.auto`; None: this process alone), results in unit order on every rank.

    ``directory``: write each result there as it finishes (``torch.save``, atomic) and skip the
    units already there, so an interrupted sweep reruns only what is missing. It needs ``key``
    (:func:`sweep_key` of the sweep's definition), which guards against resuming a different sweep.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> map_units(lambda x: x + 1, [1, 2], directory=d, key="k")
    [2, 3]
    >>> map_units(lambda x: 1 / 0, [1, 2], directory=d, key="k")   # both units on disk: nothing runs
    [2, 3]
    """
    units = list(units)
    shards = Shards.auto() if shards == "auto" else (shards or Shards())
    path = None if directory is None else Path(directory)
    if path is not None:
        if not key:  # named by its length alone, another sweep of as many units would be "resumed"
            raise ValueError("map_units(directory=...) needs key=: sweep_key(...) of what defines the sweep (its "
                             "function's settings and units), so that a rerun resumes only the same sweep.")
        _claim(path, key, len(units), shards)
    local = {}
    todo = []
    for i in shards.mine(len(units)):
        if path is not None and _unit_path(path, i).exists():
            continue
        todo.append(i)
    for i in bar(todo, desc=desc if shards.world == 1 else f"{desc} (rank {shards.rank}/{shards.world})",
                 enabled=progress):
        local[i] = fn(units[i])
        if path is not None:
            from .capture import _atomic

            _atomic(_unit_path(path, i), lambda tmp, r=local[i]: torch.save(r, tmp))
    if path is not None:  # finished units come from disk (written by any rank, in this run or before)
        shards.barrier()
        return [local[i] if i in local else torch.load(_unit_path(path, i), weights_only=False) for i in range(len(units))]
    merged = shards.gather(local)
    return [merged[i] for i in range(len(units))]
