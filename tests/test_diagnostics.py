"""steer.diagnostics against hand computations on tiny models (the lens at the last layer is the
model's output on every family; a planted outlier is found with its attention; a trace read in the
generation pass equals a full forward over the generated text), and the seed papers' observations
on the embedded SmolLM2 (the first-token massive activation and its attention sink, the IOI
answer rising through the lens, a refusal probe rising under refusal steering)."""

import pytest
import torch

import steer
from conftest import RUNNER_FAMILIES
from steer import diagnostics as D
from steer.data import Raw, tokenize

RAW = [Raw("When Mary and John went out"), Raw("The sky")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", RUNNER_FAMILIES)
def test_lens_at_the_last_layer_is_the_models_output(family, dtype):
    """decode() (final norm, unembedding, final soft-cap) against HF's own forward, fp32 and bf16."""
    m = steer.load(family, dtype=dtype)
    lens = D.logit_lens(m, RAW, positions="all", targets=[3, 7], k=4)
    b = tokenize(m, RAW)
    with torch.no_grad():
        probs = m.hf(input_ids=b.input_ids, attention_mask=b.attention_mask,
                     position_ids=b.position_ids).logits.float().softmax(-1)
    for i in range(len(RAW)):
        n = int(b.lengths[i])
        p = probs[i, -n:]  # the prompt's own tokens (left padding)
        assert lens.positions[i] == list(range(n))
        torch.testing.assert_close(lens.target_probs[i, -1, :n], p[:, [3, 7]], atol=1e-5, rtol=1e-4)
        ranks = (p[:, None, :] > p[:, [3, 7], None]).sum(-1)
        assert (lens.target_ranks[i, -1, :n] - ranks).abs().max() <= 1  # (ties within rounding)
        torch.testing.assert_close(lens.top_probs[i, -1, :n], p.topk(4).values, atol=1e-5, rtol=1e-4)
        ent = -(p * p.log()).sum(-1)
        torch.testing.assert_close(lens.entropy[i, -1, :n], ent, atol=1e-4, rtol=1e-4)


def test_lens_at_a_middle_layer_by_hand(tiny):
    """Layer 0 of a Llama read by hand: RMSNorm with the final norm's weight, then W_U."""
    lens = D.logit_lens(tiny, RAW[:1], layers=[0], positions="last", k=3)
    h = steer.capture(tiny, RAW[:1], layers=[0], positions="last").tensor[0, 0]
    norm = tiny.hf.model.norm
    x = h / torch.sqrt(h.pow(2).mean() + norm.variance_epsilon) * norm.weight
    p = (x @ tiny.hf.lm_head.weight.T).softmax(-1)
    v, i = p.topk(3)
    assert lens.top_ids[0, 0, 0].tolist() == i.tolist()
    torch.testing.assert_close(lens.top_probs[0, 0, 0], v, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="targets="):
        lens.first_layer_on_top(0)  # no targets were asked for


def test_steered_lens_and_its_kl(tiny):
    """Steering at layer 1 leaves layer 0's lens alone; at layer 1 the lens is the steered model's
    output, and its KL from the unsteered lens is the KL of the two outputs."""
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0)) * 3
    st = steer.steer(tiny, v, layer=1, strength=2.0)
    lens = D.logit_lens(tiny, RAW, steering=st, compare=True, targets=[5])
    plain = D.logit_lens(tiny, RAW, targets=[5])
    assert lens.steered and torch.all(lens.kl_from_unsteered[:, 0] < 1e-6)
    torch.testing.assert_close(lens.target_probs[:, 0], plain.target_probs[:, 0])
    with st as s:
        q = s.logits(RAW)[:, -1].log_softmax(-1)
    with steer.Steering(tiny) as s:
        p0 = s.logits(RAW)[:, -1].log_softmax(-1)
    kl = (q.exp() * (q - p0)).sum(-1)
    torch.testing.assert_close(lens.kl_from_unsteered[:, 1, 0], kl, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lens.target_probs[:, 1, 0, 0], q.exp()[:, 5], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="steering="):
        D.logit_lens(tiny, RAW, compare=True)


