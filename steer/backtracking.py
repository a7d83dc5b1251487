"""Dynamic steering with backtracking — FASB (Gan et al., "Steering When Necessary: Flexible
Steering Large Language Models with Backtracking", 2025).

A probe reads the hidden state at every step of a greedy generation, question and generated text
alike. While the probability of the desired behaviour stays at or above ``threshold``, a row is
generated unsteered. The first time it falls below, the row *backs up* its last ``backtrack``
generated tokens (steering after the deviation is too late) and continues steered from there,
with a strength that grows with the deviation:

    α = strength · (1 + (threshold − p) / threshold)      (strength at the threshold, 2·strength at p = 0)

Rows decide independently; a row whose probe never fires is generated exactly as without
steering (its strength stays 0).

How backing up works in one batched KV cache: every step feeds one column for every row. A row
that backs up ``k`` tokens masks out the cache columns of the discarded tokens and of its last
kept token, and feeds that last kept token again (at its old position id) with the steering on,
so the next token is predicted from a steered state. The cache keeps holes where discarded tokens
were; the 2-D attention mask hides them and explicit position ids keep every kept token at its
position. Backing up costs no extra forward pass: it replaces that row's step, but a row that
backs up needs that many more steps; finished rows leave the batch, so those steps compute only
the rows still generating.

The steering is an ``"add"`` :class:`~steer.interventions.Intervention` run by
:class:`~steer.steering.Steering` (the attention sink is left alone), with one strength per row
that this loop sets before each step.

>>> import steer, torch
>>> m = steer.load("tiny-llama")
>>> probe = Probe(torch.zeros(64), bias=5.0, layer=1)               # p ≈ 0.99: never fires
>>> r = generate(m, ["Hi", "Hello"], torch.randn(64), layer=1, strength=4.0, probe=probe, max_new_tokens=4)
>>> r.triggered.tolist(), r.steered_tokens.tolist()
([False, False], [0, 0])
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .data import prompt_list
from .display import Rich
from .interventions import Intervention
from .progress import bar
from .sites import Site

__all__ = ["Probe", "fit_probe", "generate", "BacktrackResult"]


@dataclass(repr=False)
class Probe(Rich):
    """Logistic probe ``P(desired | h) = σ(h·w + b)`` on ``site`` at ``layer``."""

    vector: Float[Tensor, "d_model"]
    bias: float
    layer: int
    site: str = "resid_post"
    meta: dict = field(default_factory=dict)

    def prob(self, h: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch"]:
        return torch.sigmoid(h.float() @ self.vector.to(h.device).float() + self.bias)

    def save(self, path) -> None:
        """Save as safetensors with JSON metadata in the header (atomic write).

        >>> import torch, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "probe.safetensors")
        >>> Probe(torch.ones(4), -1.5, layer=3, meta={"n": 2}).save(p)
        >>> q = Probe.load(p); q.bias, q.layer, q.meta
        (-1.5, 3, {'n': 2})
        """
        from .capture import _save_tagged

        _save_tagged(path, {"vector": self.vector.float()}, "steer_probe",
                     {"bias": self.bias, "layer": self.layer, "site": self.site, "meta": self.meta})

    @classmethod
    def load(cls, path, model=None) -> "Probe":
        """Load a saved probe; with ``model``, check that it fits (d_model, layer)."""
        from .capture import _load_tagged

        tensors, head = _load_tagged(path, "steer_probe", "Probe")
        vector = tensors["vector"]
        probe = cls(vector, float(head["bias"]), int(head["layer"]), head["site"], head["meta"])
        if model is not None and (vector.shape != (model.d_model,) or not 0 <= probe.layer < model.n_layers):
            raise ValueError(f"{path} holds a probe of width {vector.shape[0]} at layer {probe.layer}; {model.name} has "
                             f"d_model {model.d_model} and layers 0..{model.n_layers - 1}: fit one on this model.")
        return probe

    def _fields(self):
        return [("P(desired)", f"σ(h·w + b) at {self.site}.{self.layer}"), ("‖w‖", float(self.vector.norm())),
                ("b", self.bias)] + [(k, v) for k, v in self.meta.items() if isinstance(v, (int, float, str))]


def fit_probe(desired: Float[Tensor, "n d_model"], undesired: Float[Tensor, "m d_model"], layer: int,
              site: str = "resid_post", l2: float = 1e-2) -> Probe:
    """L2-regularised logistic regression of desired (1) vs undesired (0) hidden states.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randn(50, 8, generator=g) + 2, torch.randn(50, 8, generator=g) - 2
    >>> p = fit_probe(a, b, layer=0)
    >>> bool(p.prob(a).mean() > 0.9 and p.prob(b).mean() < 0.1)
    True
    """
    from .directions import _probe

    desired, undesired = torch.as_tensor(desired).float(), torch.as_tensor(undesired).float()
    if len(desired) < 2 or len(undesired) < 2:
        raise ValueError(f"fit_probe needs ≥ 2 states of each kind (got {len(desired)} desired, {len(undesired)} undesired).")
    w, b = _probe(desired, undesired, l2=l2, with_bias=True)
    acc = float(((torch.sigmoid(desired @ w + b) >= 0.5).float().sum() + (torch.sigmoid(undesired @ w + b) < 0.5).float().sum())
                / (len(desired) + len(undesired)))
    return Probe(w, b, int(layer), site, {"n_desired": len(desired), "n_undesired": len(undesired), "train_accuracy": acc})


@dataclass(repr=False)
class BacktrackResult(Rich):
    """What :func:`generate` did, per row: the accepted tokens and texts, whether and where the
    probe fired (``trigger_step``: accepted tokens at that moment, −1 if never), the strength it
    chose, how many tokens it discarded and how many forward columns ran steered, and the probe's
    probability at every step (``probs[r]``: one value per fed column, discarded ones included)."""

    texts: list
    tokens: list
    triggered: Tensor
    trigger_step: Tensor
    strength: Tensor
    discarded: Tensor
    steered_tokens: Tensor
    probs: list
    steps: int
    seconds: float
    threshold: float
    backtrack: int
    reencoded: Optional[Tensor] = None  # rows whose prompt was read again steered (reencode_prompt)
    fired_column: Optional[Tensor] = None  # index into probs[r] of the reading that fired row r (−1: never)
    model: str = ""  # the model's name, for the figure's title

    @property
    def accepted(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def steered_fraction(self) -> float:
        """Steered forward columns over accepted tokens (the whole batch)."""
        return float(self.steered_tokens.sum()) / max(self.accepted, 1)

    @property
    def tokens_per_second(self) -> float:
        """Accepted tokens per second of the generation loop."""
        return self.accepted / self.seconds if self.seconds else float("nan")

    def plot(self, path=None, ax=None, groups: Optional[Sequence[str]] = None, title: str = ""):
        """The probe's ``P(desired)`` at every fed column of each row, the threshold, and a dot
        where each row fired; one colour per entry of ``groups`` (a label per row), else fired
        vs never fired. Saved to ``path`` when given; returns the figure.

        >>> import steer, torch
        >>> m = steer.load("tiny-llama")
        >>> low = Probe(torch.zeros(64), bias=-5.0, layer=1)
        >>> r = generate(m, ["Hi", "Yo"], torch.randn(64), layer=1, strength=4.0, probe=low, max_new_tokens=3)
        >>> fig = r.plot(groups=["a", "b"])
        >>> sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts())
        ['a', 'b', 'fired', 'threshold']
        """
        from . import plotting

        n = len(self.probs)
        if groups is None:
            groups = ["fired" if f else "never fired" for f in self.triggered.tolist()]
        groups = [str(g) for g in groups]
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} labels for {n} rows: give one per row.")
        colour = {g: plotting.PALETTE[i % len(plotting.PALETTE)] for i, g in enumerate(dict.fromkeys(groups))}
        fig, ax = plotting._fig_ax(ax, (6, 3.6))
        seen = set()
        for r, pr in enumerate(self.probs):
            ax.plot(pr, color=colour[groups[r]], alpha=0.5, lw=1, label=None if groups[r] in seen else groups[r])
            seen.add(groups[r])
        cols = self.fired_column.tolist() if self.fired_column is not None else [-1] * n
        xs = [c for c in cols if c >= 0]
        ys = [self.probs[r][c] for r, c in enumerate(cols) if c >= 0]
        if xs:
            ax.scatter(xs, ys, s=12, color="k", zorder=3, label="fired")
        ax.axhline(self.threshold, color="k", ls="--", lw=0.8, label="threshold")
        ax.set_xlabel("generation step (fed column)")
        ax.set_ylabel("probe P(desired)")
        ax.set_ylim(-0.02, 1.02)
        default = f"FASB probe traces (back {self.backtrack} tokens on firing)"
        ax.set_title(title or (f"{self.model}: {default}" if self.model else default), fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return plotting.finish(fig, path)

    def _title(self) -> str:
        return f"BacktrackResult ({len(self.texts)} rows)"

    def _fields(self):
        return [("fired", f"{int(self.triggered.sum())} / {len(self.texts)} rows (threshold {self.threshold:g}, "
                          f"back {self.backtrack} tokens)"),
                ("steered / accepted tokens", f"{int(self.steered_tokens.sum())} / {self.accepted}"),
                ("prompts read again steered", int(self.reencoded.sum()) if self.reencoded is not None else 0),
                ("steps", self.steps), ("accepted tokens / s", self.tokens_per_second)]

    def _table(self):
        rows = [[i, bool(self.triggered[i]), int(self.trigger_step[i]), float(self.strength[i]), int(self.discarded[i]),
                 int(self.steered_tokens[i]), self.texts[i][:60]] for i in range(len(self.texts))]
        return ["row", "fired", "at token", "α", "discarded", "steered", "text"], rows


def _reencode(model, batch, mask, rows: list, alpha: list, iv: Intervention, grabbed: list, logits, cache, kw):
    """Prefill the ``rows`` flagged again, each steered at its ``alpha`` (``iv``'s edit at every
    position but the sink), and put their last logits, probe readings and KV-cache rows in place of
    the unsteered ones. Where the cache is not plain per-layer key/value tensors, the whole batch is
    prefilled again instead (the other rows at strength 0, so their states are unchanged)."""
    from ._hf import assign_cache_rows, output_cache
    from .steering import Steering

    idx = torch.tensor([r for r, f in enumerate(rows) if f], device=mask.device)
    reading = grabbed.pop()
    sub_iv = dataclasses.replace(iv, strength=torch.tensor([alpha[r] for r in idx.tolist()]))
    with Steering(model, [sub_iv]):
        sub = model.hf(input_ids=batch.input_ids[idx], attention_mask=mask[idx], position_ids=batch.position_ids[idx],
                       use_cache=True, **kw)
    sub_reading = grabbed.pop()
    if assign_cache_rows(cache, idx, output_cache(sub)):
        logits, reading = logits.clone(), reading.clone()
        logits[idx], reading[idx] = sub.logits.to(logits.dtype), sub_reading.to(reading.dtype)
        grabbed.append(reading)
        return logits, cache
    with Steering(model, [dataclasses.replace(iv, strength=torch.tensor([a if f else 0.0 for a, f in zip(alpha, rows)]))]):
        out = model.hf(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=True,
                       **kw)
    return out.logits, output_cache(out)


def _staged_prefill(model, batch, mask, layer: int, P: int, decide, alpha: list, iv: Intervention, grabbed: list,
                    kw, cache_kw: str):
    """The prefill with the prompt's check in the middle, so that no block runs twice without need:
    blocks up to the probe's (``P``) for every row, unsteered; the check (``decide(reading) -> rows
    that fired``); blocks ``layer ..`` again for the rows that fired, steered at their ``alpha``,
    from the input block ``layer`` had (below it nothing changes), up to ``P``; then blocks
    ``P + 1 ..`` once for every row, from each row's own state. With the probe in the last block
    the first pass runs the whole model and the rows that fired run from ``layer`` to the end. The
    cache and logits :func:`_reencode` gives; None (before any decision) where the cache or the
    blocks are not plain."""
    from ._hf import assign_cache_rows, empty_cache, output_cache, splice_cache_layers
    from .hooks import record_block_input, resume_at, run_blocks
    from .steering import Steering

    B, T = batch.input_ids.shape
    top = P + 1 < model.n_layers  # blocks above the probe's, run once for every row at the end

    def run(rows, start_resid, cache):
        """Blocks from ``layer`` (or 0) up to the probe's (or the end): (output, input to block P + 1)."""
        ids = (batch.input_ids, mask, batch.position_ids) if rows is None else \
            (batch.input_ids[rows], mask[rows], batch.position_ids[rows])
        return run_blocks(model, lambda: model.hf(input_ids=ids[0], attention_mask=ids[1], position_ids=ids[2],
                                                  use_cache=True, **{cache_kw: cache}, **kw),
                          layer, P + 1, start_resid)

    first = empty_cache(model.hf)
    if first is None:
        return None
    n_readings = len(grabbed)
    with record_block_input(model, layer) as at_l:
        out, at_p = run(None, None, first)
    plain = [at_l] + ([at_p] if top else [])
    if not all(r.get("bare") and tuple(r["resid"].shape) == (B, T, model.d_model) for r in plain) \
            or len(grabbed) != n_readings + 1:
        del grabbed[n_readings:]
        return None
    reading = grabbed.pop()
    logits = None if top else out.logits
    resid = at_p.get("resid")
    fired = decide(reading)
    if any(fired):
        idx = torch.tensor([r for r, f in enumerate(fired) if f], device=mask.device)
        sub_cache = empty_cache(model.hf)
        sub_iv = dataclasses.replace(iv, strength=torch.tensor([alpha[r] for r in idx.tolist()]))
        with Steering(model, [sub_iv]):
            sub, sub_p = run(idx, at_l["resid"][idx.to(at_l["resid"].device)], sub_cache)
        reading = reading.clone()
        reading[idx.to(reading.device)] = grabbed.pop().to(reading)  # blocks may sit on other devices
        if top:
            resid = resid.clone()
            resid[idx.to(resid.device)] = sub_p["resid"].to(resid)
        else:
            logits = logits.clone()
            logits[idx.to(logits.device)] = sub.logits.to(logits)
        if not assign_cache_rows(first, idx, sub_cache, start=layer, stop=P + 1):
            raise RuntimeError("FASB's staged prefill could not write the steered rows into the cache.")
    grabbed.append(reading)
    if not top:
        return logits, first
    with resume_at(model, P + 1, resid):
        out = model.hf(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=True,
                       **kw)
    cache = output_cache(out)
    if not splice_cache_layers(cache, first, P + 1):
        raise RuntimeError("FASB's staged prefill could not join the two halves of the cache.")
    return out.logits, cache


