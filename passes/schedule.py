"""Pipeline schedules as data: which stage and microbatch every device runs at every tick.

A `Schedule` is a table ``table[tick][device] = Action(kind, stage, microbatch)`` or ``None``
(idle); ``kind`` is ``"F"`` (forward), ``"B"`` (backward) or ``"W"`` (weight gradient). The
emitter runs any valid table with one SPMD program (a scan over ticks, each device looking up
its own cell), so a new schedule is a new table, not new code. `validate` checks a table before
emission and names the first violation.

Only forward-only (inference) tables exist so far: stage s lives on device s and runs
microbatch j at tick s + j (fill, steady state, drain).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ActionKind = Literal["F", "B", "W"]


@dataclasses.dataclass(frozen=True, order=True)
class Action:
    kind: ActionKind
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.stage}.{self.microbatch}"


Cell = Action | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    kind: str
    num_stages: int
    num_microbatches: int
    table: tuple[tuple[Cell, ...], ...]  # [tick][device]

    @property
    def num_ticks(self) -> int:
        return len(self.table)

    @property
    def num_devices(self) -> int:
        return len(self.table[0]) if self.table else 0

    def bubble_fraction(self) -> float:
        """Idle share of device-ticks (equal-length ticks): (p−1)/(m+p−1) for GPipe-like."""
        cells = [c for row in self.table for c in row]
        return sum(c is None for c in cells) / max(len(cells), 1)

    def tick_of(self, action: Action) -> int:
        for t, row in enumerate(self.table):
            if action in row:
                return t
        raise KeyError(action)


def inference(num_stages: int, num_microbatches: int) -> Schedule:
    p, m = num_stages, num_microbatches
    table = tuple(
        tuple(Action("F", d, t - d) if 0 <= t - d < m else None for d in range(p))
        for t in range(m + p - 1)
    )
    return Schedule(kind="inference", num_stages=p, num_microbatches=m, table=table)


def validate(schedule: Schedule) -> None:
    """Raises ValueError naming the first violation: counts, placement or dependencies."""
    p, m = schedule.num_stages, schedule.num_microbatches
    seen: dict[Cell, tuple[int, int]] = {}
    for t, row in enumerate(schedule.table):
        if len(row) != p:
            raise ValueError(f"schedule tick {t} has {len(row)} devices; expected {p}.")
        for d, cell in enumerate(row):
            if cell is None:
                continue
            stage, j = cell.stage, cell.microbatch
            if cell.kind != "F":
                raise ValueError(f"tick {t}, device {d}: {cell} is not a forward action.")
            if not (0 <= stage < p and 0 <= j < m):
                raise ValueError(f"tick {t}, device {d}: {cell} is outside {p} stages × {m} mbs.")
            if stage != d:
                raise ValueError(f"tick {t}: stage {stage} is placed on device {d}, not {stage}.")
            if cell in seen:
                raise ValueError(
                    f"stage {stage}, microbatch {j} runs twice (ticks {seen[cell][0]}, {t})."
                )
            if stage > 0 and seen.get(Action("F", stage - 1, j), (t,))[0] != t - 1:
                raise ValueError(
                    f"tick {t}: stage {stage} runs microbatch {j}, but stage {stage - 1} did not "
                    "run it on the tick before (activations arrive one tick after they are sent)."
                )
            seen[cell] = (t, d)
    missing = [a for s in range(p) for j in range(m) if (a := Action("F", s, j)) not in seen]
    if missing:
        raise ValueError(
            f"schedule never runs {missing[0]} (forward of stage "
            f"{missing[0].stage} on microbatch {missing[0].microbatch})."
        )