def test_planted_outlier_is_found_with_its_attention(tiny):
    """+5000 on dimension 7 of the second token at resid_post.0: found at both layers, at that
    position and dimension, input-independent; the attention mass on it is the attention weights'
    own sum."""
    prompts = [Raw("The sky is blue"), Raw("A cat sat there")]  # one length: no padding, whatever the order
    b = tokenize(tiny, prompts)
    assert bool(b.attention_mask.all())

    def plant(act, site):
        act = act.clone()
        act[:, 1, 7] += 5000.0
        return act

    with steer.add_hooks(tiny, {"resid_post.0": plant}):
        r = D.massive_activations(tiny, prompts, batch_size=2)
        from steer._hf import eager_attention
        att = []  # the model's own weights, as each eager attention module returns them
        hs = [tiny.arch.attention(blk).register_forward_hook(lambda mod, a, o: att.append(o[1])) for blk in tiny.layers]
        try:
            with eager_attention(tiny.hf), torch.no_grad():
                tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        finally:
            for h in hs:
                h.remove()
        a = steer.capture(tiny, prompts, layers=[1], positions="all")  # every token, for a brute-force top-k
    assert [(e["layer"], e["dim"], e["positions"], e["prompts"]) for e in r.entries] == [(0, 7, [1], 2), (1, 7, [1], 2)]
    assert r.dims == [7] and r.positions(0) == [1] and r.peak()["dim"] == 7
    assert r.entries[0]["cv_across_prompts"] < 0.01 and r.entries[0]["ratio_to_median"] > 1000
    # attention on position 1 by hand: mean over each prompt's queries, then over prompts
    T = b.input_ids.shape[1]
    hand = []
    for i in range(len(prompts)):
        s = T - int(b.lengths[i])
        hand.append(torch.stack([w[i, :, s:, s + 1].mean(-1) for w in att]))  # [layer, head]
    torch.testing.assert_close(r.attention_mass, torch.stack(hand).mean(0), atol=1e-6, rtol=1e-5)
    # the top entries against the brute-force capture
    x = a.tensor[1, 0].abs()
    assert float(r.top_values[1, 1].abs()[0]) == pytest.approx(float(x.max()), rel=1e-6)
    assert float(r.median[1, 1]) == pytest.approx(float(x.flatten().median()), rel=1e-6)


def test_no_outlier_in_a_random_model(tiny):
    r = D.massive_activations(tiny, RAW)
    assert r.entries == [] and r.dims == [] and torch.all(r.attention_mass == 0)
    assert "MassiveActivations" in repr(r)


def _full_forward_scores(m, ids, u, layer, hooks=None):
    got = {}

    def grab(act, site):
        got["h"] = act[0].float() @ u

    with steer.add_hooks(m, {**(hooks or {}), f"resid_post.{layer}": grab}), torch.no_grad():
        m.hf(input_ids=torch.tensor([ids]))
    return got["h"]


@pytest.mark.parametrize("steered", [False, True])
def test_trace_equals_a_full_forward_over_the_generation(tiny, steered):
    """The readings taken in the generation pass (prefill, then one per decode step) equal a
    cache-free forward over prompt + generated tokens, with and without steering."""
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(3))
    w = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(4)) * 4
    st = steer.steer(tiny, w, layer=0, strength=1.0, include_sink=True) if steered else None
    tr = D.probe_trace(tiny, RAW, v, layer=1, max_new_tokens=5, steering=st)
    u = v / v.norm()
    b = tokenize(tiny, RAW)
    for i in range(len(RAW)):
        p, g = int(tr.prompt_len[i]), int(tr.gen_len[i])
        assert g == 5
        assert tr.ids[i][:p] == b.input_ids[i, -p:].tolist()
        hooks = {"resid_post.0": lambda act, site: act + w} if steered else None
        full = _full_forward_scores(tiny, tr.ids[i], u, 1, hooks)
        assert len(tr.tokens[i]) == p + g
        torch.testing.assert_close(tr.scores[i, : p + g - 1], full[: p + g - 1], atol=1e-4, rtol=1e-4)
        assert torch.isnan(tr.scores[i, p + g - 1])  # the last generated token is never fed back


def test_trace_reads_conditions_and_probes(tiny):
    from steer.backtracking import Probe

    v = torch.randn(tiny.d_model)
    by_vec = D.probe_trace(tiny, RAW[:1], v, layer=1, max_new_tokens=2)
    cond = steer.Condition(v / v.norm(), layer=1)
    by_cond = D.probe_trace(tiny, RAW[:1], cond, max_new_tokens=2)
    torch.testing.assert_close(by_cond.scores, by_vec.scores, equal_nan=True)
    probe = D.probe_trace(tiny, RAW[:1], Probe(v / v.norm(), 0.0, layer=1), max_new_tokens=2)
    torch.testing.assert_close(probe.scores, torch.sigmoid(by_vec.scores), equal_nan=True)
    d = by_vec.largest_drop(0)
    s = by_vec.scores[0]
    diffs = s[2:] - s[1:-1]
    assert d["drop"] == pytest.approx(float(diffs[~torch.isnan(diffs)].min()))
    with pytest.raises(ValueError, match="layer="):
        D.probe_trace(tiny, RAW, v)
    with pytest.raises(ValueError, match="needs \\[64\\]"):
        D.probe_trace(tiny, RAW, torch.randn(32), layer=1)


