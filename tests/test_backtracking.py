"""FASB (steer.backtracking) on tiny models against brute force: without a trigger it is HF's greedy
generate; a row that fires backs up exactly k tokens and continues as a cache-free greedy loop
steered from the re-fed token on; other rows' tokens are untouched."""

import pytest
import torch

import steer
from conftest import RUNNER_FAMILIES, deep
from steer import backtracking as B
from steer._hf import eos_ids
from steer.data import tokenize


class Scheduled(B.Probe):
    """Test double: P(desired) = 0.1 for ``row`` at its ``at``-th check, 0.9 otherwise. ``row`` is
    a position in the batch: where rows may finish before that check, pass ``drop_finished=False``
    so that finished rows stay in the batch."""

    def __init__(self, row, at, d):
        super().__init__(torch.zeros(d), 0.0, layer=1)
        self.row, self.at, self.calls = row, at, 0

    def prob(self, h):
        p = torch.full((h.shape[0],), 0.9)
        if self.calls == self.at and self.row is not None:
            p[self.row] = 0.1
        self.calls += 1
        return p


PROMPTS = ["Hi there", "Tell me a story about a cat", "Why?"]


def hf_greedy(m, prompts, n):
    b = tokenize(m, prompts)
    out = m.hf.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=n, do_sample=False,
                        pad_token_id=m.tokenizer.pad_token_id)
    eos = eos_ids(m)
    res = []
    for row in out[:, b.input_ids.shape[1]:].tolist():
        toks = []
        for t in row:
            if t in eos:
                break
            toks.append(t)
        res.append(toks)
    return res


def brute_steered(m, prompt, kept, vector, layer, alpha, n_more, start=None):
    """Cache-free greedy loop: prompt + kept tokens, +α·v at resid_post.layer from the last kept
    token's position on (the re-fed token), or from ``start`` on, one full forward per token."""
    b = tokenize(m, [prompt])
    ids = b.input_ids[0].tolist() + list(kept)
    start = len(ids) - 1 if start is None else start
    out = []

    def hook(act, site):
        act = act.clone()
        act[:, start:] += alpha * vector
        return act

    with steer.add_hooks(m, {f"resid_post.{layer}": hook}):
        for _ in range(n_more):
            logits = m.hf(input_ids=torch.tensor([ids])).logits[0, -1]
            t = int(logits.argmax())
            if t in eos_ids(m):
                break
            ids.append(t)
            out.append(t)
            start = start  # steering stays on for every later position
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_no_trigger_is_greedy_generate(family, dtype):
    """FASB's own decode loop (explicit positions, a mask it grows itself) against HF's generate,
    on every family of the matrix, in fp32 and bf16."""
    m = steer.load(family, dtype=dtype)
    r = B.generate(m, PROMPTS, torch.randn(m.d_model), layer=1, strength=8.0, probe=Scheduled(None, 0, m.d_model),
                   max_new_tokens=7)
    assert r.tokens == hf_greedy(m, PROMPTS, 7)
    assert not r.triggered.any() and int(r.steered_tokens.sum()) == 0 and r.steps <= 7


@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_backtrack_matches_brute_force_on_every_family(family):
    """The cache with holes (masked discarded columns, a re-fed token at its old position) gives
    what a cache-free loop over the kept tokens gives, on every family."""
    m = steer.load(family)
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0)) * 3
    plain = hf_greedy(m, PROMPTS, 6)
    # rows that meet an end-of-turn token early would leave the batch and move row 1's position
    r = B.generate(m, PROMPTS, v, layer=1, strength=4.0, probe=Scheduled(1, 3, m.d_model), backtrack=2,
                   max_new_tokens=6, drop_finished=False)
    kept = plain[1][:1]
    assert r.tokens[0] == plain[0] and r.tokens[2] == plain[2] and r.tokens[1][:1] == kept
    assert r.tokens[1][1:] == brute_steered(m, PROMPTS[1], kept, v, 1, float(r.strength[1]), 5)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_backs_up_exactly_k_and_leaves_other_rows(k):
    m = steer.load("tiny-llama")
    torch.manual_seed(0)
    v = torch.randn(m.d_model) * 3
    plain = hf_greedy(m, PROMPTS, 8)
    at = 4  # row 1 fires at its 5th check, after 4 accepted tokens
    r = B.generate(m, PROMPTS, v, layer=1, strength=6.0, probe=Scheduled(1, at, m.d_model), threshold=0.5,
                   backtrack=k, max_new_tokens=8)
    assert r.tokens[0] == plain[0] and r.tokens[2] == plain[2]  # other rows untouched
    assert r.triggered.tolist() == [False, True, False] and r.trigger_step.tolist() == [-1, at, -1]
    assert int(r.discarded[1]) == k
    kept = plain[1][: at - k]
    assert r.tokens[1][: at - k] == kept
    alpha = 6.0 * (1 + (0.5 - 0.1) / 0.5)
    assert float(r.strength[1]) == pytest.approx(alpha)
    assert r.tokens[1][at - k:] == brute_steered(m, PROMPTS[1], kept, v, 1, alpha, 8 - (at - k))
    assert r.tokens[1] != plain[1]  # the steering changed something (the test can fail)
    # steered columns: the re-fed token and every accepted token fed after it
    assert int(r.steered_tokens[1]) == len(r.tokens[1]) - (at - k)


