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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from autopipe._compile import _compile
from autopipe._executable import _Runtime
from autopipe._parallel import LayerShardings, shard_layers
from autopipe._plan import Plan, Predicted, Stage
from autopipe.cost_models import memory
from autopipe.cost_models.hardware import Hardware, get_hardware
from autopipe.cost_models.memory import forward_program_bytes
from autopipe.cost_models.rules import transfer_time
from autopipe.passes import schedule as schedules
from autopipe.passes.cluster import cluster
from autopipe.passes.graph import build_program, operator_graph
from autopipe.passes.ir import Program
from autopipe.passes.layout import Split, live_across, placed_sources, split_ops, stage_layouts
from autopipe.passes.param_layout import layout_extra_bytes
from autopipe.passes.partition import StageProblem, solve_stages, step_time
from autopipe.passes.trace import Traced, batch_size_of, make_arg_spec, trace


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Costs:
    """Per pipeline operator: time (with the local param ops it needs) and bytes crossing."""

    op_times: tuple[float, ...]
    cut_bytes: tuple[int, ...]
    reads: tuple[frozenset[int], ...]  # placed parameter values each operator reads
    act_bytes: tuple[int, ...]  # output bytes per operator
    narrow_cuts: tuple[int, ...]  # cuts where one value is live (e.g. between blocks)
    unruled: tuple[str, ...]
    working: memory.WorkingSet  # materialised bytes live at each operator (XLA's fusion)


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
    sources = placed_sources(program, split)
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
        narrow_cuts=tuple(k for k in range(1, len(times)) if len(live[k]) == 1),
        working=working_set(program, split),
    )


