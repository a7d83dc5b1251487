import pytest
import torch

import steer
from steer.hooks import add_hooks
from steer.interventions import Intervention, ablate, add, clamp, orthogonalized
from steer.steering import Steering
from steer.steering import steer as steer_ctx

PROMPTS = ["Hi", "How are you today, my friend?", "Tell me a joke."]
RESID = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _grab(model, sites, store):
    def fn(act, site):
        store[str(site)] = act.detach().clone()

    return add_hooks(model, {s: fn for s in sites})


def test_pure_functions():
    x = torch.randn(2, 3, 4)
    v = torch.randn(4)
    m = torch.tensor([[True, False, True], [False, True, True]])
    y = add(x, v, torch.tensor([1.0, -2.0]), m)
    assert torch.equal(y[~m], x[~m])
    torch.testing.assert_close(y[0, 0], x[0, 0] + v)
    torch.testing.assert_close(y[1, 1], x[1, 1] - 2 * v)
    u = v / v.norm()
    assert (ablate(x, v, m)[m] @ u).abs().max() < 1e-5
    torch.testing.assert_close(clamp(x, v, 3.0, m)[m] @ u, torch.full((4,), 3.0))
    with pytest.raises(ValueError, match="zero norm"):
        ablate(x, torch.zeros(4))


def test_add_skips_pads_and_sink(tiny):
    v = torch.randn(64)
    b = steer.tokenize(tiny, PROMPTS)
    base, got = {}, {}
    with _grab(tiny, ["resid_post.0"], base):
        tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
    with steer_ctx(tiny, v, layer=0, strength=3.0) as s, _grab(tiny, ["resid_post.0"], got):
        s.logits(PROMPTS)
    diff = (got["resid_post.0"] - base["resid_post.0"]).norm(dim=-1)
    first = (b.input_ids.shape[1] - b.lengths)
    for i in range(len(PROMPTS)):
        assert torch.all(diff[i, : first[i] + 1] == 0)  # pads and the sink untouched
        torch.testing.assert_close(diff[i, first[i] + 1:], torch.full_like(diff[i, first[i] + 1:], 3 * v.norm()))


@pytest.mark.parametrize("include_sink", [False, True])
def test_ablation_orthogonal_at_every_site(tiny, include_sink):
    v = torch.randn(64)
    u = v / v.norm()
    iv = Intervention("ablate", v, layers="all", sites=RESID, include_sink=include_sink)
    b = steer.tokenize(tiny, PROMPTS)
    got = {}
    sites = [f"{s}.{l}" for s in RESID for l in range(tiny.n_layers)]
    with Steering(tiny, [iv]) as s, _grab(tiny, sites, got):
        s.logits(PROMPTS)
    real = b.attention_mask.bool().clone()
    if not include_sink:
        real[torch.arange(len(b)), b.input_ids.shape[1] - b.lengths] = False
    for name, act in got.items():
        proj = act @ u
        assert proj[real].abs().max() < 1e-4, name


def test_weight_orthogonalization_equals_runtime_ablation(tiny):
    v = torch.randn(64)
    iv = Intervention("ablate", v, layers="all", sites=("resid_pre", "attn_out", "mlp_out"), include_sink=True)
    with Steering(tiny, [iv]) as s:
        runtime = s.logits(PROMPTS)
    m2 = orthogonalized(tiny, v)
    with Steering(m2) as s:
        weights = s.logits(PROMPTS)
    b = steer.tokenize(tiny, PROMPTS)
    real = b.attention_mask.bool()
    torch.testing.assert_close(weights[real], runtime[real], atol=1e-4, rtol=0)
    with Steering(tiny) as s:  # the original model is untouched
        assert not torch.allclose(s.logits(PROMPTS)[real], runtime[real], atol=1e-3)


