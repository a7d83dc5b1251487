"""Two models of one architecture: how a direction differs between them, whether it transfers,
and which layers carry a behaviour that one has and the other lacks.

Following "How Post-Training Reshapes LLMs" (the truthfulness direction is nearly the same in
base and post-trained models and transfers; refusal does not) and the Knobe-effect study
("Analysing Moral Bias in Finetuned LLMs through Mechanistic Interpretability": the bias appears
with finetuning, sits in a few layers, and patching the pretrained model's activations into just
those layers removes it), METHODS.md §5:

* :func:`direction_cosines`: per-layer cosine of the same direction extracted from both models;
* :func:`transfer`: steer one model with the other's direction, next to its own, over strengths;
* :func:`cross_patch`: run model ``b`` with model ``a``'s activations at a site and layer (or a
  group of layers), for every site and layer in batched forwards, and measure a behaviour.

Offline, the pair is a model and a copy of it finetuned on a toy pattern (the tests do this, so
the layers that changed are known). Online, a hub pair of one architecture and tokenizer works
the same way::

    base = steer.load("HuggingFaceTB/SmolLM2-135M")
    inst = steer.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    cp = cross_patch(base, inst, prompts, metric)         # where does instruct differ?

>>> import steer, torch
>>> a, b = steer.load("tiny-llama", seed=0), steer.load("tiny-llama", seed=1)
>>> metric = lambda logits: logits[:, 5] - logits[:, 6]       # [batch, vocab] at the last token -> [batch]
>>> cp = cross_patch(a, b, [steer.Raw("a cat"), steer.Raw("the dog ran")], metric)
>>> cp.values.shape                                           # [site, layer]
torch.Size([3, 2])
>>> cp.sites, cp.restored.shape                               # (values - b) / (a - b)
(['resid_post', 'attn_out', 'mlp_out'], torch.Size([3, 2]))
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from ..data import prompt_list
from ..display import Rich

__all__ = ["direction_cosines", "transfer", "Transfer", "cross_patch", "CrossPatch"]

_SITES = ("resid_post", "attn_out", "mlp_out")


def _check_pair(a, b) -> None:
    if a.arch.family != b.arch.family:
        raise ValueError(f"{a.name} is a {a.arch.family} model, {b.name} a {b.arch.family} one: cross-model "
                         "comparisons need two models of one architecture (e.g. base and instruct checkpoints).")
    for attr in ("n_layers", "d_model", "n_heads", "d_vocab"):
        if getattr(a, attr) != getattr(b, attr):
            raise ValueError(f"The two models differ in {attr} ({getattr(a, attr)} vs {getattr(b, attr)}): "
                             "cross-model comparisons need two models of one architecture.")


def direction_cosines(a, b) -> Float[Tensor, "layer"]:
    """Per-layer cosine between two :class:`~steer.directions.Direction` s (or ``[layer, d_model]``
    tensors) extracted from two models with the same recipe; NaN at layers either leaves empty.

    >>> import torch
    >>> direction_cosines(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    tensor([1.0000, 0.7071])
    """
    va, vb = (torch.as_tensor(getattr(x, "vectors", x)).float() for x in (a, b))
    if va.shape != vb.shape:
        raise ValueError(f"Directions of shapes {tuple(va.shape)} and {tuple(vb.shape)}: extract both with the same layers.")
    na, nb = va.norm(dim=-1), vb.norm(dim=-1)
    cos = (va * vb).sum(-1) / (na * nb)
    return torch.where((na > 0) & (nb > 0), cos, torch.full_like(cos, float("nan")))


class Transfer(Rich):
    """Result of :func:`transfer`: ``own`` and ``other`` effects ``[strength]`` (steering with the
    model's own direction, and with the other model's rescaled to the same norm), ``baseline``
    (unsteered), ``cosine`` of the two vectors at the layer and ``retained`` (the other's effect
    over the own's, baseline removed, at the largest strength)."""

    def __init__(self, model_name, layer, strengths, own, other, baseline, cosine):
        self.model_name, self.layer, self.strengths = model_name, layer, list(strengths)
        self.own, self.other, self.baseline, self.cosine = own, other, baseline, cosine

    @property
    def retained(self) -> float:
        d_own = float(self.own[-1]) - self.baseline
        return float("nan") if d_own == 0 else (float(self.other[-1]) - self.baseline) / d_own

    def to_dict(self) -> dict:
        return {"model": self.model_name, "layer": self.layer, "strengths": self.strengths, "own": self.own.tolist(),
                "other": self.other.tolist(), "baseline": self.baseline, "cosine": self.cosine,
                "retained": self.retained}

    def plot(self, path=None):
        from ..plotting import PALETTE, finish, plt

        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot(self.strengths, self.own, "o-", color=PALETTE[0], label="own direction")
        ax.plot(self.strengths, self.other, "s--", color=PALETTE[1], label="transferred direction")
        ax.axhline(self.baseline, color="0.6", lw=0.8, label="unsteered")
        ax.set_xlabel("strength")
        ax.set_ylabel("effect")
        ax.set_title(f"{self.model_name}, layer {self.layer}: cosine {self.cosine:.2f}, retained {self.retained:.2f}",
                     fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return finish(fig, path)
    def _fields(self):
        return [("model", self.model_name), ("layer", self.layer), ("cosine", self.cosine),
                ("retained", self.retained), ("baseline", self.baseline)]

    def _table(self):
        return ["strength", "own", "transferred"], [[s, float(o), float(t)] for s, o, t in zip(self.strengths, self.own, self.other)]


def transfer(model, own, other, effect: Callable, *, layer: int, strengths: Sequence[float] = (0.5, 1.0, 2.0),
             **steer_kw) -> Transfer:
    """Does ``other`` (a direction from another model of the same architecture) steer ``model``
    as its ``own`` direction does? ``effect(steering) -> float`` measures the behaviour under a
    :class:`~steer.steering.Steering` (``None``: unsteered), e.g. a refusal rate or a log-odds
    from :mod:`steer.evaluate`. Both vectors are used at ``layer``, ``other`` rescaled to the
    norm of ``own`` so that strengths mean the same; ``steer_kw`` go to :func:`steer.steer`."""
    from ..steering import steer

    v_own, v_other = (torch.as_tensor(x.vector(layer) if hasattr(x, "vector") else x).float() for x in (own, other))
    if v_own.ndim == 2:
        v_own, v_other = v_own[layer], v_other[layer]
    if v_own.shape != (model.d_model,) or v_other.shape != v_own.shape:
        raise ValueError(f"Need two [{model.d_model}] vectors (or Directions) for {model.name}; got "
                         f"{tuple(v_own.shape)} and {tuple(v_other.shape)}.")
    if float(v_other.norm()) == 0 or float(v_own.norm()) == 0:
        raise ValueError("A direction is zero at this layer: extract it at the layer you transfer.")
    v_other = v_other * (v_own.norm() / v_other.norm())
    runs = lambda v: torch.tensor([float(effect(steer(model, v, layer=layer, strength=s, **steer_kw)))  # noqa: E731
                                   for s in strengths])
    cos = float(v_own @ v_other / (v_own.norm() * v_other.norm()))
    return Transfer(model.name, layer, strengths, runs(v_own), runs(v_other), float(effect(None)), cos)


class CrossPatch(Rich):
    """Result of :func:`cross_patch`. ``values`` ``[site, group]``: the mean metric of model ``b``
    run with ``a``'s activations at that site and layer group; ``a`` / ``b``: each model's own mean
    metric; ``restored`` = ``(values − b) / (a − b)``: the fraction of the gap the patch closes
    (1: ``b`` behaves as ``a``). ``per_prompt`` ``[site, group, prompt]``."""

    def __init__(self, names, sites, groups, values, per_prompt, a, b):
        self.names, self.sites, self.groups, self.values = names, list(sites), groups, values
        self.per_prompt, self.a, self.b = per_prompt, a, b

    @property
    def restored(self) -> Tensor:
        gap = self.a - self.b
        return (self.values - self.b) / gap if gap != 0 else torch.full_like(self.values, float("nan"))

    def _labels(self) -> list[str]:
        return [str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" if list(g) == list(range(g[0], g[-1] + 1))
                else ",".join(map(str, g)) for g in self.groups]

    def to_dict(self) -> dict:
        return {"a": self.names[0], "b": self.names[1], "sites": self.sites, "groups": [list(g) for g in self.groups],
                "values": self.values.tolist(), "restored": self.restored.tolist(), "metric_a": self.a, "metric_b": self.b}

    def plot(self, path=None):
        from ..plotting import finish, heatmap

        fig = heatmap(self.restored.numpy(), ylabel="site", xlabel="layer", xticklabels=self._labels(),
                      cbar_label="fraction of the gap closed",
                      title=f"{self.names[1]} run with {self.names[0]}'s activations")
        ax = fig.axes[0]
        ax.set_yticks(range(len(self.sites)), self.sites)
        return finish(fig, path)
    def _title(self) -> str:
        return f"CrossPatch: {self.names[0]} into {self.names[1]}"

    def _fields(self):
        return [("metric of a", self.a), ("metric of b", self.b), ("sites", ", ".join(self.sites))]

    def _table(self):
        r = self.restored
        order = r.flatten().abs().argsort(descending=True)[:10] if torch.isfinite(r).any() else []
        lab = self._labels()
        return (["site", "layers", "metric", "gap closed"],
                [[self.sites[int(i) // r.shape[1]], lab[int(i) % r.shape[1]], float(self.values.flatten()[i]),
                  float(r.flatten()[i])] for i in order])


@torch.no_grad()
def cross_patch(a, b, prompts: Sequence, metric: Callable[[Tensor], Tensor], *,
                sites: Sequence[str] = _SITES, layers: Union[str, Sequence] = "all",
                batch_size: int = 64) -> CrossPatch:
    """Run model ``b`` on ``prompts`` with model ``a``'s activations at each site and layer group
    (``layers``: ``"all"`` for each layer alone, or a list of ints and tuples of ints patched
    together), all tokens of each prompt, and measure ``metric`` (``[batch, vocab]`` logits at
    each prompt's last token → ``[batch]``). Every (site, group) variant is a row of a batched
    forward (prompt-major), so the cost is ``len(sites) × len(groups)`` prompt-forwards in a few
    batches. The two models must share the architecture's sizes and the tokenizer."""
    from ..data import tokenize
    from ..hooks import add_hooks
    from ..sites import resolve_layers

    _check_pair(a, b)
    batch = tokenize(a, prompt_list(prompts))
    if not torch.equal(tokenize(b, prompt_list(prompts)).input_ids, batch.input_ids):
        raise ValueError(f"{a.name} and {b.name} tokenize the prompts differently: cross-model patching needs one tokenizer.")
    for s in sites:
        if s not in _SITES:
            raise ValueError(f"site {s!r}: cross_patch patches {', '.join(_SITES)}.")
    groups = [(l,) for l in resolve_layers(a, None)] if layers == "all" else \
        [tuple(resolve_layers(a, g if isinstance(g, int) else list(g))) for g in layers]
    sites = list(sites)
    n_l = a.n_layers
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    B = len(batch)

    def last_logits(model, hooks, k=1):
        dev = model.device
        rows = lambda x: x.repeat_interleave(k, 0).to(dev)  # noqa: E731
        with add_hooks(model, hooks):
            return model.hf(input_ids=rows(ids), attention_mask=rows(mask), position_ids=rows(pos),
                            use_cache=False).logits[:, -1].float()

    acts: dict = {}
    grab = lambda act, site: acts.__setitem__((site.name, site.layer), act.detach())  # noqa: E731
    m_a = metric(last_logits(a, [(f"{s}.{l}", grab) for s in sites for l in range(n_l)])).float().cpu()
    m_b = metric(last_logits(b, [])).float().cpu()
    variants = [(s, g) for s in sites for g in groups]
    out = []
    for c in range(0, len(variants), max(1, batch_size // max(1, B))):
        chunk = variants[c: c + max(1, batch_size // max(1, B))]
        k = len(chunk)
        on = torch.zeros(k, len(sites), n_l, dtype=torch.bool)
        for j, (s, g) in enumerate(chunk):
            on[j, sites.index(s), list(g)] = True
        on_d = on.to(b.device)

        def patch(act, site, on_d=on_d, k=k):
            m = on_d[:, sites.index(site.name), site.layer]
            if not bool(m.any()):
                return None
            view = act.view(B, k, *act.shape[1:])
            src = acts[(site.name, site.layer)].to(act.device, act.dtype)[:, None]
            return torch.where(m[None, :, None, None], src, view).view(act.shape)

        logits = last_logits(b, [(f"{s}.{l}", patch) for s in sites for l in range(n_l) if bool(on[:, sites.index(s), l].any())], k)
        out.append(metric(logits).float().cpu().view(B, k))
    per = torch.cat(out, 1).view(B, len(sites), len(groups)).permute(1, 2, 0)  # [site, group, prompt]
    return CrossPatch((a.name, b.name), sites, groups, per.mean(-1), per, float(m_a.mean()), float(m_b.mean()))
