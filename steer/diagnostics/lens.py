"""Logit lens / early decoding (nostalgebraist, 2020; used by "Who's asking? User personas and the
mechanics of latent misalignment" to read harmful content out of layers the output hides).

Each chosen layer's residual stream (``resid_post``) at the chosen positions is decoded as if it
were the last one: the model's own final norm, then its unembedding (and final soft-capping where
the architecture has one), then a softmax. At the last layer this *is* the model's output. One
forward of the decoder captures every layer at the chosen positions (the unembedding of every
position, which the plain forward computes, is skipped), then the kept residuals are decoded in
chunks: only the top-k tokens, the chosen targets' probabilities and the entropy are stored, so
memory does not grow with the vocabulary. Under a :class:`~steer.steering.Steering` the lens
reads the steered run, and with ``compare=True`` also the unsteered one, giving per layer the KL
of the steered lens from the unsteered lens: where steering changes what the model would say.

>>> import steer
>>> m = steer.load("tiny-llama")
>>> lens = logit_lens(m, ["Hello there"], k=3)
>>> lens.top_ids.shape                                    # [prompt, layer, pos, k]
torch.Size([1, 2, 1, 3])
"""

from __future__ import annotations

import contextlib
import functools

from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..data import prompt_list
from ..display import Rich

__all__ = ["logit_lens", "LogitLens", "decode"]


