"""The architecture matrix: every family steer.arch describes, on a tiny random-init model.

References are independent of steer: TransformerLens' bridge (its own adapter for each family)
for captured activations and steered logits, ``transformer_lens.patching`` for activation
patching, HF's own forward for the patching runner's self-check.
"""

import pytest
import torch
import transformer_lens.patching as TLP

import steer
from steer.arch import UnsupportedModel
from steer.data import Raw
from steer.sites import SITES, Site, tl_name
from steer.steering import steer as steer_ctx

FAMILIES = [k for k in steer.models.TINY_MODELS if k not in ("tiny-llama", "tiny-gemma3")] + ["tiny-llama", "tiny-gemma3"]
NO_RESID_MID = {"tiny-pythia"}  # parallel attention + MLP
NO_NEURONS = {"tiny-qwen3-moe"}  # the MLP is a mixture of experts
NO_RUNNER = {k for k in steer.models.TINY_MODELS if not steer.load(k).arch.runner}  # none at present
PROMPT = Raw("Hello there my good friend, how are you")
PROMPTS = [Raw("Hi there"), PROMPT, Raw("A third one")]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    return steer.load(request.param)


def _sites(m):
    return [s for s in SITES if not (s == "resid_mid" and m.name in NO_RESID_MID)
            and not (s == "neuron" and m.name in NO_NEURONS)]


def test_capture_every_site_matches_the_bridge(fam):
    b = steer.tokenize(fam, [PROMPT])
    _, cache = fam.bridge.run_with_cache(b.input_ids)
    for site in _sites(fam):
        acts = steer.capture(fam, [PROMPT], layers="all", site=site, positions="all", include_sink=True,
                             progress=False)
        for l in range(fam.n_layers):
            ref = cache[tl_name(Site(site, l), fam)].reshape(acts.tensor[:, l].shape)
            torch.testing.assert_close(acts.tensor[:, l], ref, atol=1e-5, rtol=1e-5, msg=f"{site}.{l}")


def test_capture_is_padding_exact(fam):
    for site in _sites(fam):
        batched = steer.capture(fam, PROMPTS, layers=[1], site=site, positions="last", progress=False).tensor
        alone = torch.cat([steer.capture(fam, [p], layers=[1], site=site, positions="last", progress=False).tensor
                           for p in PROMPTS])
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5, msg=site)


def test_missing_sites_say_why(fam):
    if fam.name in NO_RESID_MID:
        with pytest.raises(UnsupportedModel, match="parallel"):
            steer.capture(fam, [PROMPT], layers=[0], site="resid_mid", progress=False)
    if fam.name in NO_NEURONS:
        with pytest.raises(UnsupportedModel, match="MoE"):
            steer.capture(fam, [PROMPT], layers=[0], site="neuron", progress=False)


@pytest.mark.parametrize("site", ["resid_post", "attn_out", "mlp_out"])
def test_steering_matches_a_bridge_hook(fam, site):
    """Adding strength·v at a site (every token but the sink) = the same edit made by a
    TransformerLens hook on the bridge."""
    v = torch.randn(fam.d_model, generator=torch.Generator().manual_seed(1)) * 3
    with steer_ctx(fam, v, layer=0, strength=2.0, sites=site) as s:
        ours = s.logits([PROMPT])[0]

    def hook(act, hook):
        act = act.clone()
        act[:, 1:] += 2.0 * v
        return act

    b = steer.tokenize(fam, [PROMPT])
    ref = fam.bridge.run_with_hooks(b.input_ids, fwd_hooks=[(tl_name(Site(site, 0), fam), hook)])[0]
    torch.testing.assert_close(ours, ref.to(ours.dtype), atol=1e-4, rtol=1e-4)


KINDS = {"resid": "get_act_patch_resid_pre", "attn_out": "get_act_patch_attn_out",
         "mlp_out": "get_act_patch_mlp_out", "heads": "get_act_patch_attn_head_out_all_pos",
         "q": "get_act_patch_attn_head_q_all_pos", "k": "get_act_patch_attn_head_k_all_pos",
         "v": "get_act_patch_attn_head_v_all_pos"}