@torch.no_grad()
def generate(model, prompts: Sequence, vector: Float[Tensor, "d_model"], *, layer: int, strength: float,
             probe: Probe, threshold: float = 0.5, backtrack: int = 4, max_new_tokens: int = 32,
             sites: str = "resid_post", watch_prompt: bool = True, window: int = 1,
             min_new_tokens: int = 0, reencode_prompt: bool = False, resume_blocks: bool = True,
             drop_finished: bool = True, progress: Optional[bool] = None) -> BacktrackResult:
    """Greedy generation with FASB: unsteered until the probe's ``P(desired)`` drops below
    ``threshold``, then back up ``backtrack`` tokens and steer ``+α·vector`` at ``layer`` for the
    rest of that row (see the module doc for α and the mechanics). Stops a row at an end-of-turn
    token or after ``max_new_tokens`` accepted tokens. ``watch_prompt=False`` starts watching at
    the first generated token (for a probe trained on response tokens only: the prompt's last
    state is not one it has seen). ``min_new_tokens`` forbids end-of-turn tokens before a row has
    that many accepted tokens, as in HF ``generate``. ``window > 1`` decides on the mean of the row's last ``window``
    watched readings (a per-token probe is noisy), rather than on the current one alone.
    ``progress``: a bar over the decoding steps (default: where someone watches; :mod:`steer.progress`).

    A row that fires at its first check (the prompt's last state, with ``watch_prompt``) has no
    token to back up, and by default only its prompt's last token is fed again steered: the rest
    of the prompt stays as it was read unsteered. ``reencode_prompt=True`` instead runs the prompt
    again with those rows steered at every position but the sink, as constant steering reads it
    (one more prefill of just those rows, their KV-cache rows replaced; the other rows are not
    touched). ``BacktrackResult.reencoded`` marks those rows. With ``resume_blocks`` (when the probe
    reads at or after ``layer``) no block runs twice without need: below ``layer`` the steered and
    unsteered states are the same, so the prefill keeps its input to block ``layer``; it stops
    after the probe's block for the check; the rows that fire run blocks ``layer`` to the probe's
    again, steered; and the blocks above run once for every row. (With the probe in the last
    block, the whole prefill runs and the rows that fire run again from block ``layer`` on.)
    ``resume_blocks=False`` runs the whole model again for those rows (the same result, up to
    float rounding; for comparison). With ``resume_blocks``, hooks of your own on the blocks below
    ``layer`` see each prompt once (the stand-ins that skip those blocks skip their hooks too);
    without it they also see the rows read again.

    Rows that back up need more steps than the others, and the batch decodes in lockstep. With
    ``drop_finished`` (default), once a quarter of the batch has finished those rows leave it
    (their KV-cache rows too), so the remaining steps compute only rows still generating (HF
    ``generate`` keeps computing finished rows). Where the cache is not plain per-layer key/value
    tensors the batch keeps its rows. ``drop_finished=False`` keeps every row to the end.

    >>> import steer, torch
    >>> m = steer.load("tiny-llama")
    >>> probe = Probe(torch.zeros(64), bias=-5.0, layer=1)              # p ≈ 0.007: fires at once
    >>> r = generate(m, ["Hi"], torch.randn(64), layer=1, strength=4.0, probe=probe, max_new_tokens=3)
    >>> r.trigger_step.tolist(), r.steered_tokens.tolist(), len(r.tokens[0])
    ([0], [3], 3)
    """
    from ._hf import cache_kwarg, eos_ids, output_cache, select_cache_rows, unwrap_adapters
    from .data import tokenize
    from .hooks import add_hooks
    from .steering import Steering

    if not 0 < threshold < 1:
        raise ValueError(f"threshold is a probability in (0, 1), got {threshold}.")
    if backtrack < 0 or max_new_tokens < 1 or window < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError("backtrack must be ≥ 0, max_new_tokens ≥ 1, window ≥ 1 and 0 ≤ min_new_tokens ≤ max_new_tokens.")
    vector = torch.as_tensor(vector).float()
    if vector.shape != (model.d_model,):
        raise ValueError(f"vector has shape {tuple(vector.shape)}; {model.name} needs [{model.d_model}].")
    dev = model.device
    batch = tokenize(model, prompt_list(prompts)).to(dev)
    B, T = batch.input_ids.shape
    n_prompt = batch.attention_mask.sum(-1).tolist()
    st = torch.zeros(B, device=dev)  # per-row strength, set here before each step; Steering reads it each call
    iv = Intervention("add", vector, layers=[layer], sites=sites, strength=st, positions="all",
                      meta={"method": "fasb"})
    grabbed = []

    def grab(act, site):
        grabbed.append(act[:, -1])

    eos, pad = eos_ids(model), model.tokenizer.pad_token_id
    pad = pad if pad is not None else next(iter(eos), 0)
    tokens = [[] for _ in range(B)]
    cols = [[] for _ in range(B)]  # cache column of each accepted token
    last_prompt_col = [T - 1] * B
    probs = [[] for _ in range(B)]
    seen = [[] for _ in range(B)]  # the readings the decision looks at
    done = [False] * B
    triggered, trigger_step = [False] * B, [-1] * B
    alpha, discarded, steered = [0.0] * B, [0] * B, [0] * B
    mask = batch.attention_mask.clone()
    t0 = time.perf_counter()
    steps = 0
    # only the last position's logits are read: the prefill need not unembed every position
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.hf.forward).parameters else {}
    reencoded = [False] * B
    fired_col = [-1] * B
    cache_kw = cache_kwarg(unwrap_adapters(model.hf))  # PEFT passes it on

    def decide(reading) -> list:
        """The check at the prompt's end: rows below the threshold fire, to be read again steered."""
        p0 = probe.prob(reading).cpu()
        for r in range(B):
            if p0[r] < threshold:
                triggered[r], trigger_step[r], reencoded[r] = True, 0, True
                steered[r] = 1  # its prompt's last column, steered as a re-fed one would be (the prompt is not counted)
                alpha[r] = strength * (1 + (threshold - float(p0[r])) / threshold)
                probs[r].append(float(p0[r]))  # the unsteered reading that fired it
                fired_col[r] = 0
        return reencoded

    # a prompt read again steered need only run the blocks from the steered one on, if the probe
    # reads there too (_staged_prefill); otherwise the whole prefill runs and the rows that fire
    # run the whole model again (_reencode)
    staged = reencode_prompt and watch_prompt and 1 <= layer <= probe.layer and resume_blocks
    with add_hooks(model, {Site(probe.site, probe.layer): grab}):
        done_prefill = staged and _staged_prefill(model, batch, mask, layer, probe.layer, decide, alpha, iv, grabbed,
                                                  last_only, cache_kw)
        if done_prefill:
            logits, cache = done_prefill
        else:
            # the prefill is unsteered: no row is steered before its first reading
            out = model.hf(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                           use_cache=True, **last_only)
            logits, cache = out.logits, output_cache(out)
            if reencode_prompt and watch_prompt and any(decide(grabbed[-1])):
                logits, cache = _reencode(model, batch, mask, reencoded, alpha, iv, grabbed, logits, cache, last_only)
        rows = list(range(B))  # the prompt row at each position of the batch, which shrinks as rows finish
        stack = ExitStack()
        with stack:
            stack.enter_context(Steering(model, [iv]))
            # a step accepts a token in every live row, or feeds one again: about max_new_tokens steps
            for _ in bar(itertools.count(), desc="fasb", total=max_new_tokens, enabled=progress):
                steps += 1
                p = probe.prob(grabbed.pop()).cpu()
                last = logits[:, -1]
                nxt = last.argmax(-1).cpu()
                if min_new_tokens and any(not done[r] and len(tokens[r]) < min_new_tokens for r in rows):
                    no_eos = last.clone()
                    no_eos[:, sorted(i for i in eos if i < no_eos.shape[-1])] = float("-inf")
                    early = torch.tensor([len(tokens[r]) < min_new_tokens for r in rows])
                    nxt = torch.where(early, no_eos.argmax(-1).cpu(), nxt)
                n = len(rows)
                feed, pos, action = [pad] * n, [0] * n, [None] * n
                for i, r in enumerate(rows):
                    if done[r]:
                        continue
                    probs[r].append(float(p[i]))
                    if watch_prompt or tokens[r]:
                        seen[r].append(float(p[i]))
                    score = sum(seen[r][-window:]) / len(seen[r][-window:]) if seen[r] else 1.0
                    if seen[r] and not triggered[r] and score < threshold:  # deviation: back up, steer from there
                        triggered[r], trigger_step[r] = True, len(tokens[r])
                        fired_col[r] = len(probs[r]) - 1
                        kb = min(backtrack, len(tokens[r]))
                        if kb:
                            mask[i, cols[r][-kb:]] = 0
                            del tokens[r][-kb:], cols[r][-kb:]
                        discarded[r] = kb
                        mask[i, cols[r][-1] if cols[r] else last_prompt_col[r]] = 0  # its last kept token is fed again
                        alpha[r] = strength * (1 + (threshold - score) / threshold)
                        feed[i] = tokens[r][-1] if tokens[r] else int(batch.input_ids[r, last_prompt_col[r]])
                        action[i] = "refeed"
                    else:
                        tok = int(nxt[i])
                        if tok in eos:
                            done[r] = True
                            continue
                        tokens[r].append(tok)
                        if len(tokens[r]) >= max_new_tokens:
                            done[r] = True
                            continue
                        feed[i], action[i] = tok, "append"
                    pos[i] = n_prompt[r] + len(tokens[r]) - 1  # the fed token's own position
                if all(done):
                    break
                live = [a is not None for a in action]
                if drop_finished and 4 * sum(live) <= 3 * n:
                    # a quarter of the batch has finished: those rows leave it (and the cache), and the
                    # steering starts a new sequence with one strength per remaining row
                    keep = [i for i in range(n) if live[i]]
                    if select_cache_rows(cache, torch.tensor(keep, device=dev)):
                        mask = mask[keep]
                        rows, feed, pos, action, live = ([x[i] for i in keep] for x in (rows, feed, pos, action, live))
                        stack.close()
                        st = torch.zeros(len(rows), device=dev)
                        iv = dataclasses.replace(iv, strength=st)
                        stack.enter_context(Steering(model, [iv]))
                col = mask.shape[1]
                for i, r in enumerate(rows):
                    if action[i] == "append":
                        cols[r].append(col)
                    elif action[i] == "refeed":
                        if cols[r]:
                            cols[r][-1] = col
                        else:
                            last_prompt_col[r] = col
                    if live[i] and alpha[r]:
                        steered[r] += 1
                st.copy_(torch.tensor([alpha[r] for r in rows], device=dev)
                         * torch.tensor(live, dtype=torch.float32, device=dev))
                mask = torch.cat([mask, torch.tensor(live, dtype=mask.dtype, device=dev)[:, None]], 1)
                out = model.hf(input_ids=torch.tensor(feed, device=dev)[:, None], attention_mask=mask,
                               position_ids=torch.tensor(pos, device=dev)[:, None], use_cache=True, **{cache_kw: cache})
                logits, cache = out.logits, output_cache(out)
    seconds = time.perf_counter() - t0
    texts = [model.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return BacktrackResult(texts, tokens, torch.tensor(triggered), torch.tensor(trigger_step), torch.tensor(alpha),
                           torch.tensor(discarded), torch.tensor(steered), probs, steps, seconds, threshold, backtrack,
                           torch.tensor(reencoded), torch.tensor(fired_col), model.name)
