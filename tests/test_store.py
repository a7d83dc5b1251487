"""The activation store (steer.store): shards on disk equal in-memory capture; lazy reads by rows
and layers; directions and LEACE from streamed statistics equal the in-memory fits; an
interrupted write resumes computing only the missing shards."""

import pytest
import torch

import steer
import steer.store as store_mod
from steer.directions import extract, from_activations
from steer.erasure import LeaceEraser
from steer.store import ActivationStore

PROMPTS = [f"Example {i}: {'yes' if i % 2 else 'no'} {'!' * (i % 3)}" for i in range(11)]


@pytest.fixture(scope="module")
def model():
    return steer.load("tiny-llama")


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    return ActivationStore.write(model, PROMPTS, tmp_path_factory.mktemp("store"), shard_size=4, batch_size=3,
                                 progress=False)


def test_store_equals_capture_and_reads_lazily(model, store):
    ref = steer.capture(model, PROMPTS, layers="all", positions="last", progress=False).tensor
    assert len(store) == 11 and len(store.index["shards"]) == 3 and store.layers == [0, 1]
    torch.testing.assert_close(store.get(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(store.get(rows=[9, 2, 5], layers=[1]), ref[[9, 2, 5]][:, [1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(store.get(rows=slice(3, 6), layers=1), ref[3:6, [1]], atol=1e-5, rtol=1e-5)
    mask = torch.arange(11) % 3 == 0
    torch.testing.assert_close(store.get(rows=mask), ref[mask], atol=1e-5, rtol=1e-5)
    seen = [i for idx, _ in store.batches(rows=mask) for i in idx]
    assert seen == mask.nonzero().flatten().tolist()
    assert "shards" in repr(store) and "<" in store._repr_html_()
    with pytest.raises(ValueError, match="not in this store"):
        store.get(layers=[5])


def test_direction_and_leace_from_the_store_equal_the_in_memory_ones(model, store):
    pos, neg = [i for i in range(11) if i % 2], [i for i in range(11) if not i % 2]
    ref = extract(model, [PROMPTS[i] for i in pos], [PROMPTS[i] for i in neg], positions="last", include_sink=True)
    got = store.direction(pos, neg)
    torch.testing.assert_close(got.vectors, ref.vectors, atol=1e-5, rtol=1e-4)
    x_all = store.get()
    pca = store.direction(pos, neg, method="pca_pairwise")  # read one layer at a time
    torch.testing.assert_close(pca.vectors, from_activations(x_all[pos], x_all[neg], "pca_pairwise"), atol=1e-5, rtol=1e-4)
    z = torch.tensor([i % 2 for i in range(11)])
    e, e_ref = store.leace(1, z), LeaceEraser.fit(store.get(layers=[1])[:, 0], z)
    x = store.get(layers=[1])[:, 0]
    torch.testing.assert_close(e(x), e_ref(x), atol=1e-4, rtol=1e-4)
    gap = e(x)[z == 1].mean(0) - e(x)[z == 0].mean(0)
    assert float(gap.abs().max()) < 1e-4  # the class means coincide after erasure


def test_an_interrupted_write_resumes_with_only_the_missing_shards(model, tmp_path, monkeypatch):
    ref = ActivationStore.write(model, PROMPTS, tmp_path / "ref", shard_size=4, progress=False).get()
    calls = []
    real = store_mod.capture

    def crashing(m, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second shard
        return real(m, prompts, **kw)

    monkeypatch.setattr(store_mod, "capture", crashing)
    with pytest.raises(KeyboardInterrupt):
        ActivationStore.write(model, PROMPTS, tmp_path / "s", shard_size=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["index.json", "shard-00000.safetensors"]
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore.open(tmp_path / "s")
    monkeypatch.setattr(store_mod, "capture", lambda *a, **kw: (calls.append("resumed"), real(*a, **kw))[1])
    done = ActivationStore.write(model, PROMPTS, tmp_path / "s", shard_size=4, progress=False)
    assert calls[2:] == ["resumed", "resumed"]  # shards 1 and 2 only
    assert torch.equal(done.get(), ref)
    with pytest.raises(ValueError, match="another capture"):
        ActivationStore.write(model, PROMPTS[:5], tmp_path / "s", shard_size=4, progress=False)


def test_store_errors(model, tmp_path):
    with pytest.raises(ValueError, match="reduce='mean'"):
        ActivationStore.write(model, PROMPTS, tmp_path, positions="all")
    multi = ActivationStore.write(model, PROMPTS[:5], tmp_path / "multi", site=["resid_post", "z"], shard_size=2,
                                  progress=False)
    torch.testing.assert_close(multi.get(site="z", layers=[1]),
                               steer.capture(model, PROMPTS[:5], layers=[1], site="z", progress=False).tensor,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="several sites"):
        multi.get()
    with pytest.raises(ValueError, match="Unknown site"):
        ActivationStore.write(model, PROMPTS, tmp_path / "bad", site="nope")
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        ActivationStore.open(tmp_path / "nothing")
    s = ActivationStore.write(model, PROMPTS, tmp_path / "mean", positions="all", reduce="mean", shard_size=5,
                              progress=False)
    ref = steer.capture(model, PROMPTS, layers="all", positions="all", reduce="mean", progress=False).tensor
    torch.testing.assert_close(s.get(), ref, atol=1e-5, rtol=1e-5)


def test_condition_from_a_store_equals_fit_condition(model, tmp_path):
    from steer.conditions import fit_condition

    pos = ["kill him", "steal it", "hurt them", "burn the house"]
    neg = ["bake bread", "sing a song", "plant trees", "read a book"]
    s = ActivationStore.write(model, pos + neg, tmp_path / "cast", positions="all", reduce="mean", include_sink=False,
                              shard_size=3, progress=False)
    got, ref = s.condition(range(4), range(4, 8), folds=2), fit_condition(model, pos, neg, folds=2)
    assert (got.layer, got.side) == (ref.layer, ref.side)
    assert got.threshold == pytest.approx(ref.threshold, abs=1e-5)
    torch.testing.assert_close(got.vector, ref.vector, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="CAST condition reads"):
        ActivationStore.write(model, pos + neg, tmp_path / "last", progress=False).condition(range(4), range(4, 8))


def test_repeated_rows_count_as_often_as_asked(model, store):
    """A bootstrap resample names rows twice: mean() and direction() counted them once."""
    ref = store.get()
    rows = [0, 0, 0, 1, 5, 5]
    torch.testing.assert_close(store.mean(rows), ref[rows].double().mean(0).float(), atol=1e-6, rtol=1e-6)
    d = store.direction(rows, [2, 3])
    want = ref[rows].double().mean(0) - ref[[2, 3]].double().mean(0)
    torch.testing.assert_close(d.vectors, want.float(), atol=1e-5, rtol=1e-5)
    assert store.get(rows=[]).shape == (0, *ref.shape[1:])


def test_a_store_is_not_resumed_by_another_capture(model, tmp_path):
    """Raw text and the same text chat-templated hashed alike; another model of the same name was
    resumed into the same store; a first write that failed left an index that refused its fix."""
    texts = ["one", "two", "three"]
    ActivationStore.write(model, [steer.Raw(t) for t in texts], tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="prompt_hashes"):
        ActivationStore.write(model, texts, tmp_path / "a", progress=False)
    other = steer.load("tiny-llama")
    with torch.no_grad():
        other.hf.lm_head.weight.mul_(1.5)
    with pytest.raises(ValueError, match="weights"):
        ActivationStore.write(other, [steer.Raw(t) for t in texts], tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="Unknown position selector"):
        ActivationStore.write(model, texts, tmp_path / "b", positions="instuction", reduce="mean", progress=False)
    s = ActivationStore.write(model, texts, tmp_path / "b", positions="instruction", reduce="mean", progress=False)
    assert len(s) == 3


def test_cli_store_bad_values_exit_with_a_message(tmp_path, capsys):
    """`steer store` refuses bad values with a message and a non-zero exit (no traceback): --batch-size 0
    ended in "range() arg 3 must not be zero", --layers 1,x in a bare int() error; a mistyped
    --positions is refused before the store's directory is made."""
    import json

    from steer.cli import main

    (tmp_path / "p.json").write_text(json.dumps(["Hi", "Hello there", "Bye"]))
    argv = ["store", "--prompts", str(tmp_path / "p.json"), "--out", str(tmp_path / "s"), "--model", "tiny-llama"]
    for flag in ("--batch-size", "--shard-size"):
        for bad in ("0", "-1"):
            with pytest.raises(SystemExit) as e:
                main([*argv, f"{flag}={bad}"])
            assert e.value.code == 2 and f"{flag}: must be an integer >= 1" in capsys.readouterr().err
    for bad, msg in (("1,x", "comma-separated integers"), (",", "comma-separated integers"), ("2", r"layers 0\.\.1"),
                     ("0,-3", r"layers 0\.\.1")):
        with pytest.raises(SystemExit, match=f"steer store: --layers '{bad}': .*{msg}"):
            main([*argv, f"--layers={bad}"])
    with pytest.raises(SystemExit, match="steer store: --positions 'instuction': use one of"):
        main([*argv, "--positions", "instuction", "--reduce", "mean"])
    with pytest.raises(SystemExit, match="steer store: cannot read --prompts"):
        main([*argv[:2], str(tmp_path / "none.json"), *argv[3:]])
    assert not (tmp_path / "s").exists()
    assert main([*argv, "--layers", "0,-1", "--batch-size", "2", "--shard-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == [0, 1]