def test_backtrack_before_any_token_refeeds_the_prompt_end():
    m = steer.load("tiny-llama")
    v = torch.randn(m.d_model) * 3
    r = B.generate(m, PROMPTS[:2], v, layer=1, strength=5.0, probe=Scheduled(0, 0, m.d_model), backtrack=3,
                   max_new_tokens=6)
    assert int(r.discarded[0]) == 0 and int(r.trigger_step[0]) == 0
    assert r.tokens[0] == brute_steered(m, PROMPTS[0], [], v, 1, float(r.strength[0]), 6)
    assert r.tokens[1] == hf_greedy(m, PROMPTS[:2], 6)[1]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_reencode_prompt_steers_the_whole_prompt_of_rows_that_fire_at_once(family):
    """A row that fires at the prompt's end, with ``reencode_prompt``, is generated as constant
    steering generates it (every position but the sink, prompt included); the batch's other rows
    are HF's greedy tokens; without the option only the prompt's last token is steered."""
    m = steer.load(family)
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(1))
    prompts = PROMPTS[1:] + PROMPTS[:1]  # the firing row is the longest: no left padding in its brute force
    r = B.generate(m, prompts, v, layer=0, strength=1.0, probe=Scheduled(0, 0, m.d_model), backtrack=3,
                   max_new_tokens=6, reencode_prompt=True)
    alpha = float(r.strength[0])
    assert r.reencoded.tolist() == [True, False, False] and r.trigger_step.tolist() == [0, -1, -1]
    assert r.tokens[0] == brute_steered(m, prompts[0], [], v, 0, alpha, 6, start=1)
    assert r.tokens[1:] == hf_greedy(m, prompts, 6)[1:]
    last_only = brute_steered(m, prompts[0], [], v, 0, alpha, 6)
    assert last_only != r.tokens[0]  # steering the whole prompt is not steering its last token (the test can fail)
    assert B.generate(m, prompts, v, layer=0, strength=1.0, probe=Scheduled(0, 0, m.d_model), backtrack=3,
                      max_new_tokens=6).tokens[0] == last_only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_reencode_prompt_on_every_family(family, dtype, monkeypatch):
    """The fired row's prefill written into the batch's cache equals the whole batch prefilled
    again, on every family of the matrix in fp32 and bf16; in fp32 it is also the cache-free
    loop, and the other rows are HF's greedy tokens in both."""
    import steer._hf as H

    m = steer.load(family, dtype=dtype)
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(1))
    prompts = PROMPTS[1:] + PROMPTS[:1]
    real, used = H.assign_cache_rows, []
    monkeypatch.setattr(H, "assign_cache_rows", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    spliced = B.generate(m, prompts, v, layer=0, strength=1.0, probe=Scheduled(0, 0, m.d_model), max_new_tokens=5,
                         reencode_prompt=True)
    monkeypatch.setattr(H, "assign_cache_rows", lambda *a, **k: False)
    whole = B.generate(m, prompts, v, layer=0, strength=1.0, probe=Scheduled(0, 0, m.d_model), max_new_tokens=5,
                       reencode_prompt=True)
    assert spliced.tokens == whole.tokens and spliced.reencoded.tolist() == [True, False, False]
    assert spliced.tokens[1:] == hf_greedy(m, prompts, 5)[1:]
    if dtype == torch.float32:
        assert spliced.tokens[0] == brute_steered(m, prompts[0], [], v, 0, float(spliced.strength[0]), 5, start=1)
    assert used == [True]  # every family's cache takes the rows in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_reencoded_prompt_runs_only_the_blocks_from_the_steered_layer(family, dtype):
    """Reading a fired row's prompt again steered at layer 1 skips block 0 (its states are the
    unsteered prefill's) and gives the tokens of running the whole model again; in fp32 both are
    the cache-free loop steered at layer 1 from the first position after the sink."""
    m = steer.load(family, dtype=dtype)
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(1))
    prompts = PROMPTS[1:] + PROMPTS[:1]
    widths = []
    handle = m.layers[0].register_forward_pre_hook(lambda mod, args: widths.append(args[0].shape[:2]))
    try:
        runs = {rb: B.generate(m, prompts, v, layer=1, strength=1.0, probe=Scheduled(0, 0, m.d_model),
                               max_new_tokens=5, reencode_prompt=True, resume_blocks=rb) for rb in (True, False)}
    finally:
        handle.remove()
    width = tokenize(m, prompts).input_ids.shape[1]
    # block 0 read the prompts once per run, and once more (the fired row alone) only without resume_blocks
    assert [tuple(w) for w in widths if w[1] == width] == [(3, width), (3, width), (1, width)]
    assert runs[True].tokens == runs[False].tokens and runs[True].reencoded.tolist() == [True, False, False]
    assert runs[True].tokens[1:] == hf_greedy(m, prompts, 5)[1:]
    if dtype == torch.float32:
        assert runs[True].tokens[0] == brute_steered(m, prompts[0], [], v, 1, float(runs[True].strength[0]), 5, start=1)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma3", "tiny-gemma2", "tiny-qwen2", "tiny-gpt2", "tiny-pythia"])
