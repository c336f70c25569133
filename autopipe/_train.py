"""`autopipe.train`: plan and compile a pipelined optax training step from a loss function.

The user writes ``loss_fn(params, batch) -> scalar`` (a mean over the batch) and picks an optax
optimizer; `train` traces the loss at microbatch size, chooses stages for forward + backward
time under the memory limit (parameters, gradients, optimizer state and the residuals the
schedule keeps in flight), and emits one jitted step (see `autopipe.passes.emit_train`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np
import optax

from autopipe._api import _Front, _front, _is_concrete, make_plan, segment_bytes
from autopipe._compile import _compile_train
from autopipe._executable import _Runtime
from autopipe._plan import Plan, Predicted, Stage
from autopipe.cost_models.hardware import Hardware
from autopipe.cost_models.rules import transfer_time
from autopipe.passes import schedule as schedules
from autopipe.passes.cluster import cluster
from autopipe.passes.layout import StageLayout, stage_layouts
from autopipe.passes.partition import StageProblem, solve_stages

BACKWARD_FACTOR = 2.0  # a backward costs about twice its forward (two matmuls per matmul)


def _opt_factor(optimizer: optax.GradientTransformation, front: _Front) -> float:
    """Optimizer-state bytes per parameter byte (Adam: 2), from optimizer.init's shapes."""
    prog = front.program
    params = [
        jax.ShapeDtypeStruct(prog.avals[v].shape, prog.avals[v].dtype)
        for v in prog.invars
        if v not in prog.batch_dependent
    ]
    state = jax.eval_shape(optimizer.init, params)
    p_bytes = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in params) or 1
    s_bytes = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    return float(s_bytes / p_bytes)


def _problem(front: _Front, layers, *, limit, in_flight, opt_factor, remat) -> StageProblem:
    """Stage time = forward + backward (+ a recomputed forward under remat); memory = params
    × (1 + gradient + optimizer state) + residuals of the in-flight microbatches."""
    c, hw = front.costs, front.hardware
    seg = segment_bytes(front.program, c, layers)
    residuals = seg.inputs + seg.made if remat else seg.made * in_flight
    mem = seg.params * (2 + opt_factor) + residuals + 2 * seg.peak
    mem = np.where(np.triu(np.ones_like(mem), 1) > 0, mem, np.inf)
    scale = 1 + BACKWARD_FACTOR + (1 if remat else 0)
    t = tuple(
        scale * float(sum(c.op_times[a:b])) for a, b in zip(layers[:-1], layers[1:], strict=True)
    )
    cut = tuple(2 * transfer_time(c.cut_bytes[k], hw) for k in layers[1:-1])
    return StageProblem(
        layer_time=t,
        cut_time=cut,
        segment_memory=mem,
        memory_limit=limit,
        num_stages=front.num_stages,
        num_microbatches=front.num_microbatches,
    )


def _raw_owner(front: _Front, layouts: Sequence[StageLayout], p: int) -> dict[int, dict]:
    """raw parameter value → {row (None: the whole value): devices holding it}."""
    prog = front.program
    producer = prog.producers()
    owner: dict[int, dict] = {}
    for s, lay in enumerate(layouts):
        for v in lay.params:
            i = producer.get(v)
            raw, row = (
                (prog.ops[i].invars[0], prog.ops[i].iteration) if i is not None else (v, None)
            )
            owner.setdefault(raw, {}).setdefault(row, set()).add(s % p)
    return owner


def _check_untied(front: _Front, owner: dict[int, dict]) -> None:
    spec, prog = front.traced.spec, front.program
    path = dict(zip(prog.invars, spec.in_paths, strict=True))
    for raw, rows in sorted(owner.items()):
        whole = rows.get(None, set())
        shared = [d for d in rows.values() if len(d) > 1] + (
            [whole | set().union(*rows.values())] if whole and len(rows) > 1 else []
        )
        if shared:
            raise ValueError(
                f"{spec.fn_name}: parameter {path.get(raw, raw)} is used by stages on devices "
                f"{sorted(shared[0])}. Training with a parameter shared across pipeline stages "
                "(e.g. tied embeddings) is not supported yet: untie it, or use fewer stages."
            )


def _with_orphans(front: _Front, layouts: list[StageLayout], owner) -> list[StageLayout]:
    """Parameters no stage reads still get the optimizer's update: keep them on the last."""
    prog = front.program
    orphans = [v for v in prog.invars if v not in prog.batch_dependent and v not in owner]
    if not orphans:
        return layouts
    last = layouts[-1]
    params = tuple(sorted({*last.params, *orphans}))
    extra = sum(prog.nbytes(v) for v in orphans)
    layouts[-1] = dataclasses.replace(last, params=params, param_bytes=last.param_bytes + extra)
    return layouts