def working_set(program: Program, split: Split) -> memory.WorkingSet:
    """`memory.working_set` over the pipeline operators: the buffers XLA materialises."""
    bufs = [
        memory.op_buffers(
            op.primitive if op.kind == "eqn" else op.kind,
            op.eqn.params if op.eqn is not None else {},
            op.invars,
            op.outvars,
            [program.avals[a] for a in op.invars if isinstance(a, int)],
            [program.avals[v] for v in op.outvars],
        )
        for op in (program.ops[i] for i in split.pipeline)
    ]
    return memory.working_set(
        bufs,
        program.nbytes,
        placed=placed_sources(program, split),
        sliced=[v for v in program.invars if v in program.batch_dependent],
        live_out=[a for a in program.outvars if isinstance(a, int)],
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SegmentBytes:
    """Per candidate stage [i, j) of layers (arrays indexed [i, j], i < j): parameter bytes,
    the largest live-values footprint inside it, and the bytes of all values it makes."""

    params: np.ndarray
    peak: np.ndarray
    made: np.ndarray
    inputs: np.ndarray  # bytes received at its first layer


def segment_bytes(
    program: Program,
    costs: _Costs,
    layers: Sequence[int],
    param_scale: Mapping[int, float] | None = None,
) -> SegmentBytes:
    """``param_scale[v]``: the share of parameter value v one device holds (tensor shards)."""
    scale = param_scale or {}
    n = len(layers) - 1
    pairs = list(itertools.pairwise(layers))
    readers: dict[int, list[int]] = {}  # parameter value → layers reading it
    for k, (a, b) in enumerate(pairs):
        for v in frozenset().union(*costs.reads[a:b]):
            readers.setdefault(v, []).append(k)
    rows, cols = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    upper = (cols > rows).astype(float)
    single, params = np.zeros(n), np.zeros((n + 1, n + 1))
    for v, ks in readers.items():
        nbytes = program.nbytes(v) * scale.get(v, 1.0)
        if len(ks) == 1:
            single[ks[0]] += nbytes
            continue
        first = np.full(n + 1, n + 1)  # first reader at or after layer i
        for k in sorted(ks, reverse=True):
            first[: k + 1] = k
        params += nbytes * (cols > first[:, None])  # [i, j) holds v iff that reader is < j
    total = np.concatenate([[0.0], np.cumsum(single)])
    params = (params + total[None, :] - total[:, None]) * upper
    layer_peak = np.array(
        [max(costs.cut_bytes[k] + costs.act_bytes[k] for k in range(a, b)) for a, b in pairs]
    )
    peak = np.zeros((n + 1, n + 1))
    for i in range(n):
        peak[i, i + 1 :] = np.maximum.accumulate(layer_peak[i:])
    made = np.concatenate([[0.0], np.cumsum([sum(costs.act_bytes[a:b]) for a, b in pairs])])
    made = (made[None, :] - made[:, None]) * upper
    cut_in = np.array([0.0, *(costs.cut_bytes[layers[i]] for i in range(1, n + 1))])
    inputs = cut_in[:, None] * upper
    return SegmentBytes(params=params, peak=peak, made=made, inputs=inputs)


def _segment_memory(
    program: Program,
    costs: _Costs,
    layers: Sequence[int],
    m: int,
    p: int = 1,
    param_scale: Mapping[int, float] | None = None,
    rows_scale: float = 1.0,
    copies: bool = False,
) -> np.ndarray:
    """mem[i, j] = per-device bytes of the forward-only program for a stage of layers [i, j)
    (`cost_models.memory.forward_program_bytes`): its parameters, the batch, its working set
    (materialised values only), the receive and send buffers and the output buffer.
    ``rows_scale``: microbatch rows relative to the traced program's (activations scale).
    ``copies``: add the parameters the backend copies out of the flat buffer for GEMM and
    convolution calls (`Hardware.copies_library_operands`: XLA:CPU does).
    """
    r, scale = rows_scale, param_scale or {}
    seg = segment_bytes(program, costs, layers, param_scale)
    peak, unpacked = memory.segment_working_bytes(
        costs.working, lambda v: program.nbytes(v) * scale.get(v, 1.0), layers, num_microbatches=m
    )
    batch_in = sum(program.nbytes(v) for v in program.invars if v in program.batch_dependent) * m
    out_bytes = sum(program.nbytes(a) for a in program.outvars if isinstance(a, int))
    send = np.array([0, *(costs.cut_bytes[k] for k in layers[1:-1]), 0], dtype=float)
    mem = forward_program_bytes(
        param_bytes=seg.params,
        batch_input_bytes=batch_in * r,
        live_peak_bytes=peak * r,
        output_bytes=out_bytes * r,
        num_microbatches=m,
        num_stages=p,
        boundary_bytes=r * np.maximum(seg.inputs, send[None, :]),
        unpacked_param_bytes=unpacked if copies else 0.0,
    ).total
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
    num_microbatches: int  # per data-parallel replica; the program is traced at one of them
    data_axis: str | None = None  # a mesh axis of size > 1 that splits every microbatch
    tensor_axis: str | None = None  # a mesh axis of size > 1 that splits operators

    def axis_size(self, name: str | None) -> int:
        return dict(self.mesh_axes).get(name, 1) if name else 1


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
    data_axis=None,
    tensor_axis=None,
) -> _Front:
    axes = _mesh_axes(mesh, pipeline_axis)
    sizes = dict(axes)
    data_axis = data_axis if sizes.get(data_axis, 1) > 1 else None
    tensor_axis = tensor_axis if sizes.get(tensor_axis, 1) > 1 else None
    dp = sizes[data_axis] if data_axis else 1
    p_axis = dict(axes)[pipeline_axis] * virtual_stages
    p = p_axis if num_stages is None else num_stages
    if p != p_axis:
        raise ValueError(
            f"num_stages={num_stages} but the pipeline axis {pipeline_axis!r} has "
            f"{p_axis // virtual_stages} devices × {virtual_stages} virtual stages; use "
            f"num_stages=None (or {p_axis}), or a mesh whose {pipeline_axis!r} axis has "
            f"{num_stages // virtual_stages} devices."
        )
    spec = make_arg_spec(fn, args, batch_argnums)
    batch = batch_size_of(spec)
    if batch % dp:
        raise ValueError(
            f"{spec.fn_name}: the batch has {batch} rows, which the data axis {data_axis!r} of "
            f"{dp} devices cannot split evenly. Use a batch that is a multiple of {dp}, or a "
            "smaller data axis."
        )
    if num_microbatches is None:
        num_microbatches = _default_microbatches(batch // dp, p)
    elif dp > 1 and (batch // dp) % num_microbatches:
        raise ValueError(
            f"{spec.fn_name}: each of the {dp} data-parallel replicas gets {batch // dp} rows "
            f"of the {batch}-row batch, which num_microbatches={num_microbatches} does not "
            f"divide. Use a divisor of {batch // dp}."
        )
    traced = trace(fn, args, batch_argnums=batch_argnums, num_microbatches=num_microbatches * dp)
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
        num_microbatches=num_microbatches,
        data_axis=data_axis,
        tensor_axis=tensor_axis,
    )


def _layers(front: _Front, num_stages: int) -> tuple[int, ...]:
    """Layer boundaries for the stage search: the cluster pass's equal-cost windows, plus every
    narrow cut (one live value: the residual stream between transformer blocks), so a stage
    can always end exactly at a block boundary."""
    c = front.costs
    layers = cluster(c.op_times, c.cut_bytes, min_layers=num_stages)
    return tuple(sorted(set(layers) | set(c.narrow_cuts)))


def _shard(front: _Front, layers: Sequence[int], *, lean: bool = False) -> LayerShardings:
    return shard_layers(
        front.program,
        front.split,
        layers,
        front.hardware,
        front.mesh_axes,
        front.tensor_axis,
        lean=lean,
    )


def _solve(front: _Front, layers: Sequence[int], limit: float):
    """(shardings, stage problem, stage solution): the fastest tensor shardings if some stage
    split fits `limit`, else the memory-lean ones (`shard_layers`)."""
    shard = _shard(front, layers)
    problem = _layer_problem(front, layers, limit, shard)
    try:
        return shard, problem, solve_stages(problem)
    except ValueError:  # nothing fits: split the weights too when that saves memory
        if shard.tp == 1:
            raise
    shard = _shard(front, layers, lean=True)
    problem = _layer_problem(front, layers, limit, shard)
    return shard, problem, solve_stages(problem)


def _layer_problem(
    front: _Front,
    layers: Sequence[int],
    memory_limit: float,
    shard: LayerShardings | None = None,
    *,
    rows_scale: float = 1.0,
    num_stages: int | None = None,
    num_microbatches: int | None = None,
) -> StageProblem:
    """The stage search's problem. The keywords price a different (stages, microbatches,
    microbatch rows) than the front was traced for: times and activations scale with rows."""
    c, r = front.costs, rows_scale
    p = num_stages or front.num_stages
    m = num_microbatches or front.num_microbatches
    if shard is None or shard.tp == 1:
        t = tuple(r * float(sum(c.op_times[a:b])) for a, b in itertools.pairwise(layers))
        scale = None
    else:
        t = tuple(r * x for x in shard.times)
        scale = shard.param_scale(shard.dims)
    cut = tuple(transfer_time(r * c.cut_bytes[k], front.hardware) for k in layers[1:-1])
    if shard is not None and shard.tp > 1:  # split values cut by a stage boundary: all-gather
        cut = tuple(t + r * g for t, g in zip(cut, shard.cut_times, strict=True))
    return StageProblem(
        layer_time=t,
        cut_time=cut,
        # no weight copies (copies=False): the emitted program reads its parameter slots in place
        segment_memory=_segment_memory(front.program, c, layers, m, p, scale, r),
        memory_limit=memory_limit,
        num_stages=p,
        num_microbatches=m,
    )


def _finish(
    front: _Front,
    layers,
    stage_bounds,
    problem: StageProblem,
    shard: LayerShardings,
    *,
    mesh,
    pipeline_axis,
    compile_,
    started,
) -> Plan:
    op_bounds = tuple(layers[b] for b in stage_bounds)
    layouts = stage_layouts(front.program, front.split, op_bounds, dims=shard.dims, tp=shard.tp)
    p, m = front.num_stages, front.num_microbatches
    sched = schedules.inference(p, m)
    schedules.validate(sched)
    stages = _stages(front, problem, stage_bounds, op_bounds, layouts, shard)
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
        runtime = _compile(front, layouts, sched, mesh, pipeline_axis, shard.dims)
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
        dims=shard.dims,
        lean_sharding=shard.lean,
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
        num_microbatches=front.num_microbatches,
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
        data_axis=front.data_axis,
        tensor_axis=front.tensor_axis,
        **extra,
    )


