"""Slot plan of a training schedule: which buffer slot every stored value of a tick uses.

Each stored value (an arriving activation or gradient, a stage's residuals, a split backward's
cotangent unless its W is fused with it) lives from the tick it arrives (or is made) to the
tick it is consumed; slots are reused greedily (interval colouring), so buffers hold exactly
the schedule's in-flight count — m residual sets for GPipe, at most p for 1F1B.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from autopipe.passes.schedule import Action, Schedule


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlotPlan:
    """Per tick and device: buffer slots to store into and to read from (int [tick, device])."""

    act_store: np.ndarray
    act_read: np.ndarray
    grad_store: np.ndarray
    grad_read: np.ndarray
    res_store: np.ndarray  # F stores residuals
    res_read: np.ndarray  # B reads them
    cot_store: np.ndarray  # B stores cotangents and activation inputs (split backward)
    cot_read: np.ndarray  # W reads it
    counts: dict[str, int]  # slots per buffer


def _assign(intervals: dict[Any, tuple[int, int]]) -> tuple[dict[Any, int], int]:
    """Greedy interval colouring: slot per key so that no two live intervals share a slot."""
    free_at: list[int] = []  # per slot: first tick it is free again
    slots = {}
    for key, (start, end) in sorted(intervals.items(), key=lambda kv: (kv[1], kv[0])):
        slot = next((k for k, f in enumerate(free_at) if f <= start), None)
        if slot is None:
            slot, free_at = len(free_at), [*free_at, 0]
        free_at[slot] = end + 1
        slots[key] = slot
    return slots, len(free_at)


def plan_slots(schedule: Schedule) -> SlotPlan:
    """Assigns buffer slots to every stored value (see the module docstring).

    Every tick stores something into each inbox and cotangent buffer (stores are
    unconditional, outside the switch). A tick with nothing to store writes into a slot holding
    nothing live, so buffers need a spare slot only when every slot is live at such a tick.
    Residuals are written by F only, in place; other ticks' residual store slots go unused.
    """
    s, p = schedule, schedule.num_devices
    ticks = s.ticks()
    # per kind and device: key -> (tick stored, tick last read), and every tick it is read
    spans: dict[str, list[dict]] = {k: [{} for _ in range(p)] for k in SLOT_KINDS}
    reads: dict[str, list[dict]] = {k: [{} for _ in range(p)] for k in SLOT_KINDS}
    fused = s.fused()  # a W in its B's cell: nothing stored for it
    for a, t in ticks.items():
        d, j = s.device_of(a.stage), a.microbatch
        if a.kind == "F" and a.stage > 0:
            sent = ticks[Action("F", a.stage - 1, j)]
            spans["act"][d][a], reads["act"][d][a] = (sent + 1, t), [t]
        if a.kind == "B" and a.stage < s.num_stages - 1:
            sent = ticks[Action("B", a.stage + 1, j)]
            spans["grad"][d][a], reads["grad"][d][a] = (sent + 1, t), [t]
        if a.kind == "F":
            b = ticks[Action("B", a.stage, j)]  # W reads what B stored, not the residuals
            spans["res"][d][a], reads["res"][d][a] = (t, b), [b]
        if a.kind == "B" and s.split_backward and a not in fused:
            w = ticks[Action("W", a.stage, j)]
            spans["cot"][d][a], reads["cot"][d][a] = (t, w), [w]
    tables: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for kind in SLOT_KINDS:
        # arrivals are stored before the action reads them; residuals/cotangents after
        store_first = kind in ("act", "grad")
        store, read, n = _slot_tables(spans[kind], reads[kind], s.num_ticks, store_first)
        tables[f"{kind}_store"], tables[f"{kind}_read"], counts[kind] = store, read, n
    return SlotPlan(**tables, counts=counts)


SLOT_KINDS = ("act", "grad", "res", "cot")


def _slot_tables(spans, reads, num_ticks: int, store_first: bool):
    p = len(spans)
    assigned = [_assign(iv) for iv in spans]
    count = max((c for _, c in assigned), default=0)
    store = np.full((num_ticks, p), -1, np.int32)
    read = np.zeros((num_ticks, p), np.int32)
    spare = False
    for d, (slots, _) in enumerate(assigned):
        live = np.zeros((num_ticks, max(count, 1)), bool)  # slot holds a value still needed
        for key, slot in slots.items():
            start, end = spans[d][key]
            store[start, d] = slot
            read[reads[d][key], d] = slot
            live[start : end + 1 if store_first else end, slot] = True
        for t in np.flatnonzero(store[:, d] < 0):
            free = np.flatnonzero(~live[t, :count])
            if free.size or not store_first:  # residual buffers: rewrite what a slot holds
                store[t, d] = free[0] if free.size else 0
            else:
                store[t, d], spare = count, True
    return store, read, count + int(spare or count == 0)
