"""steer.serve: steering inside vLLM equals steer's HF path (``make test-vllm``; needs vLLM).

References: the HF path (:class:`steer.Steering`), itself tested against hand computations and
TransformerLens. Compared: next-token log-probabilities at the first steered positions (fp32,
vLLM's CPU kernels vs HF's: ≤ 2e-3) and greedy texts.
"""

import os

import pytest
import torch

import steer
from steer.conditions import Condition
from steer.interventions import Intervention
from steer.steering import Steering, prompt_means

pytestmark = pytest.mark.vllm

PROMPTS = ["Hi", "Tell me a story about a cat", "What is 2 + 2?", "Name a colour"]
ATOL = 2e-3


def tiny_model(family="llama", seed=0):
    """A random tiny model of ``family`` with heads of 64 (vLLM's CPU attention has no kernel for
    the 16-wide heads of ``steer.load("tiny-llama")``), on steer's byte-level tokenizer."""
    import transformers as T

    from steer.models import Model, _byte_tokenizer

    tok = _byte_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = {"llama": lambda: T.LlamaConfig(**common, tie_word_embeddings=True),
           "qwen3": lambda: T.Qwen3Config(**common),
           "gemma3": lambda: T.Gemma3TextConfig(**common, sliding_window=4,
                                                layer_types=["sliding_attention", "full_attention", "sliding_attention"])}[family]()
    torch.manual_seed(seed)
    hf = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    cfg.architectures = [type(hf).__name__]
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
    return Model(f"tiny-{family}-64", hf.eval(), tok)


@pytest.fixture(scope="module")
def tiny():
    from steer.serve import Engine

    m = tiny_model()
    eng = Engine(m, kv_cache_gib=1, max_model_len=256)
    yield m, eng
    eng.close()


def _hf(model, steering, prompts, n=6):
    s = steering if steering is not None else Steering(model)
    with s:
        texts = s.generate(prompts, max_new_tokens=n, min_new_tokens=n)
        first = torch.log_softmax(s.next_token_logits(prompts).float(), -1)
    return texts, first, s


def _check(model, eng, steering, prompts=PROMPTS, n=6):
    out = eng.generate(prompts, steering, max_new_tokens=n, min_new_tokens=n, logprobs=10, details=True)
    texts, first, s = _hf(model, steering, prompts, n)
    err = max(abs(lp - float(first[b, t])) for b in range(len(prompts)) for t, lp in out.logprobs[b][0].items())
    assert err < ATOL, err
    assert out.texts == texts
    return out, s


def test_engine_checks_itself_at_start(tiny):
    m, eng = tiny
    assert eng.check_error < 1e-4 and not eng.multiprocess


def test_add_per_example_strengths(tiny):
    m, eng = tiny
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    plain = eng.generate(PROMPTS, max_new_tokens=6, min_new_tokens=6)
    s = steer.steer(m, v, layer=1, strength=torch.tensor([0.0, 4.0, 8.0, -6.0]))
    out, _ = _check(m, eng, s)
    assert out.texts[0] == plain[0]  # strength 0: untouched
    assert sum(a != b for a, b in zip(out.texts[1:], plain[1:])) >= 2  # the edit does something


@pytest.mark.parametrize("kind,kw", [
    ("ablate", dict(layer="all", sites=("resid_pre", "resid_post"))),
    ("clamp", dict(layer=0, strength=6.0, positions="generated")),
    ("add", dict(layer=[0, 1], strength=5.0, positions="prompt", include_sink=True)),
    ("add", dict(layer=0, sites="resid_pre", strength=5.0)),
])
def test_kinds_sites_regions(tiny, kind, kw):
    m, eng = tiny
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(1)) * 3
    _check(m, eng, steer.steer(m, v, kind=kind, **kw))


def test_clamp_toward_and_skip_tokens(tiny):
    m, eng = tiny
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(2))
    skip = frozenset(m.tokenizer("a e")["input_ids"])
    ivs = [Intervention("clamp", v, layers=[1], strength=0.5, target=10.0),
           Intervention("add", v, layers=[0], strength=torch.tensor([1.0, 3.0, 0.0, 2.0]), skip_tokens=skip)]
    _check(m, eng, Steering(m, ivs, gate=torch.tensor([1.0, 0.0, 1.0, 0.5])))


