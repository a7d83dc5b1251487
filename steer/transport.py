"""Activation transport: Linear-AcT (Rodriguez et al., "Controlling Language and Diffusion Models
by Transporting Activations", 2024) and LinEAS (Rodriguez et al., "End-to-end Learning of
Activation Steering with a Distributional Loss", 2025).

For each unit ``i`` of a site independently, an affine map ``T_i(x) = ω_i x + β_i`` is fitted
between the *sorted* source samples and the *sorted* target samples of that unit. In one
dimension the optimal transport map is monotone — it matches quantiles — so pairing the k-th
smallest source value with the k-th smallest target value and fitting them by least squares gives
the best affine transport map. Steering applies ``x + λ (T(x) − x)`` with ``λ ∈ [0, 1]``
(``λ = 1``: the source distribution is carried onto the target's).

With different numbers of source and target samples, both are read at the same ``q`` quantile
levels (linear interpolation, ``q`` = the smaller count).

LinEAS (:func:`fit_lineas`) fits the same per-unit affine family at several layers *jointly*: the
source prompts run through the model with every map applied, and one loss sums, over the mapped
layers, the 1-D Wasserstein distance (quantile matching, per unit) between the source activations
*as the earlier maps left them* and the target activations, so each map accounts for what the
maps before it already did. Neuron selection (``units=k``): after the joint fit, each layer keeps
the ``k`` units whose map moves the source samples most (mean ``|T(x) − x|`` over the unit's
target spread), the others return to the identity, and the kept ones are fitted again for as
many steps. (An L1 penalty applied as a soft-threshold after each Adam step, tried first, does
not select: Adam moves every unit by about ``lr`` per step whatever its gradient, so a threshold
below ``lr`` keeps every unit and one above it keeps none.)

Each fitted map is a ``"map"`` :class:`~steer.interventions.Intervention` (the same engine as
every other edit: per-example strengths, CAST gates, the attention sink left alone).

>>> import torch
>>> src = torch.randn(200, 3)
>>> t = LinearTransport.fit(src, 2 * src + 1, layer=0)
>>> [round(x, 4) for x in t.omega.tolist()], [round(x, 4) for x in t.beta.tolist()]
([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from .display import Rich
from .interventions import Intervention

__all__ = ["LinearTransport", "fit_linear_act", "fit_lineas", "transport", "wasserstein_1d", "demo"]


def _quantiles(x: Float[Tensor, "n d"], q: int) -> Float[Tensor, "q d"]:
    """``x`` sorted per column and read at ``q`` evenly spaced quantile levels (exact when ``q = n``)."""
    s = x.sort(dim=0).values
    n = s.shape[0]
    if q == n:
        return s
    pos = torch.linspace(0, n - 1, q, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo).to(s.dtype)[:, None]
    return s[lo] * (1 - w) + s[hi] * w


@dataclass(repr=False)
class LinearTransport(Rich):
    """Per-unit affine transport map ``T(x) = ω ⊙ x + β`` at one layer and site (Linear-AcT).

    Call it as ``t(x, λ)`` to get ``x + λ (T(x) − x)``; ``λ`` is a scalar or ``[batch, 1, 1]``.
    """

    omega: Float[Tensor, "d"]
    beta: Float[Tensor, "d"]
    layer: int
    site: str = "resid_post"
    meta: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, source: Float[Tensor, "n d"], target: Float[Tensor, "m d"], layer: int, site: str = "resid_post",
            eps: float = 1e-8) -> "LinearTransport":
        """Least squares on sorted (quantile-matched) pairs, per unit, in float64.

        A unit whose source samples are constant gets ``ω = 1`` and ``β`` = the mean shift.
        """
        src, tgt = torch.as_tensor(source).double(), torch.as_tensor(target).double()
        if src.ndim != 2 or tgt.ndim != 2 or src.shape[1] != tgt.shape[1]:
            raise ValueError(f"source {tuple(src.shape)} and target {tuple(tgt.shape)} must be [n, d] with the same d.")
        if min(len(src), len(tgt)) < 2:
            raise ValueError("Linear-AcT needs at least 2 source and 2 target samples.")
        q = min(len(src), len(tgt))
        a, b = _quantiles(src, q), _quantiles(tgt, q)
        am, bm = a.mean(0), b.mean(0)
        var = ((a - am) ** 2).mean(0)
        cov = ((a - am) * (b - bm)).mean(0)
        flat = var <= eps
        omega = torch.where(flat, torch.ones_like(var), cov / var.clamp(min=eps))
        beta = bm - omega * am
        meta = {"n_source": len(src), "n_target": len(tgt), "quantiles": q}
        return cls(omega.float(), beta.float(), int(layer), site, meta)

    def map(self, x: Tensor) -> Tensor:
        """``T(x)``."""
        return x * self.omega.to(x.device, x.dtype) + self.beta.to(x.device, x.dtype)

    def __call__(self, x: Tensor, strength: Union[float, Tensor] = 1.0) -> Tensor:
        return x + strength * (self.map(x) - x)

    def _fields(self):
        o = self.omega
        return [("layer, site", f"{self.layer}, {self.site}"), ("units", o.numel()),
                ("ω mean / min / max", f"{float(o.mean()):.3f} / {float(o.min()):.3f} / {float(o.max()):.3f}"),
                ("|β| mean", float(self.beta.abs().mean()))] + list(self.meta.items())


def transport(maps: Sequence[LinearTransport], strength: Union[float, Tensor] = 1.0,
              positions="all", include_sink: bool = False) -> list[Intervention]:
    """The maps as interventions for :class:`~steer.steering.Steering`, at strength ``λ ∈ [0, 1]``.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> t = LinearTransport(torch.ones(64), torch.zeros(64), layer=1)      # the identity map
    >>> with steer.Steering(m) as s:
    ...     plain = s.logits(["Hi"])
    >>> with steer.Steering(m, transport([t], 0.5)) as s:
    ...     torch.equal(s.logits(["Hi"]), plain)
    True
    """
    st = torch.as_tensor(strength, dtype=torch.float32)
    if ((st < 0) | (st > 1)).any():
        raise ValueError(f"Linear-AcT strength λ must lie in [0, 1] (got {strength}); λ = 1 carries the "
                         "source distribution onto the target's.")
    return [Intervention("map", fn=t, layers=[t.layer], sites=t.site, strength=strength, positions=positions,
                         include_sink=include_sink, meta={"method": "linear-act"}) for t in maps]


def fit_linear_act(model, source_prompts: Sequence, target_prompts: Sequence, layers: Union[str, Sequence[int]] = "all",
                   site: str = "resid_post", positions="all", batch_size: int = 16,
                   progress: Optional[bool] = None) -> list[LinearTransport]:
    """Fit one :class:`LinearTransport` per layer from every selected token of the source and
    target prompts (each token one sample; the attention sink excluded).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> maps = fit_linear_act(m, ["I hate this", "Awful day"], ["I love this", "Lovely day"], layers=[1])
    >>> maps[0].layer, tuple(maps[0].omega.shape)
    (1, (64,))
    """
    from .capture import capture

    def tokens(prompts):
        a = capture(model, prompts, layers=layers, site=site, positions=positions, include_sink=False,
                    batch_size=batch_size, progress=progress)
        if a.has_pos:  # [prompt, layer, pos, d] with a mask → [samples, layer, d]
            return a.layers, a.tensor.permute(0, 2, 1, 3)[a.mask]
        return a.layers, a.tensor

    ls, src = tokens(source_prompts)
    _, tgt = tokens(target_prompts)
    return [LinearTransport.fit(src[:, j], tgt[:, j], layer=l, site=site) for j, l in enumerate(ls)]


def wasserstein_1d(x: Float[Tensor, "n d"], y_quantiles: Float[Tensor, "q d"], scale: Optional[Tensor] = None) -> Tensor:
    """Mean over units of the squared 1-D Wasserstein-2 distance between the columns of ``x`` and
    a target given by its ``q`` sorted quantiles (``x`` read at the same levels); differentiable in
    ``x``. ``scale`` divides each unit's distance (e.g. the target's mean variance).

    >>> import torch
    >>> y = torch.randn(100, 2).sort(0).values
    >>> float(wasserstein_1d(y.flip(0), y))                 # same samples, another order: 0
    0.0
    >>> round(float(wasserstein_1d(y + 1, y)), 4)           # a shift by 1: 1
    1.0
    """
    xq = _quantiles(x, len(y_quantiles)) if len(x) != len(y_quantiles) else x.sort(dim=0).values
    d = (xq - y_quantiles.to(xq.dtype)) ** 2
    return (d.mean(0) / (1 if scale is None else scale)).mean()


def fit_lineas(model, source_prompts: Sequence, target_prompts: Sequence, layers: Sequence[int],
               site: str = "resid_post", positions="all", *, steps: int = 60, lr: float = 0.02,
               units: Optional[int] = None, batch_size: int = 16, init: str = "act", max_target: int = 4096,
               progress: Optional[bool] = None) -> list[LinearTransport]:
    """LinEAS: per-unit affine maps at ``layers``, fitted jointly by Adam on the summed, per-layer
    normalised 1-D Wasserstein distance between the mapped source activations (every map applied,
    so downstream layers see upstream maps) and the target activations, at the tokens selected by
    ``positions`` (the attention sink excluded). ``init="act"`` starts from the local Linear-AcT
    fit, ``"identity"`` from ``ω = 1, β = 0``; ``units=k`` keeps ``k`` units per layer off the
    identity (see the module doc; ``meta["active_units"]``: units not at the identity).

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> maps = fit_lineas(m, ["I hate this", "Awful day"], ["I love this", "Lovely day"], layers=[0, 1], steps=3)
    >>> [t.layer for t in maps], maps[1].meta["method"]
    ([0, 1], 'lineas')
    """
    from . import positions as P
    from .capture import capture
    from .data import tokenize
    from .hooks import StopForward, add_hooks
    from .progress import bar
    from .sites import Site
    from .steering import Steering

    layers = sorted(int(l) for l in layers)
    if not layers:
        raise ValueError("fit_lineas needs at least one layer.")
    if init not in ("act", "identity"):
        raise ValueError(f"init={init!r}: use 'act' (start from Linear-AcT) or 'identity'.")
    if steps < 0 or lr <= 0 or (units is not None and not 0 < units <= model.d_model):
        raise ValueError(f"Need steps ≥ 0, lr > 0 and 0 < units ≤ d_model ({model.d_model}).")
    a = capture(model, target_prompts, layers=layers, site=site, positions=positions, include_sink=False,
                batch_size=batch_size, progress=False)
    tgt = a.tensor.permute(0, 2, 1, 3)[a.mask] if a.has_pos else a.tensor  # [samples, layer, d]
    if len(tgt) > max_target:
        tgt = tgt[torch.randperm(len(tgt), generator=torch.Generator().manual_seed(0))[:max_target]]
    tq = tgt.sort(dim=0).values  # [samples, layer, d]
    scale = tgt.var(0).mean(-1)  # [layer]: one scale per layer, so each layer's term is comparable
    if init == "act":
        maps = fit_linear_act(model, source_prompts, target_prompts, layers=layers, site=site, positions=positions,
                              batch_size=batch_size, progress=False)
    else:
        maps = [LinearTransport(torch.ones(model.d_model), torch.zeros(model.d_model), l, site) for l in layers]
    dev = model.device
    omega = [t.omega.clone().to(dev).requires_grad_(True) for t in maps]
    beta = [t.beta.clone().to(dev).requires_grad_(True) for t in maps]
    live = [LinearTransport(o, b, t.layer, site) for o, b, t in zip(omega, beta, maps)]
    ivs = transport(live, 1.0)
    batches = [tokenize(model, list(source_prompts[i:i + batch_size])).to(dev)
               for i in range(0, len(source_prompts), batch_size)]
    sels = [P.mask(positions, b, include_sink=False) for b in batches]
    opt = torch.optim.Adam(omega + beta, lr=lr)
    history = []
    keep = None  # [layer] boolean masks of the selected units

    def run(n, desc):
        for step in bar(range(n), desc=desc, total=n, enabled=progress):
            b, sel = batches[step % len(batches)], sels[step % len(batches)]
            grabbed = {}

            def grab(act, site_):
                grabbed[site_.layer] = act[sel.to(act.device)]
                if site_.layer == layers[-1]:
                    raise StopForward

            with torch.enable_grad():
                with Steering(model, ivs), add_hooks(model, {Site(site, l): grab for l in layers}):
                    try:
                        model.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                                 use_cache=False)
                    except StopForward:
                        pass
                loss = sum(wasserstein_1d(grabbed[l].float(), tq[:, j].to(dev), scale[j].to(dev))
                           for j, l in enumerate(layers)) / len(layers)
                opt.zero_grad()
                loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            if keep is not None:
                with torch.no_grad():
                    for o, bb, k in zip(omega, beta, keep):
                        o.copy_(torch.where(k, o, torch.ones_like(o)))
                        bb.copy_(torch.where(k, bb, torch.zeros_like(bb)))

    frozen = [p for p in model.hf.parameters() if p.requires_grad]  # only the maps learn; given back after
    for p in frozen:
        p.requires_grad_(False)
    try:
        run(steps, "LinEAS")
        if units is not None:
            sa = capture(model, source_prompts, layers=layers, site=site, positions=positions, include_sink=False,
                         batch_size=batch_size, progress=False)
            src = (sa.tensor.permute(0, 2, 1, 3)[sa.mask] if sa.has_pos else sa.tensor).to(dev)
            sd = tgt.std(0).to(dev).clamp(min=1e-6)
            with torch.no_grad():
                moved = [((src[:, j] * (o - 1) + bb).abs().mean(0) / sd[j]) for j, (o, bb) in enumerate(zip(omega, beta))]
            keep = [torch.zeros_like(mv, dtype=torch.bool).scatter_(0, mv.topk(units).indices, True) for mv in moved]
            with torch.no_grad():
                for o, bb, k in zip(omega, beta, keep):
                    o.copy_(torch.where(k, o, torch.ones_like(o)))
                    bb.copy_(torch.where(k, bb, torch.zeros_like(bb)))
            opt = torch.optim.Adam(omega + beta, lr=lr)
            run(steps, "LinEAS (selected units)")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    out = []
    for o, bb, t in zip(omega, beta, maps):
        o, bb = o.detach().cpu(), bb.detach().cpu()
        active = int(((o - 1).abs() > 1e-6).logical_or(bb.abs() > 1e-6).sum())
        meta = {"method": "lineas", "steps": steps, "lr": lr, "units": units, "init": init,
                "active_units": active, "loss_first": history[0] if history else None,
                "loss_last": history[-1] if history else None}
        out.append(LinearTransport(o, bb, t.layer, site, meta))
    return out


def demo(model, out_dir, layer: int = 10, n_fit: int = 32, n_eval: int = 8) -> dict:
    """Linear-AcT against mean-difference steering for ``steer demo``: both fitted at ``layer`` on
    ``n_fit`` harmful and harmless training prompts (post-instruction tokens), both inducing refusal
    on ``n_eval`` held-out harmless prompts (rise of the refusal log-odds of the first answer token)
    at the side effect of their next-token KL on ``n_eval`` others (:func:`steer.evaluate.pareto`);
    saves ``transport_pareto.png`` and ``transport.json``. ``experiments/transport.py`` is the full run.

    >>> import steer, tempfile
    >>> d = demo(steer.load("tiny-llama"), tempfile.mkdtemp(), layer=1, n_fit=4, n_eval=2)
    >>> list(d["curves"]), len(d["curves"]["Linear-AcT (λ)"])
    (['mean difference (α)', 'Linear-AcT (λ)'], 3)
    """
    import json
    from pathlib import Path

    from . import refusal
    from .capture import capture
    from .evaluate import pareto
    from .plotting import save
    from .steering import Steering, steer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = refusal.training_data(balanced=True)  # every category in each split, as experiments/transport.py
    H, S = data["harmful"][:n_fit], data["harmless"]
    fit_s, eval_s, neutral = S[:n_fit], S[-n_eval:], S[-2 * n_eval:-n_eval]
    maps = fit_linear_act(model, fit_s, H, layers=[layer], positions="post_instruction", progress=False)
    mean = [capture(model, p, layers=[layer], positions="post_instruction", reduce="mean", progress=False).tensor[:, 0].mean(0)
            for p in (H, fit_s)]
    v = mean[0] - mean[1]
    base = refusal.refusal_scores(model, eval_s)
    curves = {"mean difference (α)": {a: steer(model, v, layer=layer, strength=a) for a in (0.5, 1.0, 2.0)},
              "Linear-AcT (λ)": {lam: Steering(model, transport(maps, lam)) for lam in (0.25, 0.5, 1.0)}}
    p = pareto(model, curves, lambda st: float((refusal.refusal_scores(model, eval_s, st) - base).mean()), neutral,
               name=f"{model.name}: inducing refusal at layer {layer}")
    fig = p.plot(xlabel="side effect: next-token KL on held-out harmless prompts",
                 ylabel="refusal log-odds rise (held-out harmless)")
    save(fig, out / "transport_pareto.png")
    res = {**p.to_dict(), "layer": layer, "n_fit": n_fit, "n_eval": n_eval, "figure": str(out / "transport_pareto.png"),
           "omega_mean": float(maps[0].omega.mean()),
           "act_vs_mean_difference_at_same_kl": p.ratio_at_same_kl("Linear-AcT (λ)")}
    (out / "transport.json").write_text(json.dumps(res, indent=1))
    return res