def test_batched_generation_equals_per_example(tiny):
    v = torch.randn(64) * 2
    alpha = torch.tensor([1.0, 0.0, 3.0])
    with steer_ctx(tiny, v, layer=[0, 1], strength=alpha) as s:
        batched = s.generate(PROMPTS, max_new_tokens=8)
    single = []
    for i, p in enumerate(PROMPTS):
        with steer_ctx(tiny, v, layer=[0, 1], strength=alpha[i: i + 1]) as s:
            single += s.generate([p], max_new_tokens=8)
    assert batched == single
    assert batched[1] == tiny.generate([PROMPTS[1]], max_new_tokens=8)[0]  # strength 0 = unsteered
    assert batched[0] != tiny.generate([PROMPTS[0]], max_new_tokens=8)[0]


def test_kv_cache_matches_full_recompute(tiny):
    v = torch.randn(64) * 3
    with steer_ctx(tiny, v, layer=1, strength=1.0) as s:
        cached = s.generate(PROMPTS, max_new_tokens=6)
        nocache = s.generate(PROMPTS, max_new_tokens=6, use_cache=False)
    assert cached == nocache


def test_generated_positions_only(tiny):
    v = torch.randn(64) * 3
    with Steering(tiny) as s:
        ref = s.next_token_logits(PROMPTS)
    with steer_ctx(tiny, v, layer=1, strength=2.0, positions="generated") as s:
        torch.testing.assert_close(s.next_token_logits(PROMPTS), ref)  # prompt untouched
        steered = s.generate(PROMPTS, max_new_tokens=6)
    assert steered != tiny.generate(PROMPTS, max_new_tokens=6)


def test_prompt_selector_and_clamp(tiny):
    v = torch.randn(64)
    u = v / v.norm()
    got = {}
    b = steer.tokenize(tiny, PROMPTS)
    sel = steer.positions.mask("post_instruction", b)
    with steer_ctx(tiny, v, layer=0, kind="clamp", strength=5.0, positions="post_instruction") as s, \
            _grab(tiny, ["resid_post.0"], got):
        s.logits(PROMPTS)
    proj = got["resid_post.0"] @ u
    torch.testing.assert_close(proj[sel], torch.full_like(proj[sel], 5.0))
    assert (proj[~sel] - 5.0).abs().min() > 1e-3
    with steer_ctx(tiny, v, layer=0, positions="post_instruction") as s:
        with pytest.raises(ValueError, match="tokenized prompts"):
            tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask)


def test_actadd_aligned(tiny):
    vec = torch.randn(3, 64)
    iv = Intervention("add", vec, layers=[0], positions="prompt", aligned=True, include_sink=True)
    b = steer.tokenize(tiny, PROMPTS)
    base, got = {}, {}
    with _grab(tiny, ["resid_post.0"], base):
        tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
    with Steering(tiny, [iv]) as s, _grab(tiny, ["resid_post.0"], got):
        s.logits(PROMPTS)
    d = got["resid_post.0"] - base["resid_post.0"]
    first = b.input_ids.shape[1] - b.lengths
    for i in range(len(PROMPTS)):
        f = int(first[i])
        torch.testing.assert_close(d[i, f: f + 3], vec, atol=1e-5, rtol=0)
        assert torch.all(d[i, :f] == 0) and torch.all(d[i, f + 3:] == 0)


def test_gate_per_example(tiny):
    v = torch.randn(64) * 3
    with steer_ctx(tiny, v, layer=1, strength=1.0, gate=torch.tensor([1.0, 0.0, 1.0])) as s:
        out = s.next_token_logits(PROMPTS)
    with Steering(tiny) as s:
        ref = s.next_token_logits(PROMPTS)
    assert torch.equal(out[1], ref[1]) and not torch.allclose(out[0], ref[0])


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="d_model"):
        Steering(tiny, [Intervention("add", torch.randn(32), layers=[0])])
    with pytest.raises(ValueError, match="Cannot steer site"):
        Steering(tiny, [Intervention("add", torch.randn(64), layers=[0], sites="z")])
    with pytest.raises(ValueError, match="NaN"):
        Intervention("add", torch.tensor([float("nan")] * 64))
    with pytest.raises(ValueError, match="out of range"):
        Steering(tiny, [Intervention("add", torch.randn(64), layers=[7])])
    with pytest.raises(RuntimeError, match="with"):
        Steering(tiny).generate(["Hi"])
    # a layer named twice was steered twice (layers=[1, -1] at strength 2 acted as strength 4)
    for layers in ([1, -1], [1, 1]):
        with pytest.raises(ValueError, match="listed twice"):
            Steering(tiny, [Intervention("add", torch.randn(64), layers=layers)])
    with pytest.raises(ValueError, match="not a layer index"):
        Steering(tiny, [Intervention("add", torch.randn(64), layers=[True])])
    for bad in (dict(strength=float("nan")), dict(strength=torch.tensor([1.0, float("inf")])), dict(sites=()),
                dict(sites=("resid_post", "resid_post"))):
        with pytest.raises(ValueError, match="not finite|each site"):
            Intervention("add", torch.randn(64), layers=[0], **bad)
    # hooks are removed after an exception
    with pytest.raises(KeyError):
        with steer_ctx(tiny, torch.randn(64), layer=0):
            raise KeyError
    assert not tiny.hf.model._forward_pre_hooks


