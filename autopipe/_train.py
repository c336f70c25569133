"""The training planner: stages for forward + backward time under the memory limit.

Given the front of a loss function (traced at microbatch size, `split_ops(training=True)`) and
an optax optimizer, `search_training` clusters the layers, prices every candidate stage with
the training memory model (`cost_models.stage_memory.training_segment_memory`: parameters,
gradients, optimizer state and the residuals the schedule keeps in flight, or only the stage
inputs under remat) and the duration model (`cost_models.durations`), runs the stage DP, and
decides per stage whether to rematerialise. The emitted step is `passes.emit_train`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
import optax

from autopipe._front import Front
from autopipe._plan import PlanRecord, Predicted, Stage
from autopipe._stage_search import count_strategies, make_stage, sum_collectives
from autopipe._train_tensor import (
    segments,
    tensor_layer_time,
    training_shardings,
)
from autopipe.cost_models import comm
from autopipe.cost_models.comm import link_time
from autopipe.cost_models.durations import (
    BACKWARD_FACTOR,
    action_durations,
    training_stage_scale,
)
from autopipe.cost_models.rules import Cost, memory_time, transfer_time
from autopipe.cost_models.stage_memory import SegmentBytes, training_segment_memory
from autopipe.passes import schedule as schedules
from autopipe.passes.cluster import cluster
from autopipe.passes.ir import source_of
from autopipe.passes.layout import StageLayout, stage_layouts
from autopipe.passes.optimizer_exact import layout_by, shape_free
from autopipe.passes.partition import PlanInfeasible, StageProblem, refit, solve_stages
from autopipe.passes.schedule_check import validate
from autopipe.passes.split_fused import split_fused
from autopipe.passes.tensor_parallel import LayerShardings
from autopipe.passes.train_actions import training_layout

TRAINING_SCHEDULES = ("gpipe", "1f1b", "1f1b_paired", "interleaved_1f1b", "zb_h1", "zb_paired")


def _opt_factor(optimizer: optax.GradientTransformation, front: Front) -> float:
    """Optimizer-state bytes per parameter byte (Adam: 2), from optimizer.init's shapes."""
    prog = front.program
    params = [
        jax.ShapeDtypeStruct(prog.avals[v].shape, prog.avals[v].dtype) for v in prog.param_invars
    ]
    state = jax.eval_shape(optimizer.init, params)
    p_bytes = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in params) or 1
    s_bytes = sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    return float(s_bytes / p_bytes)


def cuts_fused(optimizer: optax.GradientTransformation, front: Front) -> bool:
    """Whether training may cut fused projections apart (`passes.split_fused`): the optimizer
    must treat a block of a leaf as it treats the leaf, element by element or with only global
    statistics (`passes.optimizer_exact.shape_free`); else the leaves stay whole."""
    prog = front.uncut[0] if front.uncut else front.program
    if split_fused(prog) is prog:  # nothing to cut (the check traces the update: seconds)
        return True
    return shape_free(optimizer, [prog.avals[v] for v in prog.param_invars])


def _zero_replicas(front: Front, zero_stage: int) -> int:
    """How many data replicas split the optimizer state (ZeRO-1), checked. The split is
    counted as even: leaves no dimension of which the replicas divide stay whole."""
    if zero_stage not in (0, 1):
        raise ValueError(
            f"zero_stage={zero_stage!r}; autopipe implements ZeRO stage 1 (the optimizer state "
            "split over the data axis) or 0 (none)."
        )
    if not zero_stage:
        return 1
    if front.data_axis is None:
        raise ValueError(
            f"zero_stage=1 splits the optimizer state over the data axis, but the mesh "
            f"{dict(front.mesh_axes)} has no data axis of size > 1. Add one (e.g. "
            "jax.make_mesh((pp, dp), ('pp', 'dp'))) or use zero_stage=0."
        )
    return front.axis_size(front.data_axis)