@pytest.mark.parametrize("cast", ["in-pass", "first-pass"])
def test_cast_gate_equals_hf(tiny, cast):
    """Both ways of reading the condition give the HF path's gates and tokens. In the pass, the
    edit at layer 0 precedes the condition's layer 1: the fired prompts' layers 0-1 are replayed."""
    m, eng = tiny
    h = prompt_means(m, PROMPTS, layers=[1])[:, 0]
    u = torch.randn(m.d_model, generator=torch.Generator().manual_seed(3))
    scores = h @ (u / u.norm())
    # halfway between the middle scores (a threshold equal to a score leaves its gate to rounding)
    cond = Condition(u, layer=1, threshold=float(scores.sort().values[1:3].mean()), kind="projection")
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(4)) * 4
    s = steer.steer(m, v, layer=0, strength=3.0, condition=cond)
    out = eng.generate(PROMPTS, s, max_new_tokens=6, min_new_tokens=6, logprobs=10, details=True, cast=cast)
    texts, first, hf = _hf(m, s, PROMPTS, 6)
    err = max(abs(lp - float(first[b, t])) for b in range(len(PROMPTS)) for t, lp in out.logprobs[b][0].items())
    assert err < ATOL, err
    assert out.texts == texts
    assert out.gate.tolist() == hf.last_gate.cpu().float().tolist()
    assert 0 < out.gate.sum() < len(PROMPTS)
    assert (out.prefill_pass_seconds > 0) == (cast == "first-pass") and out.regenerated == []


@pytest.mark.parametrize("multiprocess,tp", [(True, 1), (True, 2)], ids=["engine-process", "tensor-parallel-2"])
def test_engine_in_other_processes_equals_hf(multiprocess, tp, monkeypatch):
    """vLLM's engine core in its own process, and two tensor-parallel workers (each process
    steering its own copy of the residual stream): per-row adds, an ablation at every layer's
    input and a CAST gate read in the pass give the HF path's tokens, first-token log-probs and
    gates. The plans and answers cross the process boundaries pickled (a tensor used to arrive as
    its ``str``)."""
    from steer.serve import Engine

    if tp > 1:  # vLLM's CPU workers bind one NUMA node each unless given their cores (read by the
        # engine process this starts: in this process vLLM caches its environment once an engine ran)
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp)))
    import multiprocessing

    m = tiny_model()
    before = {p.pid for p in multiprocessing.active_children()}
    eng = Engine(m, kv_cache_gib=1, max_model_len=256, multiprocess=multiprocess, tensor_parallel_size=tp)
    started = {p.pid for p in multiprocessing.active_children()} - before
    assert started  # the engine core (and the workers it starts) run in processes of their own
    try:
        assert eng.check_error < 1e-4 and eng.multiprocess  # (an in-process engine ran before: its mode is not kept)
        g = torch.Generator().manual_seed(5)
        v, u = torch.randn(m.d_model, generator=g) * 3, torch.randn(m.d_model, generator=g)
        _check(m, eng, steer.steer(m, v, layer=1, strength=torch.tensor([0.0, 4.0, 8.0, -6.0])))
        _check(m, eng, steer.steer(m, v, kind="ablate", layer="all", sites="resid_pre"))
        scores = prompt_means(m, PROMPTS, layers=[1])[:, 0] @ (u / u.norm())
        cond = Condition(u, layer=1, threshold=float(scores.sort().values[1:3].mean()), kind="projection")
        out, hf = _check(m, eng, steer.steer(m, v, layer=0, strength=3.0, condition=cond))
        assert out.gate.tolist() == hf.last_gate.cpu().float().tolist() and 0 < out.gate.sum() < len(PROMPTS)
    finally:
        eng.close()
    assert not started & {p.pid for p in multiprocessing.active_children()}  # close() shut them down