def _stages(front: _Front, problem: StageProblem, stage_bounds, op_bounds, layouts, shard=None):
    mem = problem.segment_memory
    # the forward layout's slot padding and rest-buffer copies; not yet for tensor-split plans,
    # whose memory limits the stage DP prices without them
    tp1 = shard is None or shard.tp == 1
    extra = layout_extra_bytes(front.program, layouts) if tp1 else [0] * len(layouts)
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
                memory=float(mem[lo, hi] + extra[s]),  # + the emitted layout's padding, copies
                device_param_bytes=lay.device_param_bytes,
                collectives=_sum_collectives(
                    [
                        *shard.collectives[lo:hi],
                        [("all_gather", shard.cut_gathers[hi - 1])] if s < len(layouts) - 1 else [],
                    ]
                )
                if shard
                else (),
                strategies=_count(shard.strategies[lo:hi]) if shard else (),
            )
        )
    return tuple(out)


def _count(per_layer) -> tuple[tuple[str, int], ...]:
    counts: dict[str, int] = {}
    for names in per_layer:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return tuple(sorted(counts.items()))


def _sum_collectives(per_layer) -> tuple[tuple[str, float], ...]:
    total: dict[str, float] = {}
    for layer in per_layer:
        for kind, nbytes in layer:
            total[kind] = total.get(kind, 0.0) + nbytes
    return tuple(sorted((k, b) for k, b in total.items() if b > 0))


