"""Patching a direction rather than a component, with the checks that expose an interpretability
illusion ("Is This the Subspace You Are Looking For?", Makelov, Lange & Nanda 2023; METHODS.md §2).

Patching the 1-D subspace spanned by ``u`` at a site sets the corrupt run's coordinate along
``u`` to the clean run's: ``a' = a + ((a_clean − a) · u) u``. Where the site is read through one
matrix ``W`` (MLP neurons through ``W_out``, a head's ``z`` through its slice of ``W_O``), split
``u = u_row + u_null`` with ``W u_null = 0``. The patch changes the output by
``(Δa · u) W u_row``: it *acts* only through ``u_row``, but its *size* ``Δa · u`` also counts the
variation along ``u_null``, which on its own cannot reach the output. When ``u_row`` is dormant
(the runs do not differ along it) and ``u_null`` varies, the patch moves the model through a
pathway the model itself never uses for the task: the illusion. :func:`subspace_patch` reports,
as fractions of the clean − corrupt metric gap, in one batched forward:

* ``component``: the whole site patched (what activation patching of the component gives);
* ``subspace``: the patch along ``u``;
* ``rowspace``: the patch along ``û_row`` alone (what the connected part does by itself);
* ``through_null``: the patch along ``u`` sized by the null-space part only,
  ``a + ((Δa · u_null)) u``: the part of the effect that comes from ``u_null``'s variation;
* ``nullspace``: the patch along ``û_null`` alone, which must be 0 (checked: the site has no
  other reader).

``illusion`` is flagged when most of the subspace effect runs through the null space. On the
residual stream there is no single reading matrix: only ``component`` and ``subspace`` are
reported, so at least the component-level check sits next to the direction's.

>>> import steer, torch
>>> from steer.patching import ioi_task
>>> m = steer.load("tiny-llama")
>>> r = subspace_patch(m, ioi_task(m, n=2), torch.randn(m.d_mlp), site="neuron", layer=1)
>>> sorted(r.effects)
['component', 'nullspace', 'rowspace', 'subspace', 'through_null']
>>> abs(r.effects["nullspace"]) < 1e-4
True
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..display import Rich

__all__ = ["subspace_patch", "SubspacePatch"]

_READ = {"neuron": "mlp", "z": "o"}
_RESID = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


class SubspacePatch(Rich):
    """Result of :func:`subspace_patch`: ``effects`` (name → fraction of the clean − corrupt gap;
    see the module doc), ``null_fraction`` = ``‖u_null‖²`` (``None`` on residual sites),
    ``metric_clean`` / ``metric_corrupt``, and ``illusion``."""

    def __init__(self, site, layer, head, effects, null_fraction, metric_clean, metric_corrupt, positions):
        self.site, self.layer, self.head, self.effects = site, layer, head, effects
        self.null_fraction, self.metric_clean, self.metric_corrupt = null_fraction, metric_clean, metric_corrupt
        self.positions = positions

    @property
    def illusion(self) -> Optional[bool]:
        """Most of the direction's effect runs through its null-space part (``through_null`` at
        least half of ``subspace``, same sign) while the connected part alone does less than half:
        the direction's effect is the dormant-pathway kind. ``None`` on residual sites."""
        e = self.effects
        if "through_null" not in e or abs(e["subspace"]) < 1e-6:
            return None
        share = e["through_null"] / e["subspace"]
        return bool(share >= 0.5 and abs(e["rowspace"]) < 0.5 * abs(e["subspace"]))

    def to_dict(self) -> dict:
        return {"site": self.site, "layer": self.layer, "head": self.head, "positions": self.positions,
                "effects": self.effects, "null_fraction": self.null_fraction, "illusion": self.illusion,
                "metric_clean": self.metric_clean, "metric_corrupt": self.metric_corrupt}

    def _where(self) -> str:
        return f"{self.site}.{self.layer}" + (f" head {self.head}" if self.head is not None else "")

    def _title(self) -> str:
        return f"SubspacePatch at {self._where()}"

    def _fields(self):
        f = [("positions", self.positions), ("metric clean / corrupt", f"{self.metric_clean:.4g} / {self.metric_corrupt:.4g}")]
        if self.null_fraction is not None:
            f += [("‖u_null‖²", self.null_fraction), ("illusion", self.illusion)]
        return f

    def _table(self):
        return ["patch", "fraction of the gap"], [[k, v] for k, v in self.effects.items()]


def _direction_at(model, direction, site: str, layer: int, head: Optional[int]) -> Tensor:
    v = direction.vector(layer) if hasattr(direction, "vector") else torch.as_tensor(direction)
    v = v.detach().float()
    want = {"neuron": model.d_mlp, "z": model.d_head}.get(site, model.d_model)
    if v.shape != (want,):
        raise ValueError(f"A {site} direction of {model.name} has {want} entries; got shape {tuple(v.shape)}.")
    if float(v.norm()) == 0:
        raise ValueError("The direction is zero.")
    return v / v.norm()