@pytest.fixture(scope="module")
def fam_task(fam):
    from steer.patching import PatchTask

    pairs = [("M and Y; Y to", "M and Y; N to"), ("B and Q; B to", "B and Q; K to")]
    return PatchTask.from_pairs(fam, pairs, ["M", "Q"], ["Y", "B"], name="tiny-ioi")


@pytest.mark.parametrize("kind", list(KINDS))
def test_activation_patching_matches_transformer_lens(fam, fam_task, kind):
    from steer.patching import activation_patch

    if fam.name in NO_RUNNER:
        with pytest.raises(UnsupportedModel, match="does not do"):
            activation_patch(fam, fam_task, kind)
        return
    ours = activation_patch(fam, fam_task, kind)
    mc, mx = ours.meta["metric_clean"], ours.meta["metric_corrupt"]
    _, clean_cache = fam.bridge.run_with_cache(fam_task.clean.input_ids)
    ref = getattr(TLP, KINDS[kind])(fam.bridge, fam_task.corrupt.input_ids, clean_cache,
                                    lambda lg: (fam_task.metric(lg[:, -1]).mean() - mx) / (mc - mx))
    torch.testing.assert_close(ours.scores, ref.float().cpu(), atol=1e-4, rtol=0)


def test_runner_refuses_a_forward_that_is_not_the_models(monkeypatch):
    """The self-check: a runner whose forward differs from HF's (here: its embeddings are
    off by the scale Gemma applies) raises instead of returning patching scores."""
    from steer.patching import _runner

    m = steer.load("tiny-gemma2")
    b = steer.tokenize(m, PROMPTS)
    _runner.Runner(m, b)  # fine as it is
    real = _runner._embeddings
    monkeypatch.setattr(_runner, "_embeddings", lambda model, batch: real(model, batch) * 0.5)
    with pytest.raises(UnsupportedModel, match="does not reproduce"):
        _runner.Runner(m, b)


def test_unknown_family_is_refused_at_load(tmp_path):
    from transformers import AutoModelForCausalLM, BloomConfig

    from steer.models import Model, _byte_tokenizer

    tok = _byte_tokenizer()
    hf = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModel, match="model_type='bloom'.*Known: .*gpt2"):
        Model("tiny-bloom", hf, tok)


# -- bf16: the same answers within stated tolerances (measured on these tiny models: capture
# ≤ 3.2 % relative, steered logits ≤ 1.1 % of their scale, head patching ≤ 0.18 of the
# clean-corrupt range, whose gap is small on random models) ----------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_agrees_with_fp32(name):
    from steer.patching import PatchTask, activation_patch

    pairs = [("M and Y; Y to", "M and Y; N to"), ("B and Q; B to", "B and Q; K to")]
    v = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 3  # every tiny model has d_model 64
    got = {}
    for dt in (torch.float32, torch.bfloat16):
        m = steer.load(name, dtype=dt)
        acts = steer.capture(m, PROMPTS, layers="all", site="resid_post", positions="last", progress=False)
        with steer_ctx(m, v, layer=0, strength=2.0) as s:
            logits = s.logits(PROMPTS)[:, -1]
        assert logits.dtype == dt  # (capture stores float32 by default)
        got[dt] = [acts.tensor.float(), logits.float()]
        if m.arch.runner:
            t = PatchTask.from_pairs(m, pairs, ["M", "Q"], ["Y", "B"])
            got[dt].append(activation_patch(m, t, "heads").scores)
    f, b = got[torch.float32], got[torch.bfloat16]
    assert float(((f[0] - b[0]).norm(dim=-1) / f[0].norm(dim=-1)).max()) < 0.05
    assert float((f[1] - b[1]).abs().max() / f[1].abs().max()) < 0.03
    if len(f) == 3:
        assert float((f[2] - b[2]).abs().max()) < 0.25


