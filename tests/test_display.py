"""Notebook displays and plotting style: every result object renders as text, offline HTML and
(where a picture helps) PNG; the numbers they show are the object's own."""

import base64
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import steer
from steer import bias
from steer.conditions import Condition
from steer.directions import Direction, sweep_layers
from steer.patching import atp, ioi_task
from steer.plotting import attention, heatmap, token_labels
from steer.steering import compare, steer as steer_ctx


@pytest.fixture(scope="module")
def objects(tiny):
    g = torch.Generator().manual_seed(2)
    cond = Condition(torch.randn(64, generator=g), layer=1, threshold=0.1)
    return {
        "model": tiny,
        "activations": steer.capture(tiny, ["Hi", "Hello there"], layers="all", positions="all", progress=False),
        "direction": Direction(torch.randn(2, 64, generator=g), layer=1, meta={"model": "tiny-llama"}),
        "sweep": sweep_layers(torch.randn(20, 3, 8, generator=g) + 1, torch.randn(20, 3, 8, generator=g)),
        "condition": cond,
        "rule": cond & ~cond,
        "patching": atp(tiny, ioi_task(tiny, n=2), "heads"),
        "bias": bias.occupational_bias(tiny, {"nurse": 87.4, "pilot": 4.6, "cook": 37.9}, ["The {occupation} said that"]),
        "generations": compare(tiny, ["Hi", "Yo"], {"plain": None, "steered": steer_ctx(tiny, torch.randn(64), layer=1, strength=8.0)},
                               max_new_tokens=3),
    }


PICTURED = {"activations", "direction", "sweep", "patching", "bias"}


@pytest.mark.parametrize("name", ["model", "activations", "direction", "sweep", "condition", "rule", "patching",
                                  "bias", "generations"])
def test_every_object_renders_offline(objects, name):
    obj = objects[name]
    before = set(plt.get_fignums())
    b = obj._repr_mimebundle_()
    assert set(plt.get_fignums()) == before, "a figure was left open (it would show twice in a notebook)"
    assert b["text/plain"] == repr(obj) or name == "model"
    page = b["text/html"]
    assert not re.search(r"<script|<style|<link|https?://|javascript:", page, re.I), "HTML must be CSS-only and offline"
    assert ("image/png" in b) == (name in PICTURED)
    if name in PICTURED:
        assert b["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
        assert base64.b64encode(b["image/png"]).decode() in page  # the same picture, inlined


def test_displays_show_the_objects_own_numbers(objects):
    r = objects["patching"]
    top, score = r.top_k(1)[0]
    assert f"{top}" in repr(r) and f"{score:.4f}" in repr(r)
    a = objects["activations"]
    real = a.tensor[:, 0][a.mask].norm(dim=-1)
    assert f"{float(real.max()):.4f}" in repr(a)
    s = objects["sweep"]
    assert f"best layer: {s.best_layer}" in repr(s)
    o = objects["bias"]
    assert f"{o.bias:.4f}" in repr(o) and f"{o.correlation:+.3f}" in repr(o)
    g = objects["generations"]
    assert all(t.split()[0] in repr(g) for t in g["steered"] if t.strip())
    m = objects["model"]
    assert "llama" in m._repr_mimebundle_()["text/plain"] and repr(m).startswith("Model('tiny-llama'")


def test_token_labels_keep_repeats_and_whitespace_distinct():
    labels = token_labels([" John", "John", " John", " ", "\n"])
    assert len(set(labels)) == 5
    assert labels[0] == "'␣John'_0" and labels[3] == "'␣'_3" and labels[4] == "'\\n'_4"


def test_signed_heatmaps_are_centred_at_zero():
    fig = heatmap(np.array([[0.1, 0.9], [-0.3, 0.2]]), xlabel="head", cbar_label="effect")
    im = fig.axes[0].images[0]
    assert im.norm.vcenter == 0 and im.norm.vmin == -0.9 and im.norm.vmax == 0.9
    assert fig.axes[1].get_ylabel() == "effect"
    plt.close(fig)


def test_attention_is_zero_to_one_with_the_future_blank():
    p = torch.softmax(torch.randn(4, 4).masked_fill(torch.ones(4, 4).triu(1).bool(), -1e9), -1)
    fig = attention(p, ["a", "b", "a", "c"])
    im = fig.axes[0].images[0]
    arr = im.get_array()
    assert (im.norm.vmin, im.norm.vmax) == (0.0, 1.0)
    assert arr.mask[np.triu_indices(4, 1)].all() and not arr.mask[np.tril_indices(4)].any()
    plt.close(fig)
