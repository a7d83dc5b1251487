"""The part of :mod:`steer.serve` that runs inside vLLM's worker (``worker_extension_cls``).

vLLM flattens a step's requests into one ``[tokens, d_model]`` activation with no batch axis:
request ``r`` owns tokens ``query_start_loc[r] : query_start_loc[r + 1]`` and the positions it
passes to the model are each token's absolute position in its sequence. So before every forward
the worker builds, per intervention, a ``[tokens]`` weight (strength × gate × region × not-sink ×
not-a-skipped-token) from each request's ``SamplingParams.extra_args["steer"]``, and the layer
hooks apply ``x + c·v`` with that weight. A step with no steered and no captured request skips the
hooks' work entirely.

The residual stream of a vLLM decoder layer is ``hidden + residual`` (the next norm adds them):
an edit ``x → x + c·u`` is applied as ``hidden → hidden + c·u``. Model anatomy (where the decoder
layers sit, what they return) is kept in :func:`decoder_layers` and :func:`_stream`.

A CAST condition read inside the pass (``pending`` requests): their edits wait (gate 0) while
their prompt means accumulate; in the step where a prompt ends, the hook after the condition's
last layer reads the condition, records the gate, and — if it fired and edits sit at or before
that layer — replays those layers from the first edited one, whose input it kept, with the edits.

Nothing here is global: the plan, the routing of the current step, the captured prompt means and
the gates live on the worker object.
"""

from __future__ import annotations

import pickle

from typing import Optional

import numpy as np
import torch

__all__ = ["SteerWorker", "decoder_layers"]