def subspace_patch(model, task, direction, *, site: str = "resid_post", layer: int, head: Optional[int] = None,
                   positions: Union[str, int] = "last", rank_tol: float = 1e-6) -> SubspacePatch:
    """Denoising patch of the 1-D subspace ``direction`` at ``site``/``layer`` (``head`` for
    ``z``) at ``positions`` (``"last"``, ``"all"`` or a column index), next to the component-level
    patch and the null-space decomposition (module doc). ``task``: a
    :class:`~steer.patching.PatchTask`; effects are normalised like activation patching's
    scores (0: the corrupt run, 1: the clean one)."""
    from ..hooks import add_hooks
    from ..sites import Site, resolve_layers

    layer = resolve_layers(model, layer)[0]
    if site not in _READ and site not in _RESID:
        raise ValueError(f"site {site!r}: use one of {', '.join((*_RESID, *_READ))}.")
    if (site == "z") != (head is not None):
        raise ValueError("site='z' needs head= (the head whose output the direction lives in); other sites take no head.")
    u = _direction_at(model, direction, site, layer, head)
    T = task.n_pos
    if isinstance(positions, str):
        cols = {"last": [T - 1], "all": list(range(T))}.get(positions)
    elif hasattr(positions, "__index__") and not isinstance(positions, bool) and -T <= int(positions) < T:
        cols = [int(positions) % T]
    else:  # a column past the prompts wrapped onto another one
        cols = None
    if cols is None:
        raise ValueError(f"positions={positions!r}: use 'last', 'all' or a column index in -{T}..{T - 1}.")
    sel = torch.zeros(T, dtype=torch.bool)
    sel[cols] = True

    if site in _READ:
        W = model.arch.read_matrix(model.layers[layer], _READ[site]).float()  # [d_model, d_in]
        if site == "z":
            W = W[:, head * model.d_head:(head + 1) * model.d_head]
        _, S, Vh = torch.linalg.svd(W.cpu(), full_matrices=False)
        R = Vh[S > rank_tol * S.max()]  # rowspace basis [r, d_in]
        u_row = u if len(R) == len(u) else R.T @ (R @ u)  # full rank (a head's W_O slice): no null space
        u_null = u - u_row
    target = Site(site, layer)
    dev = model.device

    def grab_into(store):
        def grab(act, s):
            store["a"] = (act[:, :, head] if head is not None else act).detach().float()
        return grab

    def run(batch, hooks, k=1):
        rows = lambda x: x.repeat(k, 1).to(dev)  # noqa: E731  variant-major
        with add_hooks(model, hooks), torch.no_grad():
            out = model.hf(input_ids=rows(batch.input_ids), attention_mask=rows(batch.attention_mask),
                           position_ids=rows(batch.position_ids), use_cache=False).logits[:, -1].float()
        return out.view(k, len(batch), -1).cpu()

    clean, corrupt = {}, {}
    m_clean = float(task.scores(run(task.clean, {str(target): grab_into(clean)}))[0])
    m_corrupt = float(task.scores(run(task.corrupt, {str(target): grab_into(corrupt)}))[0])
    a, delta = corrupt["a"], clean["a"] - corrupt["a"]  # [prompt, pos, d]
    u_d = u.to(a.device)
    new = {"component": clean["a"], "subspace": a + (delta @ u_d)[..., None] * u_d}
    null_fraction = None
    if site in _READ:
        null_fraction = float(u_null @ u_null)
        un, ur = u_null.to(a.device), u_row.to(a.device)
        new["through_null"] = a + (delta @ un)[..., None] * u_d
        for name, w in (("rowspace", ur), ("nullspace", un)):
            n = float(w.norm())
            w = w / n if n > 1e-4 else torch.zeros_like(w)  # (float noise is not a direction)
            new[name] = a + (delta @ w)[..., None] * w
    names = list(new)
    V = len(names)
    stack = torch.stack([torch.where(sel[None, :, None].to(a.device), new[k], a) for k in names])  # [V, P, T, d]

    def patch(act, s):
        x = stack.flatten(0, 1).to(act.device, act.dtype)
        if head is None:
            return x
        act = act.clone()
        act[:, :, head] = x
        return act

    vals = task.scores(run(task.corrupt, {str(target): patch}, k=V))
    gap = m_clean - m_corrupt
    effects = {k: float((vals[i] - m_corrupt) / gap) if gap != 0 else float("nan") for i, k in enumerate(names)}
    if "nullspace" in effects and abs(float(vals[names.index("nullspace")]) - m_corrupt) > 1e-3 * (1 + abs(gap)):
        raise RuntimeError(
            f"Patching the null space of {site}.{layer}'s reading matrix changed the metric: something else "
            f"reads this site in {model.name} ({model.arch.family}); the decomposition does not apply.")
    return SubspacePatch(site, layer, head, effects, null_fraction, m_clean, m_corrupt, positions)