def _problem(
    front: Front,
    layers,
    sh: LayerShardings,
    seg: SegmentBytes,
    *,
    limit,
    in_flight,
    opt_factor,
    remat,
    rows_scale: float = 1.0,
    deferred: float = 0.0,
) -> StageProblem:
    """Stage time = forward + backward (+ a recomputed forward under remat); memory: the
    training memory model (`training_segment_memory`). With a tensor axis (``sh.tp > 1``) a
    layer's compute is its planned strategies' and its tensor collectives are the forward's
    (twice under remat) and the backward conjugates the sharding search priced (Megatron's
    f/g pairs, `tensor_parallel.LayerShardings.backward_collectives`); parameters, gradients
    and optimizer state count one shard per device.
    ``rows_scale``: microbatch rows relative to the front's (`_train_factorize` prices every
    layout from one trace): compute, activations and transfers scale with it."""
    c, hw, r = front.costs, front.hardware, rows_scale
    mem = training_segment_memory(
        seg,
        optimizer_factor=opt_factor,
        in_flight=in_flight,
        remat=remat,
        rows_scale=r,
        deferred=deferred,
    )
    scale = training_stage_scale(remat)
    cut = tuple(2 * transfer_time(r * c.cut_bytes[k], hw) for k in layers[1:-1])
    if sh.tp == 1:
        t = tuple(
            r * scale * float(sum(c.op_times[a:b]))
            for a, b in zip(layers[:-1], layers[1:], strict=True)
        )
    else:
        link = hw.axis_link(front.mesh_axes, front.tensor_axis)
        t = tuple(
            tensor_layer_time(
                sh, k, scale, remat, r, lambda kind, b: link_time(kind, b, sh.tp, link)
            )
            for k in range(len(sh.times))
        )
        cut = tuple(x + r * g for x, g in zip(cut, sh.cut_times, strict=True))  # forward gathers
    return StageProblem(
        layer_time=t,
        cut_time=cut,
        segment_memory=mem,
        memory_limit=limit,
        num_stages=front.num_stages,
        num_microbatches=front.num_microbatches,
    )


def _raw_owner(front: Front, layouts: Sequence[StageLayout], p: int) -> dict[int, dict]:
    """raw parameter value → {piece (None: the whole value; else a row of a stacked one, a
    block of a fused one, see `passes.ir.source_of`): devices holding it}."""
    owner: dict[int, dict] = {}
    for s, lay in enumerate(layouts):
        for v in lay.params:
            raw, path = source_of(front.program, v)
            owner.setdefault(raw, {}).setdefault(path or None, set()).add(s % p)
    return owner


def _check_stacked(front: Front, owner: dict[int, dict]) -> None:
    """A stacked (``nn.scan``) leaf read both whole and row by row would need a whole copy and
    per-row copies kept in step; refuse it (shared whole values and shared rows are fine)."""
    spec, prog = front.traced.spec, front.program
    path = dict(zip(prog.invars, spec.in_paths, strict=True))
    for raw, rows in sorted(owner.items()):
        if None in rows and len(rows) > 1:
            by_row = sorted(set().union(*(d for r, d in rows.items() if r is not None)))
            raise ValueError(
                f"{spec.fn_name}: parameter {path.get(raw, raw)} is read whole by stages on "
                f"devices {sorted(rows[None])} and row by row (a stacked nn.scan/nnx.scan leaf) "
                f"by stages on devices {by_row}. Training cannot keep a whole copy and per-row "
                "copies of one leaf equal: read it only inside the scan or only outside it, or "
                "use fewer stages."
            )


def shared_params(front: Front, layouts: Sequence[StageLayout], p: int) -> tuple:
    """(leaf path, the stages reading it) of every placed value read by stages on several
    devices: each holds a copy, whose gradients the step sums (`passes.shared_params`)."""
    prog = front.program
    path = dict(zip(prog.invars, front.traced.spec.in_paths, strict=True))
    producer = prog.producers()
    readers: dict[int, list[int]] = {}
    for s, lay in enumerate(layouts):
        for v in lay.params:
            readers.setdefault(v, []).append(s)

    def name(v: int) -> str:  # a raw leaf, or a row or block of one
        i = producer.get(v)
        if i is None:
            return path.get(v, str(v))
        op = prog.ops[i]
        if op.kind == "block":
            axis, start, stop = op.window
            return f"{name(op.invars[0])}[{', '.join([':'] * axis + [f'{start}:{stop}'])}]"
        return f"{name(op.invars[0])}[{op.iteration}]"

    return tuple(
        (name(v), tuple(stages))
        for v, stages in sorted(readers.items())
        if len({s % p for s in stages}) > 1
    )


