"""Stage search for forward-only plans: layers → stage problem → stage DP → stages.

The layers are the cluster pass's equal-cost windows plus every narrow cut; each layer is
priced with its tensor shardings (`passes.tensor_parallel.shard_layers`) and each candidate
stage with the memory model (`cost_models.stage_memory`); the exact DP
(`passes.partition.solve_stages`) picks the boundaries. `assemble` turns chosen boundaries
into the plan's stage layouts, `Stage` records and predicted costs — also for a replayed plan.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

from autopipe._front import Front
from autopipe._plan import Predicted, Stage
from autopipe.cost_models.rules import transfer_time
from autopipe.cost_models.stage_memory import ForwardProgram, forward_segment_memory
from autopipe.passes import schedule as schedules
from autopipe.passes.cluster import cluster
from autopipe.passes.layout import StageLayout, stage_layouts
from autopipe.passes.param_layout import layout_extra_bytes
from autopipe.passes.partition import PlanInfeasible, StageProblem, solve_stages, step_time
from autopipe.passes.schedule import Schedule
from autopipe.passes.schedule_check import validate
from autopipe.passes.tensor_parallel import LayerShardings, ShardingCache, shard_layers


def layers_for(front: Front, num_stages: int) -> tuple[int, ...]:
    """Layer boundaries for the stage search: the cluster pass's equal-cost windows, plus every
    narrow cut (one live value: the residual stream between transformer blocks), so a stage
    can always end exactly at a block boundary."""
    c = front.costs
    layers = cluster(c.op_times, c.cut_bytes, min_layers=num_stages)
    return tuple(sorted(set(layers) | set(c.narrow_cuts)))


def shard(
    front: Front,
    layers: Sequence[int],
    *,
    lean: bool = False,
    held: float = 1.0,
    mesh_axes: Sequence[tuple[str, int]] | None = None,
    cache: ShardingCache | None = None,
    pipeline: int | None = None,
) -> LayerShardings:
    """`shard_layers` of the front's program on its mesh (or ``mesh_axes``, whose pipeline
    axis has ``pipeline`` devices: a ``lean`` price counts a leaf only one stage holds on each,
    as the parameter layout pads its slot there)."""
    pipeline = front.num_stages // front.virtual_stages if pipeline is None else pipeline
    return shard_layers(
        front.program,
        front.split,
        layers,
        front.hardware,
        front.mesh_axes if mesh_axes is None else mesh_axes,
        front.tensor_axis,
        cache,
        lean,
        held=held,
        pipeline=pipeline,
        backward=front.training,
    )


def forward_program(front: Front) -> ForwardProgram:
    prog = front.program
    return ForwardProgram(
        nbytes=prog.nbytes,
        batch_input_bytes=sum(prog.nbytes(v) for v in prog.invars if v in prog.batch_dependent),
        output_bytes=sum(prog.nbytes(a) for a in prog.outvars if isinstance(a, int)),
        # no weight copies: the emitted program reads its parameter slots in place
        copies_library_operands=False,
    )


def layer_problem(
    front: Front,
    layers: Sequence[int],
    memory_limit: float,
    shardings: LayerShardings | None = None,
    *,
    rows_scale: float = 1.0,
    num_stages: int | None = None,
    num_microbatches: int | None = None,
) -> StageProblem:
    """The stage search's problem. The keywords price a different (stages, microbatches,
    microbatch rows) than the front was traced for: times and activations scale with rows."""
    c, r, sh = front.costs, rows_scale, shardings
    p = num_stages or front.num_stages
    m = num_microbatches or front.num_microbatches
    if sh is None or sh.tp == 1:
        t = tuple(r * float(sum(c.op_times[a:b])) for a, b in itertools.pairwise(layers))
        scale = None
    else:
        t = tuple(r * x for x in sh.times)
        scale = sh.param_scale(sh.dims)
    cut = tuple(transfer_time(r * c.cut_bytes[k], front.hardware) for k in layers[1:-1])
    if sh is not None and sh.tp > 1:  # split values cut by a stage boundary: all-gather
        cut = tuple(t + r * g for t, g in zip(cut, sh.cut_times, strict=True))
    mem = forward_segment_memory(forward_program(front), c, layers, m, p, scale, r)
    return StageProblem(
        layer_time=t,
        cut_time=cut,
        segment_memory=mem,
        memory_limit=memory_limit,
        num_stages=p,
        num_microbatches=m,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Search:
    """The stage search's result: the shardings it priced, its problem and the boundaries."""

    shardings: LayerShardings
    problem: StageProblem
    boundaries: tuple[int, ...]  # over layers


def solve(front: Front, layers: Sequence[int], limit: float) -> Search:
    """The fastest tensor shardings if some stage split fits `limit`, else the memory-lean
    ones (`shard_layers`); `PlanInfeasible` if neither fits."""
    sh = shard(front, layers)
    problem = layer_problem(front, layers, limit, sh)
    try:
        return Search(shardings=sh, problem=problem, boundaries=solve_stages(problem).boundaries)
    except PlanInfeasible:  # nothing fits: split the weights too when that saves memory
        if sh.tp == 1:
            raise
    sh = shard(front, layers, lean=True)
    problem = layer_problem(front, layers, limit, sh)
    return Search(shardings=sh, problem=problem, boundaries=solve_stages(problem).boundaries)


