"""Batched, padding-exact activation capture.

>>> import steer
>>> m = steer.load("tiny-llama")
>>> acts = steer.capture(m, ["Hi", "How are you?"], layers="all", positions="last")
>>> acts.tensor.shape          # [n_prompts, n_layers, d_model]
torch.Size([2, 2, 64])

Prompts are left-padded into batches with an explicit attention mask and position ids, so a
prompt's activations do not depend on what it is batched with. Hooks keep only the selected
positions (and optionally average them), move them to ``device``/``dtype`` as they are
produced, and the forward pass stops after the last requested layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from . import positions as P
from .data import Prompt, batches, prompt_list, prompt_repr, tokenize
from .display import Rich
from .hooks import StopForward, add_hooks
from .progress import bar
from .sites import SITES, Site, resolve_layers

__all__ = ["Activations", "capture", "prompts_hash"]


def prompts_hash(prompts: Sequence[Any]) -> str:
    """A short stable hash of a prompt list (provenance for directions and caches).

    >>> prompts_hash(["Hi"]) == prompts_hash(["Hi"]) != prompts_hash(["Ho"])
    True"""
    return hashlib.sha256(json.dumps([prompt_repr(p) for p in prompts]).encode()).hexdigest()[:16]


@dataclass(repr=False)
class Activations(Rich):
    """Captured activations and what they are.

    ``tensor`` is ``[n_prompts, n_layers, d]`` for one-token selectors (``"last"``) or with
    ``reduce="mean"``, else ``[n_prompts, n_layers, n_pos, d]`` with ``mask`` ``[n_prompts,
    n_pos]`` marking the real entries (selected tokens packed to the left). For per-head sites
    ``d`` is ``head d_head``.

    >>> import steer
    >>> a = steer.capture(steer.load("tiny-llama"), ["Hi"], layers=[0, 1], positions="all")
    >>> a.at(1).shape, a.mean_over_positions().shape
    (torch.Size([1, 62, 64]), torch.Size([1, 2, 64]))
    """

    tensor: Tensor
    layers: list[int]
    site: str
    positions: str
    model: str
    mask: Optional[Bool[Tensor, "prompt pos"]] = None
    meta: dict = field(default_factory=dict)

    @property
    def has_pos(self) -> bool:
        return self.mask is not None

    def at(self, layer: int) -> Tensor:
        """The activations at one layer (a model layer index, not a position in ``layers``)."""
        if layer not in self.layers:
            raise KeyError(f"Layer {layer} was not captured; captured: {self.layers}.")
        return self.tensor[:, self.layers.index(layer)]

    def mean_over_positions(self) -> Tensor:
        """``[n_prompts, n_layers, d]``: the mean over each prompt's selected tokens."""
        if not self.has_pos:
            return self.tensor
        m = self.mask.to(self.tensor.dtype)
        m = m.view(m.shape[0], 1, m.shape[1], *([1] * (self.tensor.ndim - 3)))
        return (self.tensor * m).sum(2) / m.sum(2).clamp(min=1)

    def __len__(self) -> int:
        return self.tensor.shape[0]

    # -- display ---------------------------------------------------------------------------
    def _norms(self) -> Tensor:
        """``[n_layers, n_selected]`` norms of every selected activation (real tokens only)."""
        t = self.tensor.float()
        t = t.flatten(t.ndim - 2) if t.ndim == (5 if self.has_pos else 4) else t  # heads: [head d_head] → d
        n = t.norm(dim=-1)  # [prompt, layer(, pos)]
        if self.has_pos:
            return n.permute(1, 0, 2)[:, self.mask]
        return n.T

    def _fields(self):
        f = [("model", self.model), ("site", self.site), ("positions", self.positions),
             ("layers", self.layers), ("tensor", f"{list(self.tensor.shape)} {str(self.tensor.dtype)[6:]}"),
             ("prompts", len(self))]
        if self.has_pos:
            f.append(("selected tokens", int(self.mask.sum())))
        return f + [(k, v) for k, v in self.meta.items() if isinstance(v, (str, int, float))]

    def _table(self):
        n = self._norms()
        rows = [[l, float(n[i].mean()), float(n[i].median()), float(n[i].max())] for i, l in enumerate(self.layers)]
        return ["layer", "mean norm", "median norm", "max norm"], rows[:12] + ([["…", "", "", ""]] if len(rows) > 12 else [])

    def _figure(self):
        if len(self.layers) < 2:
            return None
        from .plotting import layer_curve

        n = self._norms()
        return layer_curve({"mean": n.mean(1).tolist(), "median": n.median(1).values.tolist()}, self.layers,
                           ylabel=f"{self.site} norm", title=f"{self.model}: {self.site} norms")

    def save(self, path: str | Path) -> None:
        """Save as safetensors with the metadata inside (atomic write)."""
        from safetensors.torch import save_file

        tensors = {"tensor": self.tensor.contiguous()}
        if self.mask is not None:
            tensors["mask"] = self.mask.contiguous()
        meta = {"layers": self.layers, "site": self.site, "positions": self.positions,
                "model": self.model, "meta": self.meta}
        _atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"steer": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> "Activations":
        t, meta = _load_tagged(path, "steer", "Activations")
        return cls(t["tensor"], meta["layers"], meta["site"], meta["positions"], meta["model"],
                   t.get("mask"), meta["meta"])