def _with_orphans(front: Front, layouts: list[StageLayout], owner) -> list[StageLayout]:
    """Parameters no stage reads still get the optimizer's update: keep them on the last."""
    prog = front.program
    orphans = [v for v in prog.param_invars if v not in owner]
    if not orphans:
        return layouts
    last = layouts[-1]
    params = tuple(sorted({*last.params, *orphans}))
    extra = sum(prog.nbytes(v) for v in orphans)
    layouts[-1] = dataclasses.replace(last, params=params, param_bytes=last.param_bytes + extra)
    return layouts


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingSearch:
    """A finished training search: what the plan records and what compilation needs."""

    layers: tuple[int, ...]
    boundaries: tuple[int, ...]  # over layers
    layouts: tuple[StageLayout, ...]
    schedule: schedules.Schedule
    stages: tuple[Stage, ...]
    predicted: Predicted
    remat: tuple[bool, ...]
    shared: tuple[tuple[str, tuple[int, ...]], ...]  # leaves read by stages on several devices
    shardings: LayerShardings  # the tensor strategies (tp = 1 without a tensor axis)
    optimizer_state: float  # the optimizer's state bytes per parameter byte (`_opt_factor`)


def check_schedule(schedule: str, virtual_stages: int | None) -> int:
    """The number of virtual stages per device for a training schedule (checked); "auto" (the
    fastest predicted, `Lowered.plan`) lowers with ``virtual_stages`` or 1."""
    if schedule == "auto":
        return virtual_stages or 1
    if schedule not in TRAINING_SCHEDULES:
        raise ValueError(
            f"schedule={schedule!r}; choose 'auto' or one of {', '.join(TRAINING_SCHEDULES)} "
            "(autopipe.plan is the forward-only pipeline)."
        )
    v = virtual_stages or (2 if schedule == "interleaved_1f1b" else 1)
    if v != 1 and schedule != "interleaved_1f1b":
        raise ValueError(f"virtual_stages={v} needs schedule='interleaved_1f1b'.")
    return v


def search_training(
    front: Front,
    optimizer: optax.GradientTransformation,
    *,
    schedule: str,
    memory_limit: float | None,
    remat: bool | None,
    zero_stage: int = 0,
) -> TrainingSearch:
    """Stages, remat per stage and predicted costs of a training plan (see the module doc).
    ``remat=None`` recomputes a stage's forward in its backward only where keeping residuals
    would not fit ``memory_limit``."""
    v = front.virtual_stages
    p, m, S = front.num_stages // v, front.num_microbatches, front.num_stages
    sched = schedules.make(schedule, p, m, v)
    validate(sched)
    limit = front.hardware.memory_bytes if memory_limit is None else memory_limit
    layers = cluster(front.costs.op_times, front.costs.cut_bytes, min_layers=S)
    state = _opt_factor(optimizer, front)
    opt_factor = state / _zero_replicas(front, zero_stage)
    sh = training_shardings(front, layers, opt_factor)
    seg = segments(front, layers, sh)
    prog = front.program
    by = layout_by(optimizer, [prog.avals[x] for x in prog.param_invars])

    def fit(lim: float):  # the DP under ``lim``, the layout's padding added per device
        bounds, times, mems, remat_stages = solve_training(
            front,
            layers,
            sh,
            seg,
            limit=lim / v,
            in_flight=max(sched.in_flight()) / v,
            opt_factor=opt_factor,
            remat=remat,
            deferred=max(sched.deferred()) / v,
        )
        layouts = _layouts(front, tuple(layers[b] for b in bounds), sh, p)
        pad = [(2 + opt_factor) * x for x in _layout_padding(front, layouts, p, sh, by)]
        mems = tuple(x + pad[s] if s < p else x for s, x in enumerate(mems))
        per_device = [sum(mems[d::p]) for d in range(p)]
        return (per_device, pad), (bounds, times, mems, remat_stages, layouts)

    _, (bounds, times, mems, remat_stages, layouts) = refit(fit, lambda found: found[0], limit)
    op_bounds = tuple(layers[b] for b in bounds)
    stages = tuple(
        make_stage(
            front,
            s,
            (bounds[s], bounds[s + 1]),
            op_bounds,
            lay,
            time=times[s],
            memory=mems[s],
            store_time=_store_time(front, seg, sched, bounds[s], bounds[s + 1]),
            **_tensor_facts(sh, lay, bounds[s], bounds[s + 1]),
        )
        for s, lay in enumerate(layouts)
    )
    return TrainingSearch(
        layers=tuple(layers),
        boundaries=tuple(bounds),
        layouts=layouts,
        schedule=sched,
        stages=stages,
        predicted=_predict(front, sched, stages, p, remat=remat_stages),
        remat=remat_stages,
        shared=shared_params(front, layouts, p),
        shardings=sh,
        optimizer_state=state,
    )


