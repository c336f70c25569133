"""Multi-process runs on this machine: every process plans the same model over one global mesh.

Each test starts fresh Python processes with `autopipe.launch` (this file is their script:
``python tests/test_multihost.py CASE``); each process joins the run with
``autopipe.initialize()``, plans, runs, compares its outputs with the plain function computed
locally and reports one ``RESULT {json}`` line on stdout. Every run is bounded: peers wait at
most TIMEOUT seconds for each other and the launcher kills anything left after JOB_TIMEOUT.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

TIMEOUT = 20  # seconds a process waits for its peers (arrival, heartbeats)
JOB_TIMEOUT = 300  # seconds after which the launcher kills every process (a hang; loaded CI
# machines took 120 s for the 4-process training case)


# --- the worker: runs in each launched process ------------------------------------------------


def _model(name: str):
    import jax.numpy as jnp
    import numpy as np

    from autopipe import models

    if name == "mlp":
        model = models.LinenMLP(features=(32, 32, 32, 32, 32, 32, 32, 8))
        x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16)), jnp.float32)
    else:
        cfg = models.GPTConfig(vocab=64, seq=8, d_model=32, heads=2, layers=4, mlp_ratio=2)
        model, x = models.LinenGPT(cfg), models.make_tokens(cfg, 8)
    return model.apply, models.init_linen(model, x), x


def _forward(name: str, pp: int, m: int) -> dict:
    import jax
    import numpy as np

    import autopipe

    fn, variables, x = _model(name)
    devices = jax.devices()
    mesh = jax.make_mesh((pp, len(devices) // pp), ("pp", "dp"), devices=devices)
    plan = autopipe.plan(fn, variables, x, mesh=mesh, num_microbatches=m)
    out = plan(variables, x)
    out = plan(variables, x)  # second call: placed parameters reused
    want = np.asarray(jax.jit(fn)(variables, x))
    err = None if out is None else float(np.max(np.abs(np.asarray(out) - want)))
    # each process needs only its own stages' parameters: the others may be shapes only
    sparse = plan(_only_local_params(plan, variables), x)
    sparse_err = None if sparse is None else float(np.max(np.abs(np.asarray(sparse) - want)))
    return {"holds_last": out is not None, "max_err": err, "sparse_err": sparse_err}


def _local_rows(name: str) -> dict:
    """pp = 2 × dp = 4 over 2 processes, each holding data replicas {0, 1} or {2, 3} of both
    stages: every process passes only its replicas' rows of the batch and gets their outputs."""
    import jax
    import numpy as np

    import autopipe

    fn, variables, x = _model(name)
    n, r = jax.local_device_count(), jax.process_index()
    local = (
        [d for d in jax.devices() if d.process_index == 0],
        [d for d in jax.devices() if d.process_index == 1],
    )
    grid = np.array(
        [[*local[0][: n // 2], *local[1][: n // 2]], [*local[0][n // 2 :], *local[1][n // 2 :]]]
    )
    mesh = jax.sharding.Mesh(grid, ("pp", "dp"))
    plan = autopipe.plan(fn, variables, x, mesh=mesh, num_microbatches=1)
    share = x.shape[0] // 2
    rows = np.asarray(x)[r * share : (r + 1) * share]  # all this process loads
    batch = jax.make_array_from_process_local_data(plan.batch_sharding, rows)
    out = plan(variables, batch)
    want = np.asarray(jax.jit(fn)(variables, x))[r * share : (r + 1) * share]
    got = np.concatenate(
        [np.asarray(s.data) for s in sorted(out.addressable_shards, key=lambda s: s.index[0].start)]
    )
    return {"holds_last": True, "max_err": float(np.max(np.abs(got - want))), "sparse_err": 0.0}


def _train(steps: int = 3) -> dict:
    """1F1B training over every device of every process (pp = 4 × dp = 2): losses and final
    parameters against jitted single-device training on the whole batch in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import autopipe

    fn, variables, x = _model("mlp")
    y = jnp.asarray(np.random.default_rng(2).normal(size=(x.shape[0], 8)), jnp.float32)

    def loss_fn(params, batch):
        return jnp.mean((fn(params, batch[0]) - batch[1]) ** 2)

    opt = optax.adamw(1e-2, eps=1e-6)
    mesh = jax.make_mesh((4, 2), ("pp", "dp"), devices=jax.devices())
    plan = autopipe.train(
        loss_fn, opt, variables, (x, y), mesh=mesh, schedule="1f1b", num_microbatches=2
    )
    state = plan.init(variables)
    losses = []
    for _ in range(steps):
        state, loss = plan.step(state, (x, y))
        losses.append(float(loss))
    params, opt_state, want = variables, opt.init(variables), []
    grad = jax.jit(jax.value_and_grad(loss_fn))
    for _ in range(steps):
        loss, g = grad(params, (x, y))
        updates, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        want.append(float(loss))
    result = {"loss_err": float(np.max(np.abs(np.array(losses) - np.array(want))))}
    try:
        got = plan.unplace(state)
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), got, params)
        result["param_err"] = max(jax.tree.leaves(diffs))
    except Exception as e:  # reported: unplace gathers every stage's parameters
        result["unplace_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return result


def _checkpoint(directory: str) -> dict:
    """pp = 4 × dp = 2 over every process: 6 steps straight, and steps 4-6 again from a
    checkpoint saved at step 3 (each process writes the shards it holds)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import autopipe

    fn, variables, x = _model("mlp")
    y = jnp.asarray(np.random.default_rng(2).normal(size=(x.shape[0], 8)), jnp.float32)

    def loss_fn(params, batch):
        return jnp.mean((fn(params, batch[0]) - batch[1]) ** 2)

    mesh = jax.make_mesh((4, 2), ("pp", "dp"), devices=jax.devices())
    plan = autopipe.train(
        loss_fn, optax.adamw(1e-2), variables, (x, y), mesh=mesh, num_microbatches=2
    )
    state, straight = plan.init(variables), []
    for step in range(1, 7):
        state, loss = plan.step(state, (x, y))
        straight.append(float(loss))
        if step == 3:
            autopipe.save_checkpoint(directory, state, step=step)
    restored, step = autopipe.restore_checkpoint(directory, plan.init(variables))
    resumed = []
    for _ in range(3):
        restored, loss = plan.step(restored, (x, y))
        resumed.append(float(loss))
    return {"step": step, "straight": straight[3:], "resumed": resumed}


def _only_local_params(plan, variables):
    import jax

    from autopipe._distributed import owns_any
    from autopipe._executable import _stage_devices

    prog = plan.program
    needed = set()
    for s, (_, ids) in enumerate(plan._runtime.packers):
        if owns_any(_stage_devices(plan.mesh, plan.pipeline_axis, s)):
            needed |= set(ids)
    param_ids = [v for v in prog.invars if v not in prog.batch_dependent]
    leaves, treedef = jax.tree.flatten(variables)
    kept = [
        x if v in needed else jax.ShapeDtypeStruct(x.shape, x.dtype)
        for v, x in zip(param_ids, leaves, strict=True)
    ]
    assert len(set(param_ids) - needed) > 0 or jax.process_count() == 1
    return jax.tree.unflatten(treedef, kept)


def _worker(case: str) -> dict:
    import jax

    import autopipe

    if case == "missing":  # a run of 2 processes in which process 1 never arrives
        autopipe.initialize(num_processes=2, timeout=3)
        return {"joined": True}
    if case == "dead":
        autopipe.initialize()
        if jax.process_index() == 1:
            import os

            os._exit(7)  # dies without a word after joining
        return _forward("mlp", jax.device_count(), 4)
    autopipe.initialize()
    if case in ("mlp", "gpt"):
        return _forward(case, jax.device_count(), 4)
    if case == "mlp_dp":
        return _forward("mlp", jax.device_count() // 2, 4)
    if case == "local_rows":
        return _local_rows("mlp")
    if case == "train":
        return _train()
    if case.startswith("checkpoint:"):
        return _checkpoint(case.split(":", 1)[1])
    if case == "differ":  # process 1 plans with other microbatches
        return _forward("mlp", jax.device_count(), 4 if jax.process_index() == 0 else 2)
    if case == "mesh":  # a mesh over process 0's devices only
        fn, variables, x = _model("mlp")
        n = jax.local_device_count()
        mesh = jax.make_mesh((n,), ("pp",), devices=jax.devices()[:n])
        plan = autopipe.plan(fn, variables, x, mesh=mesh, num_microbatches=4)
        return {"out": plan(variables, x) is not None}
    raise ValueError(case)


def _main(case: str) -> None:
    try:
        result = _worker(case)
    except Exception as e:  # reported to the test, which checks the message
        result = {"error": type(e).__name__, "message": str(e)}
    print("RESULT " + json.dumps(result), flush=True)


# --- the tests --------------------------------------------------------------------------------


def _run(case: str, processes: int, devices: int, timeout: int = TIMEOUT):
    from autopipe.launch import launch

    started = time.monotonic()
    results = launch(
        [sys.executable, __file__, case],
        num_processes=processes,
        devices=devices,
        timeout=timeout,
        job_timeout=JOB_TIMEOUT,
    )
    elapsed = time.monotonic() - started
    reports = []
    for r in results:
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        reports.append(json.loads(lines[-1][7:]) if lines else None)
    return results, reports, elapsed


def _check_forward(results, reports, processes: int, devices: int) -> None:
    for r, rep in zip(results, reports, strict=True):
        assert r.returncode == 0 and rep is not None, r.stderr[-3000:]
        assert "error" not in rep, rep
    # the last stage's devices are the last process's: only it gets outputs
    assert [rep["holds_last"] for rep in reports] == [False] * (processes - 1) + [True]
    assert reports[-1]["max_err"] < 1e-5 and reports[-1]["sparse_err"] < 1e-5


@pytest.mark.parametrize(
    ("processes", "devices"), [(2, 4), pytest.param(4, 2, marks=pytest.mark.slow)]
)
def test_mlp_forward_matches_single_process(processes, devices):
    results, reports, _ = _run("mlp", processes, devices)
    _check_forward(results, reports, processes, devices)


@pytest.mark.slow
def test_pipeline_with_replicas_across_processes():
    # 2 processes × 4 devices, mesh pp=4 × dp=2: each stage's two devices in one process
    results, reports, _ = _run("mlp_dp", 2, 4)
    _check_forward(results, reports, 2, 4)


@pytest.mark.slow
def test_each_process_passes_only_its_data_replicas_rows():
    results, reports, _ = _run("local_rows", 2, 4)
    for r, rep in zip(results, reports, strict=True):
        assert r.returncode == 0 and rep is not None, r.stderr[-3000:]
        assert "error" not in rep and rep["max_err"] < 1e-5, rep


@pytest.mark.parametrize(
    ("processes", "devices"), [(2, 4), pytest.param(4, 2, marks=pytest.mark.slow)]
)
def test_training_across_processes_matches_single_device(processes, devices):
    # pp = 4 × dp = 2 over every device, 1F1B, AdamW: losses and unplaced parameters
    results, reports, _ = _run("train", processes, devices, timeout=60)
    for r, rep in zip(results, reports, strict=True):
        assert r.returncode == 0 and rep is not None, r.stderr[-3000:]
        assert rep.get("unplace_error") is None, rep
        assert rep["loss_err"] < 1e-5 and rep["param_err"] < 1e-5, rep


@pytest.mark.slow
def test_checkpoint_across_processes_resumes_with_identical_losses(tmp_path):
    results, reports, _ = _run(f"checkpoint:{tmp_path / 'ckpt'}", 2, 4, timeout=60)
    for r, rep in zip(results, reports, strict=True):
        assert r.returncode == 0 and rep is not None, r.stderr[-3000:]
        assert "error" not in rep, rep
        assert rep["step"] == 3 and rep["resumed"] == rep["straight"], rep


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "devices"), [(2, 4), (4, 2)])
def test_gpt_forward_matches_single_process(processes, devices):
    results, reports, _ = _run("gpt", processes, devices)
    _check_forward(results, reports, processes, devices)


@pytest.mark.slow
def test_processes_that_plan_differently_are_refused():
    results, reports, _ = _run("differ", 2, 2)
    for rep in reports:
        assert rep["error"] == "RuntimeError", rep
        assert "processes computed different plans" in rep["message"]
        assert "process 0: " in rep["message"] and "process 1: " in rep["message"]


@pytest.mark.slow
def test_mesh_leaving_a_process_out_is_refused():
    results, reports, _ = _run("mesh", 2, 2)
    for rep in reports:
        assert rep["error"] == "ValueError", rep
        assert "processes [1] own none of its devices" in rep["message"]


def test_dead_peer_ends_with_an_error_not_a_hang():
    # process 1 dies after joining; process 0, waiting for it in the plan's first collective,
    # is stopped by JAX's coordination service once heartbeats stop (timeout = 5 s)
    results, _, elapsed = _run("dead", 2, 2, timeout=5)
    assert results[1].returncode == 7
    survivor = results[0]
    assert survivor.returncode != 0 and not survivor.killed, survivor.stderr[-2000:]
    assert "stopped sending heartbeats" in survivor.stderr
    assert elapsed < 60


@pytest.mark.slow
def test_missing_peer_ends_with_an_error_not_a_hang():
    results, reports, elapsed = _run("missing", 1, 1)
    assert elapsed < 60
    assert results[0].returncode != 0 and reports == [None]
    assert "DEADLINE_EXCEEDED" in results[0].stderr, results[0].stderr[-2000:]


if __name__ == "__main__":
    _main(sys.argv[1])