def train(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *example_args: Any,
    mesh: Any,
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zb_h1"] = "1f1b",
    num_microbatches: int | None = None,
    virtual_stages: int | None = None,
    batch_argnums: Sequence[int] = (1,),
    pipeline_axis: str = "pp",
    data_axis: str = "dp",
    hardware: str | Hardware | None = None,
    memory_limit: float | None = None,
    remat: bool | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    compile: bool = True,  # noqa: A002
) -> Plan:
    """Plans and compiles a pipelined training step of ``loss_fn`` with ``optimizer``.

    ``loss_fn(*args)`` returns a float scalar: the mean (``reduction="mean"``) or sum over the
    examples of the batch arguments (``batch_argnums``); the others are the parameters the
    optimizer trains. Use the returned plan as ``state = plan.init(*params)``,
    ``state, loss = plan.step(state, *batch)`` (state is donated), and
    ``params = plan.unplace(state)``. ``remat=None`` recomputes a stage's forward in its
    backward only where keeping residuals would not fit ``memory_limit``. The optimizer sees
    every leaf with its own shape (`autopipe.passes.optimizer`); one it cannot run exactly on
    the per-stage slots is refused with an error.
    A mesh axis named ``data_axis`` splits every microbatch's rows over data-parallel
    replicas, whose gradients are summed before the update (the batch must divide by
    replicas × microbatches); other non-pipeline axes replicate the step.
    """
    started = time.perf_counter()
    if schedule not in schedules.SCHEDULES or schedule == "inference":
        raise ValueError(
            f"schedule={schedule!r}; choose one of gpipe, 1f1b, interleaved_1f1b, "
            "zb_h1 (autopipe.plan is the forward-only pipeline)."
        )
    v = virtual_stages or (2 if schedule == "interleaved_1f1b" else 1)
    if v != 1 and schedule != "interleaved_1f1b":
        raise ValueError(f"virtual_stages={v} needs schedule='interleaved_1f1b'.")
    front = _front(
        loss_fn,
        example_args,
        mesh=mesh,
        pipeline_axis=pipeline_axis,
        num_microbatches=num_microbatches,
        batch_argnums=batch_argnums,
        num_stages=None,
        hardware=hardware,
        training=True,
        virtual_stages=v,
        data_axis=data_axis,
    )
    p, m, S = front.num_stages // v, front.num_microbatches, front.num_stages
    sched = schedules.make(schedule, p, m, v)
    schedules.validate(sched)
    limit = front.hardware.memory_bytes if memory_limit is None else memory_limit
    layers = cluster(front.costs.op_times, front.costs.cut_bytes, min_layers=S)
    opt_factor = _opt_factor(optimizer, front)
    in_flight = max(sched.in_flight()) / v
    problems = {
        r: _problem(
            front, layers, limit=limit / v, in_flight=in_flight, opt_factor=opt_factor, remat=r
        )
        for r in ([remat] if remat is not None else [False, True])
    }
    try:
        solution = solve_stages(problems[bool(remat)])
        remat_stages = (bool(remat),) * S
    except ValueError:
        if remat is not None:
            raise
        # keeping residuals does not fit: cut stages for remat, then let every stage that
        # can afford its residuals keep them
        solution = solve_stages(problems[True])
        keep = problems[False].segment_memory
        b = solution.boundaries
        remat_stages = tuple(bool(keep[b[s], b[s + 1]] > limit / v) for s in range(S))
        solution = dataclasses.replace(
            solution,
            stage_times=tuple(
                t if r else t * (1 + BACKWARD_FACTOR) / (2 + BACKWARD_FACTOR)
                for t, r in zip(solution.stage_times, remat_stages, strict=True)
            ),
            stage_memory=tuple(
                m_ if r else float(keep[b[s], b[s + 1]])
                for s, (m_, r) in enumerate(zip(solution.stage_memory, remat_stages, strict=True))
            ),
        )
    op_bounds = tuple(layers[b] for b in solution.boundaries)
    layouts = list(stage_layouts(front.program, front.split, op_bounds, training=True))
    owner = _raw_owner(front, layouts, p)
    _check_untied(front, owner)
    layouts = tuple(_with_orphans(front, layouts, owner))
    stages = tuple(
        Stage(
            index=s,
            layers=(solution.boundaries[s], solution.boundaries[s + 1]),
            operators=(op_bounds[s], op_bounds[s + 1]),
            primitives=tuple(
                front.program.ops[i].primitive
                for i in front.split.pipeline[op_bounds[s] : op_bounds[s + 1]]
            ),
            param_bytes=lay.param_bytes,
            send_bytes=int(front.costs.cut_bytes[op_bounds[s + 1]]) if s < S - 1 else 0,
            time=float(solution.stage_times[s]),
            memory=float(solution.stage_memory[s]),
        )
        for s, lay in enumerate(layouts)
    )
    predicted = _predict(front, sched, stages, p, remat=remat_stages)
    runtime = _Runtime(emitted=None, compiled=None, packers=[])
    if compile and _is_concrete(mesh):
        runtime = _compile_train(
            front,
            layouts,
            sched,
            mesh,
            pipeline_axis,
            optimizer,
            remat_stages,
            1.0 / (m * front.axis_size(front.data_axis)) if reduction == "mean" else 1.0,
        )
    return make_plan(
        front,
        layers,
        solution.boundaries,
        layouts,
        stages,
        sched,
        predicted,
        mesh=mesh,
        pipeline_axis=pipeline_axis,
        runtime=runtime,
        started=started,
        remat=remat_stages,
    )


def _predict(front: _Front, sched: schedules.Schedule, stages, p: int, *, remat: Sequence[bool]):
    """Step time and bubble from the table run event by event with per-stage times (a stage's
    time is forward + backward, plus a recomputed forward under remat)."""
    fwd = [s.time / (1 + BACKWARD_FACTOR + r) for s, r in zip(stages, remat, strict=True)]

    def duration(a: schedules.Action) -> float:
        if a.kind == "F":
            return fwd[a.stage]
        recompute = fwd[a.stage] if remat[a.stage] and a.kind in ("B", "W") else 0.0
        if sched.split_backward:  # B and W split the backward's two matmuls
            return fwd[a.stage] * BACKWARD_FACTOR / 2 + recompute
        return fwd[a.stage] * BACKWARD_FACTOR + recompute

    _, makespan = schedules.simulate(sched, duration)
    per_device = [sum(s.memory for s in stages[d::p]) for d in range(p)]
    return Predicted(
        step_time=makespan,
        bubble_fraction=sched.bubble_fraction(duration),
        memory_per_device=tuple(per_device),
        bytes_moved=float(2 * sched.num_microbatches * sum(s.send_bytes for s in stages)),
        unruled_primitives=front.costs.unruled,
    )