def test_unsupported_edits_say_where_to_go(tiny):
    m, eng = tiny
    v = torch.randn(m.d_model)
    with pytest.raises(NotImplementedError, match="HF path"):
        eng.generate(["Hi"], steer.steer(m, v, layer=0, sites="mlp_out"))
    with pytest.raises(NotImplementedError, match="HF path"):
        eng.generate(["Hi"], Steering(m, [Intervention("map", layers=[0], fn=lambda x, s: x)]))
    with pytest.raises(ValueError, match="no 'completion' tokens"):  # the HF path's own selector error
        eng.generate(["Hi"], steer.steer(m, v, layer=0, positions="completion"))
    with pytest.raises(ValueError, match="batch=2"):
        eng.generate(["Hi", "Ho"], steer.steer(m, v, layer=0, strength=torch.ones(3)))
    with pytest.raises(ValueError, match="condition reads layers"):
        eng.generate(["Hi"], steer.steer(m, v, layer=0, condition=Condition(v, layer=7)))
    # after the refused calls the engine is unsteered again
    assert eng.generate(["Hi"], max_new_tokens=4, min_new_tokens=4) == _hf(m, None, ["Hi"], 4)[0]


def test_refuses_weights_that_differ_from_the_model(tmp_path):
    from steer.serve import Engine

    m = tiny_model()
    m.hf.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)
    with torch.no_grad():
        m.hf.model.layers[0].mlp.down_proj.weight.mul_(3.0)  # the model in memory moved on
    with pytest.raises(RuntimeError, match="differs from"):
        Engine(m, path=tmp_path, kv_cache_gib=1, max_model_len=256)
    with pytest.raises(ValueError, match="prefix caching"):
        Engine(m, enable_prefix_caching=True)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_other_families(family):
    """Qwen-3 (q/k norms) and Gemma-3 (sandwich norms, sliding windows shorter than the prompts)."""
    from steer.serve import Engine

    m = tiny_model(family, seed=1)
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(5)) * 3
    with Engine(m, kv_cache_gib=1, max_model_len=256) as eng:
        assert eng.check_error < 1e-4
        _check(m, eng, steer.steer(m, v, layer=1, strength=torch.tensor([0.0, 4.0, 8.0, -6.0])))
        _check(m, eng, steer.steer(m, v, layer="all", kind="ablate", sites=("resid_pre", "resid_post")))
        # CAST read in the pass: Gemma-3's layers take more than (positions, hidden, residual)
        h = prompt_means(m, PROMPTS, layers=[2])[:, 0]
        u = torch.randn(m.d_model, generator=torch.Generator().manual_seed(6))
        mid = (h @ (u / u.norm())).sort().values[1:3].mean()
        s = steer.steer(m, v, layer=1, strength=4.0, condition=Condition(u, layer=2, threshold=float(mid)))
        out, hf = _check(m, eng, s)
        assert out.gate.tolist() == hf.last_gate.cpu().float().tolist() and 0 < out.gate.sum() < len(PROMPTS)


def test_cast_in_the_pass_beside_running_requests():
    """Three sequences at a time and 96 tokens a step, so that prompts are prefilled in steps that
    also decode other requests (some prompts split over steps, others whole): replaying a fired
    prompt's layers recomputes those requests' tokens too, which must come out as they were (their
    KV-cache entries are written again). In this setting one replay runs beside 2 decoding requests."""
    from steer.serve import Engine

    m = tiny_model(seed=3)
    prompts = PROMPTS + ["Why is the sky blue?", "Count to five", "Say something kind"]
    h = prompt_means(m, prompts, layers=[2])[:, 0]
    u = torch.randn(m.d_model, generator=torch.Generator().manual_seed(9))
    sc = (h @ (u / u.norm())).sort().values
    cond = Condition(u, layer=2, threshold=float(sc[3:5].mean()))
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(10)) * 3
    s = Steering(m, [Intervention("add", v, layers=[0], strength=3.0),
                     Intervention("ablate", v, layers=[1], sites=("resid_pre",), positions="generated")], condition=cond)
    with Engine(m, kv_cache_gib=1, max_model_len=256, max_num_seqs=3, enable_chunked_prefill=True,
                max_num_batched_tokens=96) as eng:
        out, hf = _check(m, eng, s, prompts=prompts, n=8)
    assert out.gate.tolist() == hf.last_gate.cpu().float().tolist() and 0 < out.gate.sum() < len(prompts)
    assert set(out.regenerated) < {b for b in range(len(prompts)) if out.gate[b] != 0}  # some fired whole


