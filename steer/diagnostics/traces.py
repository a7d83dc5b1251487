"""Per-token probe traces: a direction or probe read at every token of the prompt and of the
generation ("refusal cliff": a refusal probe stays high through a reasoning model's thinking and
drops just before its answer; METHODS.md §5).

:func:`probe_trace` generates greedily with HF ``generate`` and reads the probe with a hook in
that same pass: the prefill gives every prompt token's reading, each decode step the reading of
the token it feeds. No extra forward is run, so the last generated token (never fed back) has no
reading. Under a :class:`~steer.steering.Steering` the generation and the readings are the
steered ones, so a trace with and without steering shows where steering moves the probe.

The probe is anything with a score: a vector (the projection on its unit direction), a
:class:`~steer.directions.Direction`, a CAST :class:`~steer.conditions.Condition` (its score), or
a FASB :class:`~steer.backtracking.Probe` (its probability).

>>> import steer, torch
>>> m = steer.load("tiny-llama")
>>> tr = probe_trace(m, [steer.Raw("Hi"), steer.Raw("Hello there")], torch.randn(64), layer=1, max_new_tokens=3)
>>> tr.scores.shape, tr.prompt_len.tolist(), tr.gen_len.tolist()    # [prompt, pos]: prompt then generation
(torch.Size([2, 14]), [2, 11], [3, 3])
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..data import prompt_list
from ..display import Rich

__all__ = ["probe_trace", "ProbeTrace"]


def _scorer(model, probe, layer: Optional[int]):
    """``(layer, h -> score)`` for any supported probe."""
    from ..backtracking import Probe
    from ..conditions import Condition
    from ..directions import Direction
    from ..sites import resolve_layers

    if isinstance(probe, Probe):
        return probe.layer, lambda h: probe.prob(h)
    if isinstance(probe, Condition):
        return probe.layer, lambda h: probe.score(h)
    if isinstance(probe, Direction):
        layer = probe.layer if layer is None else layer
        v = probe.vector(layer)
    else:
        v = torch.as_tensor(probe)
        if v.ndim == 2:  # per-layer vectors
            if layer is None:
                raise ValueError("A [n_layers, d_model] probe needs layer=.")
            v = v[layer]
    if layer is None:
        raise ValueError("A vector probe needs layer=: the layer whose resid_post it reads.")
    (layer,) = resolve_layers(model, layer)  # a negative layer counts from the end, as everywhere
    if v.shape != (model.d_model,):
        raise ValueError(f"probe vector has shape {tuple(v.shape)}; {model.name} needs [{model.d_model}].")
    u = (v / v.norm()).float()
    return layer, lambda h: h.float() @ u.to(h.device)


class ProbeTrace(Rich):
    """The readings of :func:`probe_trace`: ``scores`` ``[prompt, pos]`` over each prompt's own
    tokens then its generated tokens (NaN where there is no reading: padding, the last generated
    token, after an end of turn), ``prompt_len`` and ``gen_len`` per prompt, ``ids`` and
    ``tokens`` (token ids and strings, prompt then generation), ``texts`` (the generations) and
    ``probe`` (what was read)."""

    def __init__(self, model_name, layer, scores, prompt_len, gen_len, ids, tokens, texts, steered=False, probe=None):
        self.model_name, self.layer, self.scores, self.ids, self.probe = model_name, layer, scores, ids, probe
        self.prompt_len, self.gen_len, self.tokens, self.texts, self.steered = prompt_len, gen_len, tokens, texts, steered

    def prompt_scores(self, i: int) -> Tensor:
        return self.scores[i, : int(self.prompt_len[i])]

    def generation_scores(self, i: int) -> Tensor:
        """Readings of the generated tokens of prompt ``i`` (the last one has none: NaN)."""
        p = int(self.prompt_len[i])
        return self.scores[i, p: p + int(self.gen_len[i])]

    def largest_drop(self, i: int, sink: bool = False) -> dict:
        """Where the score falls most between two consecutive readings of prompt ``i`` (the
        attention sink's reading left out unless ``sink``)."""
        s = self.scores[i]
        start = 0 if sink else 1
        d = s[start + 1:] - s[start:-1]
        d = torch.where(torch.isnan(d), torch.inf, d)
        j = int(d.argmin()) + start + 1
        return {"position": j, "token": self.tokens[i][j] if j < len(self.tokens[i]) else None,
                "in_generation": j >= int(self.prompt_len[i]), "drop": float(d.min()),
                "before": float(s[j - 1]), "after": float(s[j])}

    def to_dict(self) -> dict:
        return {"model": self.model_name, "layer": self.layer, "steered": self.steered,
                "rows": [{"tokens": self.tokens[i], "prompt_len": int(self.prompt_len[i]), "text": self.texts[i],
                          "scores": [None if x != x else x for x in self.scores[i, : len(self.tokens[i])].tolist()]}
                         for i in range(len(self.texts))]}

    def plot(self, rows: Optional[Sequence[int]] = None, path=None, other: Optional["ProbeTrace"] = None,
             labels: Sequence[str] = ("unsteered", "steered")):
        """The trace of each row over its tokens (the prompt shaded); with ``other`` (e.g. the
        steered trace of the same prompts) both, one panel per row."""
        from ..plotting import PALETTE, finish, plt

        rows = list(range(min(len(self.texts), 4))) if rows is None else list(rows)
        fig, axes = plt.subplots(len(rows), 1, figsize=(8, 2.1 * len(rows) + 0.6), squeeze=False)
        for ax, i in zip(axes[:, 0], rows):
            for k, tr in enumerate([self] + ([other] if other is not None else [])):
                s = tr.scores[i, : len(tr.tokens[i])].numpy()
                ax.plot(range(len(s)), s, color=PALETTE[k], lw=1.2, label=labels[k] if other is not None else None)
            ax.axvspan(-0.5, int(self.prompt_len[i]) - 0.5, color="0.9", zorder=0)
            ax.set_ylabel("score", fontsize=8)
            ax.set_title(repr(self.texts[i][:90]), fontsize=7, loc="left")
            ax.grid(alpha=0.3)
            if other is not None:
                ax.legend(fontsize=7, loc="upper right")
        axes[-1, 0].set_xlabel("token (shaded: the prompt)")
        fig.suptitle(f"{self.model_name}: probe at resid_post.{self.layer}, every token", fontsize=9)
        fig.tight_layout()
        return finish(fig, path)
    def _title(self) -> str:
        return f"ProbeTrace{' (steered)' if self.steered else ''} at resid_post.{self.layer}: {len(self.texts)} prompts"

    def _table(self):
        rows = []
        for i in range(len(self.texts)):
            g = self.generation_scores(i)
            g = g[~torch.isnan(g)]
            d = self.largest_drop(i)
            rows.append([i, float(self.prompt_scores(i)[-1]), float(g.mean()) if len(g) else float("nan"),
                         d["token"], d["drop"], self.texts[i][:50]])
        return ["row", "last prompt token", "mean over generation", "largest drop at", "drop", "text"], rows


@torch.no_grad()
def probe_trace(model, prompts: Sequence, probe, layer: Optional[int] = None, *, max_new_tokens: int = 32,
                steering=None) -> ProbeTrace:
    """Generate greedily from ``prompts`` and read ``probe`` at ``resid_post.layer`` at every token
    of prompt and generation, in the generation pass itself (see the module doc). ``steering``: a
    :class:`~steer.steering.Steering` (not yet entered) to generate under.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> v = torch.randn(64)
    >>> st = steer.steer(m, v, layer=0, strength=4.0)
    >>> tr = probe_trace(m, [steer.Raw("Hi")], v, layer=1, max_new_tokens=4, steering=st)
    >>> tr.steered, tuple(tr.scores.shape), int(tr.prompt_len[0]) + int(tr.gen_len[0])   # [prompt, pos]
    (True, (1, 6), 6)
    """
    from .._hf import eos_ids
    from ..data import tokenize
    from ..hooks import add_hooks, call_positions

    layer, score = _scorer(model, probe, layer)
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be ≥ 1.")
    batch = tokenize(model, prompt_list(prompts)).to(model.device)
    B, T = batch.input_ids.shape
    steps: list[Tensor] = []
    fresh = [False]  # the current forward call starts a sequence (no cached tokens)

    def on_call(module, args, kwargs):
        fresh[0] = call_positions(args, kwargs).past == 0

    def grab(act, site):
        if fresh[0]:  # a prompt pass: a CAST condition's pre-pass comes before the prefill, which reads last
            steps.clear()
        steps.append(score(act).float().cpu())  # prefill: [B, T]; decode: [B, 1]

    def run():
        handle = model.base.register_forward_pre_hook(on_call, with_kwargs=True)
        try:
            with add_hooks(model, {f"resid_post.{layer}": grab}):
                return model.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                         num_return_sequences=1,  # one row per prompt, whatever the
                                         pad_token_id=model.tokenizer.pad_token_id)  # model's config says
        finally:
            handle.remove()

    if steering is not None:
        # the probe's block must run in the prefill: not skipped, nor run for some rows on their own,
        # as a prefill resuming from a condition's pre-pass may (the same tokens either way)
        resume, steering.resume = steering.resume, False
        try:
            with steering as s:
                s.batch = batch
                out = run()
        finally:
            steering.resume = resume
    else:
        out = run()
    new = out[:, T:].cpu()
    eos = eos_ids(model)
    lengths = batch.lengths.cpu()
    starts = T - lengths
    gen_len = torch.tensor([next((k + 1 for k, t in enumerate(r) if t in eos), len(r)) for r in new.tolist()])
    width = int((lengths + gen_len).max())
    scores = torch.full((B, width), float("nan"))
    fed = torch.cat(steps, 1)  # [B, T + steps - 1]: prompt columns, then one per fed generated token
    all_ids, tokens, texts = [], [], []
    for i in range(B):
        p, g, s = int(lengths[i]), int(gen_len[i]), int(starts[i])
        scores[i, :p] = fed[i, s:T]
        n_fed = min(g - 1, fed.shape[1] - T)  # generated tokens that were fed back (all but the last)
        if n_fed > 0:
            scores[i, p: p + n_fed] = fed[i, T: T + n_fed]
        ids = batch.input_ids[i, s:].tolist() + new[i, :g].tolist()
        all_ids.append(ids)
        tokens.append([model.tokenizer.decode([t]) for t in ids])
        texts.append(model.tokenizer.decode(new[i, :g], skip_special_tokens=True))
    return ProbeTrace(model.name, layer, scores, lengths, gen_len, all_ids, tokens, texts, steered=steering is not None,
                      probe=probe)