def test_staged_prefill_stops_at_the_probe_and_runs_the_top_blocks_once(family):
    """Steered at block 1, probe at block 2 of 4: the prefill stops after block 2 for the check;
    the row that fires runs blocks 1-2 again steered; block 3 runs once for every row. The tokens
    are those of reading the prompt again through the whole model, and the cache-free loop's."""
    m = deep(family)
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(1)) * 2
    prompts = PROMPTS[1:] + PROMPTS[:1]
    width = tokenize(m, prompts).input_ids.shape[1]
    calls = {i: [] for i in range(4)}
    handles = [m.layers[i].register_forward_hook(lambda mod, args, out, i=i: calls[i].append(out.shape[:2]))
               for i in range(4)]  # the blocks that ran
    runs = {}
    try:
        for rb in (True, False):
            for c in calls.values():
                c.clear()
            probe = Scheduled(0, 0, m.d_model)
            probe.layer = 2
            runs[rb] = B.generate(m, prompts, v, layer=1, strength=1.0, probe=probe, max_new_tokens=5,
                                  reencode_prompt=True, resume_blocks=rb)
            if rb:
                prefill = {i: [tuple(w) for w in c if w[1] == width] for i, c in calls.items()}
    finally:
        for h in handles:
            h.remove()
    assert prefill == {0: [(3, width)], 1: [(3, width), (1, width)], 2: [(3, width), (1, width)], 3: [(3, width)]}
    assert runs[True].tokens == runs[False].tokens and runs[True].reencoded.tolist() == [True, False, False]
    assert runs[True].probs == runs[False].probs
    assert runs[True].tokens[1:] == hf_greedy(m, prompts, 5)[1:]
    assert runs[True].tokens[0] == brute_steered(m, prompts[0], [], v, 1, float(runs[True].strength[0]), 5, start=1)
    # a real probe: the readings after the check (the rows that fired: read steered) agree too
    w = torch.randn(m.d_model, generator=torch.Generator().manual_seed(4))
    ends = steer.capture(m, prompts, layers=[2], positions="last", progress=False).tensor[:, 0] @ w
    low, second = ends.sort().values[:2].tolist()
    lowest = B.Probe(w, -(low + second) / 2, layer=2)  # below 0.5 at the prompt's end for one row only
    real = {rb: B.generate(m, prompts, v, layer=1, strength=1.0, probe=lowest, max_new_tokens=5, reencode_prompt=True,
                           resume_blocks=rb) for rb in (True, False)}
    assert real[True].tokens == real[False].tokens
    assert real[True].reencoded.tolist() == real[False].reencoded.tolist() == (ends == low).tolist()
    for a, b in zip(real[True].probs, real[False].probs):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("probe_layer", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_staged_prefill_is_the_models_own_forward(family, dtype, probe_layer):
    """The staged prefill of 4 blocks (probe at block 2: stopped after it, row 0 run again from
    block 1 steered, block 3 once for all; probe at block 3: the whole model, then row 0 again
    from block 1) gives HF's own forward: its logits and every layer's keys and values are the
    whole batch's plain forward for rows 1-2, and row 0's forward alone under the steering."""
    from steer._hf import cache_kwarg, output_cache
    from steer.interventions import Intervention

    m = deep(family, dtype=dtype)
    b = tokenize(m, PROMPTS[1:] + PROMPTS[:1])
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(1)) * 2
    iv = Intervention("add", v, layers=[1], strength=torch.zeros(3), positions="all")
    grabbed = []
    with steer.add_hooks(m, {f"resid_post.{probe_layer}": lambda act, site: grabbed.append(act[:, -1])}):
        logits, cache = B._staged_prefill(m, b, b.attention_mask.clone(), 1, probe_layer,
                                          lambda reading: [True, False, False], [1.5, 0.0, 0.0], iv, grabbed, {},
                                          cache_kwarg(m.hf))
    kw = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=True)
    with torch.no_grad():
        plain = m.hf(**kw)
        with steer.Steering(m, [Intervention("add", v, layers=[1], strength=1.5, positions="all")]):
            steered = m.hf(**{k: x[:1] if torch.is_tensor(x) else x for k, x in kw.items()})
    tol = {} if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(logits[1:, -1], plain.logits[1:, -1], **tol)
    torch.testing.assert_close(logits[:1, -1], steered.logits[:, -1], **tol)
    assert not torch.allclose(steered.logits[:, -1], plain.logits[:1, -1], atol=1e-2)  # the steering matters
    for ours, a, s_ in zip(cache.layers, output_cache(plain).layers, output_cache(steered).layers):
        for name in ("keys", "values"):
            torch.testing.assert_close(getattr(ours, name)[1:], getattr(a, name)[1:], **tol)
            torch.testing.assert_close(getattr(ours, name)[:1], getattr(s_, name), **tol)


