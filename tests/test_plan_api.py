"""The Plan API: stages, compiled program facts, memory, serialisation, decorator, errors."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autopipe
from autopipe import models
from autopipe.passes import partition
from conftest import BATCH, GPT, mesh


@pytest.fixture(scope="module")
def gpt(cases):
    return cases["linen_gpt"]


@pytest.fixture(scope="module")
def gpt_plan4(gpt):
    fn, args = gpt
    return autopipe.plan(fn, *args, mesh=mesh(4), num_microbatches=4)


def _leaf_ids(plan, needle: str) -> set[int]:
    spec, prog = plan.traced.spec, plan.program
    return {v for path, v in zip(spec.in_paths, prog.invars, strict=True) if needle in path}


def _placed_raw(plan, stage: int) -> set[int]:
    """Raw parameter leaves a stage's placed values are computed from."""
    from autopipe.passes.param_layout import hoist_closure

    _, raw = hoist_closure(plan.program, plan.layouts[stage].params)
    return set(raw)


def test_stages_differ_embedding_first_head_last(gpt_plan4):
    plan = gpt_plan4
    assert "gather" in plan.stages[0].primitives  # the token embedding lookup
    assert all("gather" not in s.primitives for s in plan.stages[1:])
    wte, head = _leaf_ids(plan, "'wte'"), _leaf_ids(plan, "'lm_head'")
    assert wte <= _placed_raw(plan, 0) and not wte & _placed_raw(plan, 3)
    assert head <= _placed_raw(plan, 3) and not head & _placed_raw(plan, 0)
    # the op producing the output (the head's matmul) belongs to the last stage
    out_op = plan.program.producers()[plan.program.outvars[0]]
    assert out_op in plan.layouts[-1].ops


def test_compiled_program_has_permutes_and_no_parameter_collectives(gpt_plan4):
    hlo = gpt_plan4.as_text()
    assert len(re.findall(r"collective-permute(-start)?\(", hlo)) >= 1
    for banned in ("all-gather", "all-reduce", "all-to-all", "reduce-scatter"):
        assert banned not in hlo, banned


@pytest.mark.parametrize("pp", [4, 8])
def test_per_device_parameter_bytes_close_to_largest_stage(gpt, pp):
    fn, args = gpt
    plan = autopipe.plan(fn, *args, mesh=mesh(pp), num_microbatches=2)
    per_device = plan.compiled.memory_analysis().argument_size_in_bytes
    largest = max(s.param_bytes for s in plan.stages)
    total = sum(x.nbytes for x in jax.tree.leaves(args[0]))
    assert per_device <= 1.10 * largest, (per_device, largest)
    assert largest < total  # nobody holds the whole model


def test_scanned_layers_are_split_and_each_stage_holds_its_rows(cases):
    fn, args = cases["scanned_gpt"]
    plan = autopipe.plan(fn, *args, mesh=mesh(4), num_microbatches=2)
    steps = [plan.program.ops[i] for i in plan.split.pipeline]
    assert sum(op.kind == "scan_step" for op in steps) == GPT.layers
    total = sum(x.nbytes for x in jax.tree.leaves(args[0]))
    assert sum(s.param_bytes for s in plan.stages) <= 1.05 * total  # rows are not duplicated
    assert max(s.param_bytes for s in plan.stages) < 0.6 * total


def test_plan_is_deterministic_and_json_round_trips(gpt, gpt_plan4, monkeypatch):
    fn, args = gpt
    again = autopipe.plan(fn, *args, mesh=mesh(4), num_microbatches=4)
    assert again.to_json() == gpt_plan4.to_json()

    def no_search(problem):
        raise AssertionError("from_json must not search again")

    monkeypatch.setattr(partition, "solve_stages", no_search)
    monkeypatch.setattr(autopipe._stage_search, "solve_stages", no_search)
    loaded = autopipe.Plan.from_json(gpt_plan4.to_json(), fn, *args, mesh=mesh(4))
    assert loaded.to_json() == gpt_plan4.to_json()
    np.testing.assert_array_equal(loaded(*args), gpt_plan4(*args))