def decode(model, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits of residuals ``h`` read through the model's final norm, unembedding and final
    soft-capping (the model's own modules).

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> decode(m, torch.zeros(2, 64)).shape
    torch.Size([2, 259])
    """
    hf = model.hf
    x = model.arch.final_norm_of(hf)(h.to(device=model.device, dtype=model.dtype))
    out = hf.get_output_embeddings()(x)
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        out = torch.tanh(out / cap) * cap
    return out


class LogitLens(Rich):
    """What :func:`logit_lens` decoded: per prompt, layer and selected position the ``k`` most
    likely tokens (``top_ids``, ``top_probs``), the log-probability of each target token
    (``target_logprobs`` ``[prompt, layer, pos, target]``; ``target_probs`` its exponential) and
    its rank among all tokens (``target_ranks``, 0 = top), the entropy in nats, and, for a steered
    lens with ``compare=True``, the KL of the steered from the unsteered lens
    (``kl_from_unsteered``). ``mask`` ``[prompt, pos]`` marks real entries (positions are packed
    to the left); ``positions[i]`` are prompt ``i``'s selected positions in its own tokens."""

    def __init__(self, model_name, layers, tokens, positions, mask, top_ids, top_probs, top_tokens, entropy,
                 targets, target_logprobs, target_ranks, kl_from_unsteered=None, steered=False):
        self.model_name, self.layers, self.tokens, self.positions, self.mask = model_name, layers, tokens, positions, mask
        self.top_ids, self.top_probs, self.top_tokens, self.entropy = top_ids, top_probs, top_tokens, entropy
        self.targets, self.target_logprobs, self.target_ranks = targets, target_logprobs, target_ranks
        self.kl_from_unsteered, self.steered = kl_from_unsteered, steered

    @property
    def target_probs(self) -> Tensor:
        return self.target_logprobs.exp()

    def first_layer_on_top(self, target: int = 0, prompt: int = 0, pos: int = -1) -> Optional[int]:
        """The first layer from which ``targets[target]`` stays the top-1 token to the end (``None``: never)."""
        if not 0 <= target < len(self.targets):
            raise ValueError(f"No target {target}: this lens kept {len(self.targets)} targets; pass the tokens "
                             "to follow as logit_lens(..., targets=[...]).")
        p = self._pos(prompt, pos)
        tid = self.targets[target]
        first = None
        for j in range(len(self.layers) - 1, -1, -1):
            if int(self.top_ids[prompt, j, p, 0]) != tid:
                break
            first = self.layers[j]
        return first

    def _pos(self, prompt: int, pos: int) -> int:
        n = int(self.mask[prompt].sum())
        if isinstance(pos, bool) or not -n <= pos < n:
            raise IndexError(f"pos={pos!r}: prompt {prompt} has {n} positions read (0..{n - 1}, or -{n}..-1).")
        return pos % n

    def table(self, prompt: int = 0, pos: int = -1) -> list[list]:
        """``[layer, top-1 token, its probability, top-k tokens, entropy, target probabilities...]``."""
        p = self._pos(prompt, pos)
        return [[l, self.top_tokens[prompt][j][p][0], float(self.top_probs[prompt, j, p, 0]),
                 " ".join(repr(t) for t in self.top_tokens[prompt][j][p]), float(self.entropy[prompt, j, p])]
                + [float(x) for x in self.target_probs[prompt, j, p]] for j, l in enumerate(self.layers)]

    def to_dict(self) -> dict:
        n = len(self.tokens)
        return {"model": self.model_name, "layers": self.layers, "steered": self.steered, "targets": self.targets,
                "prompts": [{"tokens": self.tokens[i], "positions": self.positions[i],
                             "top": [[self.top_tokens[i][j][p] for p in range(len(self.positions[i]))]
                                     for j in range(len(self.layers))],
                             "top_probs": self.top_probs[i, :, :len(self.positions[i])].tolist(),
                             "target_logprobs": self.target_logprobs[i, :, :len(self.positions[i])].tolist(),
                             "target_ranks": self.target_ranks[i, :, :len(self.positions[i])].tolist(),
                             "kl_from_unsteered": None if self.kl_from_unsteered is None
                             else self.kl_from_unsteered[i, :, :len(self.positions[i])].tolist()}
                            for i in range(n)]}

    def plot(self, prompt: int = 0, path=None, target_names: Optional[Sequence[str]] = None):
        """Top-1 token and its probability per layer (rows) and selected position (columns), and
        the targets' log-probabilities per layer at the last selected position."""
        from ..plotting import PALETTE, finish, plt, token_labels

        n_pos = int(self.mask[prompt].sum())
        has_t = len(self.targets) > 0
        fig, axes = plt.subplots(1, 2 if has_t else 1, figsize=(min(3 + 1.3 * n_pos, 14) + (4 if has_t else 0),
                                                                  max(3.5, 0.22 * len(self.layers) + 1.5)),
                                 squeeze=False, gridspec_kw={"width_ratios": [max(n_pos, 1), 3]} if has_t else None)
        ax = axes[0, 0]
        probs = self.top_probs[prompt, :, :n_pos, 0].numpy()
        im = ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower", interpolation="nearest")
        for j in range(len(self.layers)):
            for p in range(n_pos):
                ax.text(p, j, repr(self.top_tokens[prompt][j][p][0])[1:-1][:10], ha="center", va="center", fontsize=6,
                        color="white" if probs[j, p] < 0.6 else "black")
        ax.set_yticks(range(len(self.layers)))
        ax.set_yticklabels(self.layers, fontsize=6)
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_pos))
        pos_tokens = [self.tokens[prompt][q] for q in self.positions[prompt]]
        ax.set_xticklabels([f"{lab.split('_')[0]}_{q}" for lab, q in zip(token_labels(pos_tokens), self.positions[prompt])],
                           rotation=45, ha="right", fontsize=7)
        fig.colorbar(im, ax=ax, label="top-1 probability")
        ax.set_title(f"logit lens{' (steered)' if self.steered else ''}: top-1 token per layer", fontsize=9)
        if has_t:
            ax2 = axes[0, 1]
            names = list(target_names or [repr(t) for t in self.target_strings])
            for t in range(len(self.targets)):
                ax2.plot(self.target_logprobs[prompt, :, n_pos - 1, t].numpy(), self.layers, marker=".",
                         color=PALETTE[t % len(PALETTE)], label=names[t])
            ax2.set_xlabel("log-probability at the last selected position")
            ax2.set_ylabel("layer")
            ax2.grid(alpha=0.3)
            ax2.legend(fontsize=7)
        fig.tight_layout()
        return finish(fig, path)
    def _title(self) -> str:
        return f"LogitLens of {self.model_name}{' (steered)' if self.steered else ''}: {len(self.tokens)} prompts"

    def _fields(self):
        f = [("layers", f"{self.layers[0]}..{self.layers[-1]} ({len(self.layers)})"),
             ("targets", self.target_strings)]
        if self.kl_from_unsteered is not None:
            kl = self.kl_from_unsteered[:, :, :][self.mask[:, None, :].expand_as(self.kl_from_unsteered)]
            f.append(("KL from the unsteered lens", f"mean {float(kl.mean()):.4f}, max {float(kl.max()):.4f}"))
        return f

    def _table(self):
        names = [f"P({t!r})" for t in self.target_strings]
        return ["layer", "top-1", "p", "top-k", "entropy"] + names, self.table(0, -1)


