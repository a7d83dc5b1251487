"""Layer trajectories against hand computations on a tiny model: layer units, distances to a
task's mean trajectories, the shared PCA projection, and steering that moves only the prompts
of prone tasks by their task's comply − refuse difference."""

import pytest
import torch

import steer
from steer import diagnostics as D
from steer.data import Raw, tokenize

TEXTS = ["translate: the cat", "translate: a dog ran", "translate: hello", "translate: sky",
         "sentiment: nice day", "sentiment: awful", "sentiment: fine", "sentiment: so bad"]
TASKS = ["tr"] * 4 + ["se"] * 4
REFUSED = [True, False, True, False, True, True, False, False]


@pytest.fixture(scope="module")
def traj(tiny):
    return D.trajectories(tiny, [Raw(t) for t in TEXTS], tasks=TASKS, refused=REFUSED)


def test_points_units_and_distances_by_hand(tiny, traj):
    acts = steer.capture(tiny, [Raw(t) for t in TEXTS], layers="all", positions="last").tensor
    torch.testing.assert_close(traj.points, acts)
    c = acts.mean(0)
    s = ((acts - c) ** 2).sum(-1).mean(0).sqrt()
    u = (acts - c) / s[:, None]
    torch.testing.assert_close(traj.units(acts), u)
    d = traj.distances()
    for i, t in enumerate(TASKS):
        for r, key in ((True, "to_refuse"), (False, "to_comply")):
            idx = [j for j in range(len(TASKS)) if TASKS[j] == t and REFUSED[j] == r]
            mu = u[idx].mean(0)
            torch.testing.assert_close(d[key + "_by_layer"][i], (u[i] - mu).norm(dim=-1))
            assert float(d[key][i]) == pytest.approx(float((u[i] - mu).norm(dim=-1).mean()), abs=1e-5)
    # the projection is onto the top two principal axes of all (prompt, layer) points
    z = u.flatten(0, 1)
    z = z - z.mean(0)
    _, _, V = torch.linalg.svd(z, full_matrices=False)
    p = traj.projection.flatten(0, 1)
    torch.testing.assert_close(p @ p.T, (z @ V[:2].T) @ (z @ V[:2].T).T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(traj.project(acts), traj.projection, atol=1e-5, rtol=1e-5)
    assert traj.classify(acts[:1]) in (["tr"], ["se"])


def test_steering_moves_only_prone_tasks(tiny, traj):
    prompts = [Raw("translate: moon"), Raw("sentiment: meh"), Raw("translate: a tree")]
    tasks = ["tr", "se", "tr"]
    st = traj.steering(tiny, tasks, prone=["tr"], layers=[0], strength=0.5, include_sink=True)
    b = tokenize(tiny, prompts)

    def resid(steering):
        got = {}
        ctx = steering if steering is not None else steer.Steering(tiny, [])
        with ctx as s, steer.add_hooks(tiny, {"resid_post.0": lambda act, site: got.__setitem__("h", act.clone())}):
            s.batch = b
            with torch.no_grad():
                tiny.hf(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        return got["h"]

    diff = resid(st) - resid(None)
    v = traj.means[("tr", False)][0] - traj.means[("tr", True)][0]
    real = b.attention_mask.bool()
    for i, t in enumerate(tasks):
        want = 0.5 * v if t == "tr" else torch.zeros_like(v)
        torch.testing.assert_close(diff[i][real[i]], want.expand(int(real[i].sum()), -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="both outcomes"):
        D.trajectories(tiny, [Raw(t) for t in TEXTS[:2]], tasks=["tr", "tr"], refused=[True, True]).steering(
            tiny, ["tr"], prone=["tr"], layers=[0])
    with pytest.raises(ValueError, match="one task and one refusal label"):
        D.trajectories(tiny, [Raw("a")], tasks=["tr", "tr"], refused=[True])
    assert "Trajectories" in traj._text() and traj._repr_mimebundle_()["text/html"]