def test_refusal_bars_unchanged_through_vllm(smol, tmp_path):
    """The refusal recipe with CAST on the embedded model (``make serve-demo``, smaller): the
    same condition gates and the same refusal rates through vLLM as through HF ``generate``."""
    import importlib.util
    from pathlib import Path

    from steer import refusal

    path = Path(__file__).parent.parent / "experiments" / "serve_demo.py"
    spec = importlib.util.spec_from_file_location("serve_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    setup = refusal.fit_refusal(smol, condition_layers=list(range(8, 18)))
    s = demo.run(tmp_path, n=16, tokens=32, model=smol, setup=setup)
    assert s["condition_gates_equal"]
    for k, r in s["rates"].items():
        assert abs(r["hf"] - r["vllm"]) <= 1 / 16, (k, r)
    assert s["answers_differing"] <= s["answers_compared"] // 16, s["differing"]
    # the recipe still does what it claims: steering adds refusals on harmful prompts
    assert s["rates"]["steered_refusal_harmful"]["vllm"] > s["rates"]["baseline_refusal_harmful"]["vllm"]
    assert (tmp_path / "refusal_bars.png").exists()


def test_last_k_prompt_tokens_and_persona_recipe(tiny):
    """``Last(k)`` / ``"last"`` selectors, and :func:`steer.persona.steered_answers` (an add at the
    last prompt token and every generated one) through ``backend=``."""
    from steer import persona
    from steer.positions import Last

    m, eng = tiny
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(6)) * 3
    _check(m, eng, Steering(m, [Intervention("add", v, layers=[1], positions=Last(3), strength=4.0),
                                Intervention("add", v, layers=[0], positions="last", strength=-3.0)]))
    qs = ["Describe yourself.", "What do you like?"]
    assert persona.steered_answers(m, v, 1, qs, 4.0, max_new_tokens=5, backend=eng) == \
        persona.steered_answers(m, v, 1, qs, 4.0, max_new_tokens=5)


def test_prompt_selectors_per_request(tiny):
    """Any prompt selector (named spans, a callable, token indices) reaches vLLM as the positions
    the HF path's selector picks in each prompt; also with CAST read in the pass."""
    from steer.positions import mask as select

    m, eng = tiny
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(11)) * 3
    every_third = lambda b: torch.arange(b.input_ids.shape[1])[None].expand_as(b.input_ids) % 3 == 0  # noqa: E731
    s = Steering(m, [Intervention("add", v, layers=[0], positions="instruction", strength=3.0),
                     Intervention("ablate", v, layers=[1], positions=every_third),
                     Intervention("add", v, layers=[2], positions=[1, -2], strength=-4.0, include_sink=True),
                     Intervention("clamp", v, layers=[1], positions="instruction_last", strength=2.0)])
    assert select("instruction", steer.tokenize(m, PROMPTS)).sum(-1).tolist() != [0] * len(PROMPTS)
    _check(m, eng, s)
    h = prompt_means(m, PROMPTS, layers=[2])[:, 0]
    u = torch.randn(m.d_model, generator=torch.Generator().manual_seed(12))
    mid = (h @ (u / u.norm())).sort().values[1:3].mean()
    s.condition = Condition(u, layer=2, threshold=float(mid))
    out, hf = _check(m, eng, s)
    assert out.gate.tolist() == hf.last_gate.cpu().float().tolist() and 0 < out.gate.sum() < len(PROMPTS)


