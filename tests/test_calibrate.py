"""Calibration (fitting, saved profiles the planner loads) and per-stage profiling."""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import pytest

import autopipe
from autopipe._calibrate import Calibration, Measurement, _fit, _fit_matmul_rate
from autopipe.cost_models.hardware import PRESETS
from autopipe.cost_models.rules import Cost, op_time


def test_fit_recovers_a_known_factor():
    truth = dataclasses.replace(PRESETS["cpu"], flops_efficiency=0.37)
    ms = [
        Measurement(kind="matmul", label=str(f), seconds=op_time(c, truth), cost=c)
        for f in (1e8, 1e9, 1e10)
        for c in [Cost(flops=f, bytes_accessed=1e3, dot_flops=(("float32", f),), kernels=1)]
    ]
    fitted = _fit(PRESETS["cpu"], "flops_efficiency", ms, 0.05, 1.0)
    assert fitted.flops_efficiency == pytest.approx(0.37, rel=0.02)


def test_matmul_fixed_time_and_efficiency_are_recovered_together():
    """A GEMM of few rows runs below the rate: time = FLOPs / (rate · efficiency) + a fixed
    time per matmul. Fitted together from sizes spanning both regimes, both come back."""
    truth = dataclasses.replace(PRESETS["cpu"], flops_efficiency=0.7, matmul_overhead=3e-5)
    ms = [
        Measurement(kind="matmul:float32", label=str(f), seconds=op_time(c, truth), cost=c)
        for f in (1e6, 1e7, 1e8, 1e9, 1e10)
        for c in [Cost(flops=f, dot_flops=(("float32", f),), kernels=1, dot_kernels=1)]
    ]
    fitted = _fit_matmul_rate(PRESETS["cpu"], ms)
    assert fitted.flops_efficiency == pytest.approx(0.7, rel=0.02)
    assert fitted.matmul_overhead == pytest.approx(3e-5, rel=0.15)
    flat = dataclasses.replace(truth, matmul_overhead=0.0)  # the flat roofline misses small ones
    assert op_time(ms[0].cost, flat) < 0.6 * ms[0].seconds


def test_matmul_fixed_time_is_paid_per_matmul_kernel():
    hw = dataclasses.replace(PRESETS["cpu"], matmul_overhead=1e-5)
    dot = Cost(flops=1e6, dot_flops=(("float32", 1e6),), kernels=1, dot_kernels=1)
    other = Cost(flops=1e6, bytes_accessed=1e3, kernels=1)
    flat = dataclasses.replace(hw, matmul_overhead=0.0)
    assert op_time(dot, hw) - op_time(dot, flat) == pytest.approx(1e-5)
    assert op_time(other, hw) == op_time(other, flat)
    assert (dot + dot * 2.0).dot_kernels == 3.0  # sums and scaled costs count their matmuls


def test_saved_profile_is_accepted_by_plan(tmp_path, cases):
    hw = dataclasses.replace(PRESETS["cpu"], name="cpu-calibrated", peak_flops=1e11)
    path = tmp_path / "profile.json"
    Calibration(hardware=hw, dispatch_seconds=5e-6, measurements=(), seconds=1.0).save(path)
    fn, args = cases["linen_mlp"]
    for given in (path, str(path), autopipe.load_hardware(path), hw):
        plan = autopipe.plan(fn, *args, mesh={"pp": 2}, num_microbatches=2, hardware=given)
        assert plan.hardware == hw
    again = autopipe.Plan.from_json(plan.to_json(), fn, *args, mesh={"pp": 2})
    assert again.hardware == hw and again.stage_boundaries == plan.stage_boundaries


def test_faster_hardware_predicts_faster_plans(cases):
    fn, args = cases["linen_gpt"]
    slow = PRESETS["cpu"]
    fast = dataclasses.replace(slow, peak_flops=slow.peak_flops * 10, op_overhead=1e-9)
    t = [
        autopipe.plan(fn, *args, mesh={"pp": 2}, hardware=h).predicted.step_time
        for h in (slow, fast)
    ]
    assert t[1] < t[0]


def test_plan_profile_times_every_stage(cases):
    fn, args = cases["linen_mlp"]
    plan = autopipe.plan(fn, *args, mesh={"pp": 2}, num_microbatches=2)
    profiles = plan.profile(*args, repeats=3)
    assert [p.stage for p in profiles] == [0, 1]
    assert all(p.measured > 0 and p.predicted > 0 for p in profiles)
    assert sum(p.operators for p in profiles) == plan.stages[-1].operators[1]


def test_profile_stage_function_matches_the_plain_function(cases):
    from autopipe._profile import _microbatch_env, stage_function

    fn, args = cases["linen_mlp"]
    plan = autopipe.plan(fn, *args, mesh={"pp": 2}, num_microbatches=2)
    env = _microbatch_env(plan, args)
    run, inputs = stage_function(plan, 1)
    out = run(*[env[v] for v in inputs])[-1]
    mb = plan.traced.microbatch_size
    assert jnp.allclose(out, fn(args[0], args[1][:mb]), atol=1e-5)


@pytest.mark.slow
def test_calibrate_finishes_in_two_minutes_and_plans_with_it(tmp_path, cases):
    lines: list[str] = []
    started = time.perf_counter()
    cal = autopipe.calibrate(tmp_path / "cpu.json", progress=lines.append)
    assert time.perf_counter() - started < 120 and len(lines) >= 5
    hw = cal.hardware
    assert 0 < hw.flops_efficiency <= 1 and 0 < hw.bandwidth_efficiency <= 1
    assert 0 <= hw.fusion_discount < 1 and hw.op_overhead > 0 and hw.matmul_overhead >= 0
    fn, args = cases["linen_gpt"]
    plan = autopipe.plan(fn, *args, mesh={"pp": 2}, hardware=tmp_path / "cpu.json")
    assert plan.hardware == hw
