"""Pipeline × data × tensor parallelism (3D): outputs against the plain function on every
factorization of the 8 simulated devices, the collectives XLA compiled against the plan's, the
per-device parameter bytes, and the mesh search."""

from __future__ import annotations

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autopipe
from autopipe import models
from autopipe.cost_models.hardware import get_hardware
from conftest import BATCH, mesh

FACTORIZATIONS = [
    (pp, dp, 8 // (pp * dp))
    for pp, dp in itertools.product((1, 2, 4, 8), repeat=2)
    if 8 % (pp * dp) == 0
]
MODELS = ("linen_mlp", "linen_gpt", "nnx_gpt", "cnn")
# An H100 with free kernel launches and messages: on the tests' tiny models it makes splitting
# pay, so the grid runs tensor-split programs (the real presets keep tiny operators whole).
SPLIT_PAYS = dataclasses.replace(
    get_hardware("h100"), name="h100-no-latency", op_overhead=0.0, link_latency=0.0
)


def _grid():
    """(model, (pp, dp, tp), m) with dp·m dividing the batch. The default run covers every
    factorization once (models and microbatch counts rotating); the rest are `slow`."""
    out = []
    for k, f in enumerate(FACTORIZATIONS):
        for i, name in enumerate(MODELS):
            ms = [m for m in (1, 2, 4) if BATCH % (f[1] * m) == 0]
            for j, m in enumerate(ms):
                fast = i == k % len(MODELS) and j == k % len(ms)
                marks = () if fast else pytest.mark.slow
                out.append(pytest.param(name, f, m, marks=marks, id=f"{name}-{f}-m{m}"))
    return out


def _mesh(pp: int, dp: int, tp: int):
    return mesh(pp, dp=dp, tp=tp)


@pytest.mark.parametrize(("name", "factors", "m"), _grid())
def test_outputs_equal_plain_function(cases, name, factors, m):
    fn, args = cases[name]
    plan = autopipe.plan(fn, *args, mesh=_mesh(*factors), num_microbatches=m, hardware=SPLIT_PAYS)
    if factors[2] > 1:  # the tensor axis really splits operators
        assert any(k != "replicated" for s in plan.stages for k, _ in s.strategies)
    np.testing.assert_allclose(
        np.asarray(plan(*args)), np.asarray(jax.jit(fn)(*args)), rtol=2e-5, atol=2e-5
    )


# --- collectives and parameter bytes, from the compiled program -------------------------------

_COLLECTIVE = re.compile(
    r"= (\([^=]*?\)|\w+\[[\d,]*\][^ ]*) (all-reduce|all-gather|reduce-scatter|all-to-all)"
    r"(?:-start)?\("
)
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_HLO_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s64": 8}


def hlo_collective_bytes(text: str, tp: int) -> dict[str, float]:
    """Bytes per device per collective kind in compiled HLO text, in the plan's convention:
    all_reduce the full value, all_gather the input shard, reduce_scatter the full input,
    all_to_all the local array."""
    out: dict[str, float] = {}
    for shape, kind in _COLLECTIVE.findall(text):
        nbytes = sum(
            _HLO_BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dt, dims in _ARRAY.findall(shape)
        )
        scale = {"all-gather": 1 / tp, "reduce-scatter": tp}.get(kind, 1)
        key = kind.replace("-", "_")
        out[key] = out.get(key, 0.0) + nbytes * scale
    return out


def _blocks(d: int, hidden: int, rows: int):
    """Four residual MLP blocks, as abstract shapes (compiled, never run)."""

    def fn(params, x):
        for w1, w2 in params:
            x = x + jax.nn.gelu(x @ w1) @ w2
        return x

    f32 = jnp.float32
    params = [
        (jax.ShapeDtypeStruct((d, hidden), f32), jax.ShapeDtypeStruct((hidden, d), f32))
        for _ in range(4)
    ]
    return fn, (params, jax.ShapeDtypeStruct((BATCH, rows, d), f32))


def _gpt(d: int, heads: int, seq: int, vocab: int):
    cfg = models.GPTConfig(vocab=vocab, seq=seq, d_model=d, heads=heads, layers=4, mlp_ratio=4)
    model, tokens = models.LinenGPT(cfg), jax.ShapeDtypeStruct((BATCH, seq), jnp.int32)
    return model.apply, (models.abstract_linen(model, tokens), tokens)


def _device_param_bytes(plan, args) -> int:
    """Argument bytes of the compiled program minus the batch: the parameter buffers."""
    batch = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(args[1]))
    return plan.compiled.memory_analysis().argument_size_in_bytes - int(batch)


def _predicted(plan) -> dict[str, float]:
    want: dict[str, float] = {}
    for s in plan.stages:  # the HLO holds every stage's branch once
        for kind, nbytes in s.collectives:
            want[kind] = want.get(kind, 0.0) + nbytes
    return want