class Sizes(B.Probe):
    """A real probe that also records the batch size of every reading."""

    def __init__(self, d, seed):
        super().__init__(torch.randn(d, generator=torch.Generator().manual_seed(seed)), 0.0, layer=1)
        self.sizes = []

    def prob(self, h):
        self.sizes.append(h.shape[0])
        return super().prob(h)


def test_finished_rows_leave_the_batch_and_change_nothing():
    """Row 1 backs up late and runs on after rows 0 and 2 finish: they leave the batch and its
    cache, and every row's tokens, readings and steered counts are those of keeping them."""
    m = steer.load("tiny-llama")
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0)) * 3
    sizes = {}
    runs = {}
    for drop in (True, False):
        probe = Scheduled(1, 5, m.d_model)
        seen = []
        real = probe.prob
        probe.prob = lambda h, real=real, seen=seen: seen.append(h.shape[0]) or real(h)
        runs[drop] = B.generate(m, PROMPTS, v, layer=1, strength=4.0, probe=probe, backtrack=3, max_new_tokens=6,
                                drop_finished=drop)
        sizes[drop] = seen
    assert sizes[False] == [3] * len(sizes[False]) and sizes[True][-1] == 1  # the batch shrank to row 1
    a, b = runs[True], runs[False]
    assert a.tokens == b.tokens and a.trigger_step.tolist() == b.trigger_step.tolist() == [-1, 5, -1]
    assert a.steered_tokens.tolist() == b.steered_tokens.tolist() and a.steps == b.steps
    for pa, pb in zip(a.probs, b.probs):
        assert pa == pytest.approx(pb)