# -- the embedded model ----------------------------------------------------------------------

@pytest.mark.slow
def test_first_token_massive_activation_and_its_sink(smol):
    prompts = [Raw(t) for t in ["The capital of France is Paris. It is a large city on the river Seine, known for its museums.",
                                "I love dogs because they are loyal, friendly and always happy to see me come home.",
                                "Summer is hot. Winter is cold. Spring and autumn sit in between, mild and often wet.",
                                "When John and Mary went to the store, John gave a drink to Mary, who thanked him."]]
    r = D.massive_activations(smol, prompts)
    at15 = [e for e in r.entries if e["layer"] == 15]
    assert len(at15) == 1 and at15[0]["positions"] == [0] and at15[0]["prompts"] == 4
    assert 15_000 < at15[0]["max_abs"] < 30_000 and at15[0]["ratio_to_median"] > 3000  # ~22,500, median ~2.7
    assert at15[0]["cv_across_prompts"] < 0.1  # nearly input-independent
    # an attention sink: past the first layers most heads put most of their attention on it
    late = r.attention_mass[5:]
    assert float(r.uniform_mass.mean()) < 0.2
    assert float(late.mean()) > 3 * float(r.uniform_mass.mean()) and float(late.median()) > 0.5


@pytest.mark.slow
def test_ioi_answer_rises_through_the_lens(smol):
    """The logit lens of IOI prompts at the last token: from a middle-late layer on, the indirect
    object is put before the subject (IO − S log-probability > 2 on average, IO ahead in ≥ 7 of 8
    prompts) and its rank among all tokens falls by more than 10x there. (Over the whole
    vocabulary SmolLM2's lens makes the IO the top token only at the last layer: its middle layers
    decode to ' ', ',' and ' the'.)"""
    task = steer.patching.ioi_task(smol, n=8)
    ios, ss = task.metric.answer_ids.tolist(), task.metric.wrong_ids.tolist()
    targets = sorted(set(ios + ss))
    lens = D.logit_lens(smol, [Raw(t) for t in task.clean.texts], targets=targets, k=3)
    diff = torch.stack([lens.target_logprobs[i, :, 0, targets.index(io)] - lens.target_logprobs[i, :, 0, targets.index(s)]
                        for i, (io, s) in enumerate(zip(ios, ss))])  # [prompt, layer]
    good = (diff.mean(0) > 2) & ((diff > 0).float().mean(0) >= 7 / 8)
    first = next(j for j in range(smol.n_layers) if bool(good[j:].all()))
    assert 15 <= first <= 25, diff.mean(0)
    rank = torch.stack([lens.target_ranks[i, :, 0, targets.index(io)] for i, io in enumerate(ios)]).float().median(0).values
    assert float(rank[first]) * 10 < float(rank[first - 1])
    assert all(lens.first_layer_on_top(targets.index(io), prompt=i) is not None for i, io in enumerate(ios))


@pytest.mark.slow
def test_refusal_probe_trace_rises_under_refusal_steering(smol):
    data = steer.refusal.training_data()
    H, S = data["harmful"][:32], data["harmless"][:32]
    d = steer.extract(smol, H, S, positions="post_instruction")
    held = data["harmless"][-6:]
    plain = D.probe_trace(smol, held, d, layer=16, max_new_tokens=16)
    steered = D.probe_trace(smol, held, d, layer=16, max_new_tokens=16,
                            steering=steer.steer(smol, d.vector(10) * d.vector(10).norm(), layer=10, strength=1.0))
    gen = lambda tr: torch.cat([tr.generation_scores(i)[:-1] for i in range(len(held))])  # noqa: E731
    assert float(gen(steered).nanmean()) > float(gen(plain).nanmean()) + 1.0
    assert steer.evaluate.refusal_rate(steered.texts) > steer.evaluate.refusal_rate(plain.texts)


# -- leaving massive activations out ---------------------------------------------------------