def replay_training(
    front: Front, optimizer: optax.GradientTransformation, saved: PlanRecord
) -> TrainingSearch:
    """A saved training plan's decisions (`PlanRecord`) on ``front``, without searching: its
    layers, stage boundaries, schedule and remat; the tensor strategies are the search's again
    (a function of the program, mesh, hardware and ``optimizer``'s state size)."""
    if len(saved.remat) != saved.num_stages or saved.optimizer_state is None:
        raise ValueError(
            f"the saved training plan for {saved.fn_name} records no remat per stage or no "
            "optimizer state (saved by an autopipe before training plans could be replayed); "
            "plan it again with autopipe.train."
        )
    state = _opt_factor(optimizer, front)
    if not np.isclose(state, saved.optimizer_state, rtol=1e-9, atol=1e-12):
        raise ValueError(
            f"the saved plan for {saved.fn_name} was made for an optimizer whose state is "
            f"{saved.optimizer_state:g} × the parameter bytes; optimizer= holds {state:g} ×, "
            "so the stages' memory no longer matches (a larger state may not fit). Pass the "
            "optimizer the plan was made with, or plan again with autopipe.train."
        )
    v = front.virtual_stages
    p, m = front.num_stages // v, front.num_microbatches
    if (front.num_stages, m) != (saved.num_stages, saved.num_microbatches):
        raise ValueError(
            f"the saved plan for {saved.fn_name} has {saved.num_stages} stages and "
            f"{saved.num_microbatches} microbatches; this mesh and batch give {front.num_stages} "
            f"and {m}. Replay it on the mesh it was made for: {dict(saved.mesh_axes)}."
        )
    sched = schedules.make(saved.schedule.kind, p, m, v)
    layers = saved.layer_boundaries
    sh = training_shardings(front, layers, state / _zero_replicas(front, saved.zero_stage))
    bounds = saved.stage_boundaries
    layouts = _layouts(front, tuple(layers[b] for b in bounds), sh, p)
    return TrainingSearch(
        layers=tuple(layers),
        boundaries=tuple(bounds),
        layouts=layouts,
        schedule=sched,
        stages=saved.stages,
        predicted=saved.predicted,
        remat=saved.remat,
        shared=shared_params(front, layouts, p),
        shardings=sh,
        optimizer_state=state,
    )


def _store_time(front: Front, seg: SegmentBytes, sched, lo: int, hi: int) -> float:
    """Seconds per microbatch a split backward's B spends writing what its W reads apart (the
    bytes `training_segment_memory` keeps per deferred W) plus the W reading it back."""
    if not sched.split_backward:
        return 0.0
    kept = float(seg.saved[lo, hi] + seg.stashed[lo, hi])
    return memory_time(Cost(bytes_accessed=2 * kept), front.hardware)


def _layouts(front: Front, op_bounds, sh: LayerShardings, p: int) -> tuple[StageLayout, ...]:
    """The stages' parameter layouts (checked; unread parameters kept on the last stage)."""
    layouts = list(
        stage_layouts(front.program, front.split, op_bounds, training=True, dims=sh.dims, tp=sh.tp)
    )
    owner = _raw_owner(front, layouts, p)
    _check_stacked(front, owner)
    return tuple(_with_orphans(front, layouts, owner))