def test_calling_a_plan_under_a_transformation_points_to_plan_apply(gpt, gpt_plan4):
    fn, (variables, tokens) = gpt
    for transform in (jax.jit, jax.grad):
        with pytest.raises(TypeError, match=r"cannot be traced .* use plan\.apply"):
            transform(lambda v: gpt_plan4(v, tokens).sum())(variables)


def test_from_json_refuses_a_different_function(gpt, gpt_plan4):
    fn, (variables, tokens) = gpt
    with pytest.raises(ValueError, match="different program"):
        autopipe.Plan.from_json(
            gpt_plan4.to_json(), lambda v, t: fn(v, t) * 2, variables, tokens, mesh=mesh(4)
        )


def test_summary_and_predictions(gpt_plan4):
    text = gpt_plan4.summary()
    assert "4 stages" in text and "bubble" in text
    p = gpt_plan4.predicted
    # equal-ish stages: bubble close to (p-1)/(m+p-1) = 3/7
    assert p.bubble_fraction == pytest.approx(3 / 7, abs=0.05)
    assert len(p.memory_per_device) == 4 and min(p.memory_per_device) > 0
    assert gpt_plan4.schedule.bubble_fraction() == pytest.approx(3 / 7)


def test_auto_mesh_works_like_explicit(gpt, gpt_plan4):
    fn, args = gpt
    auto = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("pp",))
    plan = autopipe.plan(fn, *args, mesh=auto, num_microbatches=4)
    np.testing.assert_allclose(plan(*args), gpt_plan4(*args), rtol=1e-6, atol=1e-6)


def test_custom_pipeline_axis_name_and_extra_axis(cases):
    fn, args = cases["linen_mlp"]
    m = jax.make_mesh((2, 2), ("stage", "data"), devices=jax.devices()[:4])
    plan = autopipe.plan(fn, *args, mesh=m, pipeline_axis="stage", num_microbatches=2)
    np.testing.assert_allclose(plan(*args), jax.jit(fn)(*args), rtol=1e-5, atol=1e-5)


def test_skip_connections_batch_inputs_in_late_stages_and_pytree_outputs():
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.normal(size=(16, 16)) * 0.3, jnp.float32) for _ in range(6)]

    def fn(ws, batch):
        x, mask = batch["x"], batch["mask"]
        h0 = jnp.tanh(x @ ws[0])
        h = h0
        for w in ws[1:]:
            h = jnp.tanh(h @ w)
        out = (h + h0) * mask[:, None]  # h0 skips over every stage; mask is read at the end
        return {"y": out, "label": jnp.argmax(out, axis=-1), "first": h0}

    batch = {
        "x": jnp.asarray(rng.normal(size=(BATCH, 16)), jnp.float32),
        "mask": jnp.asarray(rng.integers(0, 2, size=BATCH), jnp.float32),
    }
    plan = autopipe.plan(fn, ws, batch, mesh=mesh(4), num_microbatches=4)
    got, want = plan(ws, batch), fn(ws, batch)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    assert got["label"].dtype == want["label"].dtype