@pytest.mark.parametrize("tp", [2, 4])
def test_mlp_block_is_column_then_row_parallel(tp):
    """H100-sized blocks: the first matmul split by columns, the second by rows, so each block
    has exactly one all-reduce in the forward, nothing else crosses the tensor axis, and each
    device holds 1/tp of every weight."""
    fn, args = _blocks(1024, 4096, 128)
    plan = autopipe.plan(fn, *args, mesh=_mesh(2, 1, tp), num_microbatches=2, hardware="h100")
    text = plan.as_text()
    assert len(re.findall(r" all-reduce(?:-start)?\(", text)) == 4  # 4 blocks, 2 per stage
    assert not re.search(r" (all-gather|all-to-all|reduce-scatter)(?:-start)?\(", text)
    counts: dict[str, int] = {}
    for s in plan.stages:
        for name, k in s.strategies:
            counts[name] = counts.get(name, 0) + k
    assert counts["column"] == 4 and counts["row"] == 4, counts
    largest = max(s.param_bytes for s in plan.stages)
    assert _device_param_bytes(plan, args) <= 1.10 * largest / tp
    assert hlo_collective_bytes(text, tp) == pytest.approx(_predicted(plan), rel=0.10)


@pytest.mark.parametrize("factors", [(2, 1, 2), pytest.param((1, 2, 4), marks=pytest.mark.slow)])
def test_gpt_under_memory_pressure_splits_every_weight(factors):
    """When the fastest shardings do not fit, the planner prices parameter memory and splits
    the weights (attention over heads, MLPs column/row, embedding over its hidden dim): each
    device then holds about 1/tp of the largest stage, and XLA's collectives are the predicted
    ones."""
    fn, args = _gpt(2048, 16, 256, 4096)
    tp = factors[2]
    fastest = autopipe.plan(
        fn, *args, mesh=_mesh(*factors), num_microbatches=2, hardware="h100", compile=False
    )
    assert not fastest.lean_sharding
    limit = 0.99 * max(s.memory for s in fastest.stages)
    plan = autopipe.plan(
        fn, *args, mesh=_mesh(*factors), num_microbatches=2, hardware="h100", memory_limit=limit
    )
    assert plan.lean_sharding and max(s.memory for s in plan.stages) <= limit
    largest = max(s.param_bytes for s in plan.stages)
    assert _device_param_bytes(plan, args) <= 1.10 * largest / tp
    got, want = hlo_collective_bytes(plan.as_text(), tp), _predicted(plan)
    assert set(got) == set(want)
    for kind in want:
        assert got[kind] == pytest.approx(want[kind], rel=0.10), kind


# --- choosing the mesh -------------------------------------------------------------------------


def test_mesh_none_chooses_a_factorization_and_runs(cases):
    fn, args = cases["linen_mlp"]
    plan = autopipe.plan(fn, *args, mesh=None)
    assert np.prod([k for _, k in plan.mesh_axes]) == 8
    assert plan.factorizations and plan.factorizations[0].step_time <= min(
        f.step_time for f in plan.factorizations
    )
    best = plan.factorizations[0]
    assert dict(plan.mesh_axes) == {"pp": best.pp, "dp": best.dp, "tp": best.tp}
    np.testing.assert_allclose(plan(*args), jax.jit(fn)(*args), rtol=2e-5, atol=2e-5)


def test_factorizations_respect_nodes_and_batch():
    fs = autopipe.factorizations(1024, 512, devices_per_node=8, max_stages=96)
    assert all(pp * dp * tp == 1024 and tp <= 8 and 512 % dp == 0 for pp, dp, tp in fs)
    assert (8, 16, 8) in fs and (1024, 1, 1) not in fs


def test_data_axis_must_divide_the_batch(cases):
    fn, args = cases["linen_mlp"]
    x = args[1][:6]
    with pytest.raises(ValueError, match=r"6 rows.*data axis 'dp' of 4"):
        autopipe.plan(fn, args[0], x, mesh=_mesh(2, 4, 1))
    with pytest.raises(ValueError, match=r"num_microbatches=4 does not divide"):
        autopipe.plan(fn, *args, mesh=_mesh(1, 4, 2), num_microbatches=4)


def test_saved_3d_plan_reloads_with_the_same_shardings(cases):
    fn, args = cases["linen_mlp"]
    plan = autopipe.plan(fn, *args, mesh=_mesh(2, 2, 2), num_microbatches=2, hardware=SPLIT_PAYS)
    again = autopipe.Plan.from_json(plan.to_json(), fn, *args, mesh=_mesh(2, 2, 2))
    assert again.to_json() == plan.to_json() and dict(again.dims) == dict(plan.dims)
    assert any(k != "replicated" for s in again.stages for k, _ in s.strategies)
    np.testing.assert_allclose(again(*args), jax.jit(fn)(*args), rtol=2e-5, atol=2e-5)
