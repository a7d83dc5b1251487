"""Which attention heads hold a probe's score down: ranked by attribution, verified by ablation.

The refusal-cliff study (METHODS.md §5) reads a refusal probe at every token and finds a sparse
set of heads that push the score down; ablating a few percent of the heads raises it back.
:func:`trace_heads` does both steps for any :class:`~steer.diagnostics.traces.ProbeTrace`:

1. **Attribution** (one forward and one backward): with ``M`` the mean probe score over the
   chosen readings, each head's predicted change when it is ablated is the first-order estimate
   ``Σ_pos (z_ablated − z) · ∂M/∂z`` of its output ``z`` (the per-head attention output before
   ``W_O``), as in attribution patching. Only heads at layers ≤ the probe's layer can move it.
2. **Verification by ablation**: the ``top`` heads with the largest predicted rise are ablated
   one at a time, and then together cumulatively (the first 1, 2, ..., ``top``), all in batched
   forwards (one row per variant, AutoCircuit-style), so the measured rises sit next to the
   predicted ones.

Both run teacher-forced on the trace's own tokens (prompt and generation) under the same
steering, and the function first checks that this forward reproduces the trace's readings.
Ablation is ``"zero"`` or ``"mean"`` (each head's mean output over the real tokens); the first
token (the attention sink) is left as it is unless ``include_sink``.

>>> import steer, torch
>>> m = steer.load("tiny-llama")
>>> v = torch.randn(64)
>>> tr = steer.probe_trace(m, [steer.Raw("Hi there")], v, layer=1, max_new_tokens=4)
>>> th = trace_heads(m, tr, top=3)                             # the trace's own probe
>>> th.attribution.shape, len(th.heads), th.measured.shape    # [layer, head]; the top 3 verified
(torch.Size([2, 4]), 3, torch.Size([3]))
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from ..display import Rich
from .traces import ProbeTrace, _scorer

__all__ = ["trace_heads", "TraceHeads"]

_READINGS = ("generation", "prompt", "all")


class TraceHeads(Rich):
    """Result of :func:`trace_heads`.

    ``attribution`` ``[layer, head]``: predicted change of the mean score when the head is
    ablated (layers up to the probe's); ``heads``: the verified heads ``(layer, head)``, largest
    predicted rise first; ``predicted`` / ``measured`` ``[top]``: their predicted and measured
    changes; ``cumulative`` ``[top]``: the measured change with the first 1, 2, ... of them
    ablated together; ``base``: the mean score without ablation."""

    def __init__(self, model_name, layer, attribution, heads, predicted, measured, cumulative, base,
                 readings, ablation, n_heads_total):
        self.model_name, self.layer, self.attribution, self.heads = model_name, layer, attribution, heads
        self.predicted, self.measured, self.cumulative, self.base = predicted, measured, cumulative, base
        self.readings, self.ablation, self.n_heads_total = readings, ablation, n_heads_total

    @property
    def rank_agreement(self) -> float:
        """Spearman correlation of predicted and measured changes over the verified heads."""
        if len(self.heads) < 3:
            return float("nan")
        rp, rm = (x.argsort().argsort().float() for x in (self.predicted, self.measured))
        return float(torch.corrcoef(torch.stack([rp, rm]))[0, 1])

    def to_dict(self) -> dict:
        return {"model": self.model_name, "layer": self.layer, "readings": self.readings, "ablation": self.ablation,
                "base": self.base, "heads": [list(h) for h in self.heads], "predicted": self.predicted.tolist(),
                "measured": self.measured.tolist(), "cumulative": self.cumulative.tolist(),
                "rank_agreement": self.rank_agreement, "attribution": self.attribution.tolist()}

    def plot(self, path=None):
        """Left: attribution per layer and head. Right: measured against predicted change of the
        verified heads, and the cumulative change as more of them are ablated together."""
        from ..plotting import PALETTE, finish, heatmap, plt

        fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.6))
        heatmap(self.attribution, ax=a0, xlabel="head", cbar_label="predicted change",
                title="attribution: score change if ablated")
        k = torch.arange(1, len(self.heads) + 1)
        a1.plot(k, self.predicted, "o", color=PALETTE[0], ms=4, label="predicted (one head)")
        a1.plot(k, self.measured, "s", color=PALETTE[1], ms=4, label="measured (one head)")
        a1.plot(k, self.cumulative, "-", color=PALETTE[2], lw=1.5, label="measured (first k together)")
        a1.axhline(0, color="0.6", lw=0.8)
        a1.set_xticks(k, [f"{l}.{h}" for l, h in self.heads], rotation=60, fontsize=7)
        a1.set_ylabel("change of the mean score")
        a1.legend(fontsize=7)
        a1.grid(alpha=0.3)
        fig.suptitle(f"{self.model_name}: heads moving the probe at resid_post.{self.layer} ({self.ablation} ablation)",
                     fontsize=9)
        fig.tight_layout()
        return finish(fig, path)
    def _title(self) -> str:
        return f"TraceHeads at resid_post.{self.layer}: {len(self.heads)} of {self.n_heads_total} heads verified"

    def _fields(self):
        return [("model", self.model_name), ("readings", self.readings), ("ablation", self.ablation),
                ("base score", self.base), ("rank agreement (Spearman)", self.rank_agreement)]

    def _table(self):
        return (["head", "predicted", "measured", "first k together"],
                [[f"{l}.{h}", float(p), float(m), float(c)]
                 for (l, h), p, m, c in zip(self.heads, self.predicted, self.measured, self.cumulative)])


def _reading_mask(trace: ProbeTrace, readings: str, width: int) -> Tensor:
    """``[prompt, width]`` (left-padded like the forward's batch): the readings averaged into M."""
    if readings not in _READINGS:
        raise ValueError(f"readings={readings!r}: use one of {_READINGS}.")
    B = len(trace.ids)
    mask = torch.zeros(B, width, dtype=torch.bool)
    for i, ids in enumerate(trace.ids):
        n, p = len(ids), int(trace.prompt_len[i])
        ok = ~torch.isnan(trace.scores[i, :n])
        ok[0] = False  # the attention sink's reading
        if readings == "generation":
            ok[:p] = False
        elif readings == "prompt":
            ok[p:] = False
        mask[i, width - n:] = ok
    if not mask.any():
        raise ValueError(f"The trace has no {readings} readings to average (generate more tokens, or pick readings=).")
    return mask


def trace_heads(model, trace: ProbeTrace, probe=None, *, steering=None, readings: str = "generation",
                ablation: str = "zero", top: int = 10, include_sink: bool = False,
                batch_size: Optional[int] = None) -> TraceHeads:
    """Rank the heads by how much ablating each would raise the mean probe score over ``trace``'s
    ``readings`` (``"generation"``, ``"prompt"`` or ``"all"``; the sink's reading is never
    counted), then verify the ``top`` of them by ablation (see the module doc). ``probe``
    (default: the trace's own) and ``steering`` are those the trace was made with (``steering``
    not yet entered)."""
    from ..data import Batch, pad_left
    from ..hooks import StopForward, add_hooks

    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation={ablation!r}: use 'zero' or 'mean'.")
    probe = trace.probe if probe is None else probe
    if probe is None:
        raise ValueError("This trace does not carry its probe: pass probe= (what probe_trace read).")
    layer, score = _scorer(model, probe, trace.layer)
    if layer != trace.layer:
        raise ValueError(f"The probe reads layer {layer}, the trace layer {trace.layer}: pass the trace's probe.")
    L, H = layer + 1, model.n_heads
    top = min(int(top), L * H)
    if top < 1:
        raise ValueError("top must be ≥ 1.")
    ids, attn = pad_left(trace.ids, model.tokenizer.pad_token_id)
    B, T = ids.shape
    batch = Batch(ids, attn, [{} for _ in range(B)], list(trace.texts))
    sel = _reading_mask(trace, readings, T)
    real = attn.bool().clone()
    if not include_sink:
        real[torch.arange(B), T - attn.sum(1)] = False  # each row's first real token
    dev = model.device
    sel_d, real_d = sel.to(dev), real.to(dev)
    n_sel = sel.sum()

    def forward(b: Batch, hooks, k: int = 1):
        """Forward of ``b`` with each prompt on ``k`` consecutive rows, stopped after the probe layer."""
        got = {}

        def read(act, site):
            got["s"] = score(act).float()
            raise StopForward

        rows = lambda x: x.repeat_interleave(k, 0).to(dev)  # noqa: E731
        ctx = steering if steering is not None else nullcontext()
        with ctx as s, add_hooks(model, [*hooks, (f"resid_post.{layer}", read)]):
            if steering is not None:
                s.batch = b.to(dev)
            try:
                model.hf(input_ids=rows(b.input_ids), attention_mask=rows(b.attention_mask),
                         position_ids=rows(b.position_ids), use_cache=False)
            except StopForward:
                pass
        return got["s"]

    # 1. attribution: one forward with the graph rooted at resid_pre.0, one backward
    zs: dict[int, Tensor] = {}

    def root(act, site):
        return act.detach().requires_grad_(True)

    def keep(act, site):
        zs[site.layer] = y = act.clone()
        return y

    with torch.enable_grad():
        s = forward(batch, [("resid_pre.0", root)] + [(f"z.{l}", keep) for l in range(L)])
        _check_reproduces(s.detach().cpu(), trace, sel, model.dtype)
        M = (s * sel_d).sum() / n_sel
        grads = torch.autograd.grad(M, [zs[l] for l in range(L)])
    z = torch.stack([zs[l].detach() for l in range(L)])  # [layer, batch, pos, head, d_head]
    g = torch.stack(grads)
    if ablation == "mean":
        w = real_d[None, :, :, None, None].to(z.dtype)
        target = (z * w).sum((1, 2), keepdim=True) / w.sum((1, 2), keepdim=True)
    else:
        target = torch.zeros_like(z[:, :1, :1])
    contrib = ((target - z) * g).sum(-1) * real_d[None, :, :, None]  # [layer, batch, pos, head]
    attribution = contrib.sum((1, 2)).float().cpu()  # [layer, head]
    target = target[:, 0, 0]  # [layer, head, d_head]

    # 2. verification: each top head alone, then the first 1..top together, one row per variant
    order = attribution.flatten().argsort(descending=True)[:top]
    heads = [(int(i) // H, int(i) % H) for i in order]
    variants = torch.zeros(2 * top, L, H, dtype=torch.bool)
    for j, (l, h) in enumerate(heads):
        variants[j, l, h] = True
        variants[top + j:, l, h] = True
    base = float(M.detach())
    if batch_size is None:
        batch_size = max(1, 256 // max(1, B))
    changes = []
    with torch.no_grad():
        for c in range(0, len(variants), batch_size):
            vm = variants[c: c + batch_size].to(dev)
            k = len(vm)

            def ablate(act, site, vm=vm, k=k):
                view = act.view(B, k, *act.shape[1:])  # rows: prompt-major, variant-minor
                m = vm[:, site.layer][None, :, None, :, None] & real_d[:, None, :, None, None]
                return torch.where(m, target[site.layer].to(act.dtype)[None, None, None], view).view(act.shape)

            s = forward(batch, [(f"z.{l}", ablate) for l in range(L)], k=k).view(B, k, T)
            changes.append(((s * sel_d[:, None]).sum((0, 2)) / n_sel).cpu() - base)
    changes = torch.cat(changes)
    return TraceHeads(model.name, layer, attribution, heads, attribution.flatten()[order], changes[:top],
                      changes[top:], base, readings, ablation, model.n_layers * H)



def _check_reproduces(s: Tensor, trace: ProbeTrace, sel: Tensor, dtype) -> None:
    """The teacher-forced forward must give the trace's own readings, else the ranking is of
    another computation (e.g. a steering whose positions depend on what was generated)."""
    B, T = s.shape
    want = torch.full_like(s, float("nan"))
    for i, ids in enumerate(trace.ids):
        want[i, T - len(ids):] = trace.scores[i, : len(ids)]
    got, ref = s[sel], want[sel]
    tol = 1e-3 * (1 + float(ref.abs().max())) if dtype in (torch.float32, torch.float64) else 5e-2 * (1 + float(ref.abs().max()))
    err = float((got - ref).abs().max())
    if not err <= tol:
        raise ValueError(
            f"A forward over the trace's tokens does not reproduce its readings (max difference {err:.3g}): "
            "pass the probe and the steering the trace was made with; a steering that edits only prompt or "
            "only generated positions cannot be replayed teacher-forced (use positions='all').")

