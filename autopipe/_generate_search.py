"""The stage search of `autopipe.plan_generation`: the stage DP over the decode step's layers,
pricing each stage with its caches for all request groups and each tick with the copies of one
group's cache blocks, and with the forward plan's tensor strategies on a tensor axis."""

from __future__ import annotations

import dataclasses

from autopipe._front import Front
from autopipe._stage_search import layer_problem, layers_for
from autopipe.passes.costs import operator_costs
from autopipe.passes.decode_state import DecodeState, cache_layer_bytes, planning_program
from autopipe.passes.layout import split_ops, stage_layouts
from autopipe.passes.partition import additive_segment_memory, solve_stages
from autopipe.passes.tensor_parallel import LayerShardings, shard_layers

ROUNDS = 1024  # decode rounds the stage DP prices: Σt + (ROUNDS − 1)·max t ≈ the bottleneck


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationStage:
    index: int
    layers: tuple[int, int]
    param_bytes: int
    cache_bytes: int  # its cache leaves, all groups, one data replica's rows
    device_cache_bytes: int  # what one device of it holds (split leaves: 1/tp)
    time: float  # predicted seconds of one tick (one group's step) on this stage


def stage_records(front, state, layouts, homes, bounds, times, groups, sh: LayerShardings):
    """Per stage: its layers, parameter and cache bytes (all groups), predicted tick."""
    owned = list(zip(state.cache_in, homes, strict=True))
    nbytes = front.program.nbytes

    def held(v):
        return nbytes(v) // (sh.tp if sh.dims.get(v) is not None else 1)

    return tuple(
        GenerationStage(
            index=s,
            layers=(bounds[s], bounds[s + 1]),
            param_bytes=lay.param_bytes,
            cache_bytes=groups * sum(nbytes(v) for v, h in owned if h == s),
            device_cache_bytes=groups * sum(held(v) for v, h in owned if h == s),
            time=times[s],
        )
        for s, lay in enumerate(layouts)
    )


def planning_front(front: Front, state: DecodeState) -> Front:
    """The front with the logits as the program's only output (`planning_program`)."""
    program = planning_program(front.program, state)
    split = split_ops(program)
    costs = operator_costs(program, split, front.hardware)
    return dataclasses.replace(front, program=program, split=split, costs=costs)


def search(front: Front, state: DecodeState, groups: int, memory_limit: float | None):
    """(stage layouts, layer boundaries, per-stage tick seconds, tensor shardings) of the
    stage DP, pricing each stage with its caches for all groups instead of the forward plan's
    batch inputs, and each tick with the copies of the group's cache blocks
    (`passes.emit_generate`). With a tensor axis, each layer is priced with its tensor
    strategies (`cache_shardings`); a cache leaf split over the tensor axis costs 1/tp of its
    bytes per device."""
    limit = front.hardware.memory_bytes if memory_limit is None else memory_limit
    layers = layers_for(front, front.num_stages)
    sh = cache_shardings(front, layers, state)
    problem = layer_problem(front, layers, limit, sh)
    one_group = sum(front.program.nbytes(v) for v in state.cache_in)
    scale = {v: 1.0 / sh.tp for v in state.cache_in if sh.dims.get(v) is not None}
    per_layer = cache_layer_bytes(front.program, front.split, layers, state, groups, scale)
    memory = problem.segment_memory - groups * one_group + additive_segment_memory(per_layer)
    hw = front.hardware
    # every tick the program copies the group's block of each cache out and back in
    copies = 2 * per_layer / groups / (hw.memory_bandwidth * hw.bandwidth_efficiency)
    problem = dataclasses.replace(
        problem,
        layer_time=tuple(t + c for t, c in zip(problem.layer_time, copies, strict=True)),
        segment_memory=memory,
        num_microbatches=ROUNDS,
    )
    solution = solve_stages(problem)
    bounds = tuple(layers[k] for k in solution.boundaries)
    layouts = stage_layouts(front.program, front.split, bounds, dims=sh.dims, tp=sh.tp)
    return layouts, solution.boundaries, solution.stage_times, sh


def cache_shardings(front: Front, layers, state: DecodeState) -> LayerShardings:
    """The forward plan's sharding pass (`passes.tensor_parallel.shard_layers`) on the decode
    step, with each cache leaf held like a split parameter where that pays: a first solve lets
    the solver choose each leaf's split as for a parameter; a leaf split on a dim other than
    the rows is then pinned on that dim together with its new value (read and updated in place
    on its shard, never gathered), the others whole, and the step solved again."""
    args = (front.program, front.split, layers, front.hardware, front.mesh_axes)
    if front.tensor_axis is None:
        return shard_layers(*args, front.tensor_axis)
    free = shard_layers(*args, front.tensor_axis, free=frozenset(state.cache_in))
    pinned = {}
    for v, w in zip(state.cache_in, state.cache_out, strict=True):
        d = free.dims.get(v)
        d = d if d not in (None, 0) else None  # the rows are the data axis's
        pinned[v] = pinned[w] = d
    return shard_layers(*args, front.tensor_axis, pinned=pinned)
