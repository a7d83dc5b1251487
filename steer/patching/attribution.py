"""Attribution patching (AtP), GradDrop and AtP* (Kramár et al., "AtP*: An efficient and
scalable method for localizing LLM behaviour to components").

AtP estimates every node's patching effect at once to first order:
``Î(n) = (n_other - n_base)ᵀ ∂M/∂n`` with the gradient taken on the *base* run.

* ``direction="denoising"``: base = corrupt run, other = clean (estimates putting clean values in);
* ``direction="noising"``: base = clean run, other = corrupt.

Cost: one forward of the other prompts (no grad), one forward of the base prompts with grad
and one backward (input gradients only; parameters are frozen). Head scores use the gradient
at ``z`` (the ``o_proj`` input), which is ``W_Oᵀ ∂M/∂attn_out`` - no per-head ``d_model`` tensor.

AtP* adds (1) the QK fix for ``q``/``k`` nodes (:mod:`steer.patching.qk_fix`) and (2) GradDrop:
for each layer ℓ, the gradient flowing through layer ℓ's residual contribution (attn and MLP
outputs) is zeroed; ``score = Σ_ℓ |Î_ℓ(n)| / (L - 1)``, signed with the plain (QK-fixed)
estimate. Backward ℓ only has to run from layer ℓ down (layers above are unchanged), so all
GradDrop passes cost about ``L/2`` backwards.

Memory: every backward reduces each site's gradient to its node estimates in a tensor hook as
autograd computes it (``fused=True``, the default; :func:`~steer.patching.kernels.attribution_reduce`),
so no set of gradients is held, and the QK fix works on blocks of query rows (PyTorch) or tiles
(Triton, :mod:`~steer.patching.qk_tiled`), so it never holds ``[P, H, T, T]`` tensors
(``experiments/bench/bench_qk_memory.py``).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..arch import UnsupportedModel
from ..sites import Site
from ._runner import Runner
from .activation import _check_direction, capture_sites, run_metrics
from .nodes import NodeSet, resolve_nodes
from .kernels import triton_available
from .qk_fix import key_fix, pattern_grad, query_fix
from .qk_tiled import key_fix_sum, row_fix
from .result import PatchingResult
from .tasks import PatchTask

__all__ = ["atp", "atp_star", "grad_drop_scores"]


QK_BLOCK_ELEMENTS = 2**22  # entries of one [P, H, rows, T] temporary of the QK fix (16 MiB in fp32)


def site_reduce(ns: NodeSet, delta: Tensor, g: Tensor, impl: str = "auto") -> Tensor:
    """``ns.reduce((delta * g).sum(0))`` with the batch and innermost feature axis reduced by
    :func:`~steer.patching.kernels.attribution_reduce` (fp32 accumulation, no fp32 copies on
    the Triton path); the remaining non-unit axes (positions) are summed afterwards."""
    from .kernels import attribution_reduce

    P, shape = delta.shape[0], delta.shape[1:]
    D = 1 if ns.act_axes[-1] in ns.units else shape[-1]
    x = attribution_reduce(delta.reshape(P, -1, D), g.reshape(P, -1, D), impl)
    return ns.reduce(x.view(*shape[:-1], shape[-1] // D))


class _Attribution:
    """Shared state of one AtP run: base/other activations and base-run gradients."""

    def __init__(self, model, task: PatchTask, kinds: Sequence[NodeSet], direction: str, qk: bool,
                 qk_block: Optional[int] = None, impl: str = "auto"):
        self.model, self.task, self.kinds, self.direction, self.qk = model, task, kinds, direction, qk
        self.impl = impl
        if qk_block is not None and qk_block < 1:
            raise ValueError(f"qk_block={qk_block}: the QK fix's query rows per block must be >= 1 (None: automatic).")
        self.qk_block = qk_block
        base_b, other_b = (task.corrupt, task.clean) if direction == "denoising" else (task.clean, task.corrupt)
        sites = {ns.site for ns in kinds}
        if qk and sites & {"q", "k"}:
            if model.arch.qk_norm_scope == "full":
                raise UnsupportedModel(
                    f"The QK fix assumes that patching one head's query or key changes only that head's "
                    f"attention; {model.name} ({model.arch.family}) normalises q and k over all heads "
                    "at once, so it does not hold. Use atp() without the QK fix for q/k nodes."
                )
            sites |= {"q", "k", "v", "z"}
        self.sites = sites
        self.other_runner = Runner(model, other_b, verify=False)
        self.other, _, other_logits = capture_sites(model, self.other_runner, list(sites))
        self.other_runner.verify(other_logits)  # the runner reproduces HF's forward
        self.base_runner = r = Runner(model, base_b, verify=False)
        self.base: dict = {}

        def keep(act, site: Site):
            y = act.clone()
            self.base[(site.name, site.layer)] = y
            return y

        hooks = [(Site(s, l), keep) for s in sites if s != "resid_pre" for l in range(model.n_layers)]
        with torch.enable_grad():
            self.h0 = h0 = r.embeds.detach().requires_grad_(True)
            logits, self.resid = r.run(h0, 0, hooks, keep_resid=True)
            for l, h in enumerate(self.resid[:-1]):
                self.base[("resid_pre", l)] = h
            self.M = self.task.scores(logits[None])[0]
        base_logits = logits.detach()
        r.verify(base_logits)
        clean_l, corrupt_l = (other_logits, base_logits) if direction == "denoising" else (base_logits, other_logits)
        self.m_clean, self.m_corrupt = run_metrics(task, clean_l, corrupt_l)
        self.keys = sorted(self.base)
        self.attention_checked: set = set()

    def grads(self, retain: bool) -> dict:
        tensors = [self.base[k] for k in self.keys] + self.resid[1:]
        gs = torch.autograd.grad(self.M, tensors, retain_graph=retain, allow_unused=True)
        out = {k: (g if g is not None else torch.zeros_like(self.base[k])) for k, g in zip(self.keys, gs)}
        self.g_resid = [None] + [g if g is not None else torch.zeros_like(t) for g, t in zip(gs[len(self.keys):], self.resid[1:])]
        return out

    def hooked_scores(self, outputs, grad_outputs=None, layers=None, want=(), retain: bool = True) -> tuple[dict, tuple]:
        """One backward from ``outputs`` in which each base activation's gradient is turned into
        the estimates of the node kinds that read it as soon as autograd computes it (a tensor
        hook), so no site's full gradient is kept (the fused reduction; a ``z`` gradient feeds the
        QK fix of its layer's ``q``/``k`` nodes). ``layers``: hook only these; ``want``: tensors
        whose gradients to return as well; ``retain=False`` frees the graph (the last backward).
        Returns ``({(kind, layer): scores}, grads of want)``."""
        layers = range(self.model.n_layers) if layers is None else layers
        got: dict = {}
        handles = []
        for (site, l), y in self.base.items():
            if l not in layers or not y.requires_grad:
                continue
            users = [ns for ns in self.kinds
                     if (ns.site == site and not (self.qk and ns.site in ("q", "k")))
                     or (self.qk and site == "z" and ns.site in ("q", "k"))]
            if not users:
                continue

            def hook(g, users=users, key=(site, l)):
                for ns in users:
                    got[(ns.kind, key[1])] = self.layer_scores(ns, key[1], {key: g})

            handles.append(y.register_hook(hook))
        try:
            gs = torch.autograd.grad(outputs, [self.h0, *want], grad_outputs=grad_outputs, retain_graph=retain,
                                     allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        return got, tuple(g if g is not None else torch.zeros_like(t) for g, t in zip(gs[1:], want))

    def stack(self, got: dict, ns: NodeSet) -> Tensor:
        """Scores ``[layer, *units]`` of ``ns`` from :meth:`hooked_scores` (zero where no gradient flowed)."""
        zero = torch.zeros(ns.unit_shape, device=self.M.device)
        return torch.stack([got.get((ns.kind, l), zero) for l in range(self.model.n_layers)])

    def _qk_tiled(self, ns: NodeSet, l: int, q_rot: Tensor, k_rot: Tensor, q_alt_rot: Tensor, k_alt_rot: Tensor,
                  v: Tensor, g_z: Tensor) -> Tensor:
        """:meth:`_qk_scores`' per-layer block (``[H, T]``, ``[H]`` or ``[H, S]``) from the
        Triton kernels of :mod:`~steer.patching.qk_tiled`, on the rotated queries and keys."""
        shape = self.base_runner.attention_shape(l)
        if ns.site == "q":
            return row_fix(q_rot, k_rot, q_alt_rot, None, v, g_z, **shape).sum(0)
        if ns.units == ("head",):
            return row_fix(q_rot, k_rot, None, k_alt_rot, v, g_z, **shape).sum((0, 2))
        return key_fix_sum(q_rot, k_rot, k_alt_rot, v, g_z, **shape)

    # -- per-layer estimates -------------------------------------------------------------
    def layer_scores(self, ns: NodeSet, l: int, grads: dict) -> Tensor:
        """``Î`` for the nodes of ``ns`` at layer ``l`` given gradients ``grads[(site, l)]``."""
        if self.qk and ns.site in ("q", "k"):
            return self._qk_scores(ns, l, grads)
        key = (ns.site, l)
        delta = self.other[key] - self.base[key].detach()
        return site_reduce(ns, delta, grads[key], self.impl)

    @torch.no_grad()
    def _qk_scores(self, ns: NodeSet, l: int, grads: dict) -> Tensor:
        """The QK fix for layer ``l``, one block of query rows at a time: every ``[P, H, rows, T]``
        temporary is bounded by :data:`QK_BLOCK_ELEMENTS` (or ``qk_block`` rows), so extra memory
        grows as O(T) per row block, not O(T²). Query effects are per row; key effects are sums
        over rows, accumulated block by block."""
        r = self.base_runner
        # q/k norms and rotary in the model's own dtype (the values its attention multiplies);
        # logits and everything after them in fp32: in bf16 the key fix's logit shifts x' − x
        # lose most of their digits. The kernels take half operands as they are (exact products).
        q, k, v, z = (self.base[(site, l)].detach() for site in ("q", "k", "v", "z"))
        g_z = grads[("z", l)].detach()
        q_rot, k_rot = r.attention_qk(l, q, k)  # (queries and keys are turned independently)
        q_alt_rot, k_alt_rot = r.attention_qk(l, self.other[("q", l)].detach(), self.other[("k", l)].detach())
        f32 = lambda t: t.float()  # noqa: E731
        logits = lambda a, b, rows: r.rotated_logits(l, a, b, rows)  # noqa: E731
        P, T, H = q.shape[:3]
        Hkv = k.shape[2]
        step = self.qk_block or max(1, QK_BLOCK_ELEMENTS // max(1, P * H * T))
        check = l not in self.attention_checked  # the QK fix re-implements attention: check it first
        tiled = self.impl == "triton" or (self.impl == "auto" and q.is_cuda and triton_available())
        diff = scale = 0.0
        parts = []
        # the row blocks: the PyTorch fix, and (first time per layer) the check against the model's z
        for t0 in range(0, T, step) if check or not tiled else ():
            rows = slice(t0, min(T, t0 + step))
            x = logits(q_rot, k_rot, rows)
            if check:
                d_, s_ = r.attention_error(x, v, z[:, rows], rows)
                diff, scale = max(diff, d_), max(scale, s_)
            if tiled:
                continue
            g = pattern_grad(f32(g_z[:, rows]), f32(v))
            if ns.site == "q":
                parts.append(query_fix(x, logits(q_alt_rot, k_rot, rows), g).sum(0))  # [H, rows]
                continue
            x_new = logits(q_rot, k_alt_rot, rows)
            if ns.units == ("head",):  # all keys of a kv head patched at once: exact softmax
                parts.append(query_fix(x, x_new, g).sum((0, 2)))  # [H]
            else:
                parts.append(key_fix(x, x_new - x, g).sum((0, 2)))  # [H, S]
            del x, x_new, g
        if check:
            r.refuse_attention(l, diff, scale)
            self.attention_checked.add(l)
        if tiled:  # the kernels of qk_tiled: logits recomputed tile by tile, never stored
            parts = [self._qk_tiled(ns, l, q_rot, k_rot, q_alt_rot, k_alt_rot, v, g_z)]
        if ns.site == "q":
            per_row = torch.cat(parts, -1)  # [H, T]
            return per_row.sum(-1) if ns.units == ("head",) else per_row.T  # [H] or [T, H]
        total = torch.stack(parts).sum(0)
        if ns.units == ("head",):
            return total.view(Hkv, H // Hkv).sum(-1)
        return total.view(Hkv, H // Hkv, -1).sum(1).T  # [S, Hkv]

    def result(self, ns: NodeSet, raw: Tensor, method: str, seconds: float, fe: float, meta=None) -> PatchingResult:
        d = self.m_clean - self.m_corrupt
        scores = raw / d if self.direction == "denoising" else 1.0 + raw / d
        return PatchingResult(
            scores=scores.detach().float().cpu(), nodes=ns,
            tokens=self.task.column_tokens(self.model),
            method=method, direction=self.direction, seconds=seconds, forward_equivalents=fe,
            meta={"metric_clean": self.m_clean, "metric_corrupt": self.m_corrupt,
                  "n_prompts": self.task.n_prompts, "task": self.task.name, **(meta or {})},
        )


def _kinds(model, task, nodes) -> tuple[list[NodeSet], bool]:
    single = isinstance(nodes, (str, NodeSet))
    items = [nodes] if single else list(nodes)
    if not items:
        raise ValueError("nodes is empty: give a node kind such as 'heads' or a list of kinds.")
    return [resolve_nodes(model, n, task.n_pos) for n in items], single


def atp(
    model, task: PatchTask, nodes: Union[str, Sequence[str]] = "heads", direction: str = "denoising",
    qk_fix: bool = False, qk_block: Optional[int] = None, fused: bool = True, impl: str = "auto",
) -> Union[PatchingResult, dict[str, PatchingResult]]:
    """Attribution patching: first-order estimate of every node's patching effect.

    One node kind gives a :class:`PatchingResult`; a list of kinds gives ``{kind: result}``
    from the same 2 forwards + 1 backward. ``qk_fix=True`` uses AtP*'s exact softmax for
    ``q``/``k`` nodes (no GradDrop), computed in blocks of ``qk_block`` query rows (default: as
    many as keep each temporary under :data:`QK_BLOCK_ELEMENTS`). ``fused`` (default): each
    site's gradient is reduced to node estimates inside the backward pass and never stored
    (``False``: all gradients first, then the products);
    ``impl``: the kernels of the reduction and the QK fix (``"auto"``: Triton on CUDA when it is
    installed, else PyTorch; ``"triton"`` / ``"torch"`` force one). The Triton QK fix
    (:mod:`~steer.patching.qk_tiled`) recomputes logits tile by tile and ignores ``qk_block``.
    Both compute the QK fix in fp32 whatever the model's dtype.

    >>> import steer
    >>> from steer.patching import ioi_task, atp
    >>> m = steer.load("tiny-llama")
    >>> rs = atp(m, ioi_task(m, n=2), ["heads", "neurons"])
    >>> tuple(rs["heads"].scores.shape), tuple(rs["neurons"].scores.shape)
    ((2, 4), (2, 128))
    """
    direction = _check_direction(direction)
    kinds, single = _kinds(model, task, nodes)
    t0 = time.perf_counter()
    st = _Attribution(model, task, kinds, direction, qk_fix, qk_block, impl)
    if fused:
        got, _ = st.hooked_scores(st.M, retain=False)
        out = {ns.kind: st.stack(got, ns) for ns in kinds}
    else:
        grads = st.grads(retain=False)
        out = {ns.kind: torch.stack([st.layer_scores(ns, l, grads) for l in range(model.n_layers)]) for ns in kinds}
    sec = time.perf_counter() - t0
    res = {k: st.result(ns, out[ns.kind], "atp*-qk" if qk_fix else "atp", sec, 3.0) for k, ns in zip(out, kinds)}
    return res[kinds[0].kind] if single else res


def grad_drop_scores(st: _Attribution, ns_list: Sequence[NodeSet], grads: dict) -> dict[str, Tensor]:
    """GradDrop magnitudes ``Σ_ℓ |Î_ℓ(n)| / (L - 1)`` for each node kind (private engine)."""
    L = st.model.n_layers
    plain = {ns.kind: [st.layer_scores(ns, l, grads) for l in range(L)] for ns in ns_list}
    acc = {ns.kind: [torch.zeros_like(s) for s in plain[ns.kind]] for ns in ns_list}
    for drop in range(L):
        cot = st.g_resid[drop + 1]  # gradient at the output of layer `drop`; skip path only
        below = [k for k in st.keys if k[1] < drop]
        gd = dict(grads)
        if below:
            gs = torch.autograd.grad(st.resid[drop], [st.base[k] for k in below], grad_outputs=cot,
                                     retain_graph=True, allow_unused=True)
            for k, g in zip(below, gs):
                gd[k] = g if g is not None else torch.zeros_like(st.base[k])
        for k in st.keys:
            if k[1] == drop:
                gd[k] = cot if k[0] == "resid_pre" else torch.zeros_like(st.base[k])
        for ns in ns_list:
            for l in range(L):
                if l < drop or (l == drop and ns.site == "resid_pre"):
                    acc[ns.kind][l] += st.layer_scores(ns, l, gd).abs()
                elif l > drop:
                    acc[ns.kind][l] += plain[ns.kind][l].abs()
    out = {}
    for ns in ns_list:
        mag = torch.stack(acc[ns.kind]) / max(L - 1, 1)
        sign = torch.sign(torch.stack(plain[ns.kind]))
        out[ns.kind] = sign * mag
    return out


def grad_drop_fused(st: _Attribution, ns_list: Sequence[NodeSet], plain: dict,
                    keep: Optional[dict] = None) -> dict[str, Tensor]:
    """:func:`grad_drop_scores` with each dropped-layer backward reduced in hooks
    (:meth:`_Attribution.hooked_scores`): no set of gradients is ever held. ``keep``: a dict
    that receives, per kind, the signed estimates ``Î_ℓ`` of every dropped layer ``ℓ``
    (``[L_drop, L, *units]``, unnormalised), which sum over chunks of prompts before the
    ``|·|`` (:func:`~steer.patching.sharded.over_prompts`)."""
    L = st.model.n_layers
    acc = {ns.kind: torch.zeros_like(plain[ns.kind]) for ns in ns_list}
    drops = {ns.kind: plain[ns.kind].new_zeros(L, *plain[ns.kind].shape) for ns in ns_list} if keep is not None else None
    for drop in range(L):
        cot = st.g_resid[drop + 1]  # gradient at the output of layer `drop`; skip path only
        got = st.hooked_scores(st.resid[drop], cot, layers=range(drop))[0] if drop else {}
        for ns in ns_list:
            for l in range(L):
                x = None
                if l < drop:
                    x = got.get((ns.kind, l))
                elif l == drop and ns.site == "resid_pre":
                    x = st.layer_scores(ns, l, {("resid_pre", l): cot})
                elif l > drop:
                    x = plain[ns.kind][l]
                if x is not None:
                    acc[ns.kind][l] += x.abs()
                    if drops is not None:
                        drops[ns.kind][drop, l] = x.detach()
    if keep is not None:  # one copy off the device at the end, not one per (drop, layer)
        keep.update({k: v.float().cpu() for k, v in drops.items()})
    return {ns.kind: torch.sign(plain[ns.kind]) * acc[ns.kind] / max(L - 1, 1) for ns in ns_list}


def atp_star(
    model, task: PatchTask, nodes: Union[str, Sequence[str]] = "heads", direction: str = "denoising",
    grad_drop: bool = True, qk_block: Optional[int] = None, fused: bool = True, impl: str = "auto",
    keep_drops: bool = False,
) -> Union[PatchingResult, dict[str, PatchingResult]]:
    """AtP*: AtP with the QK fix for ``q``/``k`` nodes and GradDrop.

    Scores are ``sign(Î_AtP+QK) · Σ_ℓ |Î_ℓ| / (L-1)``; ``meta["plain"]`` keeps the signed
    QK-fixed estimate without GradDrop. One kind → :class:`PatchingResult`; a list → dict.
    ``qk_block``, ``fused``, ``impl``: as in :func:`atp` (with ``fused``, GradDrop's L extra
    backward passes reduce their gradients in hooks too). ``keep_drops``: also return each
    dropped layer's signed, unnormalised estimates in ``meta["drops_raw"]`` (``[L, L, *units]``)
    and the plain ones in ``meta["plain_raw"]``, so that chunks of prompts combine exactly
    (:func:`~steer.patching.sharded.over_prompts`; needs ``fused``).

    >>> import steer
    >>> from steer.patching import ioi_task, atp_star
    >>> m = steer.load("tiny-llama")
    >>> tuple(atp_star(m, ioi_task(m, n=2), "k_by_pos").scores.shape)[0]
    2
    """
    direction = _check_direction(direction)
    kinds, single = _kinds(model, task, nodes)
    t0 = time.perf_counter()
    st = _Attribution(model, task, kinds, direction, qk=True, qk_block=qk_block, impl=impl)
    L = model.n_layers
    if keep_drops and not (fused and grad_drop):
        raise ValueError("keep_drops needs fused=True and grad_drop=True.")
    drops: dict = {}
    if fused:
        got, g_resid = st.hooked_scores(st.M, want=st.resid[1:])
        st.g_resid = [None, *g_resid]
        plain = {ns.kind: st.stack(got, ns) for ns in kinds}
        scores = grad_drop_fused(st, kinds, plain, keep=drops if keep_drops else None) if grad_drop else plain
    else:
        grads = st.grads(retain=grad_drop)
        plain = {ns.kind: torch.stack([st.layer_scores(ns, l, grads) for l in range(L)]) for ns in kinds}
        scores = grad_drop_scores(st, kinds, grads) if grad_drop else plain
    sec = time.perf_counter() - t0
    fe = 3.0 + (L / 2 if grad_drop else 0)
    res = {}
    for ns in kinds:
        r = st.result(ns, scores[ns.kind], "atp*", sec, fe, {"grad_drop": grad_drop})
        r.meta["plain"] = st.result(ns, plain[ns.kind], "atp*", sec, fe).scores.tolist()
        if keep_drops:
            r.meta["drops_raw"], r.meta["plain_raw"] = drops[ns.kind], plain[ns.kind].detach().float().cpu()
        res[ns.kind] = r
    return res[kinds[0].kind] if single else res
