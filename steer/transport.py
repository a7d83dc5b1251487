"""Activation transport: Linear-AcT (Rodriguez et al., "Controlling Language and Diffusion Models
by Transporting Activations", 2024).

For each unit ``i`` of a site independently, an affine map ``T_i(x) = ω_i x + β_i`` is fitted
between the *sorted* source samples and the *sorted* target samples of that unit. In one
dimension the optimal transport map is monotone — it matches quantiles — so pairing the k-th
smallest source value with the k-th smallest target value and fitting them by least squares gives
the best affine transport map. Steering applies ``x + λ (T(x) − x)`` with ``λ ∈ [0, 1]``
(``λ = 1``: the source distribution is carried onto the target's).

With different numbers of source and target samples, both are read at the same ``q`` quantile
levels (linear interpolation, ``q`` = the smaller count).

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

__all__ = ["LinearTransport", "fit_linear_act", "transport"]


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