def _layout_padding(front: Front, layouts, p: int, sh: LayerShardings, by: str) -> list[int]:
    """Per device, the zero-filled bytes of the training layout's slots
    (`train_actions.training_layout`, `ParamLayout.padding`). Each such byte is also held as
    gradient and optimizer state."""
    dims = dict(sh.dims) if sh.tp > 1 else {}
    layout = training_layout(front.program, layouts, p, by=by, dims=dims, tp=sh.tp)
    return layout.padding(sh.tp)


def _tensor_facts(sh: LayerShardings, lay: StageLayout, lo: int, hi: int) -> dict:
    """A tensor-parallel stage's record: shard bytes, strategies and forward collectives."""
    if sh.tp == 1:
        return {}
    return dict(
        device_param_bytes=lay.device_param_bytes,
        strategies=count_strategies(sh.strategies[lo:hi]),
        collectives=sum_collectives(sh.collectives[lo:hi]),
    )


def solve_training(
    front: Front,
    layers,
    sh: LayerShardings,
    seg: SegmentBytes,
    *,
    limit: float,
    in_flight: float,
    opt_factor: float,
    remat: bool | None,
    rows_scale: float = 1.0,
    deferred: float = 0.0,
):
    """The stage DP on the training problem (`_problem`; both remat choices when ``remat``
    is None): (boundaries, stage times, stage memory, remat per stage)."""
    problems = {
        r: _problem(
            front,
            layers,
            sh,
            seg,
            limit=limit,
            in_flight=in_flight,
            opt_factor=opt_factor,
            remat=r,
            rows_scale=rows_scale,
            deferred=deferred,
        )
        for r in ([remat] if remat is not None else [False, True])
    }
    return _solve(problems, remat, front.num_stages, limit)


def _solve(problems: dict, remat: bool | None, S: int, limit: float):
    """(boundaries, stage times, stage memory, remat per stage)."""
    try:
        sol = solve_stages(problems[bool(remat)])
        return sol.boundaries, sol.stage_times, sol.stage_memory, (bool(remat),) * S
    except PlanInfeasible:
        if remat is not None:
            raise
    # keeping residuals does not fit: cut stages for remat, then let every stage that can
    # afford its residuals keep them
    sol = solve_stages(problems[True])
    keep = problems[False].segment_memory
    b = sol.boundaries
    remat_stages = tuple(bool(keep[b[s], b[s + 1]] > limit) for s in range(S))
    times = tuple(
        t if r else t * (1 + BACKWARD_FACTOR) / (2 + BACKWARD_FACTOR)
        for t, r in zip(sol.stage_times, remat_stages, strict=True)
    )
    mems = tuple(
        m_ if r else float(keep[b[s], b[s + 1]])
        for s, (m_, r) in enumerate(zip(sol.stage_memory, remat_stages, strict=True))
    )
    return b, times, mems, remat_stages


def _predict(front: Front, sched: schedules.Schedule, stages, p: int, *, remat: Sequence[bool]):
    """Step time and bubble of the table run lock-step (`schedule.lockstep`: one SPMD program,
    every tick as long as its slowest device) with the duration model."""
    duration = action_durations(
        [s.time for s in stages],
        training=True,
        split_backward=sched.split_backward,
        remat=remat,
        store_times=[s.store_time for s in stages],
        fused=sched.fused(),
    )
    times, makespan = schedules.lockstep(sched, duration)
    per_device = [sum(s.memory for s in stages[d::p]) for d in range(p)]
    return Predicted(
        step_time=makespan + _replica_sum_time(front, stages, p),
        bubble_fraction=schedules.idle_share(sched, times, makespan),
        memory_per_device=tuple(per_device),
        bytes_moved=float(2 * sched.num_microbatches * sum(s.send_bytes for s in stages)),
        unruled_primitives=front.costs.unruled,
    )


def _replica_sum_time(front: Front, stages, p: int) -> float:
    """Seconds of the data-axis gradient all-reduce after the pipeline (ZeRO-1's reduce-scatter
    and all-gather move the same bytes): the device holding most gradient bytes (its shards)."""
    if front.data_axis is None:
        return 0.0
    held = [
        sum(s.device_param_bytes if s.device_param_bytes >= 0 else s.param_bytes for s in mine)
        for mine in (stages[d::p] for d in range(p))
    ]
    return comm.collective_time(
        "all_reduce", float(max(held)), front.data_axis, front.mesh_axes, front.hardware
    )