def test_weight_orthogonalization_equals_runtime_ablation(fam):
    """Where the table says weight orthogonalization works, it equals ablating v̂ everywhere at
    runtime; elsewhere it refuses."""
    from steer.interventions import Intervention, orthogonalized
    from steer.steering import Steering

    v = torch.randn(fam.d_model, generator=torch.Generator().manual_seed(2))
    a = fam.arch
    if a.attn_post_norm or a.mlp_post_norm or a.mlp_out is None:
        with pytest.raises(NotImplementedError):
            orthogonalized(fam, v)
        return
    iv = Intervention("ablate", v, layers="all", sites=("resid_pre", "attn_out", "mlp_out"), include_sink=True)
    with Steering(fam, [iv]) as s:
        runtime = s.logits(PROMPTS)
    with Steering(orthogonalized(fam, v)) as s:
        weights = s.logits(PROMPTS)
    real = steer.tokenize(fam, PROMPTS).attention_mask.bool()
    torch.testing.assert_close(weights[real], runtime[real], atol=1e-4, rtol=1e-4)


def test_readme_support_table_is_current():
    """README's table of families is steer.arch.support_table(), and every family in it has a
    tiny model in this matrix."""
    from pathlib import Path

    from steer import arch

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert arch.support_table() in readme, "README is stale: paste `python -m steer.arch` into it"
    covered = {steer.load(k).config.model_type for k in FAMILIES}
    assert {a.family for a in arch.FAMILIES} <= {arch._BY_TYPE[t].family for t in covered}
    assert set(arch.supported()) <= covered


def test_qk_fix_refuses_attention_it_does_not_reproduce(monkeypatch):
    """The QK fix re-implements attention logits; they are checked against the model's own z."""
    from steer.patching import PatchTask, _runner, atp

    m = steer.load("tiny-qwen2")
    t = PatchTask.from_pairs(m, [("M and Y; Y to", "M and Y; N to")], ["M"], ["Y"])
    atp(m, t, ["k"], qk_fix=True)  # fine as it is
    real = _runner.Runner.attention_qk  # a wrong q/k norm or rotary: logits 10 % off
    monkeypatch.setattr(_runner.Runner, "attention_qk",
                        lambda self, l, q, k, rows=None: (lambda qk: (qk[0] * 1.1, qk[1]))(real(self, l, q, k, rows)))
    for impl in ("torch", "triton"):
        with pytest.raises(UnsupportedModel, match=r"attention logits for layer \d"):  # (the first layer checked)
            atp(m, t, ["k"], qk_fix=True, impl=impl)


