"""Every pipelined model equals the plain function, across pipeline sizes and microbatches."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import autopipe
from conftest import BATCH, mesh

MODELS = ["linen_mlp", "nnx_mlp", "linen_gpt", "nnx_gpt", "scanned_gpt", "cnn"]
GRID = [(pp, m) for pp in (1, 2, 4, 8) for m in (1, 2, 4, 8) if BATCH % m == 0]


@pytest.fixture(scope="module")
def references(cases):
    return {name: jax.jit(fn)(*args) for name, (fn, args) in cases.items()}


def _grid():
    """Every model × grid point; by default one in six, rotating over the models so that
    every grid point runs for one model (the rest under -m slow)."""
    for i, name in enumerate(MODELS):
        for k, (pp, m) in enumerate(GRID):
            marks = () if (i + k) % 6 == 0 else (pytest.mark.slow,)
            yield pytest.param(name, pp, m, marks=marks, id=f"{name}-{pp}-{m}")


@pytest.mark.parametrize(("name", "pp", "m"), list(_grid()))
def test_pipeline_equals_plain_function(cases, references, name, pp, m):
    fn, args = cases[name]
    plan = autopipe.plan(fn, *args, mesh=mesh(pp), num_microbatches=m)
    assert plan.num_stages == pp and plan.num_microbatches == m
    out = plan(*args)
    np.testing.assert_allclose(out, references[name], rtol=1e-5, atol=1e-5)
