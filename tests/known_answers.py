"""Known answers of the embedded SmolLM2-135M-Instruct, stored to catch upstream drift.

A new release of transformers, torch or transformer-lens can change steer's numbers without
failing a single test that compares steer with a reference computed by the same release.
These figures were computed once and stored in ``known_answers.json``; ``test_known_answers.py``
recomputes them and fails, naming the figure, when one moves beyond its tolerance.

Regenerate them on purpose (after checking that the change is intended) with::

    make known-answers          # = .venv/bin/python tests/known_answers.py --write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

STORE = Path(__file__).with_name("known_answers.json")
DATA = Path(__file__).resolve().parents[1] / "steer" / "datasets"
CHAT_PROMPT = "What is the capital of France?"
STEER_PROMPT = "How do I bake bread?"
TOP_K = 5

# What each figure is, and the tolerance it is held to (fp32 on CPU: BLAS reorderings move
# logits by ~1e-5; anything past these is a change of the computation, not of rounding).
TOLERANCES = {
    "next_token_top_ids": "exact",
    "next_token_top_logits": {"atol": 2e-3},
    "resid_post_15_sink_norm": {"rtol": 1e-4},
    "resid_post_15_last_norm": {"rtol": 1e-4},
    "steered_generation": "exact",
    "ioi_heads_top": "exact",
    "ioi_heads_top_scores": {"atol": 1e-3},
    "ioi_clean_corrupt_metric": {"atol": 1e-3},
}


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "transformer-lens", "tokenizers")}


@torch.no_grad()
def compute(model=None) -> dict:
    """Every known answer, recomputed now (about 20 s on 2 CPU cores)."""
    import steer

    torch.manual_seed(0)
    model = model or steer.load()
    out: dict = {}

    # 1. next-token logits of a fixed chat prompt
    batch = steer.tokenize(model, [CHAT_PROMPT])
    logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0, -1]
    top = logits.topk(TOP_K)
    out["next_token_top_ids"] = top.indices.tolist()
    out["next_token_top_logits"] = top.values.tolist()

    # 2. a captured activation: resid_post at layer 15, the sink (massive activation) and last token
    acts = steer.capture(model, [CHAT_PROMPT], layers=[15], site="resid_post", positions="all",
                         include_sink=True, progress=False)
    x = acts.tensor[0, 0][acts.mask[0]]  # [real tokens, d_model]
    out["resid_post_15_sink_norm"] = float(x[0].norm())
    out["resid_post_15_last_norm"] = float(x[-1].norm())

    # 3. one steered generation: the refusal recipe's behaviour vector (8 + 8 prompts, written
    #    refusal vs compliance completions) at its default layer and strength
    from steer import refusal

    harmful = steer.load_prompts(DATA / "harmful.json")[:8]
    harmless = steer.load_prompts(DATA / "harmless.json")[:8]
    d = refusal.behaviour_vector(model, harmful, harmless, layer=refusal.DEFAULT_LAYER,
                                 layers=[refusal.DEFAULT_LAYER])
    with steer.steer(model, d, strength=refusal.DEFAULT_STRENGTH) as s:
        (text,) = s.generate([STEER_PROMPT], max_new_tokens=24)
    out["steered_generation"] = text

    # 4. one patching result: IOI (4 prompts), exact activation patching of every head
    task = steer.ioi_task(model, n=4)
    r = steer.activation_patch(model, task, "heads")
    flat = r.scores.flatten()
    order = flat.abs().argsort(descending=True)[:5]
    out["ioi_heads_top"] = [r.labels()[int(i)]["name"] for i in order]
    out["ioi_heads_top_scores"] = flat[order].tolist()
    out["ioi_clean_corrupt_metric"] = [r.meta["metric_clean"], r.meta["metric_corrupt"]]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"store the recomputed answers in {STORE.name}")
    args = p.parse_args(argv)
    answers = compute()
    doc = {"about": "Known answers of the embedded SmolLM2-135M-Instruct; see tests/known_answers.py.",
           "computed_with": _versions(), "tolerances": TOLERANCES, "answers": answers}
    text = json.dumps(doc, indent=1, ensure_ascii=False)
    if args.write:
        STORE.write_text(text + "\n")
        print(f"written to {STORE}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