def test_resid_mid_edit_flows_through_the_residual_stream(tiny):
    """Adding v to resid_mid of layer l equals adding v to layer l's attention output (the
    residual after attention is resid_pre + attn_out): the edit must reach later layers too,
    not only the MLP's input."""
    v = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 2
    logits = {}
    for site in ("resid_mid", "attn_out"):
        with Steering(tiny, [Intervention("add", v, layers=[0], sites=(site,))]) as s:
            logits[site] = s.logits(PROMPTS)
    with Steering(tiny) as s:
        base = s.logits(PROMPTS)
    b = steer.tokenize(tiny, PROMPTS)
    real = b.attention_mask.bool()
    torch.testing.assert_close(logits["resid_mid"][real], logits["attn_out"][real], atol=1e-5, rtol=0)
    assert not torch.allclose(logits["resid_mid"][real], base[real], atol=1e-3)


# -- one engine for every edit: bias edits and LEACE erasers are Intervention kinds ------------
def test_bias_edit_is_steering_with_its_interventions(tiny):
    """An Edit (ablate / clamp toward a value / LEACE) runs as Steering over its interventions:
    the same logits as applying its math by hand at resid_post, and it composes with a
    steering vector in one Steering."""
    from steer import bias
    from steer.erasure import LeaceEraser
    from steer.interventions import Intervention

    g = torch.Generator().manual_seed(4)
    v = torch.randn(tiny.d_model, generator=g)
    er = LeaceEraser.fit(torch.randn(100, tiny.d_model, generator=g), torch.arange(100) % 2)
    edits = [bias.Edit("ablate", [0], vectors={0: v}, strength=0.5),
             bias.Edit("clamp", [1], vectors={1: v}, values={1: 1.5}, strength=0.5),
             bias.Edit("leace", [1], erasers={1: er})]
    prompts = ["The nurse said that", "Hi"]
    b = steer.tokenize(tiny, prompts)
    keep = b.attention_mask.bool().clone()
    keep[torch.arange(2), b.attention_mask.shape[1] - b.attention_mask.sum(-1)] = False  # not the sink
    for e in edits:
        def by_hand(act, site, e=e):
            return e.apply(site.layer, act, keep)
        with steer.add_hooks(tiny, {f"resid_post.{l}": by_hand for l in e.layers}):
            ref = tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        with e.hooks(tiny):
            got = tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        assert torch.equal(got, ref), e.method
    add = Intervention("add", v, layers=[0], strength=3.0)
    with Steering(tiny, [add] + edits[2].interventions()) as s:
        both = s.logits(prompts)
    with Steering(tiny, [add]) as s, edits[2].hooks(tiny):
        nested = s.logits(prompts)
    torch.testing.assert_close(both, nested)


def test_map_intervention_is_per_example(tiny):
    """A map's strength (or a CAST gate) is per row: strength 0 leaves that row bit-for-bit alone."""
    from steer.erasure import LeaceEraser
    from steer.interventions import Intervention

    er = LeaceEraser.fit(torch.randn(100, tiny.d_model), torch.arange(100) % 2)
    prompts = ["The nurse said that", "The pilot said that"]
    with Steering(tiny) as s:
        plain = s.logits(prompts)
    iv = Intervention("map", fn=er, layers=[0], strength=torch.tensor([1.0, 0.0]))
    with Steering(tiny, [iv]) as s:
        got = s.logits(prompts)
    assert torch.equal(got[1], plain[1]) and not torch.allclose(got[0], plain[0])
    with pytest.raises(ValueError, match="fn="):
        Intervention("map", torch.ones(64))
    with pytest.raises(ValueError, match="target="):
        Intervention("add", torch.ones(64), target=1.0)