def test_skip_tokens_are_never_edited(tiny):
    """An intervention with skip_tokens leaves those tokens' activations exactly as unsteered, in a
    full forward and in a decode step fed one of them; other tokens are edited."""
    from steer.interventions import Intervention

    skip = tiny.to_tokens("e")[0]
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(2)) * 5
    iv = Intervention("add", v, layers=[0], strength=1.0, skip_tokens={skip})
    prompts = [Raw("see the tree"), Raw("a cat")]
    b = tokenize(tiny, prompts)
    got = {}

    def grab(act, site):
        got.setdefault("h", []).append(act.clone())

    def run(steering, feed):
        got.clear()
        ctx = steering if steering is not None else steer.Steering(tiny)
        with ctx as s, steer.add_hooks(tiny, {"resid_post.0": grab}), torch.no_grad():  # read after the edit
            s.batch = b
            out = tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                          use_cache=True)
            am = torch.cat([b.attention_mask, torch.ones(2, 1, dtype=b.attention_mask.dtype)], 1)
            tiny.hf(input_ids=torch.tensor([[feed], [feed]]), attention_mask=am,
                    position_ids=b.position_ids[:, -1:] + 1, past_key_values=out.past_key_values, use_cache=True)
        return got["h"]

    other = tiny.to_tokens("x")[0]
    for feed in (skip, other):
        plain, steered = run(None, feed), run(steer.Steering(tiny, [iv]), feed)
        is_skip = b.input_ids == skip
        real = b.attention_mask.bool()
        first = torch.zeros_like(real)
        first[torch.arange(2), (b.input_ids.shape[1] - b.lengths)] = True  # the sink, left alone too
        same = (plain[0] - steered[0]).abs().amax(-1) < 1e-6
        assert same[is_skip & real].all() and not same[real & ~is_skip & ~first].any()
        assert bool(((plain[1] - steered[1]).abs().amax() < 1e-6)) == (feed == skip)


def test_extract_and_steer_leave_planted_massive_activations_out(tiny):
    """A planted outlier (+5000 on dimension 7 of the embedding of 'e', so every 'e' token carries
    it at every layer): exclude= finds it, the direction is the one read without those tokens,
    with dimension 7 zeroed; steer(exclude=) zeroes it and skips those tokens."""
    e = tiny.to_tokens("e")[0]
    emb = tiny.hf.get_input_embeddings().weight
    pos, neg = [Raw("the tree is green"), Raw("see here")], [Raw("a cat sat"), Raw("dogs run")]
    with torch.no_grad():
        emb[e, 7] += 5000.0
    try:
        r = D.massive_activations(tiny, pos + neg, attention=False)
        dims, skip, sink = D.massive.exclusion(tiny, r)
        assert dims == [7] and skip == {e} and not sink
        d = steer.extract(tiny, pos, neg, positions="all", layer=1, exclude=r)
        ids = torch.tensor([e])
        ref = steer.extract(tiny, pos, neg, positions=lambda b: steer.positions.mask("all", b, include_sink=False)
                            & ~torch.isin(b.input_ids, ids), layer=1)
        plain = steer.extract(tiny, pos, neg, positions="all", layer=1)
    finally:
        with torch.no_grad():
            emb[e, 7] -= 5000.0
    want = ref.vectors.clone()
    want[:, 7] = 0
    torch.testing.assert_close(d.vectors, want)
    assert d.meta["exclude"] == {"dims": [7], "tokens": [e]}
    assert plain.vectors[1, 7].abs() > 100  # without exclude, the outlier's share of the mean leaks in
    st = steer.steer(tiny, torch.ones(tiny.d_model), layer=1, exclude=r)
    iv = st.interventions[0]
    assert float(iv.vector[7]) == 0.0 and iv.skip_tokens == {e}
    with pytest.raises(ValueError, match="'massive'"):
        steer.steer(tiny, torch.ones(tiny.d_model), layer=1, exclude="huge")
    with pytest.raises(ValueError, match="skip_tokens"):
        steer.steer(tiny, exclude=r)


@pytest.mark.slow
def test_massive_dimension_takes_over_a_sink_inclusive_direction(smol):
    """The prompt-mean refusal direction with the sink's ~25,000 in the mean: dimension 507 (the
    massive one) carries nearly all of its norm, because harmful and harmless prompts differ in
    length and so in the sink's share of the mean. exclude="massive" removes it, recovers the
    direction extracted without the sink, and separates held-out prompts better (measured: cosine
    with the sink-free direction 0.14 → 0.999; held-out AUROC 0.86 → 0.91)."""
    from steer import evaluate as E

    d = steer.refusal.training_data()
    H, S = d["harmful"][:32], d["harmless"][:32]
    kw = dict(positions="all", layers=[15], layer=15)
    with_sink = steer.extract(smol, H, S, include_sink=True, **kw).vector(15)
    excluded = steer.extract(smol, H, S, include_sink=True, exclude="massive", **kw).vector(15)
    default = steer.extract(smol, H, S, **kw).vector(15)  # the sink left out, steer's default
    assert abs(float(with_sink[507])) / float(with_sink.norm()) > 0.9 and float(excluded[507]) == 0.0
    cos = lambda a, b: float(a @ b / a.norm() / b.norm())  # noqa: E731
    assert cos(excluded, default) > 0.99 and cos(with_sink, default) < 0.3
    held = d["harmful"][-16:] + d["harmless"][-16:]
    h = steer.capture(smol, held, layers=[15], positions="all", reduce="mean", include_sink=False).tensor[:, 0]
    labels = [1] * 16 + [0] * 16
    assert E.auroc(h @ excluded, labels) > E.auroc(h @ with_sink, labels) + 0.03