def plan(
    fn: Callable,
    *example_args: Any,
    mesh: Any,
    num_microbatches: int | None = None,
    batch_argnums: Sequence[int] = (1,),
    num_stages: int | None = None,
    pipeline_axis: str = "pp",
    data_axis: str = "dp",
    tensor_axis: str = "tp",
    hardware: str | Hardware | None = None,
    memory_limit: float | None = None,
    compile: bool = True,  # noqa: A002 - the natural name for the switch
) -> Plan:
    """Plans and compiles a pipeline-parallel version of ``fn(*example_args)``.

    Args:
      fn: a JAX function; e.g. a Flax linen ``model.apply`` or ``lambda model, x: model(x)``
        for an NNX module.
      example_args: arrays or ``jax.ShapeDtypeStruct`` (planning never allocates them).
      mesh: a ``jax.sharding.Mesh`` with a pipeline axis and optionally a data and a tensor
        axis (compiled plan), or an ``AbstractMesh`` / ``{"pp": 8, "dp": 16, "tp": 8}`` dict
        (planning only: nothing is compiled). Other axes replicate the whole pipeline.
      num_microbatches: microbatches per batch; None = largest divisor of the batch ≤ 2·stages.
      batch_argnums: arguments whose leading axis is the batch; the rest are parameters.
      num_stages: None = one stage per device of the pipeline axis.
      data_axis: the mesh axis over which every microbatch's rows are split (if the mesh has
        it): each replica runs the pipeline on its rows, parameters are replicated over it.
      tensor_axis: the mesh axis over which operators are split (if the mesh has it): the
        planner picks each operator's sharding (column/row-parallel matmuls, heads, ...) and
        each device holds only its shard of the split parameters.
      hardware: a preset name ("h100", "v100", "cpu") or a ``Hardware``; None = by platform.
      memory_limit: bytes per device for the stage search; None = the hardware's memory.
      compile: False plans without compiling even for a concrete mesh.
    """
    started = time.perf_counter()
    if mesh is None or isinstance(mesh, int):
        return _plan_devices(
            fn,
            example_args,
            devices=mesh,
            num_microbatches=num_microbatches,
            batch_argnums=batch_argnums,
            pipeline_axis=pipeline_axis,
            data_axis=data_axis,
            tensor_axis=tensor_axis,
            hardware=hardware,
            memory_limit=memory_limit,
            compile_=compile,
            started=started,
        )
    front = _front(
        fn,
        example_args,
        mesh=mesh,
        pipeline_axis=pipeline_axis,
        num_microbatches=num_microbatches,
        batch_argnums=batch_argnums,
        num_stages=num_stages,
        hardware=hardware,
        data_axis=data_axis,
        tensor_axis=tensor_axis,
    )
    limit = front.hardware.memory_bytes if memory_limit is None else memory_limit
    layers = _layers(front, front.num_stages)
    shard, problem, solution = _solve(front, layers, limit)
    return _finish(
        front,
        layers,
        solution.boundaries,
        problem,
        shard,
        mesh=mesh,
        pipeline_axis=pipeline_axis,
        compile_=compile,
        started=started,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Factorization:
    """One way to lay the devices out as pipeline × data × tensor, priced by the cost model."""

    pp: int
    dp: int
    tp: int
    num_microbatches: int
    step_time: float  # predicted seconds per batch; inf if no stage split fits in memory
    memory: float  # largest predicted bytes per device (inf if it does not fit)


def factorizations(
    devices: int, batch: int, *, devices_per_node: int, max_stages: int
) -> list[tuple[int, int, int]]:
    """Every (pp, dp, tp) with pp·dp·tp = devices such that the tensor axis stays inside a node
    (tp divides devices_per_node), dp divides the batch and pp ≤ max_stages."""
    out = []
    for tp in range(1, devices + 1):
        if devices % tp or devices_per_node % tp:
            continue
        for pp in range(1, min(devices // tp, max_stages) + 1):
            if (devices // tp) % pp == 0 and batch % (dp := devices // (tp * pp)) == 0:
                out.append((pp, dp, tp))
    return out


def search_factorizations(
    fn: Callable,
    *example_args: Any,
    devices: int,
    num_microbatches: int | None = None,
    batch_argnums: Sequence[int] = (1,),
    hardware: str | Hardware | None = None,
    memory_limit: float | None = None,
    pipeline_axis: str = "pp",
    tensor_axis: str = "tp",
) -> list[Factorization]:
    """Prices every factorization of `devices` (best first) from ONE trace of the whole batch:
    per (pp, tp) the layers are clustered and sharded once, per dp the microbatch rows (and with
    them compute, activations and transfers) are scaled, then the exact stage search runs. The
    estimate that picks the mesh; the chosen mesh is then planned exactly (`plan`)."""
    base = _front(
        fn,
        example_args,
        mesh={pipeline_axis: 1},
        pipeline_axis=pipeline_axis,
        num_microbatches=1,
        batch_argnums=batch_argnums,
        num_stages=None,
        hardware=hardware,
    )
    hw = base.hardware
    limit = hw.memory_bytes if memory_limit is None else memory_limit
    batch = base.traced.batch_size
    shards: dict = {}
    cache: dict = {}
    out = []
    for pp, dp, tp in factorizations(
        devices,
        batch,
        devices_per_node=hw.devices_per_node,
        max_stages=len(base.split.pipeline),
    ):
        m = num_microbatches or _default_microbatches(batch // dp, pp)
        if (batch // dp) % m:
            continue
        layers = _layers(base, pp)
        step = mem = math.inf  # unless some stage split fits in memory
        for lean in (False, True) if tp > 1 else (False,):
            key = (tuple(layers), tp, lean)
            if key not in shards:
                axes = ((pipeline_axis, pp), ("dp", dp), (tensor_axis, tp))
                shards[key] = shard_layers(
                    base.program, base.split, layers, hw, axes, tensor_axis, cache, lean
                )
            problem = _layer_problem(
                base,
                layers,
                limit,
                shards[key],
                rows_scale=1.0 / (dp * m),
                num_stages=pp,
                num_microbatches=m,
            )
            try:
                sol = solve_stages(problem)
            except ValueError:
                continue
            step, mem = sol.step_time, max(sol.stage_memory)
            break
        out.append(
            Factorization(pp=pp, dp=dp, tp=tp, num_microbatches=m, step_time=step, memory=mem)
        )
    return sorted(out, key=lambda f: (f.step_time, f.pp * 1000 + f.tp))


def _plan_devices(
    fn, args, *, devices, pipeline_axis, data_axis, tensor_axis, compile_, started, **options
) -> Plan:
    """`plan` for ``mesh=None`` (this process's devices) or ``mesh=N`` (N devices): picks the
    factorization by `search_factorizations`, then plans that mesh exactly."""
    n = jax.device_count() if devices is None else devices
    if n < 1:
        raise ValueError(f"mesh={devices}: a device count must be at least 1.")
    candidates = search_factorizations(
        fn,
        *args,
        devices=n,
        pipeline_axis=pipeline_axis,
        tensor_axis=tensor_axis,
        **options,
    )
    best = candidates[0] if candidates else None
    if best is None or math.isinf(best.step_time):
        raise ValueError(
            f"no factorization of {n} devices into pipeline × data × tensor fits the model in "
            f"the memory limit (or divides the batch); tried {len(candidates)}. Use more "
            f"devices, a smaller batch per device, or a larger memory_limit."
        )
    shape = (best.pp, best.dp, best.tp)
    names = (pipeline_axis, data_axis, tensor_axis)
    if n == jax.device_count():
        mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), names)
    else:
        mesh = dict(zip(names, shape, strict=True))
    out = plan(
        fn,
        *args,
        mesh=mesh,
        num_microbatches=best.num_microbatches,
        pipeline_axis=pipeline_axis,
        data_axis=data_axis,
        tensor_axis=tensor_axis,
        compile=compile_,
        **{k: v for k, v in options.items() if k != "num_microbatches"},
    )
    return dataclasses.replace(
        out,
        factorizations=tuple(candidates),
        planning_seconds=time.perf_counter() - started,
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
        data_axis=saved.get("data_axis"),
        tensor_axis=saved.get("tensor_axis"),
    )
    if front.traced.fingerprint() != saved["fingerprint"]:
        raise ValueError(
            f"the saved plan was made for a different program than {front.traced.spec.fn_name} "
            f"traced with these arguments (fingerprint {saved['fingerprint']} vs "
            f"{front.traced.fingerprint()}); plan it again with autopipe.plan."
        )
    layers = tuple(saved["layer_boundaries"])
    shard = _shard(front, layers, lean=saved.get("lean_sharding", False))
    problem = _layer_problem(front, layers, math.inf, shard)
    return _finish(
        front,
        layers,
        tuple(saved["stage_boundaries"]),
        problem,
        shard,
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