def test_decorator_caches_per_shape(cases):
    fn, (variables, x) = cases["linen_mlp"]
    calls = []

    @autopipe.parallelize(mesh=mesh(2), num_microbatches=2)
    def forward(variables, x):
        calls.append(1)
        return fn(variables, x)

    np.testing.assert_allclose(forward(variables, x), fn(variables, x), rtol=1e-5, atol=1e-5)
    traced_once = len(calls)
    forward(variables, x)
    assert len(calls) == traced_once  # cached: no new trace for the same shapes
    assert isinstance(forward.plan(variables, x), autopipe.Plan)
    half = x[: BATCH // 2]
    np.testing.assert_allclose(forward(variables, half), fn(variables, half), rtol=1e-5, atol=1e-5)
    assert len(calls) > traced_once


@pytest.mark.slow  # test_models and test_cli plan the same shapes by default
def test_gpt3_175b_plans_abstractly_without_allocating():
    cfg = dataclasses.replace(models.gpt3_175b(), dtype=jnp.bfloat16)
    model = models.LinenGPT(cfg)
    tokens = jax.ShapeDtypeStruct((8, cfg.seq), jnp.int32)
    variables = models.abstract_linen(model, tokens)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(variables))
    n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(variables))
    assert 174e9 < n_params < 176e9
    for pp in (8, 64):
        plan = autopipe.plan(
            model.apply, variables, tokens, mesh={"pp": pp}, num_microbatches=8, hardware="h100"
        )
        assert plan.num_stages == pp and plan.compiled is None
        held = sum(s.param_bytes for s in plan.stages)
        assert 2 * n_params <= held <= 2 * n_params * 1.01  # bf16; only tied/tiny dupes
        assert max(plan.predicted.memory_per_device) <= 80e9
    with pytest.raises(RuntimeError, match="without compiling"):
        plan(variables, tokens)


# --- errors -------------------------------------------------------------------------------


def test_error_mesh_without_pipeline_axis(cases):
    fn, args = cases["linen_mlp"]
    m = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    with pytest.raises(ValueError, match=r"no pipeline axis 'pp'.*pipeline_axis"):
        autopipe.plan(fn, *args, mesh=m)


def test_error_batch_not_divisible(cases):
    fn, args = cases["linen_mlp"]
    with pytest.raises(ValueError, match=r"batch size 8 is not divisible by num_microbatches=3"):
        autopipe.plan(fn, *args, mesh=mesh(2), num_microbatches=3)


def test_error_more_stages_than_operators():
    def tiny(w, x):
        return x * w

    with pytest.raises(ValueError, match=r"8 stages requested .* only 1 batch-dependent"):
        autopipe.plan(tiny, jnp.ones(4), jnp.ones((8, 4)), mesh=mesh(8))


def test_error_python_control_flow_names_the_function():
    def branchy(w, x):
        if (x @ w).sum() > 0:
            return x
        return -x

    with pytest.raises(ValueError, match=r"branchy.*Python control flow.*jax.lax.cond"):
        autopipe.plan(branchy, jnp.ones((4, 4)), jnp.ones((8, 4)), mesh=mesh(2))


def test_error_call_with_other_shapes_or_structure(gpt, gpt_plan4):
    _, (variables, tokens) = gpt
    with pytest.raises(ValueError, match=r"args\[1\] has shape \(4, 8\).*made for \(8, 8\)"):
        gpt_plan4(variables, tokens[:4])
    with pytest.raises(ValueError, match="structure"):
        gpt_plan4({"params": variables["params"], "extra": jnp.ones(3)}, tokens)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        gpt_plan4(variables)


def test_error_output_without_batch_axis():
    def mean_loss(w, x):
        return jnp.mean(x @ w)

    with pytest.raises(ValueError, match=r"output 0 .* does not carry the batch"):
        autopipe.plan(mean_loss, jnp.ones((4, 4)), jnp.ones((8, 4)), mesh=mesh(2))


def test_error_num_stages_disagrees_with_mesh(cases):
    fn, args = cases["linen_mlp"]
    with pytest.raises(ValueError, match=r"num_stages=3 but the pipeline axis 'pp' has 2"):
        autopipe.plan(fn, *args, mesh=mesh(2), num_stages=3)


@pytest.mark.parametrize(
    "name",
    ["linen_mlp", *(pytest.param(n, marks=pytest.mark.slow) for n in ("linen_gpt", "scanned_gpt"))],
)
def test_grad_of_pipelined_forward_is_gpipe_by_autodiff(cases, name):
    fn, (variables, x) = cases[name]
    plan = autopipe.plan(fn, variables, x, mesh=mesh(4), num_microbatches=4)

    def loss(apply, v):
        return jnp.mean(jnp.tanh(apply(v, x)))

    got = jax.jit(jax.grad(lambda v: loss(plan.apply, v)))(variables)
    want = jax.grad(lambda v: loss(fn, v))(variables)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