@torch.no_grad()
def logit_lens(model, prompts: Sequence, *, layers="all", positions="last", targets: Sequence = (), k: int = 5,
               include_sink: bool = True, steering=None, compare: bool = False, batch_size: int = 16,
               chunk: int = 256) -> LogitLens:
    """Decode every chosen layer's ``resid_post`` at the tokens picked by ``positions`` (any
    :mod:`steer.positions` selector) through the final norm and unembedding (see the module doc).

    ``targets``: token ids or strings (a string is its first token, as in ``model.to_tokens``)
    whose probability is kept at every layer. ``steering``: a :class:`~steer.steering.Steering`
    (not yet entered) under which the lens runs; ``compare=True`` also runs the unsteered model
    and keeps each entry's KL(steered ‖ unsteered). ``chunk``: residuals decoded at once.

    >>> import steer
    >>> m = steer.load("tiny-llama")
    >>> lens = logit_lens(m, [steer.Raw("Hello there"), steer.Raw("Hi")], targets=["e"], positions="all")
    >>> lens.target_probs.shape, lens.mask.sum(-1).tolist()
    (torch.Size([2, 2, 11, 1]), [11, 2])
    """
    from ..capture import capture

    if compare and steering is None:
        raise ValueError("compare=True compares a steered lens with the unsteered one: pass steering=.")
    target_ids = [_token_id(model, t) for t in targets]

    def residuals(s=None):
        return capture(model, prompts, layers=layers, site="resid_post", positions=positions, include_sink=include_sink,
                       batch_size=batch_size, progress=False, device=None, dtype=None, steering=s)

    with steering if steering is not None else contextlib.nullcontext() as s:
        a = residuals(s)
    ref = residuals() if compare else None
    t = a.tensor if a.has_pos else a.tensor[:, :, None]  # [n, layer, pos, d]
    mask = a.mask if a.has_pos else torch.ones(t.shape[0], 1, dtype=torch.bool)
    n, L, P, d = t.shape
    flat = t.reshape(-1, d)
    rflat = None if ref is None else (ref.tensor if ref.has_pos else ref.tensor[:, :, None]).reshape(-1, d)
    kk = min(k, model.d_vocab)
    top_ids = torch.zeros(n * L * P, kk, dtype=torch.long)
    top_p = torch.zeros(n * L * P, kk)
    ent = torch.zeros(n * L * P)
    tp = torch.zeros(n * L * P, len(target_ids))
    tr = torch.zeros(n * L * P, len(target_ids), dtype=torch.long)
    kl = None if rflat is None else torch.zeros(n * L * P)
    valid = mask[:, None, :].expand(n, L, P).reshape(-1)
    rows = valid.nonzero()[:, 0]
    for s in range(0, len(rows), chunk):
        r = rows[s:s + chunk]
        lp = decode(model, flat[r.to(flat.device)]).float().log_softmax(-1)
        p = lp.exp()
        v, i = p.topk(kk, dim=-1)
        top_ids[r], top_p[r] = i.cpu(), v.cpu()
        ent[r] = -(p * lp).sum(-1).cpu()
        if target_ids:
            t_lp = lp[:, target_ids]
            tp[r] = t_lp.cpu()
            tr[r] = (lp[:, None, :] > t_lp[:, :, None]).sum(-1).cpu()
        if kl is not None:
            lq = decode(model, rflat[r.to(rflat.device)]).float().log_softmax(-1)
            kl[r] = (p * (lp - lq)).sum(-1).clamp(min=0).cpu()
    shape = (n, L, P)
    top_ids, top_p = top_ids.view(*shape, kk), top_p.view(*shape, kk)

    tokens, pos_lists = _positions(model, prompts, positions, include_sink, batch_size)
    @functools.lru_cache(maxsize=None)
    def s(tid):
        return model.tokenizer.decode([tid])

    top_tokens = [[[[s(int(x)) for x in top_ids[i, j, q]] for q in range(P)] for j in range(L)] for i in range(n)]
    lens = LogitLens(model.name, a.layers, tokens, pos_lists, mask.cpu(), top_ids, top_p, top_tokens, ent.view(shape),
                     target_ids, tp.view(*shape, len(target_ids)), tr.view(*shape, len(target_ids)),
                     None if kl is None else kl.view(shape),
                     steered=steering is not None)
    lens.target_strings = [s(t) for t in target_ids]
    return lens


def _token_id(model, t) -> int:
    if isinstance(t, int):
        if not 0 <= t < model.d_vocab:
            raise ValueError(f"target token id {t} outside the vocabulary (0..{model.d_vocab - 1}).")
        return t
    ids = model.tokenizer(t, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"target {t!r} has no tokens.")
    return ids[0]


def _positions(model, prompts, positions, include_sink, batch_size) -> tuple[list[list[str]], list[list[int]]]:
    """Each prompt's own tokens and the selected positions among them (the order capture packs them in)."""
    from .. import positions as Pm
    from ..data import tokenize

    tokens, pos = [], []
    prompts = prompt_list(prompts)
    for i in range(0, len(prompts), batch_size):
        b = tokenize(model, prompts[i:i + batch_size])
        m = Pm.mask(positions, b, include_sink=include_sink)
        starts = b.input_ids.shape[1] - b.lengths
        for r in range(len(b.input_ids)):
            s = int(starts[r])
            tokens.append([model.tokenizer.decode([t]) for t in b.input_ids[r, s:].tolist()])
            pos.append([int(q) - s for q in m[r].nonzero()[:, 0].tolist()])
    return tokens, pos
