"""`validate`: a schedule table checked against the rules every emitter relies on — counts
(each action once), placement (stage s on device s % p), cells (at most one action of each
kind, in the order F, B, W) and dependencies (`schedule.dependencies`; an action may read what
its cell ran before it) — naming the first violation."""

from __future__ import annotations

from autopipe.passes.schedule import Action, Schedule, actions, dependencies


def _expected(s: Schedule) -> list[Action]:
    kinds = ("F", "B", "W") if s.split_backward else ("F", "B") if s.training else ("F",)
    return [
        Action(k, st, j)
        for k in kinds
        for st in range(s.num_stages)
        for j in range(s.num_microbatches)
    ]


def validate(schedule: Schedule) -> None:
    """Raises ValueError naming the first violation: counts, placement or dependencies."""
    s, p = schedule, schedule.num_devices
    if s.num_stages % p:
        raise ValueError(f"{s.num_stages} stages cannot be spread evenly over {p} devices.")
    seen: dict[Action, int] = {}
    for t, row in enumerate(s.table):
        if len(row) != p:
            raise ValueError(f"schedule tick {t} has {len(row)} devices; expected {p}.")
        for d, cell in enumerate(row):
            kinds = "".join(a.kind for a in actions(cell))
            if isinstance(cell, tuple) and kinds not in ("FB", "FW", "BW", "FBW"):
                raise ValueError(
                    f"tick {t}, device {d}: a cell runs at most one action of each kind, in "
                    f"the order F, B, W; not {tuple(map(str, cell))}."
                )
            for i, a in enumerate(actions(cell)):  # it may read what the cell ran before it
                _check_action(s, seen, t, d, a, same_tick=actions(cell)[:i])
                seen[a] = t
    missing = [a for a in _expected(s) if a not in seen]
    if missing:
        raise ValueError(f"schedule never runs {missing[0]} ({len(missing)} actions missing).")
    if not s.training:
        late = [
            a
            for a, t in seen.items()
            if a.stage > 0 and seen[Action("F", a.stage - 1, a.microbatch)] != t - 1
        ]
        if late:
            raise ValueError(
                f"{late[0]} does not run on the tick after its input is sent; a "
                "forward-only table consumes activations as they arrive."
            )


def _check_action(
    s: Schedule, seen: dict[Action, int], t: int, d: int, a: Action, *, same_tick: tuple
) -> None:
    """Action ``a`` at tick ``t`` on device ``d``, given the ticks of the actions before it;
    ``same_tick``: the actions run before it in the same cell, whose results it may read."""
    if not (0 <= a.stage < s.num_stages and 0 <= a.microbatch < s.num_microbatches):
        raise ValueError(
            f"tick {t}, device {d}: {a} is outside {s.num_stages} stages "
            f"× {s.num_microbatches} microbatches."
        )
    if s.device_of(a.stage) != d:
        raise ValueError(
            f"tick {t}: {a} is placed on device {d}, but stage {a.stage} "
            f"lives on device {s.device_of(a.stage)}."
        )
    if a in seen:
        raise ValueError(f"{a} runs twice (ticks {seen[a]} and {t}).")
    if a.kind != "F" and not s.training:
        raise ValueError(f"tick {t}: {a} in a forward-only schedule.")
    if a.kind == "W" and not s.split_backward:
        raise ValueError(f"tick {t}: {a} but this schedule does not split the backward.")
    for dep, _ in dependencies(a, s):
        ready = seen.get(dep)
        if ready is None or (ready >= t and dep not in same_tick):
            when = "has not run" if ready is None else f"runs at tick {ready}"
            raise ValueError(f"tick {t}: {a} needs {dep} first, which {when}.")
