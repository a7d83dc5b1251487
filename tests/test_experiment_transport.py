"""experiments/transport.py on the embedded model (a reduced run): Linear-AcT is the identity at
λ = 0, its refusal effect and side effect grow with λ, LinEAS likewise (and its joint fit lowers
the loss from its Linear-AcT start), and the results hold the three curves."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("transport_exp", Path(__file__).resolve().parents[1] / "experiments" / "transport.py")
exp = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(exp)


@pytest.mark.slow
def test_linear_act_against_mean_difference(smol, tmp_path):
    res = exp.run(tmp_path, n_fit=32, n_eval=12, lambdas=(0.0, 0.5, 1.0), alphas=(0.5, 1.0, 2.0), lineas_steps=20,
                  model=smol)
    a0, a5, a1 = res["linear_act"]
    assert a0["effect"] == 0.0 and a0["kl"] == 0.0  # λ = 0 is the identity, bit for bit
    assert 0 < a5["effect"] < a1["effect"] and 0 < a5["kl"] < a1["kl"]
    l0, l5, l1 = res["lineas"]
    assert l0["effect"] == 0.0 and l0["kl"] == 0.0
    assert 0 < l5["effect"] < l1["effect"] and 0 < l5["kl"] < l1["kl"]
    assert res["lineas_loss"][1] < res["lineas_loss"][0]  # the joint fit improved on its Linear-AcT start
    md = res["mean_difference"]
    assert [r["effect"] for r in md] == sorted(r["effect"] for r in md)  # the baseline rises with α too
    assert (tmp_path / "pareto.png").exists()
