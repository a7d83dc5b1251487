import numpy as np
import pytest
import torch

import steer
from steer.directions import Direction, METHODS, actadd_vector, extract, from_activations, sweep_layers


def _data(n=24, layers=2, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(d, generator=g)
    neg = torch.randn(n, layers, d, generator=g)
    pos = neg + 1.5 * true + 0.3 * torch.randn(n, layers, d, generator=g)
    return pos, neg, true


def test_mean_diff_by_hand():
    pos, neg, _ = _data()
    got = from_activations(pos, neg, "mean_diff")
    P, N = pos.numpy(), neg.numpy()
    np.testing.assert_allclose(got.numpy(), P.mean(0) - N.mean(0), atol=1e-6)
    np.testing.assert_allclose(from_activations(pos, neg, "paired_mean_diff").numpy(), (P - N).mean(0), atol=1e-6)


def test_pca_variants_by_hand():
    pos, neg, _ = _data()
    P, N = pos.double().numpy(), neg.double().numpy()
    for l in range(2):
        diffs = P[:, l] - N[:, l]
        ref_diff = np.linalg.svd(diffs, full_matrices=False)[2][0]
        mid = (P[:, l] + N[:, l]) / 2
        ref_center = np.linalg.svd(np.concatenate([P[:, l] - mid, N[:, l] - mid]), full_matrices=False)[2][0]
        allx = np.concatenate([P[:, l], N[:, l]])
        ref_pw = np.linalg.eigh(np.cov(allx.T))[1][:, -1]
        for method, ref in [("pca_diff", ref_diff), ("pca_center", ref_center), ("pca_pairwise", ref_pw)]:
            got = from_activations(pos, neg, method)[l].double().numpy()
            md = P[:, l].mean(0) - N[:, l].mean(0)
            ref = ref if ref @ md > 0 else -ref  # sign: positives project higher
            np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=method)
            assert got @ md > 0


def test_probe_matches_gradient_descent():
    pos, neg, _ = _data(n=40, layers=1)
    x = torch.cat([pos[:, 0], neg[:, 0]]).double()
    y = torch.cat([torch.ones(40), torch.zeros(40)]).double()
    mu, sd = x.mean(0), x.std(0)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    b = torch.zeros((), dtype=torch.float64)
    for _ in range(20000):  # plain gradient descent on the same L2-regularised loss
        p = torch.sigmoid(z @ w + b)
        w -= 0.5 * (z.T @ (p - y) / len(y) + 1e-2 * w)
        b -= 0.5 * (p - y).mean()
    ref = (w / sd).float()
    got = from_activations(pos, neg, "probe")[0]
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.999
    assert abs(float(got.norm()) - 1) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_errors_on_bad_data(method):
    pos, neg, _ = _data(n=4)
    with pytest.raises(ValueError, match="both sides"):
        from_activations(pos[:0], neg, method)
    with pytest.raises(ValueError, match="both sides"):
        from_activations(pos, neg[:0], method)
    bad = pos.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        from_activations(bad, neg, method)
    with pytest.raises(ValueError, match="position axis"):  # capture(positions="all") without reduce=
        from_activations(pos[:, :, None].expand(-1, -1, 5, -1), neg[:, :, None].expand(-1, -1, 5, -1), method)


def test_direction_arithmetic_and_normalising_with_layers_not_extracted():
    d = Direction(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), layer=1)  # as extract(layers=[1]) leaves it
    torch.testing.assert_close(d.normalized().vectors, torch.tensor([[0.0, 0.0], [0.6, 0.8]]))
    with pytest.raises(ValueError, match="every layer"):
        Direction(torch.zeros(2, 2)).normalized()
    with pytest.raises(ValueError, match="2 and 3 layers"):  # broadcast to 3 layers before
        d + Direction(torch.ones(3, 2))
    assert Direction(torch.ones(3, 2), layer=-1).layer == 2  # as d.vector(-1) reads it
    meta = {"model": "m"}
    assert Direction(torch.ones(3, 2), meta=meta).meta["d_model"] == 2 and meta == {"model": "m"}  # not written into
    with pytest.raises(ValueError, match="out of range"):
        Direction(torch.ones(3, 2), layer=3)


def test_extract_errors_and_matches_capture(tiny):
    with pytest.raises(ValueError, match="both sides"):
        extract(tiny, [], ["a"])
    with pytest.raises(ValueError, match="both sides"):
        extract(tiny, ["a", "b"], [])
    pos, neg = ["I love it", "So good"], ["I hate it", "So bad!"]
    d = extract(tiny, pos, neg, positions="all", layer=1)
    a = steer.capture(tiny, pos, positions="all", reduce="mean", include_sink=False).tensor
    b = steer.capture(tiny, neg, positions="all", reduce="mean", include_sink=False).tensor
    torch.testing.assert_close(d.vectors, a.mean(0) - b.mean(0))
    assert d.meta["model"] == "tiny-llama" and d.meta["data_hash"] and d.meta["steer_version"]
    assert d.meta["site"] == "resid_post" and "date" in d.meta