@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_dropping_finished_rows_on_every_family(family):
    """With a real probe (rows fire where their states say; on most families some back up and run
    on after the others finish), a batch whose finished rows leave it generates what a batch that
    keeps them generates, on every family."""
    m = steer.load(family)
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(2)) * 3
    prompts = PROMPTS + ["Good morning to you", "Count: 1 2 3"]
    out = {drop: B.generate(m, prompts, v, layer=1, strength=4.0, probe=Sizes(m.d_model, 3), threshold=0.5,
                            backtrack=2, max_new_tokens=8, reencode_prompt=True, drop_finished=drop)
           for drop in (True, False)}
    assert out[True].tokens == out[False].tokens
    assert out[True].steered_tokens.tolist() == out[False].steered_tokens.tolist()


def test_resume_at_checks_the_layer_and_restores_the_blocks():
    from steer.hooks import record_block_input, resume_at

    m = steer.load("tiny-llama")
    blocks = list(m.layers)
    for bad in (0, m.n_layers):
        with pytest.raises(ValueError, match="no block before it"):
            with resume_at(m, bad, torch.zeros(1, 1, m.d_model)):
                pass
        with pytest.raises(ValueError, match="no block before it"):
            with record_block_input(m, bad):
                pass
    with pytest.raises(ValueError, match="record_block_input"):
        with resume_at(m, 1, torch.zeros(1, 3, 32)):
            pass
    with pytest.raises(RuntimeError):
        with resume_at(m, 1, torch.zeros(1, 3, m.d_model)):
            raise RuntimeError
    assert list(m.layers) == blocks


def test_watch_prompt_false_waits_for_the_first_token():
    m = steer.load("tiny-llama")
    low = B.Probe(torch.zeros(m.d_model), bias=-5.0, layer=1)  # fires whenever it is watched
    r = B.generate(m, ["Hi there"], torch.randn(m.d_model), layer=1, strength=1.0, probe=low, backtrack=4,
                   max_new_tokens=4, watch_prompt=False)
    assert r.trigger_step.tolist() == [1] and r.discarded.tolist() == [1]


def test_probe_is_read_at_the_fed_token():
    """The real Probe path: the probe sees resid_post at the probe layer of the last fed column."""
    m = steer.load("tiny-llama")
    h = steer.capture(m, ["Hi there"], layers=[1], positions="last").tensor[0, 0]  # resid_post.1, last token
    w = torch.randn(m.d_model)
    probe = B.Probe(w, bias=float(-(h @ w)) + 0.3, layer=1)  # P(desired) at the prompt end = σ(0.3)
    r = B.generate(m, ["Hi there"], torch.randn(m.d_model), layer=1, strength=1.0, probe=probe, max_new_tokens=2)
    assert r.probs[0][0] == pytest.approx(float(torch.sigmoid(torch.tensor(0.3))), abs=1e-5)


def test_min_new_tokens_is_hf_min_new_tokens(monkeypatch):
    """End of turn is forbidden before ``min_new_tokens`` accepted tokens, as HF does it: with a
    token the model emits early declared end of turn, FASB stops there without it and equals HF's
    ``generate(min_new_tokens=...)`` with it."""
    m = steer.load("tiny-llama")
    first = hf_greedy(m, PROMPTS, 6)
    stop = first[0][1]  # row 0's second token becomes end of turn
    monkeypatch.setattr(m.hf.generation_config, "eos_token_id", stop)
    probe = Scheduled(None, 0, m.d_model)
    short = B.generate(m, PROMPTS, torch.zeros(m.d_model), layer=1, strength=1.0, probe=probe, max_new_tokens=6)
    assert len(short.tokens[0]) == 1
    b = tokenize(m, PROMPTS)
    ref = m.hf.generate(input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=6, min_new_tokens=4,
                        do_sample=False, pad_token_id=m.tokenizer.pad_token_id)[:, b.input_ids.shape[1]:].tolist()
    r = B.generate(m, PROMPTS, torch.zeros(m.d_model), layer=1, strength=1.0, probe=Scheduled(None, 0, m.d_model),
                   max_new_tokens=6, min_new_tokens=4)
    eos = eos_ids(m)
    for got, row in zip(r.tokens, ref):
        k = next((i for i, t in enumerate(row) if t in eos), len(row))
        assert got == row[:k] and len(got) >= 4


