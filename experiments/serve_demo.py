"""The refusal recipe with CAST through vLLM, next to steer's HF path (``make serve-demo``).

On the embedded SmolLM2: :func:`steer.refusal.fit_refusal` (behaviour vector at layer 10 and a
harmfulness condition, from steer's training prompts), then :func:`steer.refusal.evaluate_refusal`
on held-out prompts (``experiments/data/eval_*.json``) twice: generating through HF
(``backend="hf"``) and through vLLM (``backend="vllm"``, :mod:`steer.serve`). Writes
``results.json`` (both results, the answers that differ, the time of each) and
``refusal_bars.png`` (the refusal rates side by side).

Run in the vLLM venv: ``.venv-vllm/bin/python experiments/serve_demo.py [--n 32]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from heldout import heldout

RATES = ["baseline_refusal_harmful", "baseline_refusal_harmless", "steered_refusal_harmful",
         "steered_refusal_harmless", "conditional_refusal_harmful", "conditional_refusal_harmless"]


def run(out="out/serve-demo", n: int = 32, tokens: int = 48, model=None, setup=None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import steer
    from steer import refusal
    from steer.serve import engine_for

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model or steer.load()
    setup = setup or refusal.fit_refusal(model)
    harmful, harmless = heldout("harmful", n), heldout("harmless", n)
    eng = engine_for(model, "vllm")
    res = {}
    for backend in ("hf", "vllm"):
        res[backend] = refusal.evaluate_refusal(model, harmful, harmless, setup, max_new_tokens=tokens,
                                                keep_texts=None, backend=eng if backend == "vllm" else "hf")
    differ = [{"prompt": a["prompt"], "setting": k, "hf": a[k], "vllm": b[k]}
              for a, b in zip(res["hf"]["examples"], res["vllm"]["examples"])
              for k in ("baseline", "steered", "conditional") if a[k] != b[k]]
    gates_equal = all(a["fired"] == b["fired"] for a, b in zip(res["hf"]["examples"], res["vllm"]["examples"]))
    summary = {"n_harmful": len(harmful), "n_harmless": len(harmless), "max_new_tokens": tokens,
               "rates": {k: {"hf": res["hf"][k], "vllm": res["vllm"][k]} for k in RATES},
               "answers_compared": 3 * len(res["hf"]["examples"]), "answers_differing": len(differ),
               "condition_gates_equal": gates_equal, "seconds": {"hf": res["hf"]["seconds"], "vllm": res["vllm"]["seconds"]},
               "vllm_engine_start_s": round(eng.start_seconds, 1),
               "differing": differ}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(RATES))
    ax.bar([x - 0.2 for x in xs], [res["hf"][k] for k in RATES], width=0.4, label="HF generate")
    ax.bar([x + 0.2 for x in xs], [res["vllm"][k] for k in RATES], width=0.4, label="vLLM (steer.serve)")
    ax.set_xticks(list(xs), [k.replace("_refusal_", "\n") for k in RATES], fontsize=8)
    ax.set(ylabel="refusal rate", ylim=(0, 1.22), yticks=[0, 0.25, 0.5, 0.75, 1], title=f"Refusal with CAST on SmolLM2, {len(harmful)}+{len(harmless)} held-out prompts")
    ax.legend(ncol=2, loc="upper left", frameon=False)
    fig.tight_layout()
    fig.savefig(out / "refusal_bars.png", dpi=120)
    (out / "results.json").write_text(json.dumps({"summary": summary, "hf": res["hf"], "vllm": res["vllm"]}, indent=1))
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/serve-demo")
    ap.add_argument("--n", type=int, default=32, help="held-out prompts per side")
    ap.add_argument("--tokens", type=int, default=48)
    a = ap.parse_args()
    s = run(a.out, a.n, a.tokens)
    print(json.dumps({k: v for k, v in s.items() if k != "differing"}, indent=1))
    for d in s["differing"][:5]:
        print(f"- [{d['setting']}] {d['prompt'][:60]!r}\n    hf:   {d['hf'][:90]!r}\n    vllm: {d['vllm'][:90]!r}")
