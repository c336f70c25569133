"""``num_microbatches=None`` on a given mesh: the count whose exact plan predicts the fastest step.

More microbatches shrink the pipeline's bubble ((p − 1)/(m + p − 1) of a GPipe or 1F1B step)
and, with 1F1B, the activations in flight, but every operator runs on fewer rows, where the fixed
costs of a kernel — its launch (`Hardware.op_overhead`) and, for a matmul, the rows a GEMM needs
to reach its rate (`Hardware.matmul_overhead`, measured by `autopipe.calibrate`) — weigh more,
and the step has more ticks. So each count is planned exactly as if it had been asked for: the
program lowered at that count's microbatch rows (every operator priced at its own sizes), the
stage search (and, for ``schedule="auto"``, every schedule) run under the memory limit.

Counts: the divisors of a replica's rows from the pipeline's device count up (multiples of it
for the interleaved schedule), each at least 1.5 × the last tried, while the prediction
improves; a count nothing fits is skipped. The fewest microbatches within `TIE` of the fastest
prediction are chosen — fewer ticks and larger GEMMs, where the difference is inside the cost
model's error. ``plan.factorizations`` lists the counts tried, fastest first; if no count can be
planned, the first refusal is raised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from autopipe._plan import Factorization
from autopipe._planned import Planned
from autopipe._staged import Lowered
from autopipe.passes.partition import PlanInfeasible
from autopipe.passes.trace import batch_size_of

TIE = 0.03  # predictions this close count as equal: the fewer microbatches win


def microbatch_counts(rows: int, devices: int, multiple: int = 1) -> list[int]:
    """The counts to try for a replica of ``rows`` rows on ``devices`` pipeline devices: the
    divisors of ``rows`` (multiples of ``multiple``) from ``devices`` up, each ≥ 1.5 × the last
    (fewer than ``devices`` only when the rows are fewer)."""
    start = min(devices, rows)
    counts: list[int] = []
    for m in range(start, rows + 1):
        if rows % m == 0 and m % multiple == 0 and m >= 1.5 * (counts[-1] if counts else 0):
            counts.append(m)
    return counts


def fastest_count(lowered: Lowered, plan_at: Callable[[int], Planned], multiple: int) -> Planned:
    """The plan of the fastest predicted count (see the module doc). ``lowered``: the program
    on its mesh at the default count; ``plan_at(m)``: its plan at ``m`` microbatches."""
    front = lowered.front
    rows = batch_size_of(front.traced.spec) // front.axis_size(front.data_axis)
    devices = front.num_stages // front.virtual_stages
    counts = microbatch_counts(rows, devices, multiple) or [front.num_microbatches]
    tried: list[Planned] = []
    refusals: list[Exception] = []
    best = math.inf
    for m in counts:
        try:
            planned = plan_at(m)
        except (PlanInfeasible, ValueError) as e:  # does not fit (or cannot run) at m
            refusals.append(e)
            continue
        tried.append(planned)
        if planned.predicted.step_time >= best:
            break
        best = planned.predicted.step_time
    if not tried:
        raise refusals[0]
    chosen = min(
        (p for p in tried if p.predicted.step_time <= (1 + TIE) * best),
        key=lambda p: p.num_microbatches,
    )
    ranked = sorted(tried, key=lambda p: p.predicted.step_time)
    return dataclasses.replace(chosen, factorizations=tuple(map(_estimate, ranked)))


def _estimate(p: Planned) -> Factorization:
    axes = dict(p.mesh_axes)
    return Factorization(
        pp=axes[p.pipeline_axis],
        dp=axes.get(p.data_axis, 1) if p.data_axis else 1,
        tp=axes.get(p.tensor_axis, 1) if p.tensor_axis else 1,
        num_microbatches=p.num_microbatches,
        step_time=p.predicted.step_time,
        memory=max(p.predicted.memory_per_device, default=0.0),
    )