def test_bad_input():
    m = steer.load("tiny-llama")
    p = B.Probe(torch.zeros(64), 0.0, layer=1)
    with pytest.raises(ValueError, match="probability"):
        B.generate(m, ["Hi"], torch.randn(64), layer=1, strength=1.0, probe=p, threshold=1.5)
    with pytest.raises(ValueError, match="needs \\[64\\]"):
        B.generate(m, ["Hi"], torch.randn(32), layer=1, strength=1.0, probe=p)
    with pytest.raises(ValueError, match="min_new_tokens"):
        B.generate(m, ["Hi"], torch.randn(64), layer=1, strength=1.0, probe=p, max_new_tokens=3, min_new_tokens=4)


def test_fasb_probe_checks_its_arguments_before_generating(monkeypatch):
    from steer import refusal
    m = steer.load("tiny-llama")
    monkeypatch.setattr(refusal.Steering, "generate", lambda *a, **k: pytest.fail("generated before checking"))
    with pytest.raises(ValueError, match=r"layer=22 is outside 0..1"):
        refusal.fasb_probe(m, torch.randn(m.d_model), steer_layer=0)
    with pytest.raises(ValueError, match=r"steer_layer=10 is outside 0..1"):
        refusal.fasb_probe(m, torch.randn(m.d_model), layer=1)
    with pytest.raises(ValueError, match="n=0"):
        refusal.fasb_probe(m, torch.randn(m.d_model), layer=1, steer_layer=0, n=0)
    with pytest.raises(ValueError, match=r"shape \(32,\), tiny-llama needs \[64\]"):
        refusal.fasb_probe(m, torch.randn(32), layer=1, steer_layer=0)
    with pytest.raises(ValueError, match=r"shape \(2, 64\)"):  # a Direction's whole [n_layers, d_model]
        refusal.fasb_probe(m, torch.randn(2, m.d_model), layer=1, steer_layer=0)


@pytest.mark.parametrize("at,reencode", [(0, True), (3, False), (3, True)])
def test_fired_column_and_plot_mark_the_reading_that_fired(at, reencode, tmp_path):
    m = steer.load("tiny-llama")
    r = B.generate(m, PROMPTS, torch.randn(m.d_model), layer=1, strength=2.0, probe=Scheduled(1, at, m.d_model),
                   max_new_tokens=6, reencode_prompt=reencode, drop_finished=False)
    low = [i for i, p in enumerate(r.probs[1]) if p == pytest.approx(0.1)]  # the one reading below the threshold
    assert len(low) == 1 and r.fired_column.tolist() == [-1, low[0], -1]
    at = low[0]
    fig = r.plot(tmp_path / "traces.png", groups=["x", "y", "x"])
    assert (tmp_path / "traces.png").stat().st_size > 0
    ax = fig.axes[0]
    assert len(ax.lines) == 3 + 1  # one trace per row, and the threshold
    assert ax.collections[0].get_offsets().tolist() == [[at, pytest.approx(0.1)]]
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        r.plot(groups=["x", "y"])


def test_progress_bar_only_when_asked(capsys, monkeypatch):
    monkeypatch.delenv("STEER_PROGRESS", raising=False)  # (that variable silences every bar)
    m = steer.load("tiny-llama")
    kw = dict(layer=1, strength=1.0, probe=B.Probe(torch.zeros(m.d_model), 5.0, layer=1), max_new_tokens=4)
    quiet = B.generate(m, PROMPTS, torch.randn(m.d_model), progress=False, **kw)
    assert capsys.readouterr().err == ""
    shown = B.generate(m, PROMPTS, torch.randn(m.d_model), progress=True, **kw)
    assert "fasb" in capsys.readouterr().err
    assert shown.tokens == quiet.tokens and shown.steps == quiet.steps  # the bar changes nothing else


def test_fasb_probe_progress_bar_only_when_asked(capsys, monkeypatch):
    from steer import refusal
    monkeypatch.delenv("STEER_PROGRESS", raising=False)
    m = steer.load("tiny-llama")
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    kw = dict(layer=1, steer_layer=0, strength=8.0, n=4, max_new_tokens=3)
    quiet = refusal.fasb_probe(m, v, progress=False, **kw)
    assert capsys.readouterr().err == ""
    shown = refusal.fasb_probe(m, v, progress=True, **kw)
    assert "fasb_probe: answers" in capsys.readouterr().err
    assert torch.equal(shown.vector, quiet.vector) and shown.bias == quiet.bias