def test_chunked_prefill_keeps_regions_and_condition():
    """Prompts prefilled over several steps (16 tokens a step): the prompt/generated split, the
    sink and CAST's prompt means still follow each request's absolute positions."""
    from steer.serve import Engine

    m = tiny_model(seed=2)
    long = [p * 4 for p in PROMPTS]  # 30-120 tokens each with the chat template
    h = prompt_means(m, long, layers=[2])[:, 0]
    u = torch.randn(m.d_model, generator=torch.Generator().manual_seed(7))
    # threshold halfway between the two middle scores: torch's median *is* one prompt's score, whose
    # gate then hangs on last-bit rounding (vLLM fired it on an AMX CPU, HF did not)
    mid = (h @ (u / u.norm())).sort().values[1:3].mean()
    cond = Condition(u, layer=2, threshold=float(mid), kind="projection")
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(8)) * 3
    with Engine(m, kv_cache_gib=1, max_model_len=256, enable_chunked_prefill=True, max_num_batched_tokens=16,
                max_num_seqs=4) as eng:
        out, hf = _check(m, eng, Steering(m, [Intervention("add", v, layers=[0], positions="prompt", strength=3.0),
                                              Intervention("clamp", v, layers=[1], positions="generated", strength=2.0)],
                                          condition=cond), prompts=long)
    assert out.gate.tolist() == hf.last_gate.cpu().float().tolist()
    assert 0 < out.gate.sum() < len(long)
    # prompts longer than a step's 16 tokens: the condition is read in the pass, but the fired ones
    # are generated again with their gate (their first chunks went through unedited)
    assert out.regenerated == [b for b in range(len(long)) if out.gate[b] != 0]


def test_each_engine_gets_its_own_kv_cache_size(tiny):
    """vLLM's CPU backend sizes its KV cache from an environment variable read at start; a second
    Engine's ``kv_cache_gib`` used to be ignored (the first one's value stayed set)."""
    import os

    from steer.serve import Engine

    m, first = tiny
    before = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    second = Engine(m, kv_cache_gib=2, max_model_len=256)
    try:
        blocks = [e.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks for e in (first, second)]
        assert blocks[1] == 2 * blocks[0], blocks
        assert os.environ.get("VLLM_CPU_KVCACHE_SPACE") == before  # set for the start only
    finally:
        second.close()


ITEMS = [{"question": "Do you like the sea?", "matching": "Yes, I love it!", "non_matching": "No, not at all."},
         {"question": "Shall we go out?", "matching": "Gladly, let us go.", "non_matching": "I would rather not."},
         {"question": "How was your day?", "matching": "Wonderful, thanks!", "non_matching": "Terrible, sadly."}]


def test_reliable_evaluation_through_vllm(tiny):
    """``evaluate_steering(backend=...)``: likelihood effects, the prompting baseline and the
    perplexity ratio from vLLM's prefill equal the HF path's (the neutral KL is HF's in both), for
    steering on every token and on the response tokens only (a callable selector)."""
    from steer.evaluate import completion_logprob, evaluate_steering
    from steer.persona import _from_response

    m, eng = tiny
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(13)) * 3
    pairs = [("Hi", "Hello there!"), ("Tell me a story", "Once upon a time.")]
    for pos in ("all", _from_response):
        s = steer.steer(m, v, layer=1, strength=3.0, positions=pos)
        with s:
            ref = completion_logprob(m, [p for p, _ in pairs], [c for _, c in pairs], steering=s)
        got = completion_logprob(m, [p for p, _ in pairs], [c for _, c in pairs], steering=s, backend=eng)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        kw = dict(system_prompt="Be cheerful.", neutral_prompts=["Name a fruit"], unrelated_texts=["The river runs."])
        make = lambda a: steer.steer(m, v, layer=1, strength=a, positions=pos)  # noqa: E731
        hf = evaluate_steering(m, ITEMS, make, [0.0, 3.0], **kw)
        vl = evaluate_steering(m, ITEMS, make, [0.0, 3.0], **kw, backend=eng)
        for a, b in zip(hf.rows, vl.rows):
            assert a["setting"] == b["setting"] and a["neutral_kl"] == b["neutral_kl"]
            assert abs(a["effect"] - b["effect"]) < 2 * ATOL and abs(a["ppl_ratio"] - b["ppl_ratio"]) < 1e-2
            assert a["matching_rate"] == b["matching_rate"]
        assert abs(hf.rows[1]["effect"]) > 10 * ATOL  # the steering moves the likelihoods at all


