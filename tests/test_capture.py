import pytest
import torch

import steer
from steer.sites import SITES, Site, tl_name

PROMPTS = ["Hi", "How are you today, my friend?", "Tell me a joke about cats."]


@pytest.mark.parametrize("site", SITES)
def test_capture_matches_run_with_cache(tiny, site):
    """Every site equals TransformerLens' own run_with_cache at the matching hook (1e-5)."""
    prompts = PROMPTS[1:2]  # unpadded: run_with_cache gets exactly the same tokens
    acts = steer.capture(tiny, prompts, layers="all", site=site, positions="all")
    ids = steer.tokenize(tiny, prompts).input_ids
    names = [tl_name(Site(site, l)) for l in range(tiny.n_layers)]
    _, cache = tiny.bridge.run_with_cache(ids, names_filter=names)
    for j, name in enumerate(names):
        ref = cache[name][0]
        got = acts.tensor[0, j]
        got = got.flatten(-2) if got.shape != ref.shape else got
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", ["resid_post", "z", "neuron"])
def test_padding_does_not_change_activations(tiny, site):
    batched = steer.capture(tiny, PROMPTS, layers="all", site=site, positions="all")
    for i, p in enumerate(PROMPTS):
        alone = steer.capture(tiny, [p], layers="all", site=site, positions="all")
        n = int(alone.mask.sum())
        assert int(batched.mask[i].sum()) == n
        torch.testing.assert_close(batched.tensor[i, :, :n], alone.tensor[0, :, :n], atol=1e-4, rtol=0)


def test_batch_size_and_reduce(tiny):
    full = steer.capture(tiny, PROMPTS, layers=[1], positions="all", batch_size=1)
    mean = steer.capture(tiny, PROMPTS, layers=[1], positions="all", reduce="mean", batch_size=2)
    torch.testing.assert_close(full.mean_over_positions(), mean.tensor, atol=1e-5, rtol=0)
    assert mean.tensor.shape == (3, 1, tiny.d_model)


def test_position_selectors_pick_the_right_tokens(tiny):
    acts_all = steer.capture(tiny, PROMPTS, layers=[0], positions="all")
    last = steer.capture(tiny, PROMPTS, layers=[0], positions="last")
    last3 = steer.capture(tiny, PROMPTS, layers=[0], positions=steer.Last(3))
    explicit = steer.capture(tiny, PROMPTS, layers=[0], positions=[0, -1])
    for i in range(len(PROMPTS)):
        n = int(acts_all.mask[i].sum())
        row = acts_all.tensor[i, 0, :n]
        torch.testing.assert_close(last.tensor[i, 0], row[-1])
        torch.testing.assert_close(last3.tensor[i, 0], row[-3:])
        torch.testing.assert_close(explicit.tensor[i, 0], row[[0, -1]])
    no_sink = steer.capture(tiny, PROMPTS, layers=[0], positions="all", include_sink=False)
    assert (no_sink.mask.sum(-1) == acts_all.mask.sum(-1) - 1).all()


def test_completion_positions(tiny):
    pairs = [("Say hi", " Hello there"), ("Count", " 1 2 3 4")]
    acts = steer.capture(tiny, pairs, layers=[0], positions="completion")
    # byte tokenizer: one token per byte of the completion
    assert acts.mask.sum(-1).tolist() == [len(" Hello there"), len(" 1 2 3 4")]


def test_save_load_roundtrip(tiny, tmp_path):
    acts = steer.capture(tiny, PROMPTS, layers="all", positions="all")
    acts.save(tmp_path / "a.safetensors")
    back = steer.Activations.load(tmp_path / "a.safetensors")
    torch.testing.assert_close(back.tensor, acts.tensor)
    assert back.layers == acts.layers and back.site == acts.site and back.model == acts.model
    assert torch.equal(back.mask, acts.mask)
    steer.Direction(torch.ones(2, 64), layer=1).save(tmp_path / "d.safetensors")
    with pytest.raises(ValueError, match="not a steer Activations file"):  # was a bare KeyError
        steer.Activations.load(tmp_path / "d.safetensors")