# -- per-token host work: what would synchronise a GPU at every decode step ---------------------
# On CUDA, reading a tensor's value (``.item()``, ``bool(t)``, ``torch.equal``) waits for the GPU,
# and building a tensor from Python data copies it from the host (a synchronising copy). Both are
# visible on the CPU as aten ops, so this test guards what tests/test_gpu.py measures on a device
# (the H200 run of 2026-12-04 found a scalar strength copied to the device at every step: 1.06
# synchronisations per token; ablate and clamp also checked their vector's norm at every step).
_HOST_OPS = {"_local_scalar_dense", "is_nonzero", "item", "equal", "nonzero", "masked_select", "lift_fresh",
             "lift_fresh_copy"}


def _host_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func.__name__.split(".")[0] in _HOST_OPS
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("kind", ["add", "ablate", "clamp", "clamp toward", "gated, skip tokens", "cast"])
def test_steered_generation_does_no_host_work_per_token(tiny, kind):
    from steer.conditions import Condition

    batch = steer.tokenize(tiny, ["Hi", "Tell me a joke about the sea."])
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0))
    ivs = {"add": Intervention("add", v, layers=[0, 1], strength=2.0, positions="last"),
           "ablate": Intervention("ablate", v, layers=[0, 1]),
           "clamp": Intervention("clamp", v, layers=[1], strength=torch.tensor([1.0, -1.0])),
           "clamp toward": Intervention("clamp", v, layers=[1], strength=0.5, target=2.0),
           "gated, skip tokens": Intervention("add", v, layers=[1], strength=2.0, skip_tokens={5, 6}),
           "cast": Intervention("add", v, layers=[1], strength=2.0)}
    gate = torch.tensor([1.0, 0.0]) if kind.startswith("gated") else None
    cond = Condition(v, layer=0, threshold=0.0) if kind == "cast" else None

    def extra(n):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
        plain = _host_ops(lambda: tiny.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                   pad_token_id=tiny.tokenizer.pad_token_id, **kw))
        with Steering(tiny, [ivs[kind]], gate=gate, condition=cond) as s:
            steered = _host_ops(lambda: s.generate(batch, **kw))
        return steered - plain

    short, long = extra(3), extra(12)
    assert long == short, f"{kind}: {(long - short) / 9:.2f} host reads or copies per generated token"


def test_strengths_are_moved_once_per_version(tiny):
    """A strength tensor on another device than the model's is moved once, and again only after an
    in-place change (FASB changes its strengths between steps); a list once per content."""
    st = torch.tensor([1.0, 2.0])
    s = Steering(tiny, [Intervention("add", torch.randn(tiny.d_model), layers=[0], strength=st),
                        Intervention("add", torch.randn(tiny.d_model), layers=[0], strength=[3.0, 4.0])])
    dev = torch.device("meta")  # any device other than the tensor's
    moved = lambda: s._moved[("moved strength", 0, dev)][2]  # noqa: E731
    assert s._row_strength(0, s.interventions[0], 2, 1, dev).device == dev
    first = moved()
    s._row_strength(0, s.interventions[0], 2, 1, dev)
    assert moved() is first
    st.mul_(2)
    s._row_strength(0, s.interventions[0], 2, 1, dev)
    assert moved() is not first
    assert s._row_strength(0, s.interventions[0], 2, 1, torch.device("cpu")).tolist() == [2.0, 4.0]
    listed = s._row_strength(1, s.interventions[1], 4, 2, torch.device("cpu"))
    assert listed.tolist() == [3.0, 3.0, 4.0, 4.0]
    assert s._row_strength(1, s.interventions[1], 4, 2, torch.device("cpu")).tolist() == [3.0, 3.0, 4.0, 4.0]
    s.interventions[1].strength = [5.0, 6.0]
    assert s._row_strength(1, s.interventions[1], 4, 2, torch.device("cpu")).tolist() == [5.0, 5.0, 6.0, 6.0]