def decoder_layers(model) -> list:
    """The decoder layers of a vLLM model (the same anatomy steer's :mod:`steer.arch` names)."""
    for path in ("model.layers", "language_model.model.layers", "model.language_model.layers",
                 "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise NotImplementedError(f"steer.serve does not know where {type(model).__name__}'s decoder layers are.")


def _stream(hidden: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    return hidden if residual is None else hidden + residual


def _with_stream(args: list, kwargs: dict, hidden, residual) -> tuple[list, dict]:
    """A decoder layer's call ``layer(positions, hidden_states, residual, ...)`` with another stream."""
    args, kwargs = list(args), dict(kwargs)
    for i, (name, value) in enumerate((("hidden_states", hidden), ("residual", residual)), start=1):
        if len(args) > i:
            args[i] = value
        elif name in kwargs or value is not None:
            kwargs[name] = value
    return args, kwargs


class SteerWorker:
    """Methods mixed into vLLM's worker; the engine calls them through ``collective_rpc``, by way
    of :meth:`steer_rpc`."""

    def steer_rpc(self, payload: bytes) -> bytes:
        """Run ``(method name, args)`` pickled in ``payload``; the answer comes back pickled. In the
        multiprocess engine a ``collective_rpc`` call crosses process boundaries through msgspec,
        which has no encoding for tensors or steer's conditions (a tensor arrived as its ``str``)."""
        name, args = pickle.loads(payload)
        if not name.startswith("steer_") or name == "steer_rpc":
            raise ValueError(f"steer_rpc calls the steer_* methods, not {name!r}.")
        return pickle.dumps(getattr(self, name)(*args))

    # -- plan -----------------------------------------------------------------------------
    def steer_install(self, plan: dict) -> int:
        """Install hooks for ``plan`` (built by :func:`steer.serve.engine._plan`); returns the
        number of hooks. Replaces any earlier plan."""
        self.steer_clear()
        model = self.model_runner.get_model()
        layers = decoder_layers(model)
        if plan["n_layers"] != len(layers):
            raise ValueError(f"The plan is for {plan['n_layers']} layers; the vLLM model has {len(layers)}.")
        self._steer_plan = plan
        self._steer_route = None
        self._steer_means: dict = {}
        self._steer_specs: dict = {}
        self._steer_gates: dict = {}  # capture key -> (gate, dirty): gates decided inside the pass
        self._steer_replaying = False
        edits = plan["edits"]
        for e in edits:
            e["vec"] = torch.as_tensor(e["vec"])
        self._steer_dev = {}
        hooks = []
        # the gate read inside the pass: edits at or before the condition's last layer are replayed
        # from the first of them once it is known, so that layer's input is kept in such steps
        last_read = max(plan["capture_layers"], default=None)
        early = [e["layer"] for e in edits if last_read is not None and e["layer"] <= last_read]
        self._steer_replay_from = min(early) if plan.get("condition") is not None and early else None
        if self._steer_replay_from is not None:
            hooks.append(layers[self._steer_replay_from].register_forward_pre_hook(self._keep_input, with_kwargs=True))
        for layer in sorted({e["layer"] for e in edits if e["where"] == "pre"}):
            todo = [e for e in edits if e["where"] == "pre" and e["layer"] == layer]
            hooks.append(layers[layer].register_forward_pre_hook(self._pre_hook(todo), with_kwargs=True))
        post_layers = {e["layer"] for e in edits if e["where"] == "post"} | set(plan["capture_layers"])
        for layer in sorted(post_layers):
            todo = [e for e in edits if e["where"] == "post" and e["layer"] == layer]
            hooks.append(layers[layer].register_forward_hook(self._post_hook(layer, todo)))
        # a step that only captures prompt means (CAST's first pass) stops after the last
        # condition layer, as the HF path's pre-pass does: later layers pass their input through
        last = max(plan["capture_layers"], default=None)
        if last is not None:
            for layer in layers[last + 1:]:
                self._steer_truncate(layer)
        runner = self.model_runner
        if "_model_forward" not in vars(runner):  # route every forward (once per worker)
            inner = runner._model_forward

            def routed(*args, **kwargs):
                self._steer_route = self._route(kwargs.get("positions"), kwargs.get("input_ids"))
                try:
                    return inner(*args, **kwargs)
                finally:
                    self._steer_route = None

            runner._model_forward = routed
        self._steer_hooks = hooks
        return len(hooks)

    def _steer_truncate(self, layer) -> None:
        """Let ``layer`` pass its input through in capture-only steps (the forward is wrapped on
        the instance; steer_clear restores it)."""
        inner = layer.forward

        def forward(*args, **kwargs):
            route = self._steer_route
            if route is None or not route.get("capture_only"):
                return inner(*args, **kwargs)
            hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
            residual = args[2] if len(args) > 2 else kwargs.get("residual")
            return hidden if "residual" not in kwargs and len(args) < 3 else (hidden, residual)

        layer.forward = forward
        self._steer_wrapped.append(layer)

    def steer_clear(self) -> None:
        for h in getattr(self, "_steer_hooks", []):
            h.remove()
        for layer in getattr(self, "_steer_wrapped", []):
            del layer.forward  # back to the class's forward
        self._steer_wrapped = []
        self._steer_hooks = []
        self._steer_plan = None
        self._steer_route = None

    def steer_take_means(self, keys: list) -> dict:
        """Pop the captured prompt means: ``{key: {layer: [d_model] float32}}`` (CAST's statistic:
        mean resid_post over each prompt's tokens, the first excluded)."""
        out = {}
        for k in keys:
            sums = self._steer_means.pop(k, None)
            if sums is None:
                raise RuntimeError(f"No prompt means were captured for request {k!r}.")
            count, by_layer = sums
            out[k] = {layer: (s / max(count, 1)).clone() for layer, s in by_layer.items()}
        return out

    # -- per-step routing ------------------------------------------------------------------
    def _spec(self, req_id: str):
        spec = self._steer_specs.get(req_id)
        if spec is None:
            req = self.model_runner.requests[req_id]
            extra = (req.sampling_params.extra_args or {}) if req.sampling_params is not None else {}
            s = extra.get("steer") or {}
            n = len(self._steer_plan["ivs"])
            strengths = np.asarray(s.get("s", [0.0] * n), dtype=np.float64)
            if strengths.shape != (n,):
                raise ValueError(f"Request {req_id} carries {strengths.shape} strengths for {n} interventions.")
            sel = {int(i): np.asarray(v, dtype=np.int64) for i, v in (s.get("sel") or {}).items()}
            spec = {"s": strengths, "own": "s" in s, "g": float(s.get("g", 1.0)), "key": s.get("key"), "sel": sel,
                    "capture": bool(s.get("capture", False)), "pending": bool(s.get("pending", False)),
                    "plen": len(req.prompt_token_ids or ())}
            self._steer_specs[req_id] = spec
        return spec

    def _gate(self, spec) -> float:
        """A request's gate now: given, or (CAST read inside the pass) 0 until the condition has
        been read, then condition × user gate (0 for a request whose prompt was split: see
        :meth:`steer_take_gates`)."""
        if not spec["pending"]:
            return spec["g"]
        gate, dirty = self._steer_gates.get(spec["key"], (0.0, False))
        return 0.0 if dirty else gate

    def _route(self, positions, input_ids):
        plan = self._steer_plan
        if plan is None or positions is None:
            return None
        runner = self.model_runner
        n_req = runner.input_batch.num_reqs
        req_ids = runner.input_batch.req_ids[:n_req]
        specs = [self._spec(r) for r in req_ids]
        waiting = [sp["pending"] and sp["key"] not in self._steer_gates for sp in specs]
        # a request still waiting for its gate may be steered later in this very step
        # a clamp without target clamps to its strength, 0 included (the direction projected out)
        clamps = np.asarray([iv["kind"] == "clamp" and iv["target"] is None for iv in plan["ivs"]], bool)
        steered = [bool(np.any((sp["s"] != 0) | (clamps & sp["own"]))) and (sp["g"] if w else self._gate(sp)) != 0
                   for sp, w in zip(specs, waiting)]
        capture = [sp["capture"] and (not sp["pending"] or w) for sp, w in zip(specs, waiting)]
        if not any(steered) and not any(capture):
            return None
        qsl = np.asarray(runner.query_start_loc.np[: n_req + 1])
        counts = np.diff(qsl)
        n_tok = int(qsl[-1])
        width = positions.shape[0]  # may be padded past the scheduled tokens
        req_of = np.repeat(np.arange(n_req), counts)
        pos = positions[:n_tok].cpu().numpy()
        plen = np.asarray([sp["plen"] for sp in specs])[req_of]
        ids = None if input_ids is None else input_ids[:n_tok].cpu().numpy()
        route = {"n_tok": n_tok, "width": width, "device": positions.device, "specs": specs, "req_of": req_of,
                 "pos": pos, "plen": plen, "ids": ids}
        if any(steered):
            self._weights(route)
        if any(capture):
            route["capture_only"] = all(c and not sp["pending"] for c, sp in zip(capture, specs))
            keep = np.asarray(capture)[req_of] & (pos >= 1) & (pos < plen)
            route["capture"] = (torch.from_numpy(np.nonzero(keep)[0]).to(positions.device),
                                torch.from_numpy(req_of[keep]).to(positions.device),
                                [sp["key"] if c else None for sp, c in zip(specs, capture)],
                                np.bincount(req_of[keep], minlength=n_req))
            route["captured_layers"] = set()
            # requests whose condition is read in this pass and whose prompt ends in this step;
            # "split": it began in an earlier step, so its earlier tokens went through unedited
            first = np.full(n_req, np.iinfo(np.int64).max)
            np.minimum.at(first, req_of, pos)
            for r in np.nonzero(np.asarray(waiting) & (first == 0))[0]:  # a prompt (re)starting: vLLM
                self._steer_means.pop(specs[r]["key"], None)  # recomputes a preempted request from 0
            ends = np.zeros(n_req, bool)
            ends[req_of[pos == plen - 1]] = True
            route["decide"] = [(r, bool(first[r] > 0)) for r in range(n_req) if waiting[r] and ends[r]]
        return route

    def _weights(self, route) -> None:
        """Per intervention, the ``[tokens]`` weight (strength × gate where its region, sink and
        skip rules allow) and mask of this step, from each request's current gate."""
        plan = self._steer_plan
        specs, req_of, pos, plen, ids = (route[k] for k in ("specs", "req_of", "pos", "plen", "ids"))
        n_tok, width = route["n_tok"], route["width"]
        S = np.stack([sp["s"] for sp in specs])  # [req, iv]
        G = np.asarray([self._gate(sp) for sp in specs])
        own = np.asarray([sp["own"] for sp in specs], bool)[req_of]  # tokens of requests that carry strengths
        weights, masks = [], []
        for i, iv in enumerate(plan["ivs"]):
            r = iv["region"]
            if r == "select":  # the prompt positions the HF path's selector picked, per request
                region = np.zeros(n_tok, bool)
                for q, sp in enumerate(specs):
                    at = req_of == q
                    region[at] = np.isin(pos[at], sp["sel"].get(i, ()))
            else:
                region = (np.ones(n_tok, bool) if r == "all" else pos < plen if r == "prompt" else
                          pos >= plen if r == "generated" else (pos < plen) & (pos >= plen - iv["k"]))
            clamp_to = iv["kind"] == "clamp" and iv["target"] is None  # its strength is the value, 0 included
            m = region & own & (G[req_of] != 0) if clamp_to else region & (S[req_of, i] != 0) & (G[req_of] != 0)
            if not iv["include_sink"]:
                m &= pos != 0
            if iv["skip"] and ids is not None:
                m &= ~np.isin(ids, iv["skip"])
            # clamp: the strength is the value (the gate only selects rows); else strength × gate
            w = S[req_of, i] if clamp_to else S[req_of, i] * G[req_of]
            weights.append(np.where(m, w, 0.0))
            masks.append(m)
        pad = width - n_tok
        route["w"] = torch.from_numpy(np.pad(np.stack(weights), ((0, 0), (0, pad)))).to(route["device"])
        route["m"] = torch.from_numpy(np.pad(np.stack(masks), ((0, 0), (0, pad)))).to(route["device"])

    # -- hooks ----------------------------------------------------------------------------
    def _vec(self, e, like: torch.Tensor) -> torch.Tensor:
        key = (id(e), like.device, like.dtype)
        v = self._steer_dev.get(key)
        if v is None:
            v = self._steer_dev[key] = e["vec"].to(device=like.device, dtype=like.dtype)
        return v

    def _apply(self, todo, hidden, residual):
        """``hidden`` edited so that ``hidden + residual`` gets each edit, in order."""
        route = self._steer_route
        if route is None or "w" not in route or not todo:
            return hidden
        x = _stream(hidden, residual)
        for e in todo:
            w = route["w"][e["iv"]].to(x.dtype)
            v = self._vec(e, x)
            if e["kind"] == "add":
                c = w[:, None] * v
            else:
                u = v  # unit vector (the plan normalises it)
                proj = x @ u
                if e["kind"] == "ablate":
                    coef = -w * proj
                elif e["target"] is not None:  # clamp toward a target: a fraction w of the way
                    coef = w * (float(e["target"]) - proj)
                else:  # clamp: the projection set to w where the mask allows
                    coef = torch.where(route["m"][e["iv"]], w - proj, torch.zeros_like(proj))
                c = coef[:, None] * u
            hidden = hidden + c
            x = x + c
        return hidden

    def _pre_hook(self, todo):
        def hook(module, args, kwargs):
            if self._steer_route is None:
                return None
            args, kwargs = list(args), dict(kwargs)
            # vLLM calls layer(positions, hidden_states, residual[, ...])
            names = ("positions", "hidden_states", "residual")
            get = {n: (args[i] if i < len(args) else kwargs.get(n)) for i, n in enumerate(names)}
            new = self._apply(todo, get["hidden_states"], get["residual"])
            if len(args) > 1:
                args[1] = new
            else:
                kwargs["hidden_states"] = new
            return tuple(args), kwargs

        return hook

    def _post_hook(self, layer: int, todo):
        def hook(module, args, out):
            route = self._steer_route
            if route is None:
                return None
            hidden, residual = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
            new = self._apply(todo, hidden, residual)
            reads = self._steer_plan["capture_layers"]
            if "capture" in route and layer in reads and not self._steer_replaying:
                self._capture(layer, _stream(new, residual), route)
                if layer == max(reads) and route.get("decide"):
                    replayed = self._decide(route)
                    if replayed is not None:
                        new, residual = replayed
                        return (new, residual, *out[2:]) if isinstance(out, tuple) else new
            if new is hidden:
                return None
            return (new, residual, *out[2:]) if isinstance(out, tuple) else new

        return hook

    # -- CAST read inside the pass ---------------------------------------------------------
    def _keep_input(self, module, args, kwargs):
        """Pre-hook of the first edited layer at or before the condition's: keep its input
        (before any edit) in a step where some request's condition will be read."""
        route = self._steer_route
        if route is not None and route.get("decide") and not self._steer_replaying:
            own = lambda x: x.clone() if torch.is_tensor(x) else x  # noqa: E731 (vLLM norms work in place)
            route["saved"] = ([own(a) for a in args], {k: own(v) for k, v in kwargs.items()})
        return None

    def _decide(self, route):
        """Read the condition of the requests whose prompt ends in this step (their prompt means
        are complete), record their gates, and update this step's weights. If one of them fires
        and edits sit at or before the condition's layer, replay those layers from the kept input
        with the edits (every request's tokens: the others come out as they were) and return the
        new ``(hidden, residual)`` of the condition's layer."""
        cond, specs = self._steer_plan["condition"], route["specs"]
        decide = route["decide"]
        keys = [specs[r]["key"] for r, _ in decide]
        means = []
        for k in keys:
            count, by_layer = self._steer_means.pop(k)
            means.append({layer: s / max(count, 1) for layer, s in by_layer.items()})
        hs = {layer: torch.stack([m[layer] for m in means]) for layer in sorted(cond.layers)}
        fires = cond.evaluate(hs).float().cpu()
        replay = False
        for (r, split), k, f in zip(decide, keys, fires.tolist()):
            gate = f * specs[r]["g"]
            self._steer_gates[k] = (gate, split)
            replay |= gate != 0 and not split
        if "w" in route:
            self._weights(route)
        if not replay or self._steer_replay_from is None:
            return None
        args, kwargs = route.pop("saved")
        layers = decoder_layers(self.model_runner.get_model())
        self._steer_replaying = True
        try:
            for layer in range(self._steer_replay_from, max(self._steer_plan["capture_layers"]) + 1):
                out = layers[layer](*args, **kwargs)  # its hooks apply the edits with the new gates
                hidden, residual = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
                args, kwargs = _with_stream(args, kwargs, hidden, residual)
        finally:
            self._steer_replaying = False
        return hidden, residual

    def steer_decided(self, keys: list) -> dict:
        """The gates of ``keys`` read so far: ``{key: (gate, dirty)}`` (kept for their decoding)."""
        return {k: self._steer_gates[k] for k in keys if k in self._steer_gates}

    def steer_take_gates(self, keys: list) -> dict:
        """Pop the gates read inside the pass: ``{key: (gate, dirty)}``. ``dirty``: the request's
        prompt was prefilled over several steps (chunked prefill), so its first chunks went
        through before the gate was known and were not edited; if its gate is not 0 its answer is
        not the steered one, and the engine generates it again with the gate it now knows."""
        missing = [k for k in keys if k not in self._steer_gates]
        if missing:
            raise RuntimeError(f"No gate was read for requests {missing[:3]}...")
        return {k: self._steer_gates.pop(k) for k in keys}

    def _capture(self, layer: int, x: torch.Tensor, route) -> None:
        tok, req, keys, counts = route["capture"]
        sums = torch.zeros(len(keys), x.shape[-1], dtype=torch.float32, device=x.device)
        sums.index_add_(0, req, x[tok].float())
        last = layer == max(self._steer_plan["capture_layers"])
        for r, k in enumerate(keys):
            if k is None or counts[r] == 0 and not last:
                continue
            entry = self._steer_means.setdefault(k, [0, {}])
            entry[1][layer] = entry[1].get(layer, 0) + sums[r].cpu()
            if last:  # the token count once per step (every capture layer sees the same tokens)
                entry[0] += int(counts[r])
