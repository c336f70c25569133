"""Operator costs: the costed IR → per pipeline operator facts for the stage search.

In: the program, its split into pipeline and local operators, the hardware. Out: an
`OperatorCosts` record — per pipeline operator its predicted seconds (a local parameter
operator is charged to its first pipeline consumer), the bytes live across each cut, the
placed parameter values it reads, its output bytes, the narrow cuts (one live value) and the
materialised working set (`cost_models.memory.working_set`). Operator times come from the
graph pass (`passes.graph.operator_graph`, one cost rule per primitive); this pass only
aggregates them along the pipeline order, so it needs no extension for a new primitive.
"""

from __future__ import annotations

import dataclasses

from autopipe.cost_models import memory
from autopipe.cost_models.hardware import Hardware
from autopipe.passes.graph import operator_graph
from autopipe.passes.ir import Program
from autopipe.passes.layout import Split, live_across, placed_sources
from autopipe.passes.split_backward import weight_uses
from autopipe.passes.stage_fns import batch_values


@dataclasses.dataclass(frozen=True, kw_only=True)
class OperatorCosts:
    """Per pipeline operator: time (with the local param ops it needs) and bytes crossing."""

    op_times: tuple[float, ...]
    cut_bytes: tuple[int, ...]
    reads: tuple[frozenset[int], ...]  # placed parameter values each operator reads
    act_bytes: tuple[int, ...]  # output bytes per operator
    saved_bytes: tuple[float, ...]  # residual bytes per operator (`memory.saved_bytes`)
    # per operator: the inputs zero-bubble's B stores for W (`passes.split_backward`): a matmul
    # or convolution's activation inputs where it also reads a parameter, each value counted
    # at its first such reader
    stashed: tuple[tuple[int, ...], ...] = ()
    narrow_cuts: tuple[int, ...]  # cuts where one value is live (e.g. between blocks)
    unruled: tuple[str, ...]
    working: memory.WorkingSet  # materialised bytes live at each operator (XLA's fusion)


def operator_costs(program: Program, split: Split, hw: Hardware) -> OperatorCosts:
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
    return OperatorCosts(
        op_times=tuple(times),
        cut_bytes=tuple(sum(program.nbytes(v) for v in vs) for vs in live),
        reads=reads,
        act_bytes=tuple(
            sum(program.nbytes(v) for v in program.ops[i].outvars) for i in split.pipeline
        ),
        saved_bytes=tuple(_saved(program.ops[i]) for i in split.pipeline),
        unruled=tuple(unruled),
        narrow_cuts=tuple(k for k in range(1, len(times)) if len(live[k]) == 1),
        working=working_set(program, split),
        stashed=stashed_inputs(program, split),
    )


def stashed_inputs(program: Program, split: Split) -> tuple[tuple[int, ...], ...]:
    """Per pipeline operator: the activation inputs (value ids) W's split backward keeps of
    it — `split_backward.weight_uses`' stored inputs over the whole program, each value at its
    first reader."""
    acts = batch_values(program)
    uses = weight_uses(program, range(len(program.ops)), program.param_invars, acts, ())
    first: dict[int, int] = {}  # value → its first tapped reader
    for i, j in uses.stashed:
        first.setdefault(program.ops[i].invars[j], i)
    kept: dict[int, list[int]] = {}
    for v, i in first.items():
        kept.setdefault(i, []).append(v)
    return tuple(tuple(kept.get(i, ())) for i in split.pipeline)


def _saved(op) -> float:
    if op.kind == "eqn":
        return memory.saved_bytes(op.primitive, op.eqn.params, [v.aval for v in op.eqn.outvars])
    if op.kind == "scan_step":  # one iteration of the body
        return memory.saved_bytes("closed_call", {"jaxpr": op.eqn.params["jaxpr"]}, ())
    return 0.0


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