@pytest.mark.parametrize("probe_layer", [0, 1])
def test_probe_trace_under_a_cast_condition_reads_the_steered_pass(tiny, probe_layer):
    """A condition's pre-pass runs the blocks up to its layer first: the trace took its readings
    for the prompt, and the prefill's prompt columns for the generated tokens (off by up to 38)."""
    from steer.conditions import Condition
    from steer.interventions import Intervention
    from steer.steering import Steering, prompt_means

    g = torch.Generator().manual_seed(0)
    v, u = torch.randn(tiny.d_model, generator=g), torch.randn(tiny.d_model, generator=g)
    prompts = [Raw("Hi"), Raw("Hello there"), Raw("Good morning, friend")]
    score = Condition(u, layer=1).score(prompt_means(tiny, prompts, layers=[1])[:, 0])
    cond = Condition(u, layer=1, threshold=float(score.median()), side="above")  # fires on some rows only
    fires = (score > score.median()).float()
    assert 0 < fires.sum() < len(prompts)
    iv = Intervention("add", v, layers=[0], strength=4.0)
    got = D.probe_trace(tiny, prompts, v, layer=probe_layer, max_new_tokens=4, steering=Steering(tiny, [iv], condition=cond))
    ref = D.probe_trace(tiny, prompts, v, layer=probe_layer, max_new_tokens=4, steering=Steering(tiny, [iv], gate=fires))
    assert got.ids == ref.ids
    torch.testing.assert_close(got.scores, ref.scores, equal_nan=True)


def test_diagnostics_refuse_what_they_cannot_read(tiny):
    """A lens position past the prompt wrapped onto another one; refusal labels went through
    bool() (None as complied, "no" as refused); a trace at layer=-1 was stored as -1."""
    lens = D.logit_lens(tiny, [Raw("ab")], positions="all", k=2)
    n = int(lens.mask[0].sum())
    assert lens.table(0, n - 1) == lens.table(0, -1)
    for pos in (n, -n - 1):
        with pytest.raises(IndexError, match="positions read"):
            lens.table(0, pos)
    with pytest.raises(ValueError, match="True/False"):
        D.trajectories(tiny, ["a", "b"], tasks=["t", "t"], refused=[None, "no"], layers=[0])
    v = torch.randn(tiny.d_model)
    assert D.probe_trace(tiny, RAW[:1], v, layer=-1, max_new_tokens=2).layer == tiny.n_layers - 1


def test_trace_and_massive_settings_that_would_misread(tiny):
    """A model whose generation config asks for beams would misalign the trace's rows; a NaN
    threshold marked nothing as massive."""
    m = steer.load("tiny-llama")
    m.hf.generation_config.num_beams = 2
    v = torch.randn(m.d_model)
    assert D.probe_trace(m, RAW, v, layer=1, max_new_tokens=3).ids == D.probe_trace(tiny, RAW, v, layer=1, max_new_tokens=3).ids
    with pytest.raises(ValueError, match="finite"):
        D.massive_activations(tiny, RAW, min_value=float("nan"))


def test_steered_lens_with_a_prompt_selector(tiny):
    """A steering that picks prompt tokens (Last(1)) raised, asking for steering.batch, which
    logit_lens gave no way to set; each batch now describes its passes."""
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(4)) * 3
    prompts = [Raw("Hello there friend"), Raw("Hi")]
    lens = D.logit_lens(tiny, prompts, positions="all", k=2,
                        steering=steer.steer(tiny, v, layer=0, strength=4.0, positions=steer.Last(1)))
    for i, p in enumerate(prompts):  # by hand: +4v at the last token only, one prompt at a time
        ids = torch.tensor([tiny.to_tokens(p)])
        with steer.add_hooks(tiny, {"resid_post.0": lambda a, s: torch.cat([a[:, :-1], a[:, -1:] + 4.0 * v], 1)}):
            ref = tiny.hf(input_ids=ids).logits[0]
        assert torch.equal(lens.top_ids[i, -1, :ids.shape[1], 0], ref.argmax(-1))