def test_arithmetic():
    d = Direction(torch.tensor([[1.0, 1.0, 0.0]]), layer=0)
    o = Direction(torch.tensor([[1.0, 0.0, 0.0]]), layer=0)
    assert abs(d.orthogonalize(o).cosine(o)) < 1e-6
    assert torch.allclose((2 * d).vectors, d.vectors * 2)
    assert torch.allclose((d + o).vectors, torch.tensor([[2.0, 1.0, 0.0]]))
    assert torch.allclose((d - o).vectors, torch.tensor([[0.0, 1.0, 0.0]]))
    assert abs(d.project(torch.tensor([[2.0, 0.0, 0.0]]))[0] - 2 ** 0.5) < 1e-6
    with pytest.raises(ValueError, match="NaN"):
        Direction(torch.tensor([[float("nan"), 0.0]]))


def test_save_load_roundtrip_and_model_checks(tmp_path, tiny):
    d = extract(tiny, ["good", "nice"], ["bad", "awful"], layer=1)
    p = tmp_path / "d.safetensors"
    d.save(p)
    e = Direction.load(p, model=tiny)
    assert torch.equal(e.vectors, d.vectors) and e.layer == 1 and e.method == d.method and e.meta == d.meta
    other = Direction(torch.randn(2, 32), layer=0, meta={"model": "tiny-llama"})
    other.save(tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="d_model 32.*d_model 64"):
        Direction.load(tmp_path / "o.safetensors", model=tiny)
    named = Direction(torch.randn(2, 64), meta={"model": "some-other-model"})
    named.save(tmp_path / "n.safetensors")
    with pytest.raises(ValueError, match="some-other-model"):
        Direction.load(tmp_path / "n.safetensors", model=tiny)
    Direction.load(tmp_path / "n.safetensors", model=tiny, allow_other_model=True)
    with pytest.raises(ValueError, match="d_model"):
        steer.steering.steer(tiny, other, layer=0)


def test_gguf_roundtrip(tmp_path):
    import gguf

    d = Direction(torch.randn(5, 16), meta={"model": "m", "model_type": "llama"})
    p = tmp_path / "cv.gguf"
    d.to_gguf(p)
    r = gguf.GGUFReader(str(p))
    assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert "controlvector.model_hint" in r.fields and "controlvector.layer_count" in r.fields
    assert int(r.fields["controlvector.layer_count"].parts[-1][0]) == 4
    assert sorted(t.name for t in r.tensors) == [f"direction.{k}" for k in range(1, 5)]
    e = Direction.from_gguf(p, n_layers=5)
    assert torch.equal(e.vectors[1:], d.vectors[1:]) and torch.all(e.vectors[0] == 0)
    assert e.meta["model"] == "llama"
    with pytest.raises(ValueError, match="layer 4"):  # an IndexError before
        Direction.from_gguf(p, n_layers=3)


def test_sweep_layers_picks_separating_layer():
    g = torch.Generator().manual_seed(0)
    neg = torch.randn(40, 3, 8, generator=g)
    pos = torch.randn(40, 3, 8, generator=g)
    pos[:, 2] += 3.0  # only layer 2 separates
    s = sweep_layers(pos, neg)
    assert s.best_layer == 2 and s.rows[2]["accuracy"] > 0.9 and s.rows[2]["auroc"] > 0.95
    assert "accuracy" in s.table()


def test_actadd_vector(tiny):
    v = actadd_vector(tiny, "Love", "Hate!", layer=1)
    assert v.shape == (5, 64) and torch.isfinite(v).all()


def test_actadd_rows_align_with_a_raw_prompts_tokens_when_the_tokenizer_adds_bos():
    """With a BOS token (Llama, Gemma), row j is the j-th token of the raw prompt as steer tokenizes
    it: row 0 is BOS − BOS = 0 (it was the first words' difference, landing on the BOS)."""
    from tokenizers.processors import TemplateProcessing

    from steer.data import tokenize

    m = steer.load("tiny-llama")
    tok = m.tokenizer
    bos = tok.convert_tokens_to_ids(tok.bos_token)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, bos)])
    assert tokenize(m, [steer.Raw("Love")]).input_ids[0].tolist()[0] == bos  # a raw prompt starts with it
    v = actadd_vector(m, "Love", "Hate!", layer=1)
    assert v.shape == (6, 64) and v[0].abs().max() == 0 and v[1].abs().max() > 0
