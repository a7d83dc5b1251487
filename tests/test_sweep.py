"""Sharded, resumable sweeps (steer.sweep): unit bookkeeping, a real 2-process gloo run of
activation patching equal to one process, and a sweep killed mid-way that resumes."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import steer
from steer.patching import activation_patch, ioi_task
from steer.sweep import Shards, map_units

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "STEER_PROGRESS": "0"}


def test_units_are_split_round_robin_and_validated():
    assert [Shards(r, 3).mine(7) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="rank < world"):
        Shards(2, 2)


def test_map_units_resumes_and_refuses_another_sweep(tmp_path):
    calls = []

    def fn(x):
        calls.append(x)
        if x == 3 and len(calls) == 3:
            raise RuntimeError("crash")  # the first run dies at its third unit
        return x * 10

    with pytest.raises(RuntimeError):
        map_units(fn, [1, 2, 3, 4], directory=tmp_path, key="a")
    assert sorted(p.name for p in tmp_path.glob("unit-*.pt")) == ["unit-000000.pt", "unit-000001.pt"]
    calls.clear()
    assert map_units(fn, [1, 2, 3, 4], directory=tmp_path, key="a") == [10, 20, 30, 40]
    assert calls == [3, 4]  # only the unfinished units ran
    with pytest.raises(ValueError, match="another sweep"):
        map_units(fn, [1, 2, 3, 4], directory=tmp_path, key="b")


def test_shards_auto_needs_the_launcher_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        Shards.auto()
    monkeypatch.delenv("WORLD_SIZE")
    assert Shards.auto() == Shards(0, 1)


WORKER = textwrap.dedent("""
    import sys, time, torch, steer
    from steer.patching import activation_patch, ioi_task
    import steer.patching.activation as A
    out, kind, directory, delay = sys.argv[1], sys.argv[2], sys.argv[3] or None, float(sys.argv[4])
    if delay:  # slow every unit down, so that the test can kill the sweep half-way
        real = A.map_units
        def slow(fn, units, **kw):
            return real(lambda u: (time.sleep(delay), fn(u))[1], units, **kw)
        A.map_units = slow
    m = steer.load("tiny-llama")
    r = activation_patch(m, ioi_task(m, n=4), kind, batch_size=8, shards="auto", directory=directory)
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(r.scores, out)
""")


def _worker(tmp_path) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return script


DRIVER = textwrap.dedent("""
    import sys
    from steer.cli import main
    patch_json, store_dir, prompts = sys.argv[1:4]
    main(["patch", "--model", "tiny-llama", "--n-prompts", "4", "--nodes", "heads_by_pos", "--method", "activation,atp",
          "--batch-size", "8", "--chunk", "2", "--shard", "auto", "--json", patch_json])
    main(["store", "--model", "tiny-llama", "--prompts", prompts, "--out", store_dir, "--shard-size", "3",
          "--shard", "auto"])
