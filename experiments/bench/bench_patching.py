"""Benchmark: steer.patching vs transformer_lens.patching on the embedded model (same run, same inputs).

Run: ``python experiments/bench/bench_patching.py [--tl-nodes N] [--model gemma-3-270m]`` (about
4 minutes on 2 CPU cores for SmolLM2, the default).

Both libraries are timed on the full node set by default. TransformerLens runs one full forward
per node, whose cost does not depend on the node, so ``--tl-nodes N`` times it on N random nodes
and extrapolates linearly (said in each line) for a quicker run.
Forward-equivalents of AtP/AtP* are wall time divided by the median time of a plain forward of
the same batch, measured in between (the machine may be shared, so medians are used).
"""

from __future__ import annotations

import random
import statistics
import time

import pandas as pd
import torch


def _forward_time(model, task, reps: int = 3) -> float:
    from steer.patching._runner import Runner

    r = Runner(model, task.corrupt)
    ts = []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            r.run(r.embeds)
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(device: str = "cpu", n_prompts: int = 4, tl_nodes: int | None = None, seed: int = 0,
         model_name: str | None = None, model=None) -> dict:
    """Print ``patching <kind>: steer X s, transformer_lens Y s, speedup Zx`` lines; return the numbers.

    ``model``: a loaded :class:`steer.Model` to use instead of ``steer.load(model_name)`` (the GPU
    benchmark passes random-init models of real shapes)."""
    import transformer_lens.patching as TLP

    import steer
    from steer.patching import activation_patch, atp, atp_star, ioi_task, relp

    model = model if model is not None else steer.load(model_name, device=device)
    task = ioi_task(model, n=n_prompts)
    bridge = model.bridge
    clean, corrupt = task.clean.input_ids, task.corrupt.input_ids
    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean)
    out = {}
    rng = random.Random(seed)
    L, T, H = model.n_layers, task.n_pos, model.n_heads
    for kind, fn, cols, sizes in [("resid", "get_act_patch_resid_pre", ["layer", "pos"], (L, T)),
                                  ("heads", "get_act_patch_attn_head_out_all_pos", ["layer", "head"], (L, H))]:
        t0 = time.perf_counter()
        ours = activation_patch(model, task, kind)
        t_ours = time.perf_counter() - t0
        mc, mx = ours.meta["metric_clean"], ours.meta["metric_corrupt"]
        metric = lambda lg: (task.metric(lg[:, -1]).mean() - mx) / (mc - mx)  # noqa: E731
        all_idx = [(a, b) for a in range(sizes[0]) for b in range(sizes[1])]
        sub = all_idx if tl_nodes is None else rng.sample(all_idx, min(tl_nodes, len(all_idx)))
        df = pd.DataFrame(sub, columns=cols)
        t0 = time.perf_counter()
        kw = dict(getattr(TLP, fn).keywords)  # the same setter/hook TL's utility uses, on a node subset
        kw.pop("index_axis_names")
        ref = TLP.generic_activation_patch(bridge, corrupt, cache, metric, index_df=df, **kw)
        t_sub = time.perf_counter() - t0
        t_tl = t_sub * len(all_idx) / len(sub)
        ours_sub = torch.tensor([float(ours.scores[a, b]) for a, b in sub])
        err = float((ours_sub - ref.float().cpu().flatten()).abs().max())
        how = ("both timed on every node" if len(sub) == len(all_idx) else
               f"TL timed on {len(sub)} random nodes ({t_sub:.1f} s) and extrapolated linearly")
        print(f"patching {kind}: steer {t_ours:.1f} s, transformer_lens {t_tl:.1f} s, speedup {t_tl / t_ours:.1f}x "
              f"(all {len(all_idx)} nodes, {n_prompts} prompts x {T} tokens; {how}; "
              f"max |diff| over the TL nodes {err:.1e}, in units of the clean-corrupt metric gap {mc - mx:.2e})")
        out[kind] = {"steer_s": t_ours, "tl_s": t_tl, "speedup": t_tl / t_ours, "max_abs_diff": err, "metric_gap": mc - mx}
    f1 = _forward_time(model, task)
    t0 = time.perf_counter()
    atp(model, task, ["heads", "neurons"])
    t_atp = time.perf_counter() - t0
    f2 = _forward_time(model, task)
    fwd = statistics.median([f1, f2])
    print(f"atp heads+neurons: {t_atp:.2f} s = {t_atp / fwd:.1f} forward-equivalents (forward {fwd:.2f} s)")
    t0 = time.perf_counter()
    relp(model, task, ["heads", "neurons"])
    t_relp = time.perf_counter() - t0
    print(f"relp heads+neurons: {t_relp:.2f} s = {t_relp / fwd:.1f} forward-equivalents")
    t0 = time.perf_counter()
    atp_star(model, task, ["heads"], grad_drop=True)
    t_star = time.perf_counter() - t0
    t0 = time.perf_counter()
    atp(model, task, ["q", "k"], qk_fix=True)
    t_qk = time.perf_counter() - t0
    f3 = _forward_time(model, task)
    fwd = statistics.median([f1, f2, f3])
    print(f"atp* heads (GradDrop): {t_star:.2f} s = {t_star / fwd:.1f} forward-equivalents "
          f"(target <= L/2 + 4 = {L / 2 + 4:.0f}); AtP with QK fix on q,k: {t_qk:.2f} s = {t_qk / fwd:.1f} fe")
    out.update(atp_fe=t_atp / fwd, relp_fe=t_relp / fwd, atp_star_fe=t_star / fwd, qk_fe=t_qk / fwd, forward_s=fwd)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tl-nodes", type=int, default=None, help="time TransformerLens on N random nodes only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="steer.load name (default: the embedded SmolLM2)")
    a = ap.parse_args()
    main(device=a.device, tl_nodes=a.tl_nodes, model_name=a.model)
