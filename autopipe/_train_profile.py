"""`Plan.profile(state, *batch)` for a training plan: every action kind timed inside the
compiled step, and the step time the plan's table predicts from those measurements.

The compiled step takes its schedule's tables as an argument (`passes.emit_train`), so the very
program that trains runs other tables of the same length: one in which no device does anything (the
fixed cost: the tick loop, its sends, the optimizer update), and per action kind (F, B and, split
off, W, and BW: a B fused with its W) and virtual stage one in which every device runs that action
of its stage at every tick, and one in which only device d runs it
(`passes.emit_train.probe_tables`). With every device busy a tick costs what devices pay for running
together (cores shared on a CPU host, memory bandwidth on a node); alone, a device may run faster
(on a CPU host its kernels spread over the cores the idle devices leave). An action's cost is its
table's time less the idle table's, per tick; the predicted step is the idle time plus the lock-step
`timeline` of the plan's table with those costs: one SPMD program, every tick as long as its slowest
device.

Timings are medians of interleaved repetitions, the plan's own step among them, each call on a
fresh copy of the given state (copied outside the timing; the state itself is not donated).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from autopipe._executable import check_live
from autopipe.passes import schedule as schedules
from autopipe.passes.emit_train import probe_tables


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActionCost:
    """Seconds per tick of one action kind on the stages ``virtual · p + d`` (``virtual`` is 0
    without virtual stages): with every device running it (``together``), and with only
    device d running it, the others idle (``alone[d]``)."""

    kind: str
    virtual: int
    together: float
    alone: tuple[float, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainProfile:
    """Measured action costs of a training plan and the step they predict, against the step
    measured in the same run and the cost model's prediction (`Plan.predicted.step_time`)."""

    schedule: str
    ticks: int
    actions: tuple[ActionCost, ...]
    fixed: float  # the step with every cell idle
    predicted: float  # fixed + the lock-step time of the plan's table with `actions`
    measured: float  # the plan's own step
    cost_model: float

    @property
    def relative_error(self) -> float:
        """(predicted − measured) / measured."""
        return (self.predicted - self.measured) / self.measured

    def __str__(self) -> str:
        costs = ", ".join(
            f"{a.kind}{a.virtual} {a.together * 1e3:.1f} (alone "
            + "/".join(f"{x * 1e3:.1f}" for x in a.alone)
            + ")"
            for a in self.actions
        )
        return (
            f"{self.schedule}: {self.ticks} ticks, ms per tick {costs}, fixed "
            f"{self.fixed * 1e3:.1f} ms -> predicted {self.predicted * 1e3:.1f} ms, measured "
            f"{self.measured * 1e3:.1f} ms ({self.relative_error:+.1%}); cost model "
            f"{self.cost_model * 1e3:.1f} ms"
        )


def profile_training(plan: Any, state: Any, *args: Any, repeats: int = 5) -> TrainProfile:
    """See the module docstring; ``args`` as `Plan.step` takes them."""
    rt = plan._require_training()
    check_live(state, f"plan.profile for {plan.traced.spec.fn_name}")
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}.")
    emitted, sched = rt.emitted, plan.schedule
    p = sched.num_devices
    batch, ins = plan._step_inputs(state, args)

    def probe(*key: Any) -> dict:
        return emitted.place_tables(probe_tables(sched, emitted.slots, *key))

    kinds = ("F", *sorted(sched.loop_kinds()))
    units = [(k, i) for k in kinds for i in range(sched.virtual_stages)]
    probes: dict[Any, dict] = {"step": rt.tables, "idle": probe(None)}
    probes |= {u: probe(*u) for u in units}
    probes |= {(*u, d): probe(*u, d) for u in units for d in range(p) if p > 1}
    seconds = _interleaved(rt.compiled, state, batch, ins, probes, repeats)
    fixed = seconds["idle"]
    per_tick = {k: max(t - fixed, 0.0) / sched.num_ticks for k, t in seconds.items()}
    costs = tuple(
        ActionCost(
            kind=k,
            virtual=i,
            together=per_tick[(k, i)],
            alone=tuple(per_tick.get((k, i, d), per_tick[(k, i)]) for d in range(p)),
        )
        for k, i in units
    )
    return TrainProfile(
        schedule=sched.kind,
        ticks=sched.num_ticks,
        actions=costs,
        fixed=fixed,
        predicted=fixed + timeline(sched, costs),
        measured=seconds["step"],
        cost_model=plan.predicted.step_time,
    )


def timeline(schedule: schedules.Schedule, costs: Sequence[ActionCost]) -> float:
    """Seconds of the table's ticks run lock-step: each tick lasts as long as its slowest
    device's actions take alone, or, where the devices share capacity (cores, memory
    bandwidth), as long as their work takes together, whichever is longer. The shared term of
    a tick is the mean over devices of their actions' ``together`` costs: for a tick in which
    every device runs the same action it is exactly that action's measured ``together``."""
    by = {(c.kind, c.virtual): c for c in costs}
    p, fused = schedule.num_devices, schedule.fused()
    total = 0.0
    for row in schedule.table:
        alone = shared = 0.0
        for d, cell in enumerate(row):
            run = [a for a in schedules.actions(cell) if not (a.kind == "W" and a in fused)]
            mine = [by[("BW" if a in fused else a.kind, a.stage // p)] for a in run]
            alone = max(alone, sum(c.alone[d] for c in mine))
            shared += sum(c.together for c in mine) / p
        total += max(alone, shared)
    return total


def _interleaved(
    compiled: Any, state: Any, batch: Sequence, ins: Sequence, probes: dict, repeats: int
) -> dict[Any, float]:
    """Median seconds of the compiled step per set of tables, the sets run in turn."""
    samples: dict[Any, list[float]] = {k: [] for k in probes}
    for rep in range(repeats + 1):  # the first round warms up
        for key, tables in probes.items():
            params, opt_state = jax.tree.map(jnp.copy, (state.params, state.opt_state))
            jax.block_until_ready((params, opt_state))
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, opt_state, batch, ins, tables))
            if rep:
                samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}