def _atomic(path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_tagged(path, tensors: dict, tag: str, header: dict) -> None:
    """Write ``tensors`` as safetensors with ``header`` as JSON under metadata key ``tag`` (atomic)."""
    from safetensors.torch import save_file

    _atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                        metadata={tag: json.dumps(header, default=str)}))


def _load_tagged(path, tag: str, what: str) -> tuple[dict, dict]:
    """``(tensors, header)`` of a file :func:`_save_tagged` wrote; a clear error for a missing
    file or one that is not a steer ``what`` (no ``tag`` metadata)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No {what.lower()} file at {path}.")
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
        if tag not in header:
            raise ValueError(f"{path} is not a steer {what} file (no {tag!r} metadata).")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(header[tag])


def _pack(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Selected positions packed to the left: index ``[b, k]`` and validity ``[b, k]``."""
    counts = mask.sum(-1)
    k = int(counts.max())
    # sort selected positions first, keeping order: key = (not selected, position)
    width = mask.shape[1]
    key = (~mask).long() * width + torch.arange(width, device=mask.device)
    idx = key.argsort(-1)[:, :k]
    valid = torch.arange(k, device=mask.device)[None, :] < counts[:, None]
    return idx, valid


@torch.no_grad()
def capture(
    model,
    prompts: Sequence[Prompt],
    layers="all",
    site: str = "resid_post",
    positions: P.Selector = "last",
    *,
    reduce: Optional[str] = None,
    batch_size: int = 32,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = torch.float32,
    include_sink: bool = True,
    progress: Optional[bool] = None,
    steering=None,
) -> Activations:
    """Capture activations at ``site`` for ``layers`` and the tokens picked by ``positions``.

    Args:
        model: a :class:`steer.Model`.
        prompts: strings (chat-templated), chat message lists, ``(prompt, completion)`` pairs or
            :class:`steer.Raw` text.
        layers: ``"all"``, an int or a list of ints.
        site: one of :data:`steer.sites.SITES`.
        positions: a selector (see :mod:`steer.positions`).
        reduce: ``"mean"`` averages the selected tokens of each prompt as they are captured.
        batch_size: prompts per forward pass.
        device, dtype: where the kept activations go (default CPU float32); ``None`` keeps them.
        include_sink: keep the first (attention-sink) token when the selector picks it.
        progress: show a progress bar (default: in a terminal or notebook, when there is more than
            one batch; see :mod:`steer.progress`).
        steering: an entered :class:`~steer.steering.Steering` the passes run under; each batch
            describes its calls (so prompt selectors such as ``Last(k)`` apply to the right tokens).

    Returns:
        :class:`Activations` with ``tensor`` ``[n_prompts, n_layers, (n_pos,) d]``.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> a = capture(m, ["Hi", "Hello there"], layers=[1], site="z", positions="post_instruction")
    >>> a.tensor.shape, a.mask.sum(-1).tolist()      # [n, layer, pos, head, d_head]
    (torch.Size([2, 1, 13, 4, 16]), [13, 13])
    """
    prompts = prompt_list(prompts)
    if not prompts:
        raise ValueError("capture() got an empty prompt list: pass at least one prompt.")
    if site not in SITES:
        raise ValueError(f"Unknown site {site!r}. Valid sites: {', '.join(SITES)}.")
    if reduce not in (None, "mean"):
        raise ValueError(f"reduce={reduce!r}: use None or 'mean'.")
    layer_list = resolve_layers(model, layers)
    single = P.is_single(positions) or reduce == "mean"
    lengths = tokenize(model, prompts).lengths.tolist()  # cheap: tokenization only
    groups = batches(len(prompts), batch_size, lengths)

    per_layer: dict[int, list[tuple[list[int], Tensor, Tensor]]] = {l: [] for l in layer_list}
    state: dict[str, Tensor] = {}
    last_layer = max(layer_list)

    def grab(act: Tensor, s: Site):
        idx, valid = state["idx"], state["valid"]
        rows = torch.arange(act.shape[0], device=act.device)[:, None]
        sel = act[rows, idx]  # [b, k, ...]
        v = valid.view(*valid.shape, *([1] * (sel.ndim - 2))).to(sel.dtype)
        sel = sel * v
        if reduce == "mean":
            sel = sel.sum(1) / v.sum(1).clamp(min=1)
        elif single:
            sel = sel[:, 0]
        if torch.isnan(sel).any() or torch.isinf(sel).any():
            raise FloatingPointError(
                f"Non-finite activations at {s}: the model overflowed in {act.dtype}. "
                "Load it with dtype=torch.float32 (steer.load(..., dtype=torch.float32))."
            )
        sel = sel.to(device=device if device is not None else sel.device, dtype=dtype or sel.dtype)
        per_layer[s.layer].append((state["rows"], sel, valid.to(sel.device)))
        if s.layer == last_layer:  # nothing later is needed
            raise StopForward

    base = model.base
    with add_hooks(model, {Site(site, l): grab for l in layer_list}):
        for rows in bar(groups, desc=f"capture {site}", enabled=progress):
            batch = tokenize(model, [prompts[i] for i in rows])
            m = P.mask(positions, batch, include_sink=include_sink)
            if (m.sum(-1) == 0).any():
                bad = int((m.sum(-1) == 0).nonzero()[0, 0])
                raise ValueError(f"positions={positions!r} selects no token of prompt {rows[bad]}.")
            state["idx"], state["valid"] = _pack(m)
            state["rows"] = rows
            try:
                with steering._describing(batch) if steering is not None else nullcontext():
                    base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids, use_cache=False)
            except StopForward:
                pass

    tensor, mask = _assemble(per_layer, layer_list, len(prompts), single)
    return Activations(
        tensor=tensor,
        layers=layer_list,
        site=site,
        positions=repr(positions),
        model=model.name,
        mask=mask,
        meta={"prompts_hash": prompts_hash(prompts), "reduce": reduce, "include_sink": include_sink},
    )


def _assemble(per_layer, layer_list, n, single) -> tuple[Tensor, Optional[Tensor]]:
    first = per_layer[layer_list[0]]
    k = 0 if single else max(sel.shape[1] for _, sel, _ in first)
    ref = first[0][1]
    trailing = ref.shape[1:] if single else ref.shape[2:]
    shape = (n, len(layer_list), *(() if single else (k,)), *trailing)
    out = torch.zeros(shape, dtype=ref.dtype, device=ref.device)
    mask = None if single else torch.zeros((n, k), dtype=torch.bool, device=ref.device)
    for j, layer in enumerate(layer_list):
        for rows, sel, valid in per_layer[layer]:
            r = torch.tensor(rows, device=out.device)
            if single:
                out[r, j] = sel
            else:
                out[r, j, : sel.shape[1]] = sel
                if j == 0:
                    mask[r, : valid.shape[1]] = valid
    return out, mask
