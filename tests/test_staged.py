"""The staged API (trace → lower → plan → compile) against the one-line entry points, and the
small defects fixed with it: PlanInfeasible, reduction, TPU presets, Calibration as hardware."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autopipe
from autopipe.cost_models.hardware import PRESETS, default_preset, get_hardware
from autopipe.passes.partition import StageProblem
from conftest import mesh


def _mlp_loss(cases):
    fn, (variables, x) = cases["linen_mlp"]

    def loss(params, batch):
        return jnp.mean(fn(params, batch) ** 2)

    return loss, variables, x


def test_stages_round_trip_and_match_plan(cases):
    fn, args = cases["linen_gpt"]
    traced = autopipe.trace(fn, *args)
    assert [a.shape for a in traced.batch_avals] == [args[1].shape]
    assert len(traced.param_avals) == len(jax.tree.leaves(args[0]))
    assert "dot_general" in traced.as_text()
    lowered = traced.lower(mesh(2), num_microbatches=2)
    n_ops = len(lowered.costs.op_times)
    assert n_ops + 1 == len(lowered.costs.cut_bytes) and all(t >= 0 for t in lowered.costs.op_times)
    assert lowered.layers[0] == 0 and lowered.layers[-1] == n_ops
    problem = lowered.stage_problem()
    assert isinstance(problem, StageProblem) and len(problem.layer_time) == len(lowered.layers) - 1
    assert len(lowered.as_text().splitlines()) == n_ops + 1
    planned = lowered.plan()
    assert not hasattr(planned, "step") and not hasattr(planned, "compiled")
    reference = autopipe.plan(fn, *args, mesh=mesh(2), num_microbatches=2)
    text = planned.to_json()
    assert text == reference.to_json()
    record = autopipe.PlanRecord.from_json(text)
    assert record.to_json() == text and record == planned.record
    compiled = lowered.replay(record).compile()
    assert isinstance(compiled, autopipe.Plan)
    want = np.asarray(reference(*args))
    np.testing.assert_array_equal(np.asarray(compiled(*args)), want)
    np.testing.assert_allclose(want, np.asarray(jax.jit(fn)(*args)), rtol=2e-5, atol=2e-5)


def test_plan_with_other_microbatches_lowers_again(cases):
    fn, args = cases["linen_mlp"]
    lowered = autopipe.trace(fn, *args).lower({"pp": 2}, num_microbatches=2)
    planned = lowered.plan(num_microbatches=4)
    assert planned.num_microbatches == 4
    want = autopipe.plan(fn, *args, mesh={"pp": 2}, num_microbatches=4)
    assert planned.to_json() == want.to_json()


def test_planned_is_drawable_and_compiles_only_on_devices(cases, tmp_path):
    fn, args = cases["linen_mlp"]
    planned = autopipe.trace(fn, *args).lower({"pp": 2}).plan()
    assert planned.plot_schedule(tmp_path / "s.png") is not None
    assert len(planned.layer_times) == planned.num_layers
    with pytest.raises(RuntimeError, match="concrete jax.sharding.Mesh"):
        planned.compile()


@pytest.mark.parametrize("schedule", ["1f1b", "zb_h1"])
def test_staged_training_matches_train(cases, schedule):
    loss, variables, x = _mlp_loss(cases)
    opt = optax.sgd(0.1)
    planned = (
        autopipe.trace(loss, variables, x)
        .lower({"pp": 2}, num_microbatches=4, training=True)
        .plan(optimizer=opt, schedule=schedule)
    )
    want = autopipe.train(
        loss, opt, variables, x, mesh={"pp": 2}, schedule=schedule, num_microbatches=4
    )
    assert planned.to_json() == want.to_json() and planned.training


def test_does_not_fit_is_plan_infeasible(cases):
    fn, args = cases["linen_mlp"]
    with pytest.raises(autopipe.PlanInfeasible, match="memory_limit=1000 bytes") as e:
        autopipe.plan(fn, *args, mesh={"pp": 2}, memory_limit=1e3)
    assert isinstance(e.value, ValueError)
    loss, variables, x = _mlp_loss(cases)
    with pytest.raises(autopipe.PlanInfeasible):
        autopipe.train(loss, optax.sgd(0.1), variables, x, mesh={"pp": 2}, memory_limit=1e3)
    with pytest.raises(autopipe.PlanInfeasible, match="no factorization of 4 devices"):
        autopipe.plan(fn, *args, mesh=4, memory_limit=1e3, hardware="cpu")


def test_reduction_is_validated(cases):
    loss, variables, x = _mlp_loss(cases)
    with pytest.raises(ValueError, match=r"reduction='avg'.*reduction='mean' or reduction='sum'"):
        autopipe.train(loss, optax.sgd(0.1), variables, x, mesh={"pp": 2}, reduction="avg")


def test_sum_reduction_trains_like_a_sum(cases):
    fn, (variables, x) = cases["linen_mlp"]
    opt = optax.sgd(0.1)

    def summed(params, batch):  # a sum over the examples: not scaled by the microbatches
        return jnp.sum(fn(params, batch) ** 2)

    plan = autopipe.train(
        summed, opt, variables, x, mesh=mesh(2), num_microbatches=2, reduction="sum"
    )
    _, got = plan.step(plan.init(variables), x)
    np.testing.assert_allclose(float(got), float(summed(variables, x)), rtol=1e-5)


@pytest.mark.parametrize(
    ("kind", "preset"),
    [
        ("TPU v4", "tpu_v4"),
        ("TPU v5 lite", "tpu_v5e"),
        ("TPU v5p", "tpu_v5p"),
        ("TPU v6", "tpu_v5e"),
    ],
)
def test_tpu_platforms_get_tpu_presets(kind, preset):
    assert default_preset("tpu", kind) == preset
    assert get_hardware(None, platform="tpu", device_kind=kind) is PRESETS[preset]
    assert default_preset("gpu") == "h100" and default_preset("cpu") == "cpu"


def test_hardware_accepts_what_calibrate_returns(cases):
    fn, args = cases["linen_mlp"]
    calibration = autopipe.Calibration(
        hardware=PRESETS["v100"], dispatch_seconds=0.0, measurements=(), seconds=0.0
    )
    plan = autopipe.plan(fn, *args, mesh={"pp": 2}, hardware=calibration)
    assert plan.hardware is PRESETS["v100"]
    with pytest.raises(ValueError, match="what autopipe.calibrate"):
        autopipe.plan(fn, *args, mesh={"pp": 2}, hardware=3)
