"""Stored answers of the embedded model must not move when an upstream release comes out.

See ``tests/known_answers.py``; regenerate on purpose with ``make known-answers``.
"""

import json

import pytest
import torch

from known_answers import STORE, TOLERANCES, _versions, compute

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stored():
    return json.loads(STORE.read_text())


@pytest.fixture(scope="module")
def now(smol):
    return compute(smol)


def test_every_answer_has_a_tolerance(stored):
    assert set(stored["answers"]) == set(TOLERANCES) == set(stored["tolerances"])


@pytest.mark.parametrize("key", sorted(TOLERANCES))
def test_known_answer(stored, now, key):
    want, got, tol = stored["answers"][key], now[key], TOLERANCES[key]
    hint = (f"{key} changed: stored {want!r} (computed with {stored['computed_with']}), now {got!r} "
            f"(with {_versions()}). If an upstream release changed it on purpose, check why, then "
            "regenerate with `make known-answers`.")
    if tol == "exact":
        assert got == want, hint
    else:
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   atol=tol.get("atol", 0.0), rtol=tol.get("rtol", 0.0), msg=hint)