""")


def test_two_gloo_processes_give_one_process_result(tmp_path):
    """`torchrun` with 2 processes (gloo) running `steer patch --shard auto` (activation patching,
    and AtP over chunks of 2 prompts) and `steer store --shard auto`: the results equal one
    process's exactly, and only rank 0 writes."""
    import json

    from steer.store import ActivationStore

    m = steer.load("tiny-llama")
    ref = activation_patch(m, ioi_task(m, n=4), "heads_by_pos", batch_size=8)
    prompts = [f"Prompt number {i}" + "!" * i for i in range(8)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out, store_dir = tmp_path / "patch.json", tmp_path / "store"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(out), str(store_dir), str(tmp_path / "prompts.json")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(line.startswith("activation: ") for line in proc.stderr.splitlines()) == 1  # one rank reported
    assert proc.stdout.count('"n_prompts": 8') == 1
    doc = json.loads(out.read_text())["methods"]
    assert torch.equal(torch.tensor(doc["activation"]["scores"]), ref.scores)
    from steer.patching.sharded import over_prompts
    one = over_prompts("atp", m, ioi_task(m, n=4), "heads_by_pos", chunk=2)  # one process
    assert torch.equal(torch.tensor(doc["atp"]["scores"]), one.scores)
    two = ActivationStore.open(store_dir)
    assert len(two.index["shards"]) == 3
    alone = ActivationStore.write(m, prompts, tmp_path / "alone", shard_size=3, progress=False)
    assert torch.equal(two.get(), alone.get())  # each shard the same capture, whichever rank wrote it


def test_a_killed_sweep_resumes_computing_only_unfinished_units(tmp_path):
    m = steer.load("tiny-llama")
    ref = activation_patch(m, ioi_task(m, n=4), "heads_by_pos", batch_size=8)
    d, out = tmp_path / "sweep", tmp_path / "scores.pt"
    cmd = [sys.executable, str(_worker(tmp_path)), str(out), "heads_by_pos", str(d), "0.4"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(d.glob("unit-*.pt"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in d.glob("unit-*.pt")}
    n_units = int(__import__("json").loads((d / "sweep.json").read_text())["units"])
    assert 2 <= len(done) < n_units, (len(done), n_units)
    assert not list(d.glob(".*")), "a partial unit file was left behind"
    r = activation_patch(m, ioi_task(m, n=4), "heads_by_pos", batch_size=8, directory=d)
    assert torch.equal(r.scores, ref.scores)
    after = {p.name: p.stat().st_mtime_ns for p in d.glob("unit-*.pt")}
    assert len(after) == n_units
    assert all(after[k] == v for k, v in done.items())  # finished units were not recomputed


def test_steering_sweep_cells_resume_from_a_directory(tmp_path):
    from steer.directions import Direction, steering_sweep

    m = steer.load("tiny-llama")
    d = Direction(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), meta={"model": "tiny-llama"})
    args = (m, d, ["Hi", "Tell me"], ["Yo"], lambda lg: lg[:, 0], [0, 1], [1.0, 3.0])
    ref = steering_sweep(*args, progress=False)
    first = steering_sweep(*args, progress=False, directory=tmp_path)
    assert first.rows == ref.rows and len(list(tmp_path.glob("unit-*.pt"))) == 4
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("unit-*.pt")}
    again = steering_sweep(*args, progress=False, directory=tmp_path)
    assert again.rows == ref.rows and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    with pytest.raises(ValueError, match="another sweep"):  # a different direction is a different sweep
        steering_sweep(m, d * 2.0, *args[2:], progress=False, directory=tmp_path)


@pytest.mark.parametrize("method,kw", [("atp", {}), ("atp", {"qk_fix": True}), ("relp", {}), ("ig", {"steps": 2}),
                                       ("atp", {"direction": "noising"}), ("atp*", {}),
                                       ("atp*", {"direction": "noising"})])
def test_estimators_over_prompt_chunks_equal_the_whole_task(method, kw, tmp_path):
    """Chunks of 3 of 7 prompts (uneven), combined: the whole task's AtP / AtP+QK / RelP / IG /
    AtP* (GradDrop: the dropped layers' signed estimates summed over chunks before the |·|)."""
    from steer.patching import atp, atp_star, integrated_gradients, relp
    from steer.patching.sharded import over_prompts

    m = steer.load("tiny-llama")
    t = ioi_task(m, n=7)
    kinds = ["heads", "mlp_out", "k_by_pos"] if kw.get("qk_fix") or method == "atp*" else ["heads", "mlp_out"]
    whole = {"atp": atp, "relp": relp, "ig": integrated_gradients, "atp*": atp_star}[method](m, t, kinds, **kw)
    got = over_prompts(method, m, t, kinds, chunk=3, directory=tmp_path, **kw)
    for k in kinds:
        torch.testing.assert_close(got[k].scores, whole[k].scores, atol=2e-5, rtol=1e-4)
        assert got[k].meta["metric_clean"] == pytest.approx(whole[k].meta["metric_clean"], rel=1e-5)
        if method == "atp*":
            torch.testing.assert_close(torch.tensor(got[k].meta["plain"]), torch.tensor(whole[k].meta["plain"]),
                                       atol=2e-5, rtol=1e-4)
            assert "drops_raw" not in got[k].meta
    assert len(list(tmp_path.glob("unit-*.pt"))) == 3


def test_over_prompts_refuses_what_does_not_split():
    from steer.patching import PatchTask
    from steer.patching.sharded import over_prompts

    m = steer.load("tiny-llama")
    with pytest.raises(ValueError, match="grad_drop=True"):
        over_prompts("atp*", m, ioi_task(m, n=2), grad_drop=False)
    with pytest.raises(ValueError, match="use one of"):
        over_prompts("activation", m, ioi_task(m, n=2))
    t = ioi_task(m, n=2)
    custom = PatchTask(t.clean, t.corrupt, metric=lambda lg: lg[..., 0] - lg[..., 1])
    with pytest.raises(ValueError, match="subset"):
        over_prompts("atp", m, custom, chunk=1)


def test_a_resumable_sweep_needs_its_key(tmp_path):
    """Named by its length alone, a different sweep of as many units returned the first one's results."""
    from steer.sweep import map_units

    assert map_units(lambda x: x * x, [1, 2, 3], directory=tmp_path, key="squares") == [1, 4, 9]
    with pytest.raises(ValueError, match="needs key="):
        map_units(lambda x: x + 100, [7, 8, 9], directory=tmp_path)


def test_over_prompts_resumes_only_the_same_metric_and_weights(tmp_path):
    """The resume key named the prompts, not the metric nor the weights: other answers, or another
    model of the same name, loaded the first sweep's chunks (scores off by 1.5). A metric that
    returns one number for the task cannot be split into chunks (they are combined as a mean)."""
    from steer.patching import PatchTask, atp
    from steer.patching.sharded import over_prompts
    from steer.patching.tasks import LogitDiff

    m = steer.load("tiny-llama")
    t = ioi_task(m, n=3)
    over_prompts("atp", m, t, "heads", chunk=2, directory=tmp_path)
    swapped = PatchTask(t.clean, t.corrupt, LogitDiff(t.metric.wrong_ids, t.metric.answer_ids))
    with pytest.raises(ValueError, match="another sweep"):
        over_prompts("atp", m, swapped, "heads", chunk=2, directory=tmp_path)
    other = steer.load("tiny-llama")
    with torch.no_grad():
        other.hf.lm_head.weight.mul_(1.5)
    with pytest.raises(ValueError, match="another sweep"):
        over_prompts("atp", other, t, "heads", chunk=2, directory=tmp_path)
    torch.testing.assert_close(over_prompts("atp", m, swapped, "heads", chunk=2).scores, atp(m, swapped, "heads").scores,
                               atol=2e-5, rtol=1e-4)
    summed = PatchTask(t.clean, t.corrupt, metric=lambda lg: (lg[..., 0] - lg[..., 1]).sum())
    with pytest.raises(ValueError, match="one value per prompt"):
        over_prompts("atp", m, summed, chunk=2)