def test_cli_evaluate_backend_vllm(tiny, tmp_path):
    """``steer evaluate --backend vllm`` writes the same rows as ``--backend hf``."""
    import json

    from steer.cli import main
    from steer.directions import Direction

    m, _ = tiny
    d = tmp_path / "model"
    m.hf.save_pretrained(d)
    m.tokenizer.save_pretrained(d)
    v = torch.randn(m.n_layers, m.d_model, generator=torch.Generator().manual_seed(14))
    Direction(v, 1, "mean_diff", {"model": str(d)}).save(tmp_path / "dir.pt")
    (tmp_path / "items.json").write_text(json.dumps(ITEMS))
    rows = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.json"
        assert main(["evaluate", "--model", str(d), "--direction", str(tmp_path / "dir.pt"), "--items",
                     str(tmp_path / "items.json"), "--strengths", "0,4", "--neutral", "2", "--backend", backend,
                     "--json", str(out)]) == 0
        rows[backend] = json.loads(out.read_text())
    assert rows["vllm"]["backend"] == "vllm"
    for a, b in zip(rows["hf"]["rows"], rows["vllm"]["rows"]):
        assert abs(a["effect"] - b["effect"]) < 2 * ATOL, (a, b)


def test_review_findings_on_the_vllm_path(tiny):
    """Clamping to 0 (projecting the direction out) was skipped as 'not steered'; Last(k) longer than
    a prompt ran; n=2 returned one sample per prompt; a NaN gate ran (and its NaN stayed in vLLM's
    reused KV blocks for later calls); an interrupted call left its requests queued for the next."""
    m, eng = tiny
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(7)) * 3
    _check(m, eng, steer.steer(m, v, layer=1, kind="clamp", strength=torch.tensor([0.0, 3.0, 0.0, -2.0])))
    _check(m, eng, steer.steer(m, v, layer=1, kind="clamp", strength=0.0))
    with pytest.raises(ValueError, match="only"):
        eng.generate(PROMPTS, steer.steer(m, v, layer=1, positions=steer.Last(500)), max_new_tokens=2)
    with pytest.raises(ValueError, match="n=2"):
        eng.generate(PROMPTS, max_new_tokens=2, n=2, temperature=0.8)
    with pytest.raises(ValueError, match="NaN"):
        eng.generate(PROMPTS, Steering(m, [Intervention("add", v, layers=[1])], gate=torch.tensor([1.0, float("nan"), 1, 1])),
                     max_new_tokens=2)
    steps = {"n": 0}
    step = eng.llm.llm_engine.step

    def interrupted():
        steps["n"] += 1
        if steps["n"] == 2:
            raise KeyboardInterrupt
        return step()

    eng.llm.llm_engine.step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            eng.generate(PROMPTS, max_new_tokens=8)
    finally:
        del eng.llm.llm_engine.step
    assert not eng.llm.llm_engine.has_unfinished_requests()
    assert eng.generate(PROMPTS[:2], max_new_tokens=6, min_new_tokens=6) == _hf(m, None, PROMPTS[:2])[0]


def test_an_engine_started_inside_a_steering_block_checks_the_plain_model():
    """Its start-up check compared vLLM with the steered HF forward (a 'wrong weights' error)."""
    m = tiny_model(seed=3)
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0)) * 3
    with steer.steer(m, v, layer=1, strength=8.0) as s:
        texts = s.generate(PROMPTS[:2], max_new_tokens=4, min_new_tokens=4, backend="vllm")
        assert texts == s.generate(PROMPTS[:2], max_new_tokens=4, min_new_tokens=4)
    m.__dict__["_vllm_engine"].close()
