"""An activation store: capture streamed to disk in shards, read back lazily.

For datasets whose activations do not fit in memory. :meth:`ActivationStore.write` captures
``prompts`` one shard (``shard_size`` prompts) at a time with :func:`steer.capture` and writes
each shard as a safetensors file the moment it is done, so memory holds one shard, not the
dataset. The store's ``index.json`` records the model, site, layers, positions, dtype and a hash
per prompt. Crash-safe: a shard file is written under a temporary name and renamed when
complete, so it is complete or absent; rerunning the same ``write`` computes only the missing
shards. Under ``torchrun`` (``shards="auto"``) the shards are split across processes.

Reading is lazy (memory-mapped safetensors): :meth:`~ActivationStore.get` by prompt range and
layer, :meth:`~ActivationStore.batches` to stream, and statistics computed shard by shard for
direction extraction (:meth:`~ActivationStore.direction`, equal to
:func:`steer.directions.extract` on the same prompts) and LEACE (:meth:`~ActivationStore.leace`).
CAST conditions come from :meth:`~ActivationStore.condition` (equal to
:func:`steer.fit_condition`; the store must hold CAST's prompt means), and for probes of your
own :meth:`~ActivationStore.get` gives one layer's rows as a tensor.

>>> import steer, tempfile
>>> m = steer.load("tiny-llama")
>>> s = ActivationStore.write(m, ["Hi", "Hello", "Bye", "Ciao"], tempfile.mkdtemp(), shard_size=3, progress=False)
>>> len(s), s.layers, tuple(s.get(rows=slice(1, 4), layers=[1]).shape)
(4, [0, 1], (3, 1, 64))
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from . import positions as P
from .capture import _atomic, capture
from .data import prompt_list, prompt_repr
from .models import weights_fingerprint
from .display import Rich
from .sites import resolve_layers

__all__ = ["ActivationStore"]

INDEX = "index.json"
FORMAT = 1


def _prompt_hash(p) -> str:
    return hashlib.sha256(prompt_repr(p).encode()).hexdigest()[:16]


def _rows(rows, n: int) -> list[int]:
    if rows is None:
        return list(range(n))
    if isinstance(rows, slice):
        return list(range(n))[rows]
    t = torch.as_tensor(rows)
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"A boolean row mask needs {n} entries (one per stored prompt), got {tuple(t.shape)}.")
        return t.nonzero().flatten().tolist()
    out = t.flatten().tolist()
    if out and not (0 <= min(out) and max(out) < n):
        raise IndexError(f"rows must lie in [0, {n}); got {min(out)}..{max(out)}.")
    return out


@dataclass(repr=False)
class ActivationStore(Rich):
    """A store on disk (see the module docstring); open one with :meth:`open`."""

    path: Path
    index: dict

    # -- writing -----------------------------------------------------------------------
    @classmethod
    def write(
        cls, model, prompts: Sequence, path: Union[str, Path], *, layers="all", site: Union[str, Sequence[str]] = "resid_post",
        positions: P.Selector = "last", reduce: Optional[str] = None, shard_size: int = 1024, batch_size: int = 32,
        dtype: torch.dtype = torch.float32, include_sink: bool = True, shards=None, progress: Optional[bool] = None,
    ) -> "ActivationStore":
        """Capture ``prompts`` into a store at ``path`` (arguments as :func:`steer.capture`;
        one token per prompt, or ``reduce="mean"``; ``site`` may list several sites, each kept
        as its own tensor in every shard). Resumes an interrupted write of the same capture;
        refuses a directory holding a different one."""
        from .sites import SITES
        from .sweep import Shards, map_units

        prompts = prompt_list(prompts)
        if not prompts:
            raise ValueError("ActivationStore.write got no prompts.")
        if not (P.is_single(positions) or reduce == "mean"):
            raise ValueError(f"positions={positions!r} picks several tokens per prompt: the store keeps one row per "
                             "prompt, so pass reduce='mean' (or a one-token selector such as 'last').")
        if shard_size < 1:
            raise ValueError(f"shard_size={shard_size}: must be >= 1 prompt.")
        sites = [site] if isinstance(site, str) else list(site)
        bad = [x for x in sites if x not in SITES]
        if bad or not sites:
            raise ValueError(f"Unknown site(s) {bad or sites}: valid sites are {', '.join(SITES)}.")
        shards = Shards.auto() if shards == "auto" else (shards or Shards())
        path = Path(path)
        layer_list = resolve_layers(model, layers)
        n = len(prompts)
        spans = [(a, min(n, a + shard_size)) for a in range(0, n, shard_size)]
        index = {
            "format": FORMAT, "model": model.name, "weights": weights_fingerprint(model), "n_layers": model.n_layers, "sites": sites, "layers": layer_list, "positions": repr(positions),
            "reduce": reduce, "include_sink": include_sink, "dtype": str(dtype).removeprefix("torch."),
            "n_prompts": n, "prompt_hashes": [_prompt_hash(p) for p in prompts],
            "shards": [{"file": f"shard-{i:05d}.safetensors", "start": a, "stop": b} for i, (a, b) in enumerate(spans)],
        }
        # an index with no shard written yet (a first write that failed) is replaced, not resumed
        fresh = not any((path / s["file"]).exists() for s in json.loads((path / INDEX).read_text())["shards"]) \
            if (path / INDEX).exists() else True
        if shards.rank == 0 and fresh:
            path.mkdir(parents=True, exist_ok=True)
            _atomic(path / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index)))
        shards.barrier()  # then every rank checks the index it resumes (none raises alone)
        old = json.loads((path / INDEX).read_text())
        old.setdefault("weights", index["weights"])  # stores written before steer recorded it
        diff = [k for k in index if old.get(k) != index[k]]
        if diff:
            raise ValueError(f"{path} holds another capture (differs in {', '.join(diff)}): write this one "
                             "elsewhere, or delete that store.")
        kw = dict(layers=layer_list, positions=positions, reduce=reduce, batch_size=batch_size,
                  dtype=dtype, include_sink=include_sink, progress=False)

        def unit(i: int) -> int:
            target = path / index["shards"][i]["file"]
            if target.exists():  # written by an earlier run: complete (renamed into place)
                return i
            a, b = spans[i]
            acts = {x: capture(model, prompts[a:b], site=x, **kw).tensor.contiguous() for x in sites}
            from safetensors.torch import save_file

            _atomic(target, lambda tmp: save_file(acts, tmp))
            return i

        map_units(unit, range(len(spans)), shards=shards, desc=f"store {', '.join(sites)}", progress=progress)
        return cls.open(path)

    # -- reading -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: Union[str, Path]) -> "ActivationStore":
        """Open a store; raises if it is incomplete (rerun the ``write`` to finish it)."""
        path = Path(path)
        if not (path / INDEX).exists():
            raise FileNotFoundError(f"{path} is not an activation store (no {INDEX}): create one with ActivationStore.write.")
        index = json.loads((path / INDEX).read_text())
        missing = [s["file"] for s in index["shards"] if not (path / s["file"]).exists()]
        if missing:
            raise ValueError(f"{path} is incomplete: {len(missing)} of {len(index['shards'])} shards missing "
                             f"(first: {missing[0]}); rerun the same ActivationStore.write to finish it.")
        return cls(path, index)

    def __len__(self) -> int:
        return self.index["n_prompts"]

    @property
    def layers(self) -> list[int]:
        return list(self.index["layers"])

    @property
    def sites(self) -> list[str]:
        return list(self.index["sites"])

    @property
    def site(self) -> str:
        """The store's site (a store of several sites: pass ``site=`` to the readers)."""
        if len(self.sites) > 1:
            raise ValueError(f"This store holds several sites ({', '.join(self.sites)}): pass site=... to read one.")
        return self.sites[0]

    def _site(self, site: Optional[str]) -> str:
        if site is None:
            return self.site
        if site not in self.sites:
            raise ValueError(f"Site {site!r} is not in this store (it holds {', '.join(self.sites)}).")
        return site

    def _layer_cols(self, layers) -> list[int]:
        if layers is None:
            return list(range(len(self.layers)))
        layers = [layers] if isinstance(layers, int) else list(layers)
        bad = [l for l in layers if l not in self.layers]
        if bad:
            raise ValueError(f"Layers {bad} are not in this store (it holds {self.layers}).")
        return [self.layers.index(l) for l in layers]

    def _read(self, shard: dict, local: list[int], cols: list[int], site: str) -> Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / shard["file"]), "pt") as f:
            sl = f.get_slice(site)
            lo, hi = min(local), max(local) + 1
            if len(cols) == 1:  # one layer: read only its rows of the file
                block = sl[lo:hi, cols[0]: cols[0] + 1]
            else:
                block = sl[lo:hi]
                block = block[:, cols]
        return block[torch.tensor(local) - lo]

    def get(self, rows=None, layers=None, site: Optional[str] = None) -> Float[Tensor, "n layer *d"]:
        """Stored rows (a slice, indices or a boolean mask over prompts; default all) at
        ``layers`` (model layer numbers; default all stored) of ``site``, ``[n, n_layers, d]``
        (per-head sites: ``head d_head``), in the order asked. Only the shards holding those
        rows are read."""
        site = self._site(site)
        want = _rows(rows, len(self))
        cols = self._layer_cols(layers)
        parts, order = [], []
        for shard in self.index["shards"]:
            a, b = shard["start"], shard["stop"]
            mine = [(j, r) for j, r in enumerate(want) if a <= r < b]
            if mine:
                parts.append(self._read(shard, [r - a for _, r in mine], cols, site))
                order += [j for j, _ in mine]
        if not parts:  # no rows: the stored shape with none of them
            shard = self.index["shards"][0]
            return self._read(shard, [0], cols, site)[:0]
        out = torch.cat(parts)
        return out[torch.argsort(torch.tensor(order))]

    def batches(self, layers=None, rows=None, site: Optional[str] = None) -> Iterator[tuple[list[int], Tensor]]:
        """``(prompt indices, [n, n_layers, d])`` one shard at a time (rows: a subset; a row
        asked for twice, as a bootstrap resample does, comes twice)."""
        site = self._site(site)
        want = sorted(_rows(rows, len(self)))
        cols = self._layer_cols(layers)
        for shard in self.index["shards"]:
            local = [r for r in want if shard["start"] <= r < shard["stop"]]
            if local:
                yield local, self._read(shard, [r - shard["start"] for r in local], cols, site)

    # -- statistics, shard by shard ----------------------------------------------------
    def mean(self, rows=None, layers=None, site: Optional[str] = None) -> Float[Tensor, "layer d"]:
        """Mean over ``rows`` per layer, accumulated in fp64 one shard at a time."""
        total, n = None, 0
        for idx, x in self.batches(layers, rows, site):
            s = x.double().sum(0)
            total = s if total is None else total + s
            n += len(idx)
        if not n:
            raise ValueError("No rows selected: the mean of nothing is undefined.")
        return (total / n).float()

    def direction(self, positive, negative, method: str = "mean_diff", layer: Optional[int] = None,
                  site: Optional[str] = None):
        """A :class:`~steer.directions.Direction` from two groups of stored rows (indices or
        masks), as :func:`steer.directions.extract` would compute it from their prompts.
        ``mean_diff`` streams; other methods read one layer of the two groups at a time."""
        from .directions import Direction, from_activations

        site = self._site(site)
        pos, neg = _rows(positive, len(self)), _rows(negative, len(self))
        if not pos or not neg:
            raise ValueError(f"direction() needs rows on both sides; got {len(pos)} positive and {len(neg)} negative.")
        if method == "mean_diff":
            vec = self.mean(pos, site=site) - self.mean(neg, site=site)
        else:
            vec = torch.cat([from_activations(self.get(pos, [l], site), self.get(neg, [l], site), method)
                             for l in self.layers])
        full = torch.zeros(self.index["n_layers"], vec.shape[-1])  # one row per model layer, as extract() gives
        full[self.layers] = vec
        meta = {"model": self.index["model"], "d_model": vec.shape[-1], "site": site,
                "positions": self.index["positions"], "layers": self.layers, "n_pos": len(pos), "n_neg": len(neg),
                "include_sink": self.index["include_sink"], "store": str(self.path)}
        return Direction(full, layer, method, meta)

    def leace(self, layer: int, z, site: Optional[str] = None, **kw):
        """A :class:`~steer.erasure.LeaceEraser` fitted at ``layer`` on every stored row against
        the concept ``z`` (one label per prompt), from moments accumulated shard by shard
        (fp64): equal to ``LeaceEraser.fit`` on the rows in memory."""
        from .erasure import LeaceEraser

        z = torch.as_tensor(z)
        if z.shape[0] != len(self):
            raise ValueError(f"z has {z.shape[0]} entries; the store holds {len(self)} prompts.")
        Z = LeaceEraser._concept(z)
        n, sx, sz, sxx, sxz = 0, 0.0, Z.sum(0), 0.0, 0.0
        for idx, x in self.batches([layer], site=site):
            X, Zb = x[:, 0].double(), Z[idx]
            n, sx, sxx, sxz = n + len(idx), sx + X.sum(0), sxx + X.T @ X, sxz + X.T @ Zb
        mu, mz = sx / n, sz / n
        cov = sxx / n - torch.outer(mu, mu)
        cross = sxz / n - torch.outer(mu, mz)
        return LeaceEraser.from_moments(mu, cov, cross, **kw)

    def condition(self, positive, negative, **kw):
        """A CAST :class:`~steer.conditions.Condition` fitted on two groups of stored rows
        (arguments of :func:`~steer.conditions.fit_condition_on`: ``method``, ``kind``,
        ``folds``, ...), equal to :func:`~steer.conditions.fit_condition` on their prompts. The
        store must hold CAST's statistic, so that the condition reads at run time what it was
        fitted on: ``site="resid_post", positions="all", reduce="mean", include_sink=False``."""
        from .conditions import fit_condition_on

        ix = self.index
        cast = {"positions": repr("all"), "reduce": "mean", "include_sink": False}
        wrong = {k: ix.get(k) for k, v in cast.items() if ix.get(k) != v}
        if "resid_post" not in self.sites:
            wrong["sites"] = self.sites
        if wrong:
            raise ValueError(f"This store holds {wrong}, but a CAST condition reads the mean resid_post over each "
                             "prompt's tokens but the sink: write the store with site='resid_post', positions='all', "
                             "reduce='mean', include_sink=False to fit conditions from it.")
        pos, neg = _rows(positive, len(self)), _rows(negative, len(self))
        if len(pos) < 2 or len(neg) < 2:
            raise ValueError(f"condition() needs at least 2 rows per side (got {len(pos)} and {len(neg)}).")
        h = torch.cat([self.get(pos, site="resid_post"), self.get(neg, site="resid_post")])
        y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).bool()
        meta = {"model": ix["model"], "augmented": False, "store": str(self.path)}
        return fit_condition_on(h, y, self.layers, meta=meta, **kw)

    # -- display -----------------------------------------------------------------------
    def _fields(self):
        ix = self.index
        return [("model", ix["model"]), ("sites", ", ".join(ix["sites"])), ("layers", f"{len(ix['layers'])} ({ix['layers'][0]}..{ix['layers'][-1]})"),
                ("positions", ix["positions"]), ("prompts", len(self)), ("shards", len(ix["shards"])),
                ("dtype", ix["dtype"]), ("path", str(self.path))]
