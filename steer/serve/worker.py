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

Nothing here is global: the plan, the routing of the current step and the captured prompt means
live on the worker object.
"""

from __future__ import annotations

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


class SteerWorker:
    """Methods mixed into vLLM's worker; the engine calls them through ``collective_rpc``."""

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
        edits = plan["edits"]
        for e in edits:
            e["vec"] = torch.as_tensor(e["vec"])
        self._steer_dev = {}
        hooks = []
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
            spec = (strengths, float(s.get("g", 1.0)), s.get("key"), bool(s.get("capture", False)),
                    len(req.prompt_token_ids or ()))
            self._steer_specs[req_id] = spec
        return spec

    def _route(self, positions, input_ids):
        plan = self._steer_plan
        if plan is None or positions is None:
            return None
        runner = self.model_runner
        n_req = runner.input_batch.num_reqs
        req_ids = runner.input_batch.req_ids[:n_req]
        specs = [self._spec(r) for r in req_ids]
        steered = [bool(np.any(sp[0] != 0) and sp[1] != 0) for sp in specs]
        capture = [sp[3] for sp in specs]
        if not any(steered) and not any(capture):
            return None
        qsl = np.asarray(runner.query_start_loc.np[: n_req + 1])
        counts = np.diff(qsl)
        n_tok = int(qsl[-1])
        width = positions.shape[0]  # may be padded past the scheduled tokens
        req_of = np.repeat(np.arange(n_req), counts)
        pos = positions[:n_tok].cpu().numpy()
        plen = np.asarray([sp[4] for sp in specs])[req_of]
        ids = None if input_ids is None else input_ids[:n_tok].cpu().numpy()
        device = positions.device
        route = {"n_tok": n_tok, "width": width}
        if any(steered):
            S = np.stack([sp[0] for sp in specs])  # [req, iv]
            G = np.asarray([sp[1] for sp in specs])
            weights, masks = [], []
            for i, iv in enumerate(plan["ivs"]):
                r = iv["region"]
                region = (np.ones(n_tok, bool) if r == "all" else pos < plen if r == "prompt" else
                          pos >= plen if r == "generated" else (pos < plen) & (pos >= plen - iv["k"]))
                m = region & (S[req_of, i] != 0) & (G[req_of] != 0)
                if not iv["include_sink"]:
                    m &= pos != 0
                if iv["skip"] and ids is not None:
                    m &= ~np.isin(ids, iv["skip"])
                # clamp: the strength is the value (the gate only selects rows); else strength × gate
                w = S[req_of, i] if iv["kind"] == "clamp" and iv["target"] is None else S[req_of, i] * G[req_of]
                weights.append(np.where(m, w, 0.0))
                masks.append(m)
            pad = width - n_tok
            route["w"] = torch.from_numpy(np.pad(np.stack(weights), ((0, 0), (0, pad)))).to(device)
            route["m"] = torch.from_numpy(np.pad(np.stack(masks), ((0, 0), (0, pad)))).to(device)
        if any(capture):
            route["capture_only"] = all(capture) and not any(steered)
            keep = np.asarray(capture)[req_of] & (pos >= 1) & (pos < plen)
            route["capture"] = (torch.from_numpy(np.nonzero(keep)[0]).to(device),
                                torch.from_numpy(req_of[keep]).to(device),
                                [sp[2] for sp in specs], np.bincount(req_of[keep], minlength=n_req))
            route["captured_layers"] = set()
        return route

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
            if "capture" in route and layer in self._steer_plan["capture_layers"]:
                self._capture(layer, _stream(new, residual), route)
            if new is hidden:
                return None
            return (new, residual, *out[2:]) if isinstance(out, tuple) else new

        return hook

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