def test_output_hidden_states_under_steering_show_the_edit():
    """transformers records ``output_hidden_states`` with block hooks it keeps from the first
    request on; they see the block output after steer's edit, as the next block does (they saw it
    before: the steered layer read as unsteered, the layers after it as steered)."""
    from steer.data import tokenize

    tiny = steer.load("tiny-llama")  # its own: the recorders stay on the model (other tests count hooks)

    b = tokenize(tiny, ["Hi", "How are you doing today?"])
    kw = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
              output_hidden_states=True)
    v = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 5
    real = b.attention_mask.bool()
    with torch.no_grad():
        base = tiny.hf(**kw).hidden_states  # transformers installs its recording hooks here, before steer's
        with steer.steer(tiny, v, layer=0, strength=1.0, include_sink=True):
            steered = tiny.hf(**kw).hidden_states
    torch.testing.assert_close(steered[1][real], base[1][real] + v)


def test_copies_taken_inside_a_steering_block_are_unsteered():
    """The bridge and ``orthogonalized`` deep-copy the HF model; a copy of its hooks kept steering
    the bridge after the block (and failed on the context manager's generator under ``steer``)."""
    m = steer.load("tiny-llama")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    v = torch.randn(m.d_model, generator=torch.Generator().manual_seed(0))
    with steer_ctx(m, v, layer=0, strength=8.0):
        bridge = m.bridge
        orth = orthogonalized(m, v)
    with torch.no_grad():
        plain = m.hf(input_ids=ids).logits
        assert (bridge(ids, return_type="logits") - plain).abs().max() < 1e-4
        assert torch.equal(orth.hf(input_ids=ids).logits, orthogonalized(m, v).hf(input_ids=ids).logits)
    assert bridge.cfg.n_layers == m.n_layers and m.bridge is bridge


def test_a_generate_batch_does_not_describe_later_direct_calls(tiny):
    """After ``generate([A])`` a direct call on a prompt B that begins A's tokens was taken for A:
    its generated tokens up to A's width counted as prompt (left unsteered under
    ``positions="generated"``), and A's condition gate was used."""
    from steer.data import Raw, tokenize

    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(5)) * 3
    long, short = Raw("Hello there friend, how are you today?"), Raw("Hello")
    ids = tokenize(tiny, [short]).input_ids
    assert torch.equal(tokenize(tiny, [long]).input_ids[:, :ids.shape[1]], ids)
    iv = Intervention("add", v, layers=[1], strength=4.0, positions="generated")

    def direct():
        return tiny.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                pad_token_id=tiny.tokenizer.pad_token_id)[0, ids.shape[1]:]

    with Steering(tiny, [iv]) as s:
        fresh = direct()
        s.generate([long], max_new_tokens=2)
        assert s.batch is None
        after = direct()
        s.batch = tokenize(tiny, [short])  # a batch set by hand describes this block's calls
        by_hand = direct()
    assert s.batch is None
    with add_hooks(tiny, {"resid_post.1": lambda a, site: a + 4.0 * v if a.shape[1] == 1 else a}):
        reference = direct()
    assert torch.equal(fresh, reference) and torch.equal(after, reference) and torch.equal(by_hand, reference)
    assert not torch.equal(reference, tiny.hf.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                                       pad_token_id=tiny.tokenizer.pad_token_id)[0, ids.shape[1]:])


def test_a_new_gate_applies_to_the_same_batch_again(tiny):
    from steer.data import tokenize

    b = tokenize(tiny, ["Hi there", "Bake a cake"])
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(2))
    plain = tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    with Steering(tiny, [Intervention("add", v, layers=[0], strength=3.0)], gate=torch.tensor([1.0, 1.0])) as s:
        s.batch = b
        both = tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        s.gate = torch.tensor([0.0, 1.0])  # the same prompts again, now with row 0 off
        one = tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    assert (both[0] - plain[0]).abs().max() > 1e-3
    assert torch.allclose(one[0], plain[0], atol=1e-5) and torch.allclose(one[1], both[1], atol=1e-5)