@pytest.mark.parametrize("kind,site", [("attn_out", "attn_out"), ("heads", "z"), ("resid", "resid_pre")])
def test_atp_equals_a_gradient_through_hfs_own_forward(fam, fam_task, kind, site):
    """AtP = (clean − corrupt) · ∂metric/∂activation, the gradient taken through HF's forward
    with steer's hooks (not the patching runner), summed per node and normalised."""
    from steer.hooks import add_hooks
    from steer.patching import atp, node_set

    ours = atp(fam, fam_task, kind)

    def keep(store):
        def fn(act, s):
            y = act.clone()  # in the graph: later sites are functions of earlier ones
            store[s.layer] = y
            return y
        return fn

    def run(batch, store, grad):
        hooks = [(f"{site}.{l}", keep(store)) for l in range(fam.n_layers)]
        if grad:  # the graph starts at the embeddings (the weights are frozen)
            hooks.insert(0, ("resid_pre.0", lambda act, s: act.detach().requires_grad_(True)))
        with add_hooks(fam, hooks), torch.enable_grad():
            return fam.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids).logits[:, -1]

    clean, corrupt = {}, {}
    run(fam_task.clean, clean, False)
    logits = run(fam_task.corrupt, corrupt, True)
    metric = fam_task.scores(logits[None])[0]
    grads = torch.autograd.grad(metric, [corrupt[l] for l in range(fam.n_layers)])
    ns = node_set(fam, kind, fam_task.n_pos)
    d = ours.meta["metric_clean"] - ours.meta["metric_corrupt"]
    ref = torch.stack([ns.reduce(((clean[l] - corrupt[l].detach()) * grads[l]).sum(0)) for l in range(fam.n_layers)]) / d
    torch.testing.assert_close(ours.scores, ref.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_recipes_in_half_precision_agree_with_fp32(dtype):
    """CAST condition scores, AtP*, RelP, occupational bias and persona log-probs in bf16/fp16
    against fp32 on tiny-llama. Measured max deviations relative to each quantity's largest value:
    bf16 ≤ 7.4 % (RelP; bias 4.8 %, AtP* 4.8 %, condition 0.9 %, persona 0.2 %), fp16 ≤ 2.0 %
    (AtP*); held to 10 %."""
    from steer import bias, persona
    from steer.patching import PatchTask, atp_star, relp
    from steer.steering import prompt_means

    prompts = ["Hi", "How are you today, my friend?", "Tell me a joke.", "Write one long sentence about the sea."]
    pairs = [("M and Y; Y to", "M and Y; N to"), ("B and Q; B to", "B and Q; K to")]
    u = torch.randn(64, generator=torch.Generator().manual_seed(7))
    out = {}
    for dt in (torch.float32, dtype):
        m = steer.load("tiny-llama", dtype=dt)
        t = PatchTask.from_pairs(m, pairs, ["M", "Q"], ["Y", "B"])
        out[dt] = {
            "condition": prompt_means(m, prompts, layers=[0])[:, 0] @ (u / u.norm()),
            "atp*": atp_star(m, t, ["heads"])["heads"].scores,
            "relp": relp(m, t, "heads").scores,
            "bias": bias.occupational_bias(m, {"nurse": 87.4, "pilot": 4.6, "cook": 37.9},
                                           ["The {occupation} said that"]).per_value,
            "persona": persona._completion_logprob(m, ["Hi", "Bye"], ["Hello there!", "See you"]),
        }
    for key, ref in out[torch.float32].items():
        got = out[dtype][key].float()
        assert torch.isfinite(got).all(), key
        assert float((got - ref).abs().max()) <= 0.1 * float(ref.abs().max()), key


def test_softcapped_attention_is_never_run_by_sdpa():
    """sdpa has no attention soft-capping (transformers < 5.24 silently dropped it for Gemma-2):
    steer switches such a model to eager attention, and its forward then matches the bridge."""
    from steer.models import Model

    ref = steer.load("tiny-gemma2")
    ref.hf.config._attn_implementation = "sdpa"  # as transformers 5.9-5.23 load it (5.24 refuses sdpa here)
    m = Model.from_hf(ref.hf, ref.tokenizer)
    assert m.hf.config._attn_implementation == "eager"
    b = steer.tokenize(m, [PROMPT])
    torch.testing.assert_close(m.hf(input_ids=b.input_ids).logits, m.bridge(b.input_ids), atol=1e-4, rtol=1e-4)


def test_resid_mid_edit_flows_through_the_residual_stream(fam):
    """Adding v at resid_mid.l equals adding it at attn_out.l (resid_mid = resid_pre + attn_out):
    the edit reaches the rest of the residual stream, not only the MLP's input."""
    from steer.interventions import Intervention
    from steer.steering import Steering

    if fam.name in NO_RESID_MID:
        with pytest.raises(UnsupportedModel, match="parallel"):
            Steering(fam, [Intervention("add", torch.ones(fam.d_model), layers=[0], sites=("resid_mid",))]).__enter__()
        return
    v = torch.randn(fam.d_model, generator=torch.Generator().manual_seed(3)) * 2
    logits = {}
    for site in ("resid_mid", "attn_out"):
        with Steering(fam, [Intervention("add", v, layers=[0], sites=(site,))]) as s:
            logits[site] = s.logits(PROMPTS)
    real = steer.tokenize(fam, PROMPTS).attention_mask.bool()
    torch.testing.assert_close(logits["resid_mid"][real], logits["attn_out"][real], atol=1e-4, rtol=1e-4)
