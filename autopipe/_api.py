"""Public entry points: `plan` (search + compile), `plan_from_dict` (replay), `parallelize`.

The compile path, one pass per module in `autopipe.passes`:
trace → graph (IR + costed operator graph) → layout.split_ops → cluster → partition (stage DP)
→ layout.stage_layouts → schedule → emit.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from autopipe._plan import Plan, Predicted, Stage, _Runtime
from autopipe.cost_models.hardware import Hardware, get_hardware
from autopipe.cost_models.memory import forward_program_bytes
from autopipe.cost_models.rules import transfer_time
from autopipe.passes import schedule as schedules
from autopipe.passes.cluster import cluster
from autopipe.passes.emit import emit, make_packers
from autopipe.passes.graph import build_program, operator_graph
from autopipe.passes.ir import Program
from autopipe.passes.layout import Split, live_across, split_ops, stage_layouts
from autopipe.passes.partition import StageProblem, solve_stages, step_time
from autopipe.passes.trace import Traced, trace


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Costs:
    """Per pipeline operator: time (with the local param ops it needs) and bytes crossing."""

    op_times: tuple[float, ...]
    cut_bytes: tuple[int, ...]
    reads: tuple[frozenset[int], ...]  # placed parameter values each operator reads
    act_bytes: tuple[int, ...]  # output bytes per operator
    unruled: tuple[str, ...]


# --- argument checks -------------------------------------------------------------------------


def _mesh_axes(mesh: Any, axis: str) -> tuple[tuple[str, int], ...]:
    if isinstance(mesh, dict):
        axes = tuple((str(k), int(v)) for k, v in mesh.items())
    elif hasattr(mesh, "axis_names") and hasattr(mesh, "shape"):
        axes = tuple((str(n), int(mesh.shape[n])) for n in mesh.axis_names)
    else:
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('pp',))), an "
            f"AbstractMesh, or a dict of axis sizes for planning only; got {type(mesh).__name__}."
        )
    if axis not in dict(axes):
        names = tuple(n for n, _ in axes)
        raise ValueError(
            f"mesh axes {names} have no pipeline axis {axis!r}. Create the mesh with a "
            f"{axis!r} axis, e.g. jax.make_mesh((8,), ({axis!r},)), or name the pipeline axis "
            f"with pipeline_axis=... (one of {names})."
        )
    return axes


def _is_concrete(mesh: Any) -> bool:
    return isinstance(mesh, jax.sharding.Mesh)


def _default_microbatches(batch: int, stages: int) -> int:
    """Largest divisor of the batch that is at most 2 × stages (at least 1)."""
    return max(d for d in range(1, min(batch, 2 * stages) + 1) if batch % d == 0)


def _check_outputs(traced: Traced, program: Program) -> None:
    mb = traced.microbatch_size
    batch_in = set(program.invars) & program.batch_dependent
    for k, a in enumerate(program.outvars):
        ok = isinstance(a, int) and (a in program.batch_dependent or a in batch_in)
        shape = tuple(program.avals[a].shape) if isinstance(a, int) else ()
        if not ok or not shape or shape[0] != mb:
            raise ValueError(
                f"{traced.spec.fn_name}: output {k} (shape {shape}) does not carry the batch on "
                f"its leading axis (microbatch size {mb}). Pipelining splits the batch into "
                "microbatches and concatenates the outputs, so every output must be computed "
                "per example with the batch first; return batch-independent values separately."
            )


def _check_loss(traced: Traced, program: Program) -> None:
    outs = program.outvars
    aval = program.avals[outs[0]] if len(outs) == 1 and isinstance(outs[0], int) else None
    if aval is None or aval.shape != () or not np.issubdtype(aval.dtype, np.floating):
        shapes = [
            tuple(getattr(program.avals[a], "shape", ())) if isinstance(a, int) else ()
            for a in outs
        ]
        raise ValueError(
            f"{traced.spec.fn_name}: a training loss function must return one float scalar "
            f"(the loss, a mean over the batch), but it returns {len(outs)} value(s) with "
            f"shapes {shapes}. Return only the loss."
        )
    if outs[0] not in program.batch_dependent:
        raise ValueError(f"{traced.spec.fn_name}: the loss does not depend on the batch.")


# --- costs ---------------------------------------------------------------------------------


def _operator_costs(program: Program, split: Split, hw: Hardware) -> _Costs:
    graph = operator_graph(program, hw)
    pos = {i: k for k, i in enumerate(split.pipeline)}
    times = [graph.nodes[i]["time"] for i in split.pipeline]
    for i in sorted(split.local):  # a local param op is charged to its first consumer
        consumers = [pos[j] for j in graph.successors(i) if j in pos]
        if consumers:
            times[min(consumers)] += graph.nodes[i]["time"]
    sources = set(program.invars) - program.batch_dependent | {v for v, _ in program.consts}
    sources |= {v for i in split.hoisted for v in program.ops[i].outvars}
    reads = tuple(
        frozenset(a for a in program.ops[i].invars if isinstance(a, int) and a in sources)
        for i in split.pipeline
    )
    live = live_across(program, split)
    unruled = sorted({u for i in graph.nodes for u in graph.nodes[i]["unruled"]})
    return _Costs(
        op_times=tuple(times),
        cut_bytes=tuple(sum(program.nbytes(v) for v in vs) for vs in live),
        reads=reads,
        act_bytes=tuple(
            sum(program.nbytes(v) for v in program.ops[i].outvars) for i in split.pipeline
        ),
        unruled=tuple(unruled),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SegmentBytes:
    """Per candidate stage [i, j) of layers (arrays indexed [i, j], i < j): parameter bytes,
    the largest live-values footprint inside it, and the bytes of all values it makes."""

    params: np.ndarray
    peak: np.ndarray
    made: np.ndarray
    inputs: np.ndarray  # bytes received at its first layer


def segment_bytes(program: Program, costs: _Costs, layers: Sequence[int]) -> SegmentBytes:
    n = len(layers) - 1
    params, peak, made, inputs = (np.zeros((n + 1, n + 1)) for _ in range(4))
    layer_reads = [frozenset().union(*costs.reads[a:b]) for a, b in itertools.pairwise(layers)]
    layer_peak = [
        max(costs.cut_bytes[k] + costs.act_bytes[k] for k in range(a, b))
        for a, b in itertools.pairwise(layers)
    ]
    layer_made = [sum(costs.act_bytes[a:b]) for a, b in itertools.pairwise(layers)]
    for i in range(n):
        held: set[int] = set()
        p_bytes = pk = mk = 0
        for j in range(i + 1, n + 1):
            new = layer_reads[j - 1] - held
            held |= new
            p_bytes += sum(program.nbytes(v) for v in new)
            pk, mk = max(pk, layer_peak[j - 1]), mk + layer_made[j - 1]
            params[i, j], peak[i, j], made[i, j] = p_bytes, pk, mk
            inputs[i, j] = costs.cut_bytes[layers[i]] if i > 0 else 0
    return SegmentBytes(params=params, peak=peak, made=made, inputs=inputs)


def _segment_memory(
    program: Program, costs: _Costs, layers: Sequence[int], m: int, p: int = 1
) -> np.ndarray:
    """mem[i, j] = per-device bytes of the forward-only program for a stage of layers [i, j)
    (`cost_models.memory.forward_program_bytes`), plus its receive and send buffers.

    The unpacked-parameter copy XLA keeps today (see `forward_program_bytes`) is left out
    (param_copies=0): it is an artefact of the emitted program, not a property of the stage.
    """
    seg = segment_bytes(program, costs, layers)
    batch_in = sum(program.nbytes(v) for v in program.invars if v in program.batch_dependent) * m
    out_bytes = sum(program.nbytes(a) for a in program.outvars if isinstance(a, int))
    send = np.array([0, *(costs.cut_bytes[k] for k in layers[1:-1]), 0], dtype=float)
    mem = (
        2 * np.maximum(seg.inputs, send[None, :])
        + forward_program_bytes(
            param_bytes=seg.params,
            batch_input_bytes=batch_in,
            live_peak_bytes=seg.peak,
            output_bytes=out_bytes,
            num_microbatches=m,
            num_stages=p,
            param_copies=0.0,
        ).total
    )
    return np.where(np.triu(np.ones_like(mem), 1) > 0, mem, np.inf)


# --- planning -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Front:
    """What every plan of a function needs before the search: trace, IR, split, costs."""

    traced: Traced
    program: Program
    split: Split
    costs: _Costs
    hardware: Hardware
    mesh_axes: tuple[tuple[str, int], ...]
    num_stages: int


def _front(
    fn,
    args,
    *,
    mesh,
    pipeline_axis,
    num_microbatches,
    batch_argnums,
    num_stages,
    hardware,
    training=False,
    virtual_stages=1,
) -> _Front:
    axes = _mesh_axes(mesh, pipeline_axis)
    p_axis = dict(axes)[pipeline_axis] * virtual_stages
    p = p_axis if num_stages is None else num_stages
    if p != p_axis:
        raise ValueError(
            f"num_stages={num_stages} but the pipeline axis {pipeline_axis!r} has "
            f"{p_axis // virtual_stages} devices × {virtual_stages} virtual stages; use "
            f"num_stages=None (or {p_axis}), or a mesh whose {pipeline_axis!r} axis has "
            f"{num_stages // virtual_stages} devices."
        )
    if num_microbatches is None:
        probe = trace(fn, args, batch_argnums=batch_argnums, num_microbatches=1)
        num_microbatches = _default_microbatches(probe.batch_size, p)
    traced = trace(fn, args, batch_argnums=batch_argnums, num_microbatches=num_microbatches)
    program = build_program(traced.jaxpr, traced.spec.batch_leaves)
    (_check_loss if training else _check_outputs)(traced, program)
    split = split_ops(program, training=training)
    n_ops = len(split.pipeline)
    if n_ops < p:
        raise ValueError(
            f"{traced.spec.fn_name}: {p} stages requested but the function has only {n_ops} "
            f"batch-dependent operators, and every stage needs at least one. Use a pipeline "
            f"axis of at most {n_ops} devices."
        )
    platform = "gpu" if _is_concrete(mesh) and mesh.devices.flat[0].platform == "gpu" else "cpu"
    hw = get_hardware(hardware, platform=platform)
    costs = _operator_costs(program, split, hw)
    return _Front(
        traced=traced,
        program=program,
        split=split,
        costs=costs,
        hardware=hw,
        mesh_axes=axes,
        num_stages=p,
    )


def _layer_problem(front: _Front, layers: Sequence[int], memory_limit: float) -> StageProblem:
    c = front.costs
    t = tuple(float(sum(c.op_times[a:b])) for a, b in zip(layers[:-1], layers[1:], strict=True))
    cut = tuple(transfer_time(c.cut_bytes[k], front.hardware) for k in layers[1:-1])
    return StageProblem(
        layer_time=t,
        cut_time=cut,
        segment_memory=_segment_memory(
            front.program, c, layers, front.traced.num_microbatches, front.num_stages
        ),
        memory_limit=memory_limit,
        num_stages=front.num_stages,
        num_microbatches=front.traced.num_microbatches,
    )


def _finish(
    front: _Front,
    layers,
    stage_bounds,
    problem: StageProblem,
    *,
    mesh,
    pipeline_axis,
    compile_,
    started,
) -> Plan:
    op_bounds = tuple(layers[b] for b in stage_bounds)
    layouts = stage_layouts(front.program, front.split, op_bounds)
    p, m = front.num_stages, front.traced.num_microbatches
    sched = schedules.inference(p, m)
    schedules.validate(sched)
    stages = _stages(front, problem, stage_bounds, op_bounds, layouts)
    step = step_time([s.time for s in stages], m)
    predicted = Predicted(
        step_time=step,
        bubble_fraction=1.0 - m * sum(s.time for s in stages) / (p * step),
        memory_per_device=tuple(s.memory for s in stages),
        bytes_moved=float(m * sum(s.send_bytes for s in stages)),
        unruled_primitives=front.costs.unruled,
    )
    runtime = _Runtime(emitted=None, compiled=None, packers=[])
    if compile_ and _is_concrete(mesh):
        runtime = _compile(front, layouts, sched, mesh, pipeline_axis)
    return make_plan(
        front,
        layers,
        stage_bounds,
        layouts,
        stages,
        sched,
        predicted,
        mesh=mesh,
        pipeline_axis=pipeline_axis,
        runtime=runtime,
        started=started,
    )


def make_plan(
    front: _Front,
    layers,
    stage_bounds,
    layouts,
    stages,
    sched,
    predicted,
    *,
    mesh,
    pipeline_axis,
    runtime,
    started,
    **extra,
) -> Plan:
    """Assembles the `Plan` of a finished search (forward-only or training)."""
    return Plan(
        fn_name=front.traced.spec.fn_name,
        fingerprint=front.traced.fingerprint(),
        mesh_axes=front.mesh_axes,
        pipeline_axis=pipeline_axis,
        num_microbatches=front.traced.num_microbatches,
        layer_boundaries=tuple(layers),
        stage_boundaries=tuple(stage_bounds),
        stages=stages,
        schedule=sched,
        predicted=predicted,
        hardware=front.hardware,
        planning_seconds=time.perf_counter() - started,
        traced=front.traced,
        program=front.program,
        split=front.split,
        layouts=tuple(layouts),
        mesh=mesh,
        _runtime=runtime,
        **extra,
    )


def _stages(front: _Front, problem: StageProblem, stage_bounds, op_bounds, layouts):
    mem = problem.segment_memory
    out = []
    for s, lay in enumerate(layouts):
        lo, hi = stage_bounds[s], stage_bounds[s + 1]
        send = front.costs.cut_bytes[op_bounds[s + 1]] if s < len(layouts) - 1 else 0
        t = sum(problem.layer_time[lo:hi]) + (
            problem.cut_time[hi - 1] if hi < len(problem.layer_time) else 0.0
        )
        prims = tuple(
            front.program.ops[i].primitive
            for i in front.split.pipeline[op_bounds[s] : op_bounds[s + 1]]
        )
        out.append(
            Stage(
                index=s,
                layers=(lo, hi),
                operators=(op_bounds[s], op_bounds[s + 1]),
                primitives=prims,
                param_bytes=lay.param_bytes,
                send_bytes=int(send),
                time=float(t),
                memory=float(mem[lo, hi]),
            )
        )
    return tuple(out)


def _compile(front: _Front, layouts, sched, mesh, axis) -> _Runtime:
    traced, program = front.traced, front.program
    emitted = emit(program, layouts, sched, mesh=mesh, axis=axis, batch_size=traced.batch_size)
    p = front.num_stages
    param_avals = tuple(
        jax.ShapeDtypeStruct((p, n), dt, sharding=emitted.param_sharding)
        for dt, n in zip(emitted.param_dtypes, emitted.param_sizes, strict=True)
    )
    batch_avals = tuple(
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=emitted.batch_sharding)
        for a, b in zip(traced.spec.in_avals, traced.spec.batch_leaves, strict=True)
        if b
    )
    compiled = emitted.step.lower(param_avals, batch_avals).compile()
    return _Runtime(
        emitted=emitted,
        compiled=compiled,
        packers=make_packers(program, front.split, [lay.params for lay in layouts]),
    )


def plan(
    fn: Callable,
    *example_args: Any,
    mesh: Any,
    num_microbatches: int | None = None,
    batch_argnums: Sequence[int] = (1,),
    num_stages: int | None = None,
    pipeline_axis: str = "pp",
    hardware: str | Hardware | None = None,
    memory_limit: float | None = None,
    compile: bool = True,  # noqa: A002 - the natural name for the switch
) -> Plan:
    """Plans and compiles a pipeline-parallel version of ``fn(*example_args)``.

    Args:
      fn: a JAX function; e.g. a Flax linen ``model.apply`` or ``lambda model, x: model(x)``
        for an NNX module.
      example_args: arrays or ``jax.ShapeDtypeStruct`` (planning never allocates them).
      mesh: a ``jax.sharding.Mesh`` with a pipeline axis (compiled plan), or an
        ``AbstractMesh`` / ``{"pp": 64}`` dict (planning only: nothing is compiled).
      num_microbatches: microbatches per batch; None = largest divisor of the batch ≤ 2·stages.
      batch_argnums: arguments whose leading axis is the batch; the rest are parameters.
      num_stages: None = one stage per device of the pipeline axis.
      hardware: a preset name ("h100", "v100", "cpu") or a ``Hardware``; None = by platform.
      memory_limit: bytes per device for the stage search; None = the hardware's memory.
      compile: False plans without compiling even for a concrete mesh.
    """
    started = time.perf_counter()
    front = _front(
        fn,
        example_args,
        mesh=mesh,
        pipeline_axis=pipeline_axis,
        num_microbatches=num_microbatches,
        batch_argnums=batch_argnums,
        num_stages=num_stages,
        hardware=hardware,
    )
    limit = front.hardware.memory_bytes if memory_limit is None else memory_limit
    layers = cluster(front.costs.op_times, front.costs.cut_bytes, min_layers=front.num_stages)
    problem = _layer_problem(front, layers, limit)
    solution = solve_stages(problem)
    return _finish(
        front,
        layers,
        solution.boundaries,
        problem,
        mesh=mesh,
        pipeline_axis=pipeline_axis,
        compile_=compile,
        started=started,
    )


def plan_from_dict(
    saved: dict,
    fn: Callable,
    example_args: Sequence[Any],
    *,
    mesh: Any,
    batch_argnums: Sequence[int] = (1,),
    compile: bool = True,
) -> Plan:  # noqa: A002
    """Rebuilds a saved plan: same trace, same stages, no search."""
    started = time.perf_counter()
    axis = saved["pipeline_axis"]
    front = _front(
        fn,
        example_args,
        mesh=mesh,
        pipeline_axis=axis,
        num_microbatches=saved["num_microbatches"],
        batch_argnums=batch_argnums,
        num_stages=len(saved["stage_boundaries"]) - 1,
        hardware=Hardware(**saved["hardware"]),
    )
    if front.traced.fingerprint() != saved["fingerprint"]:
        raise ValueError(
            f"the saved plan was made for a different program than {front.traced.spec.fn_name} "
            f"traced with these arguments (fingerprint {saved['fingerprint']} vs "
            f"{front.traced.fingerprint()}); plan it again with autopipe.plan."
        )
    layers = tuple(saved["layer_boundaries"])
    problem = _layer_problem(front, layers, math.inf)
    return _finish(
        front,
        layers,
        tuple(saved["stage_boundaries"]),
        problem,
        mesh=mesh,
        pipeline_axis=axis,
        compile_=compile,
        started=started,
    )


def parallelize(fn: Callable | None = None, **options: Any) -> Callable:
    """Decorator: ``@autopipe.parallelize(mesh=mesh, num_microbatches=4)``.

    The decorated function plans on first call for each argument structure/shapes/dtypes
    (cached) and runs the plan; ``decorated.plan(*args)`` returns that `Plan`.
    """
    if fn is None:
        return functools.partial(parallelize, **options)
    cache: dict[Any, Plan] = {}

    def plan_for(*args: Any) -> Plan:
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", ""))) for x in leaves))
        if key not in cache:
            cache[key] = plan(fn, *args, **options)
        return cache[key]

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        return plan_for(*args)(*args)

    wrapper.plan = plan_for
    return wrapper
