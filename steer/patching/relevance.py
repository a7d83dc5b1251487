"""Relevance patching (RelP): AtP with LRP propagation coefficients in place of gradients.

Jafari et al., "RelP: Faithful and Efficient Circuit Discovery via Relevance Patching" (2025).
Same cost as AtP (2 forwards + 1 backward) and the same estimate
``Î(n) = (n_other - n_base)ᵀ r(n)``, but the coefficients ``r`` come from a backward pass in
which the model's nonlinearities follow layer-wise relevance propagation rules:

* **LN-rule** - every RMSNorm of the residual stream (block norms, Gemma's sandwich norms, the
  final norm; per-head q/k norms only if asked) is linear in its input with its ``1/rms`` scale
  held fixed: ``∂out/∂x = c · s`` with ``c`` the norm's gain and ``s = 1/sqrt(mean(x²) + eps)``
  (no derivative through ``s``).
* **Identity rule** - the MLP activation passes relevance straight through:
  ``∂act(x)/∂x := act(x) / x``.
* **Half-rule** - the gated product ``act(gate) * up`` splits relevance equally between its
  two factors (each factor's coefficient is halved).

These are the paper's default rules; attention keeps the ordinary gradient. The reference code
also offers an AH-rule (attention pattern held fixed); a prototype of it on IOI with SmolLM2
made every node kind worse (heads Pearson 0.99 -> 0.80, MLP outputs 0.31 -> -0.49, n=4), so
steer does not ship it.

The rules only change the backward pass: under :func:`relevance_rules` every forward value is
unchanged. On MLP outputs the paper reports Pearson 0.956 against activation patching where
AtP gets 0.006 (GPT-2 large). On IOI with the embedded models RelP raises the MLP-output
correlation much less (SmolLM2: 0.02 -> 0.31, n=4; Gemma-3: no gain) and ranks by |effect|
worse than AtP there; ``experiments/ioi_localisation.py`` has the figures.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence, Union

import torch
from torch import Tensor

from .attribution import atp
from .result import PatchingResult
from .tasks import PatchTask

__all__ = ["relevance_rules", "relp"]


def _straight(out: Tensor, x: Tensor, coef: Tensor) -> Tensor:
    """``out`` in the forward pass; ``coef * dx`` in the backward pass."""
    return out.detach() + coef * (x - x.detach())


def _norm_rule(module):
    """LN-rule hook for one RMSNorm; its gain and eps are read once, when the rule is installed."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    with torch.no_grad():
        ones = torch.ones(module.weight.shape[-1], dtype=module.weight.dtype, device=module.weight.device)
        gain = module(ones) * math.sqrt(1.0 + eps)  # c: RMSNorm(1) = c / sqrt(1 + eps)

    def hook(mod, args, out):
        x = args[0]
        with torch.no_grad():
            scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
        return _straight(out, x, gain.to(x.dtype) * scale)

    return hook


def _activation_rule(module, half: bool):
    """Identity-rule hook for one activation module (halved for the gate when ``half``)."""
    with torch.no_grad():
        eps = torch.tensor(1e-4)
        at_zero = float(module.forward(eps) / eps)  # act(x)/x as x -> 0

    def hook(mod, args, out):
        x = args[0]
        with torch.no_grad():
            safe = torch.where(x != 0, x, torch.ones_like(x))
            coef = torch.where(x != 0, out / safe, torch.full_like(x, at_zero))
        return _straight(out, x, coef * 0.5 if half else coef)

    return hook


def _half_rule(module, args, out):
    return 0.5 * out + 0.5 * out.detach()


@contextlib.contextmanager
def relevance_rules(model, qk_norms: bool = False) -> Iterator[None]:
    """Install RelP's LRP rules (LN-rule, identity rule, half-rule) on ``model`` for one block.

    Forward values are unchanged; gradients taken through a graph built inside the block are
    LRP coefficients. Hooks are removed on exit, also after an exception.

    ``qk_norms``: also apply the LN-rule to per-head query/key norms (Gemma-3). The paper's
    models have none. Measured on IOI with Gemma-3-270M (n=4): it wrecks key-node estimates
    (Pearson 0.92 -> 0.11) while raising MLP outputs (0.02 -> 0.28); off by default.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> x = torch.tensor([[5, 6, 7]])
    >>> with relevance_rules(m):
    ...     y = m.hf(x).logits
    >>> torch.allclose(y, m.hf(x).logits, atol=1e-5)
    True
    """
    handles = []
    try:
        a = model.arch
        if a.gated_mlp is None:
            raise NotImplementedError(
                f"RelP's rules are written for gated MLPs with separate gate and up projections; "
                f"{model.name} ({a.family}) has another MLP - use atp() for this model."
            )
        _, up_name, act_name = a.gated_mlp
        for layer in model.layers:
            mlp, attn = a.mlp_module(layer), a.attention(layer)
            skip = set() if qk_norms else {id(getattr(attn, n, None)) for n in ("q_norm", "k_norm")}
            for mod in layer.modules():
                if type(mod).__name__.endswith("RMSNorm") and id(mod) not in skip:
                    handles.append(mod.register_forward_hook(_norm_rule(mod)))
            act = getattr(mlp, act_name)
            handles.append(act.register_forward_hook(_activation_rule(act, half=True)))
            handles.append(getattr(mlp, up_name).register_forward_hook(_half_rule))
        final = a.final_norm_of(model.hf)
        handles.append(final.register_forward_hook(_norm_rule(final)))
        yield
    finally:
        for h in handles:
            h.remove()


def relp(
    model, task: PatchTask, nodes: Union[str, Sequence[str]] = "heads", direction: str = "denoising",
    qk_norms: bool = False,
) -> Union[PatchingResult, dict[str, PatchingResult]]:
    """Relevance patching: :func:`~steer.patching.atp` with LRP coefficients (see module doc).

    One node kind gives a :class:`PatchingResult` (``method="relp"``); a list gives ``{kind: result}``.
    ``qk_norms``: see :func:`relevance_rules`.

    >>> import steer
    >>> from steer.patching import ioi_task, relp
    >>> m = steer.load("tiny-llama")
    >>> r = relp(m, ioi_task(m, n=2), "mlp_out")
    >>> r.method, tuple(r.scores.shape)[0]
    ('relp', 2)
    """
    with relevance_rules(model, qk_norms=qk_norms):
        out = atp(model, task, nodes, direction)
    for r in [out] if isinstance(out, PatchingResult) else out.values():
        r.method = "relp"
    return out
