"""Closed-form linear concept erasure (LEACE-style) as an activation edit.

"LEACE: Perfect linear concept erasure in closed form" (Belrose et al., 2023): with ``Σ`` the
covariance of the activations ``x``, ``Σ_xz`` their cross-covariance with the concept ``z``, the
whitening ``W = (Σ^{1/2})⁺`` and ``P`` the orthogonal projection onto the column space of
``W Σ_xz``, the edit

    r(x) = x − W⁺ P W (x − μ)

is the smallest (in the Σ-weighted sense) affine change after which no linear classifier
recovers ``z`` better than a constant: ``Cov(r(x), z) = 0``. The edit has rank ``k`` (the rank
of ``Σ_xz``), so it is stored as two ``[d_model, k]`` factors: ``r(x) = x − ((x − μ) B) Aᵀ``.

``z`` may be class labels (``[n]`` ints → one-hot), a continuous score (``[n]`` floats, e.g. the
share of women in an occupation) or several scores (``[n, k]``).

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(200, 8, generator=g); z = (x[:, 0] + 0.1 * x[:, 1] > 0).long()
>>> e = LeaceEraser.fit(x, z)
>>> xe = e(x)
>>> float(((xe - xe.mean(0)) * (z.float() - z.float().mean())[:, None]).mean(0).abs().max()) < 1e-5
True
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["LeaceEraser", "erasing"]


@dataclass
class LeaceEraser:
    """A fitted eraser ``x ↦ x − strength · ((x − mean) B) Aᵀ``.

    Attributes:
        mean: ``[d_model]`` mean of the fitting activations.
        A: ``[d_model, k]`` = ``W⁺ U`` (``U``: orthonormal basis of ``W Σ_xz``).
        B: ``[d_model, k]`` = ``W U``.

    Fit on activations and a concept, erase (the class means coincide afterwards), and keep the
    eraser as a state dict (``torch.save(e.state_dict(), path)``):

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(100, 6, generator=g)
    >>> z = (x[:, 0] > 0).long()                      # the concept: sign of coordinate 0
    >>> e = LeaceEraser.fit(x, z)
    >>> e.rank, tuple(e.A.shape), tuple(e.mean.shape)  # two classes: a rank-1 edit
    (1, (6, 1), (6,))
    >>> gap = lambda t: float((t[z == 1].mean(0) - t[z == 0].mean(0)).abs().max())
    >>> gap(x) > 1, gap(e(x)) < 1e-5
    (True, True)
    >>> torch.allclose(e(x, strength=0.5), x - 0.5 * e.edit(x))
    True
    >>> torch.equal(LeaceEraser.from_state_dict(e.state_dict())(x), e(x))
    True
    >>> e.to(dtype=torch.float64).A.dtype, LeaceEraser.fit(x, x[:, :2]).rank   # [n, 2] scores: rank 2
    (torch.float64, 2)
    """

    mean: Float[Tensor, "d_model"]
    A: Float[Tensor, "d_model k"]
    B: Float[Tensor, "d_model k"]

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        x: Float[Tensor, "n d_model"],
        z: Tensor,
        *,
        rcond: float = 1e-5,
        shrinkage: float = 0.0,
    ) -> "LeaceEraser":
        """Fit on activations ``x`` ``[n, d]`` and concept ``z`` (``[n]`` labels/scores or ``[n, k]``).

        ``rcond``: eigenvalues of ``Σ`` below ``rcond · λ_max`` are treated as zero (pseudo-inverse).
        ``shrinkage``: mix ``Σ`` with ``tr(Σ)/d · I`` (0 = plain covariance), useful when ``n < d``.

        >>> e = LeaceEraser.fit(torch.randn(50, 4), torch.arange(50) % 2)
        >>> e.A.shape
        torch.Size([4, 1])
        """
        x = torch.as_tensor(x)
        if x.ndim != 2:
            raise ValueError(f"LeaceEraser.fit needs x of shape [n, d_model], got {tuple(x.shape)}.")
        z = torch.as_tensor(z)
        if z.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but z has {z.shape[0]}: give one concept value per row.")
        if x.shape[0] < 2:
            raise ValueError("LeaceEraser.fit needs at least 2 examples.")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN/inf: capture activations in float32.")
        X, Z = x.double(), cls._concept(z)
        mu = X.mean(0)
        Xc, Zc = X - mu, Z - Z.mean(0)
        n = X.shape[0]
        dt = x.dtype if torch.is_floating_point(x) else torch.float32
        return cls.from_moments(mu, Xc.T @ Xc / n, Xc.T @ Zc / n, rcond=rcond, shrinkage=shrinkage, dtype=dt)

    @staticmethod
    def _concept(z: Tensor) -> Tensor:
        """``z`` as fp64 ``[n, k]``: one-hot for integer labels, else the scores themselves."""
        if z.is_floating_point() and not torch.isfinite(z).all():
            raise ValueError("z contains NaN/inf: give every row a concept value.")
        if z.ndim == 1 and not torch.is_floating_point(z):
            classes = z.unique()
            if len(classes) < 2:
                raise ValueError("z has a single class: the concept must vary to be erased.")
            return (z[:, None] == classes[None, :]).double()
        return z.double().reshape(z.shape[0], -1)

    @classmethod
    @torch.no_grad()
    def from_moments(
        cls, mean: Tensor, cov: Tensor, sxz: Tensor, *, rcond: float = 1e-5, shrinkage: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> "LeaceEraser":
        """The eraser from the activations' ``mean`` ``[d]``, covariance ``cov`` ``[d, d]`` and
        cross-covariance with the concept ``sxz`` ``[d, k]`` (population moments, as
        :meth:`fit` computes them), e.g. accumulated over data that does not fit in memory
        (:meth:`steer.store.ActivationStore.leace`).

        >>> x, z = torch.randn(50, 4), torch.arange(50) % 2
        >>> Z = LeaceEraser._concept(z); xc, zc = x.double() - x.double().mean(0), Z - Z.mean(0)
        >>> e = LeaceEraser.from_moments(x.double().mean(0), xc.T @ xc / 50, xc.T @ zc / 50)
        >>> torch.allclose(e.A, LeaceEraser.fit(x, z).A)
        True
        """
        mu, cov, sxz = mean.double(), cov.double(), sxz.double()
        if shrinkage:
            d = cov.shape[0]
            cov = (1 - shrinkage) * cov + shrinkage * cov.trace() / d * torch.eye(d, dtype=cov.dtype, device=cov.device)
        if float(sxz.abs().max()) == 0:
            raise ValueError("x and z are uncorrelated: nothing to erase.")
        evals, evecs = torch.linalg.eigh(cov)
        keep = evals > rcond * evals.max()
        V, lam = evecs[:, keep], evals[keep]
        W = V @ torch.diag(lam.rsqrt()) @ V.T  # whitening (pseudo-inverse square root)
        Winv = V @ torch.diag(lam.sqrt()) @ V.T
        u, s, _ = torch.linalg.svd(W @ sxz, full_matrices=False)
        U = u[:, s > s.max() * 1e-8]
        return cls(mean=mu.to(dtype), A=(Winv @ U).to(dtype), B=(W @ U).to(dtype))

    @property
    def rank(self) -> int:
        """Rank ``k`` of the edit (the number of concept dimensions it removes)."""
        return int(self.A.shape[1])

    def edit(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The part of ``x`` the eraser removes: ``((x − mean) B) Aᵀ``."""
        m, A, B = (t.to(device=x.device, dtype=x.dtype) for t in (self.mean, self.A, self.B))
        return ((x - m) @ B) @ A.T

    def __call__(
        self,
        x: Float[Tensor, "... d_model"],
        strength: float = 1.0,
        mask: Optional[Bool[Tensor, "batch pos"]] = None,
    ) -> Float[Tensor, "... d_model"]:
        """Erase: ``x − strength · edit(x)``; with ``mask`` ``[batch, pos]`` only at masked positions.

        >>> e = LeaceEraser.fit(torch.randn(30, 4), torch.arange(30) % 2)
        >>> x = torch.randn(2, 3, 4); m = torch.tensor([[False, True, True]] * 2)
        >>> bool((e(x, mask=m)[:, 0] == x[:, 0]).all())
        True
        """
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"Eraser was fitted on d={self.mean.shape[0]}, got activations with d={x.shape[-1]}.")
        out = x - strength * self.edit(x)
        if mask is None:
            return out
        if mask.shape != x.shape[:2]:
            raise ValueError(f"Mask shape {tuple(mask.shape)} does not match activations {tuple(x.shape[:2])}.")
        return torch.where(mask.to(x.device)[..., None], out, x)

    def to(self, device=None, dtype=None) -> "LeaceEraser":
        """A copy with its tensors moved to ``device`` / cast to ``dtype``."""
        return LeaceEraser(*(t.to(device=device, dtype=dtype) for t in (self.mean, self.A, self.B)))

    def state_dict(self) -> dict[str, Tensor]:
        """``{"mean", "A", "B"}`` tensors, for ``torch.save``; :meth:`from_state_dict` reads it back.

        >>> import tempfile, os
        >>> e = LeaceEraser.fit(torch.eye(4).repeat(5, 1), torch.arange(20) % 4)
        >>> path = os.path.join(tempfile.mkdtemp(), "eraser.pt")
        >>> torch.save(e.state_dict(), path)
        >>> back = LeaceEraser.from_state_dict(torch.load(path))
        >>> back.rank, torch.equal(back.A, e.A)
        (3, True)
        """
        return {"mean": self.mean, "A": self.A, "B": self.B}

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> "LeaceEraser":
        """Rebuild an eraser from :meth:`state_dict`'s dict (``KeyError`` naming missing keys)."""
        missing = {"mean", "A", "B"} - set(d)
        if missing:
            raise KeyError(f"Eraser state is missing {sorted(missing)}.")
        return cls(d["mean"], d["A"], d["B"])


@contextmanager
def erasing(model, erasers: Mapping[int, "LeaceEraser"], strength: float = 1.0, site: str = "resid_post",
            include_sink: bool = False) -> Iterator[None]:
    """Apply fitted erasers ``{layer: eraser}`` at ``site`` for every forward pass in the block —
    plain forwards, ``model.generate`` and inside another :class:`steer.steering.Steering` (they
    nest) — leaving each prompt's first real token (the attention sink) alone unless
    ``include_sink``. Each eraser is a ``"map"`` :class:`~steer.interventions.Intervention`; put
    those in your own ``Steering`` to combine erasure with other edits in one engine.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> e = LeaceEraser.fit(torch.randn(40, 64), torch.arange(40) % 2)
    >>> with erasing(m, {1: e}):
    ...     out = m.generate(["Hi"], max_new_tokens=2)
    >>> len(out)
    1
    """
    from .interventions import Intervention
    from .steering import Steering

    ivs = [Intervention("map", fn=e, layers=[l], sites=site, strength=strength, include_sink=include_sink)
           for l, e in erasers.items()]
    with Steering(model, ivs):
        yield