def replay(front: Front, layers: Sequence[int], boundaries: Sequence[int], lean: bool) -> Search:
    """The search's result for saved boundaries, without searching."""
    sh = shard(front, layers, lean=lean)
    problem = layer_problem(front, layers, math.inf, sh)
    return Search(shardings=sh, problem=problem, boundaries=tuple(boundaries))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Assembled:
    """A finished forward search: what the plan records and what compilation needs."""

    layers: tuple[int, ...]
    search: Search
    layouts: tuple[StageLayout, ...]
    schedule: Schedule
    stages: tuple[Stage, ...]
    predicted: Predicted

    def memory(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per device: the bytes it needs, and the part of them the stage DP did not price
        (the parameter layout's padding and rest-buffer copies; `passes.partition.refit`)."""
        seg, b = self.search.problem.segment_memory, self.search.boundaries
        need = self.predicted.memory_per_device
        return need, tuple(n - float(seg[b[s], b[s + 1]]) for s, n in enumerate(need))


def assemble(front: Front, layers: Sequence[int], search: Search) -> Assembled:
    b = search.boundaries
    op_bounds = tuple(layers[k] for k in b)
    sh = search.shardings
    layouts = stage_layouts(front.program, front.split, op_bounds, dims=sh.dims, tp=sh.tp)
    p, m = front.num_stages, front.num_microbatches
    sched = schedules.inference(p, m)
    validate(sched)
    stages = _stages(front, search, op_bounds, layouts)
    step = step_time([s.time for s in stages], m)
    predicted = Predicted(
        step_time=step,
        bubble_fraction=1.0 - m * sum(s.time for s in stages) / (p * step),
        memory_per_device=tuple(s.memory for s in stages),
        bytes_moved=float(m * sum(s.send_bytes for s in stages)),
        unruled_primitives=front.costs.unruled,
        unsharded_primitives=tuple(sorted(sh.unruled)),
    )
    return Assembled(
        layers=tuple(layers),
        search=search,
        layouts=tuple(layouts),
        schedule=sched,
        stages=stages,
        predicted=predicted,
    )


def make_stage(
    front: Front,
    s: int,
    layers: tuple[int, int],
    op_bounds: Sequence[int],
    layout: StageLayout,
    *,
    time: float,
    memory: float,
    **extra,
) -> Stage:
    """The `Stage` record of stage s (forward-only and training plans alike)."""
    last = s == len(op_bounds) - 2
    return Stage(
        index=s,
        layers=layers,
        operators=(op_bounds[s], op_bounds[s + 1]),
        primitives=tuple(
            front.program.ops[i].primitive
            for i in front.split.pipeline[op_bounds[s] : op_bounds[s + 1]]
        ),
        param_bytes=layout.param_bytes,
        send_bytes=0 if last else int(front.costs.cut_bytes[op_bounds[s + 1]]),
        time=float(time),
        memory=float(memory),
        **extra,
    )


def _stages(front: Front, search: Search, op_bounds, layouts) -> tuple[Stage, ...]:
    problem, sh, bounds = search.problem, search.shardings, search.boundaries
    # the forward layout's slot padding and rest-buffer copies (`refit` weighs them)
    extra = layout_extra_bytes(front.program, layouts, dims=sh.dims, tp=sh.tp)
    out = []
    for s, lay in enumerate(layouts):
        lo, hi = bounds[s], bounds[s + 1]
        last = s == len(layouts) - 1
        t = sum(problem.layer_time[lo:hi]) + (
            problem.cut_time[hi - 1] if hi < len(problem.layer_time) else 0.0
        )
        gathers = [] if last else [("all_gather", sh.cut_gathers[hi - 1])]
        out.append(
            make_stage(
                front,
                s,
                (lo, hi),
                op_bounds,
                lay,
                time=t,
                memory=problem.segment_memory[lo, hi] + extra[s],  # + the layout's padding
                device_param_bytes=lay.device_param_bytes,
                collectives=sum_collectives([*sh.collectives[lo:hi], gathers]),
                strategies=count_strategies(sh.strategies[lo:hi]),
            )
        )
    return tuple(out)


def count_strategies(per_layer) -> tuple[tuple[str, int], ...]:
    counts: dict[str, int] = {}
    for names in per_layer:
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return tuple(sorted(counts.items()))


def sum_collectives(per_layer) -> tuple[tuple[str, float], ...]:
    total: dict[str, float] = {}
    for layer in per_layer:
        for kind, nbytes in layer:
            total[kind] = total.get(kind, 0.0) + nbytes
    return tuple(sorted((k, b) for k, b in total.items() if b > 0))