def test_bad_input_errors(tiny):
    with pytest.raises(ValueError, match="empty prompt list"):
        steer.capture(tiny, [])
    # one prompt alone was read as one prompt per character ("Hello": five answers, five rows)
    for call in (lambda p: steer.capture(tiny, p), lambda p: tiny.generate(p, max_new_tokens=1),
                 lambda p: steer.tokenize(tiny, p)):
        for lone in ("Hello", [{"role": "user", "content": "Hello"}]):
            with pytest.raises(TypeError, match="pass \\["):
                call(lone)
    with pytest.raises(ValueError, match="one row"):  # a batch of ids was decoded as one token per row
        tiny.to_str_tokens(torch.tensor([[40, 41, 42]]))
    with pytest.raises(ValueError, match="Valid sites"):
        steer.capture(tiny, ["Hi"], site="resid_middle")
    with pytest.raises(ValueError, match="out of range"):
        steer.capture(tiny, ["Hi"], layers=[5])
    with pytest.raises(ValueError, match="Unknown position selector"):
        steer.capture(tiny, ["Hi"], positions="first-ish")
    with pytest.raises(ValueError, match="completion"):
        steer.capture(tiny, ["Hi"], positions="completion")
    with pytest.raises(ValueError, match="chat template.*'last'"):
        steer.capture(tiny, [steer.Raw("Hi")], positions="post_instruction")


def test_fp16_overflow_is_reported(tiny):
    m = steer.load("tiny-llama")
    with torch.no_grad():
        m.hf.model.embed_tokens.weight.mul_(1e6)
    with pytest.raises(FloatingPointError, match="float32"):
        steer.capture(m.to(dtype=torch.float16), ["Hi"], layers="all")


def test_instruction_span_is_the_users_text():
    """The user's text was looked for anywhere in the rendered prompt: 'assistant' was found in the
    generation prompt, and text a template trims was not found at all (the span then covered the
    template's first tokens)."""
    from steer.data import tokenize

    m = steer.load("tiny-llama")

    def instruction(prompt):
        b = tokenize(m, [prompt])
        s, e = b.spans[0]["instruction"]
        user = b.texts[0].index("user\n") + len("user\n")
        assert b.texts[0][user:].startswith(m.tokenizer.decode(b.input_ids[0, s:e]))  # right after the role
        return m.tokenizer.decode(b.input_ids[0, s:e])

    assert instruction("assistant") == "assistant" and instruction("a") == "a"
    m.tokenizer.chat_template = m.tokenizer.chat_template.replace("message['content']", "(message['content'] | trim)")
    assert instruction("Write a poem.\n") == "Write a poem."
    m.tokenizer.chat_template = m.tokenizer.chat_template.replace("| trim", "| upper")
    with pytest.raises(ValueError, match="did not find the user's text"):
        steer.capture(m, ["Write a poem."], positions="instruction")
    # messages and a string render alike without a template, BOS included
    m.tokenizer.chat_template, m.tokenizer.add_bos_token = None, True
    bos = m.tokenizer.bos_token_id
    plain, messages = tokenize(m, ["Hi"]), tokenize(m, [[{"role": "user", "content": "Hi"}]])
    assert plain.input_ids[0, 0] == bos and torch.equal(plain.input_ids, messages.input_ids)


def test_casual_copies_keep_raw_text_raw_and_batches_need_a_size():
    from steer.data import Raw, batches, casual

    out = casual([Raw("The capital of France is"), "How do I bake bread?"], seed=0)
    assert isinstance(out[0], Raw) and not isinstance(out[1], Raw)  # a Raw copy was chat-templated
    assert batches(5, 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="batch_size"):
        batches(5, -2)  # was [] (nothing to run, silently)


def test_load_prompts_reads_only_text(tmp_path):
    """An instruction of null became the prompt None; an upper-case .JSONL was read as one JSON value."""
    import json as _json

    bad = tmp_path / "p.json"
    bad.write_text(_json.dumps([{"instruction": "Hi"}, {"instruction": None}]))
    with pytest.raises(ValueError, match="item 1"):
        steer.load_prompts(bad)
    lines = tmp_path / "p.JSONL"
    lines.write_text('{"instruction": "Hi"}\n{"instruction": "Ho", "completion": " there"}\n')
    assert steer.load_prompts(lines) == ["Hi", ("Ho", " there")]
