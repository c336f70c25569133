"""Pipeline schedules as data: which action every device runs at every tick.

A `Schedule` is a table ``table[tick][device]``: an ``Action(kind, stage, microbatch)``, a
tuple of actions the device runs in the same tick (at most one of each kind, in the order F,
B, W), or ``None`` (idle); `actions(cell)` lists a cell's actions. ``kind`` is ``"F"``
(forward), ``"B"`` (backward: input gradient, plus the weight gradient unless the schedule
splits it off) or ``"W"`` (weight gradient, split schedules only). A W in the cell of its own
B is *fused* with it: the device runs one whole backward and stores nothing for W (`fused`).
Stage ``s`` lives on device ``s % p``; with ``v`` virtual stages per device (interleaved) there
are ``v·p`` stages. The emitter runs any valid table with one SPMD program (a scan over ticks,
each device looking up its own cell), so a new schedule is a new table, not new code.

Tables are built from a per-device *order* of actions by `from_orders`, which places each action at
the first tick its inputs have arrived (a value sent at tick t arrives at t + 1). Builders:
`inference`, `gpipe`, `one_f_one_b`, `one_f_one_b_paired`, `interleaved_1f1b`, `zb_h1`, `zb_paired`;
look them up by name in `SCHEDULES`. `schedule_check.validate` checks any table (counts, placement,
dependencies) and names the first violation. `simulate` times a table event by event (each device
runs its actions in table order as soon as their inputs are ready), which gives the bubble fractions
of the literature: (p−1)/(m+p−1) for GPipe and 1F1B, (p−1)/(v·m+p−1) interleaved, less for ZB-H1.
`lockstep` times the table as the emitted SPMD program runs it: every tick lasts as long as its
slowest device's work, so a tick where one device runs a backward and the others a forward costs a
backward. With one action per device per tick, 1F1B's steady state alternates F and B ticks, devices
out of phase, and every tick costs a backward: 2·(m + p − 1) backward-long ticks.
`one_f_one_b_paired` runs a forward and a backward in one tick instead: m + 2(p − 1) ticks, each F +
B long in the steady state — GPipe's lock-step time with at most 2(p − d) − 1 microbatches in flight
on device d (GPipe: m). `zb_paired` is its zero-bubble form: each B fused with its W, and the W's
that shorten a tick moved into the cool-down, where devices wait; lock-step with unit F, B and W it
takes `zb_h1`'s time (tests/test_schedules.py: every p ≤ 6, m < 20) in m + 2(p − 1) ticks instead of
about 3m, with 1F1B-paired's memory plus up to p − 1 moved W's cotangents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

ActionKind = Literal["F", "B", "W"]


@dataclasses.dataclass(frozen=True, order=True)
class Action:
    kind: ActionKind
    stage: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind}{self.stage}.{self.microbatch}"


Cell = Action | tuple[Action, ...] | None


def actions(cell: Cell) -> tuple[Action, ...]:
    """The actions a table cell runs, in order: none, one, or a tuple (kinds in F, B, W order)."""
    if cell is None:
        return ()
    return cell if isinstance(cell, tuple) else (cell,)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    kind: str
    num_devices: int  # p
    num_stages: int  # v · p
    num_microbatches: int  # m
    table: tuple[tuple[Cell, ...], ...]  # [tick][device]
    training: bool = False
    split_backward: bool = False  # B is input-gradient only; W does the weight gradient

    @property
    def num_ticks(self) -> int:
        return len(self.table)

    @property
    def virtual_stages(self) -> int:
        return self.num_stages // self.num_devices

    def device_of(self, stage: int) -> int:
        return stage % self.num_devices

    def ticks(self) -> dict[Action, int]:
        return {a: t for t, row in enumerate(self.table) for c in row for a in actions(c)}

    def tick_of(self, action: Action) -> int:
        return self.ticks()[action]

    def bubble_fraction(self, durations: Durations | None = None) -> float:
        """Idle share of device time when the table runs event by event (see `simulate`)."""
        durations = durations or _UNIT
        cost = durations if callable(durations) else (lambda a: durations[a.kind])
        _, makespan = simulate(self, cost)
        work = sum(cost(a) for row in self.table for c in row for a in actions(c))
        return 1.0 - work / (self.num_devices * makespan) if makespan else 0.0

    def in_flight(self) -> list[int]:
        """Per device: the most microbatches whose residuals it holds at once — forward run,
        backward not yet (W reads only what B stored: `deferred`) — and 1 for a forward-only
        table (nothing waits)."""
        if not self.training:
            return [1] * self.num_devices
        return self._peak("F", "B")

    def deferred(self) -> list[int]:
        """Per device: the most microbatches whose W waits at once (B run, W not yet), whose
        tapped results' cotangents and activation inputs it keeps (`passes.split_backward`);
        0 without W."""
        if not self.split_backward:
            return [0] * self.num_devices
        return self._peak("B", "W", skip=self.fused())

    def fused(self) -> frozenset[Action]:
        """The B and W actions that share a cell with their partner: one whole backward, nothing
        stored for W."""
        if not self.split_backward:
            return frozenset()
        ticks = self.ticks()
        pairs = [
            (a, w)
            for a, t in ticks.items()
            if a.kind == "B" and ticks.get(w := dataclasses.replace(a, kind="W")) == t
        ]
        return frozenset(x for pair in pairs for x in pair)

    def loop_kinds(self) -> frozenset[str]:
        """The backward action loops the emitted step runs for every stage: ``B`` (alone),
        ``BW`` (a B fused with its W) and ``W`` (apart from its B), those the table uses."""
        fused = self.fused()
        return frozenset("BW" if a in fused else a.kind for a in self.ticks() if a.kind != "F")

    def _peak(self, opens: str, closes: str, skip: frozenset = frozenset()) -> list[int]:
        """Per device: the most microbatches at once between their ``opens`` action and their
        ``closes`` action (a cell's actions run in order), ``skip`` not counted."""
        peak = []
        for d in range(self.num_devices):
            live = best = 0
            for row in self.table:
                for a in actions(row[d]):
                    if a not in skip:
                        live += (a.kind == opens) - (a.kind == closes)
                        best = max(best, live)
            peak.append(best)
        return peak


_UNIT = {"F": 1.0, "B": 1.0, "W": 1.0}


# --- dependencies -------------------------------------------------------------------------


def dependencies(a: Action, s: Schedule) -> list[tuple[Action, bool]]:
    """(action, crosses devices) pairs that must finish before `a` starts."""
    last = s.num_stages - 1
    if a.kind == "F":
        return [(Action("F", a.stage - 1, a.microbatch), True)] if a.stage > 0 else []
    if a.kind == "B":
        own = [(Action("F", a.stage, a.microbatch), False)]
        if a.stage < last:
            own.append((Action("B", a.stage + 1, a.microbatch), True))
        return own
    return [(Action("B", a.stage, a.microbatch), False)]


# --- timing -------------------------------------------------------------------------------


Durations = dict[str, float] | Callable[[Action], float]


def simulate(
    schedule: Schedule, durations: Durations, transfer: float = 0.0
) -> tuple[dict[Action, tuple[float, float]], float]:
    """Event-driven times: each device runs its actions in table order, each starting once its
    inputs are ready (plus `transfer` across devices). `durations` maps an action kind, or an
    action, to seconds. Returns {action: (start, end)} and the makespan.
    """
    cost = durations if callable(durations) else (lambda a: durations[a.kind])
    times: dict[Action, tuple[float, float]] = {}
    free = [0.0] * schedule.num_devices
    for row in schedule.table:
        for d, cell in enumerate(row):
            for a in actions(cell):
                _start(a, d, schedule, cost, transfer, times, free)
    return times, max(free, default=0.0)


def _start(a: Action, d: int, schedule: Schedule, cost, transfer: float, times, free) -> None:
    """`simulate`'s step: ``a`` starts on device ``d`` once it is free and ``a``'s inputs are."""
    deps = dependencies(a, schedule)
    ready = max((times[dep][1] + (transfer if cross else 0.0) for dep, cross in deps), default=0.0)
    start = max(free[d], ready)
    times[a] = (start, start + cost(a))
    free[d] = start + cost(a)


def lockstep(
    schedule: Schedule, durations: Durations, tick_overhead: float = 0.0
) -> tuple[dict[Action, tuple[float, float]], float]:
    """Times of the table run as ONE SPMD program (a scan over its ticks): all devices start a
    tick together, and it lasts as long as its slowest device's work (idle: 0) plus
    ``tick_overhead`` (the tick's ppermutes and bookkeeping). Returns {action: (start, end)}
    and the makespan, never less than `simulate`'s for the same durations: an action starts
    there no later than at its tick here."""
    cost = durations if callable(durations) else (lambda a: durations[a.kind])
    times: dict[Action, tuple[float, float]] = {}
    now = 0.0
    for row in schedule.table:
        longest = 0.0
        for cell in row:
            start = now
            for a in actions(cell):  # in the cell's order
                times[a] = (start, start + cost(a))
                start += cost(a)
            longest = max(longest, start - now)
        now += longest + tick_overhead
    return times, now


def idle_share(schedule: Schedule, times: dict[Action, tuple[float, float]], span: float) -> float:
    """Idle share of the ``devices × span`` device-seconds of `simulate`/`lockstep` times."""
    busy = sum(end - start for start, end in times.values())
    return 1.0 - busy / (schedule.num_devices * span) if span > 0 else 0.0


# --- builders -----------------------------------------------------------------------------


def from_orders(
    kind: str,
    orders: Sequence[Sequence[Action]],
    *,
    num_stages: int,
    num_microbatches: int,
    training: bool,
    split_backward: bool = False,
) -> Schedule:
    """Places each device's actions, in order, at the first tick their inputs have arrived."""
    p = len(orders)
    proto = Schedule(
        kind=kind,
        num_devices=p,
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        table=(),
        training=training,
        split_backward=split_backward,
    )
    done: dict[Action, int] = {}
    nxt = [0] * p
    rows: list[tuple[Cell, ...]] = []
    total = sum(len(o) for o in orders)
    while len(done) < total:
        t = len(rows)
        row: list[Cell] = [None] * p
        for d in range(p):
            if nxt[d] < len(orders[d]):
                a = orders[d][nxt[d]]
                if all(dep in done and done[dep] < t for dep, _ in dependencies(a, proto)):
                    row[d] = a
        if not any(row):
            stuck = [str(orders[d][nxt[d]]) for d in range(p) if nxt[d] < len(orders[d])]
            raise ValueError(f"schedule {kind!r} deadlocks at tick {t}: waiting on {stuck}.")
        for d, a in enumerate(row):
            if a is not None:
                done[a] = t
                nxt[d] += 1
        rows.append(tuple(row))
    return dataclasses.replace(proto, table=tuple(rows))


def inference(p: int, m: int, v: int = 1) -> Schedule:
    orders = [[Action("F", d, j) for j in range(m)] for d in range(p)]
    return from_orders("inference", orders, num_stages=p, num_microbatches=m, training=False)


def gpipe(p: int, m: int, v: int = 1) -> Schedule:
    """All forwards, then all backwards (what jax.grad of the forward pipeline does)."""
    orders = [
        [Action("F", d, j) for j in range(m)] + [Action("B", d, j) for j in range(m)]
        for d in range(p)
    ]
    return from_orders("gpipe", orders, num_stages=p, num_microbatches=m, training=True)


def _one_f_one_b_order(d: int, p: int, m: int, kinds=("B",)) -> list[Action]:
    warm = min(p - d - 1, m)
    order = [Action("F", d, j) for j in range(warm)]
    for j in range(m - warm):
        order.append(Action("F", d, warm + j))
        order.extend(Action(k, d, j) for k in kinds)
    for j in range(m - warm, m):
        order.extend(Action(k, d, j) for k in kinds)
    return order


def one_f_one_b(p: int, m: int, v: int = 1) -> Schedule:
    """PipeDream-flush 1F1B: p − d − 1 warm-up forwards, then alternate; ≤ p − d in flight."""
    orders = [_one_f_one_b_order(d, p, m) for d in range(p)]
    return from_orders("1f1b", orders, num_stages=p, num_microbatches=m, training=True)


def interleaved_1f1b(p: int, m: int, v: int = 2) -> Schedule:
    """Megatron's interleaved 1F1B: v stages per device (s = chunk·p + d); needs m % p == 0."""
    if m % p:
        raise ValueError(
            f"interleaved 1F1B needs num_microbatches ({m}) divisible by the "
            f"pipeline size ({p}); use m = {p * max(1, round(m / p))}."
        )
    n = m * v

    def unit(k: int, kind: ActionKind, d: int) -> Action:
        chunk = (k // p) % v
        chunk = v - 1 - chunk if kind == "B" else chunk
        return Action(kind, chunk * p + d, (k // (p * v)) * p + k % p)

    orders = []
    for d in range(p):
        warm = min((p - d - 1) * 2 + (v - 1) * p, n)
        order = [unit(k, "F", d) for k in range(warm)]
        for k in range(n - warm):
            order += [unit(warm + k, "F", d), unit(k, "B", d)]
        order += [unit(k, "B", d) for k in range(n - warm, n)]
        orders.append(order)
    return from_orders(
        "interleaved_1f1b", orders, num_stages=v * p, num_microbatches=m, training=True
    )


def zb_h1(p: int, m: int, v: int = 1) -> Schedule:
    """Zero-bubble H1: the backward is split into B (input gradient, on the critical path) and
    W (weight gradient, deferred to fill bubbles). Each tick a device runs, by priority, a ready
    B, else a ready F while fewer than p − d microbatches hold activations (1F1B's memory
    bound, counted until W), else a pending W."""
    proto = Schedule(
        kind="zb_h1",
        num_devices=p,
        num_stages=p,
        num_microbatches=m,
        table=(),
        training=True,
        split_backward=True,
    )
    done: dict[Action, int] = {}
    count = [{"F": 0, "B": 0, "W": 0} for _ in range(p)]
    rows: list[tuple[Cell, ...]] = []
    while len(done) < 3 * p * m:
        t = len(rows)
        row: list[Cell] = [None] * p
        for d in range(p):
            n = count[d]
            options = [
                ("B", n["B"] < m),
                ("F", n["F"] < m and n["F"] - n["W"] < p - d),
                ("W", n["W"] < n["B"]),
            ]
            for kind, allowed in options:
                a = Action(kind, d, n[kind])
                if allowed and all(done.get(dep, t) < t for dep, _ in dependencies(a, proto)):
                    row[d] = a
                    break
        for d, a in enumerate(row):
            if a is not None:
                done[a] = t
                count[d][a.kind] += 1
        rows.append(tuple(row))
    return dataclasses.replace(proto, table=tuple(rows))


def one_f_one_b_paired(p: int, m: int, v: int = 1) -> Schedule:
    """1F1B for lock-step execution: each tick a device runs its next forward AND its next
    backward where both are ready (a pair; the last stage's backward may read the forward of
    the same tick), so the steady state does one F + B per device per tick. With a
    microbatch's round trip of 2(p − 1 − d) ticks from device d to the last stage and back,
    device d keeps up to 2(p − d) − 1 microbatches in flight (1F1B keeps p − d, GPipe m):
    the price of never idling in the steady state. Lock-step time (m + p − 1)·(F + B), GPipe's,
    in m + 2(p − 1) ticks."""
    proto = Schedule(
        kind="1f1b_paired", num_devices=p, num_stages=p, num_microbatches=m, table=(),
        training=True,
    )  # fmt: skip
    done: dict[Action, int] = {}
    count = [{"F": 0, "B": 0} for _ in range(p)]
    rows: list[tuple[Cell, ...]] = []
    while len(done) < 2 * p * m:
        t = len(rows)
        row: list[Cell] = [None] * p
        for d in range(p):
            n = count[d]
            f = Action("F", d, n["F"]) if n["F"] < m and n["F"] - n["B"] < 2 * (p - d) - 1 else None
            if f is not None and not all(done.get(x, t) < t for x, _ in dependencies(f, proto)):
                f = None
            b = Action("B", d, n["B"]) if n["B"] < m else None
            if b is not None and not all(
                done.get(x, t) < t or x == f for x, _ in dependencies(b, proto)
            ):
                b = None
            row[d] = (f, b) if f and b else f or b
        if not any(row):
            raise AssertionError(f"1f1b_paired({p}, {m}) stalls at tick {t}")
        for d, cell in enumerate(row):
            for a in actions(cell):
                done[a] = t
                count[d][a.kind] += 1
        rows.append(tuple(row))
    return dataclasses.replace(proto, table=tuple(rows))


def zb_paired(p: int, m: int, v: int = 1) -> Schedule:
    """Zero-bubble for lock-step execution: `one_f_one_b_paired`'s forwards and backwards, each
    B with its W in its cell (fused: one whole backward, nothing stored), then, from the last
    tick back, a tick's W moved to a later tick of its device where that tick has room
    (`lockstep` with unit F, B, W: the tick is no longer for it), wherever that shortens the
    tick: every device at the tick's length must shed a W. The W's move into the cool-down,
    where devices would wait for the backwards coming back. Memory: 1F1B-paired's in flight,
    plus the stored cotangents of the moved W's (`Schedule.deferred`)."""
    base = one_f_one_b_paired(p, m)
    cells = [[list(actions(c)) for c in row] for row in base.table]
    for row in cells:
        for cell in row:
            cell += [Action("W", a.stage, a.microbatch) for a in cell if a.kind == "B"]
    length = [max(map(len, row)) for row in cells]
    for t in reversed(range(len(cells))):
        moves = []
        for d in (d for d, c in enumerate(cells[t]) if len(c) == length[t]):
            room = (u for u in range(t + 1, len(cells)) if len(cells[u][d]) < length[u])
            u = next((u for u in room if all(a.kind != "W" for a in cells[u][d])), None)
            if u is None or cells[t][d][-1].kind != "W":
                break
            moves.append((d, u))
        else:
            for d, u in moves:
                cells[u][d].append(cells[t][d].pop())
            length[t] = max(map(len, cells[t]))
    cell = lambda c: tuple(c) if len(c) > 1 else c[0] if c else None  # noqa: E731
    table = tuple(tuple(map(cell, row)) for row in cells)
    return dataclasses.replace(base, kind="zb_paired", table=table, split_backward=True)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "inference": inference,
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "1f1b_paired": one_f_one_b_paired,
    "interleaved_1f1b": interleaved_1f1b,
    "zb_h1": zb_h1,
    "zb_paired": zb_paired,
}


def peak_in_flight(kind: str, p: int, m: int, v: int = 1) -> int:
    """``max(make(kind, p, m, v).in_flight())`` without building the table (the factorization
    search prices thousands of (p, m); a table of 1024 devices × 1536 microbatches takes a
    minute). tests/test_schedules.py proves it equal to the tables."""
    if kind == "gpipe":
        return m
    if kind in ("1f1b", "zb_h1"):
        return min(p, m)
    if kind in ("1f1b_paired", "zb_paired"):
        return min(m, 2 * p - 1)
    if kind == "interleaved_1f1b":
        return v * p if m <= p else (v + 1) * p - 1
    raise ValueError(f"schedule={kind!r} is not a training schedule.")


def peak_deferred(kind: str, p: int, m: int, v: int = 1) -> int:
    """``max(make(kind, p, m, v).deferred())`` without building the table: zb_h1 runs each
    W at most one backward after its B, zb_paired moves at most p − 1 (and m) W's of a device
    into its cool-down (tests/test_schedules.py proves both on the tables)."""
    peak_in_flight(kind, p, m, v)  # checks the kind
    return {"zb_h1": 1, "zb_paired": min(p - 1, m)}.get(kind, 0)


def make(kind: str, p: int, m: int, v: int = 1) -> Schedule:
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r} is not one of {sorted(SCHEDULES)}.")
    return SCHEDULES[kind](p, m, v)
