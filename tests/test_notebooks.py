"""The notebooks in experiments/notebooks: stored without outputs, and each runs top to bottom
in a real Jupyter kernel (nbclient + ipykernel from the venv) in under two minutes on 2 cores."""

import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "experiments" / "notebooks").glob("*.ipynb"))
BUDGET_S = 120


def test_there_are_notebooks_and_they_are_stored_clean():
    assert {p.stem for p in NOTEBOOKS} >= {"tour", "refusal_cast", "ioi_patching", "bias_personas"}
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{p.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    took = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert took < BUDGET_S, f"{path.name} took {took:.0f} s (budget {BUDGET_S} s)"
    print(f"{path.name}: {took:.1f} s")
