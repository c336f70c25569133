"""Stage partitioning: split a chain of L layers into p contiguous pipeline stages.

What this pass does
-------------------
Given per-layer forward times, per-boundary send times and a per-device memory model,
:func:`solve_stages` picks stage boundaries ``0 = b_0 < b_1 < ... < b_p = L`` that minimise the
GPipe-style step time of one forward pass over ``m`` microbatches::

    step = sum_i t_i + (m - 1) * max_i t_i                                  (see step_time)

where stage ``i`` holds layers ``[b_i, b_{i+1})`` and ``t_i`` is the sum of its layer times plus
the time to send the values crossing its outgoing boundary (the last stage sends nothing).
Every stage must fit in ``memory_limit`` bytes. The answer is exact: it equals a brute-force
search over all partitions (tests/test_partition.py checks this).

Memory model
------------
``StageProblem.segment_memory`` is either

* a 2-D array of shape ``(L + 1, L + 1)`` where entry ``[i, j]`` (``i < j``) is the per-device
  bytes of a stage that holds layers ``[i, j)``; entries with ``i >= j`` are ignored, or
* a callable ``(i, j) -> bytes`` with the same meaning (it is evaluated once for every ``i < j``).

Use ``math.inf`` for segments that must never form a stage. :func:`additive_segment_memory`
builds the common "sum of per-layer bytes plus a fixed per-stage overhead" table.

Algorithm
---------
Write ``w[j]`` for the send time of the boundary after layer ``j - 1`` (``w[L] = 0``). Then
``sum_i t_i = total compute + sum of w over used boundaries``, so for a fixed cap ``T`` on the
stage time the best partition minimises just the cut sum; a vectorised DP solves that in
``O(p * L^2)`` numpy work. The optimum is ``min_T total + cut(T) + (m - 1) * T`` over the
distinct achievable stage times ``T``. ``cut(T)`` is a non-increasing step function, so instead
of trying every ``T`` we walk its steps downward: a DP at cap ``T`` returns a partition whose
largest stage time ``T' <= T`` is the next step, and every cap in ``[T', T]`` gives the same cut
sum. The walk starts at the largest cap that could still beat the best-known value and stops
at the smallest feasible cap ``T*`` (a min-max DP) or when ``total + cut + (m - 1) * T*`` can no
longer beat the best-known value.

Tie-breaking: among optimal partitions (objective equal up to a relative 1e-12) the
lexicographically smallest ``boundaries`` is returned, so the result is deterministic.

How to extend
-------------
* A different objective that is still "sum plus (m - 1) times the bottleneck" (e.g. forward +
  backward stage times for 1F1B) only needs a different stage time matrix:
  change :func:`_stage_time_matrix` and :func:`step_time` together.
* Extra constraints on which layers may share a stage: set those segments to ``inf`` in the
  memory table (or add a mask next to the memory check in :func:`solve_stages`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")
SegmentMemory = np.ndarray | Callable[[int, int], float]

# Relative tolerance under which two objective values count as a tie.
_TIE_RTOL = 1e-12


class PlanInfeasible(ValueError):
    """No plan fits: every split of the layers into stages exceeds the memory limit (or, for a
    device count, no factorization of the devices fits). Catch it by type; the message names
    the limit, the smallest achievable memory and the fixes."""


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class StageProblem:
    """Input of :func:`solve_stages`. Times are seconds for ONE microbatch; memory is bytes.

    ``eq=False`` because ``segment_memory`` may be a numpy array (identity equality/hash).
    """

    layer_time: tuple[float, ...]  # L >= 1 forward time of each layer
    cut_time: tuple[float, ...]  # L - 1: send time of the boundary after layer k
    segment_memory: SegmentMemory  # (L+1, L+1) array or callable; [i, j] = bytes of layers [i, j)
    memory_limit: float = math.inf  # bytes per device; math.inf = no limit
    num_stages: int  # p: exact number of stages, each with >= 1 layer
    num_microbatches: int  # m >= 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageSolution:
    """Output of :func:`solve_stages`.

    ``bubble_fraction`` is the idle share of the ``p * step_time`` device-seconds of one step:
    ``1 - m * sum(stage_times) / (p * step_time)`` (0 when ``step_time`` is 0). With equal stage
    times it is the familiar ``(p - 1) / (m + p - 1)``.
    """

    boundaries: tuple[int, ...]  # p + 1 indices; stage s holds layers [b_s, b_{s+1})
    stage_times: tuple[float, ...]  # per stage: layer times + outgoing send time (s)
    stage_memory: tuple[float, ...]  # per stage: segment_memory[b_s, b_{s+1}] (bytes)
    step_time: float  # step_time(stage_times, m) (s)
    bubble_fraction: float  # idle fraction of p * step_time


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Candidate:
    """A partition found by the cut-sum DP under some stage time cap."""

    boundaries: tuple[int, ...]
    cut_sum: float  # DP value: sum of w over used boundaries
    max_time: float  # largest stage time of this partition
    value: float  # step_time of this partition


def step_time(stage_times: Sequence[float], num_microbatches: int) -> float:
    """GPipe forward-only step time: ``sum(t) + (m - 1) * max(t)``."""
    times = [float(t) for t in stage_times]
    if not times:
        raise ValueError("step_time needs at least one stage time, got an empty sequence")
    return sum(times) + (num_microbatches - 1) * max(times)


def bubble_fraction(stage_times: Sequence[float], num_microbatches: int) -> float:
    """Idle fraction ``1 - m * sum(t) / (p * step)`` of the device time of one step."""
    step = step_time(stage_times, num_microbatches)
    if step <= 0.0:
        return 0.0
    busy = num_microbatches * sum(float(t) for t in stage_times)
    return 1.0 - busy / (len(stage_times) * step)


def additive_segment_memory(
    layer_bytes: Sequence[float], *, stage_overhead: float = 0.0
) -> np.ndarray:
    """``(L+1, L+1)`` table with ``[i, j] = sum(layer_bytes[i:j]) + stage_overhead`` for i < j."""
    per_layer = np.asarray(layer_bytes, dtype=np.float64)
    prefix = np.concatenate([[0.0], np.cumsum(per_layer)])
    table = prefix[None, :] - prefix[:, None] + float(stage_overhead)
    upper = np.triu(np.ones_like(table, dtype=bool), k=1)
    return np.where(upper, table, np.inf)


def solve_stages(problem: StageProblem) -> StageSolution:
    """Exact minimum of ``step_time`` over memory-feasible partitions into ``num_stages`` stages.

    Raises ``ValueError`` for malformed problems and when no partition fits ``memory_limit``.
    """
    layer_time, w = _validate(problem)
    p, m = problem.num_stages, problem.num_microbatches
    times = _stage_time_matrix(layer_time, w)
    memory = _memory_matrix(problem.segment_memory, len(layer_time))
    feasible_times = np.where(memory <= problem.memory_limit, times, np.inf)
    t_star = float(_min_max_table(feasible_times, p)[p, 0])  # smallest feasible stage time cap
    if not math.isfinite(t_star):
        raise _memory_error(memory, problem)

    cut_tol = _TIE_RTOL * float(np.sum(w))
    total = float(np.sum(layer_time))

    def query(cap: float) -> _Candidate:
        return _best_under_cap(feasible_times, times, w, p, m, cap, cut_tol)

    best = _search(query, feasible_times, t_star, m, total)
    return _solution(best.boundaries, times, memory, m)


def _search(
    query: Callable[[float], _Candidate],
    feasible_times: np.ndarray,
    t_star: float,
    m: int,
    total: float,
) -> _Candidate:
    """Walk the steps of cut(T) downward from the largest useful cap (see module docstring)."""
    caps = np.unique(feasible_times[np.isfinite(feasible_times)])  # ascending
    unbounded = query(float(caps[-1]))  # the largest cap allows every feasible segment
    if m == 1:
        # The objective is the plain sum; no cap can beat the unconstrained cut DP.
        return unbounded
    found = [query(t_star), unbounded]

    def bound() -> float:
        return min(c.value for c in found) * (1.0 + _TIE_RTOL)

    # Caps above t_hi cannot beat the best value: total + cut(inf) + (m-1) T > best.
    t_hi = (bound() - total - unbounded.cut_sum) / (m - 1)
    if unbounded.max_time <= t_hi:
        current = unbounded
    else:
        index = int(np.searchsorted(caps, t_hi, side="right")) - 1
        current = query(float(caps[index])) if index >= 0 else found[0]
        found.append(current)
    while current.max_time > t_star and total + current.cut_sum + (m - 1) * t_star <= bound():
        index = int(np.searchsorted(caps, current.max_time, side="left")) - 1
        if index < 0 or caps[index] <= t_star:
            break  # the remaining cap is t_star, already evaluated
        current = query(float(caps[index]))
        found.append(current)
    return _pick(found)


def _pick(found: Sequence[_Candidate]) -> _Candidate:
    """Smallest value; among ties (relative _TIE_RTOL) the lexicographically smallest."""
    best_value = min(c.value for c in found)
    limit = best_value + _TIE_RTOL * abs(best_value)
    return min((c for c in found if c.value <= limit), key=lambda c: c.boundaries)


def _best_under_cap(
    feasible_times: np.ndarray,
    times: np.ndarray,
    w: np.ndarray,
    p: int,
    m: int,
    cap: float,
    cut_tol: float,
) -> _Candidate:
    """Minimum cut sum over partitions whose stage times are all <= cap."""
    blocked = np.where(feasible_times <= cap, 0.0, np.inf)
    table = _min_sum_table(blocked, w, p)
    boundaries = _trace_min_sum(table, blocked, w, p, cut_tol)
    stage_times = _segment_values(times, boundaries)
    return _Candidate(
        boundaries=boundaries,
        cut_sum=float(table[p, 0]),
        max_time=max(stage_times),
        value=step_time(stage_times, m),
    )


def _validate(problem: StageProblem) -> tuple[np.ndarray, np.ndarray]:
    """Check the problem; return ``layer_time`` and ``w`` (w[j] = send time after layer j-1)."""
    num_layers = len(problem.layer_time)
    p = problem.num_stages
    if num_layers < 1:
        raise ValueError("layer_time is empty; a stage problem needs at least one layer")
    if len(problem.cut_time) != num_layers - 1:
        raise ValueError(
            f"cut_time has {len(problem.cut_time)} entries but layer_time has {num_layers} "
            f"layers; pass exactly {num_layers - 1} cut times (one per boundary between "
            "consecutive layers)"
        )
    if p < 1:
        raise ValueError(f"num_stages must be >= 1, got {p}; use at least one stage")
    if p > num_layers:
        raise ValueError(
            f"cannot form {p} stages from {num_layers} layers (every stage needs >= 1 layer); "
            f"use at most {num_layers} stages or split the model into more layers"
        )
    if problem.num_microbatches < 1:
        raise ValueError(
            f"num_microbatches must be >= 1, got {problem.num_microbatches}; "
            "use at least one microbatch"
        )
    if math.isnan(problem.memory_limit) or problem.memory_limit < 0:
        raise ValueError(
            f"memory_limit must be >= 0 bytes (math.inf for no limit), got {problem.memory_limit}"
        )
    layer_time = _nonnegative("layer_time", problem.layer_time)
    cut_time = _nonnegative("cut_time", problem.cut_time)
    return layer_time, np.concatenate([[0.0], cut_time, [0.0]])


def _nonnegative(name: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(array) | (array < 0))
    if bad.size:
        k = int(bad[0])
        raise ValueError(
            f"{name}[{k}] = {array[k]} is not a finite time >= 0; pass seconds per microbatch"
        )
    return array


def _stage_time_matrix(layer_time: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``t[i, j]`` = time of a stage holding layers [i, j): its compute + send time w[j]."""
    num_layers = layer_time.shape[0]
    # t[i, j] = sum(layer_time[i:j]) + w[j] for i < j, inf otherwise.
    t = np.full((num_layers + 1, num_layers + 1), np.inf)
    for i in range(num_layers):
        # Row-wise cumsum (not prefix differences) keeps each entry an exact left-to-right sum.
        t[i, i + 1 :] = np.cumsum(layer_time[i:]) + w[i + 1 :]
    return t


def _memory_matrix(segment_memory: SegmentMemory, num_layers: int) -> np.ndarray:
    """``mem[i, j]`` = bytes of a stage holding layers [i, j) for i < j, inf otherwise."""
    n = num_layers + 1
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    if callable(segment_memory):
        table = np.full((n, n), np.inf)
        for i in range(num_layers):
            for j in range(i + 1, n):
                table[i, j] = float(segment_memory(i, j))
    else:
        table = np.asarray(segment_memory, dtype=np.float64)
        if table.shape != (n, n):
            raise ValueError(
                f"segment_memory has shape {table.shape} but {num_layers} layers need "
                f"({n}, {n}): entry [i, j] is the bytes of a stage holding layers [i, j)"
            )
    if np.isnan(table[upper]).any():
        i, j = (int(k[0]) for k in np.nonzero(np.isnan(table) & upper))
        raise ValueError(f"segment_memory[{i}, {j}] is NaN; use math.inf to forbid a segment")
    return np.where(upper, table, np.inf)


def _min_sum_table(blocked: np.ndarray, w: np.ndarray, p: int) -> np.ndarray:
    """Suffix DP for the minimum cut sum; ``blocked[i, j]`` is 0 (allowed) or inf."""
    num_layers = w.shape[0] - 1
    # h[s, i] = min sum of w[b] over the boundaries b used when layers [i, L) form exactly s
    #           allowed stages (w[L] = 0 for the last stage); inf when impossible.
    h = np.full((p + 1, num_layers + 1), np.inf)
    h[0, num_layers] = 0.0
    for s in range(1, p + 1):
        # With p stages in all, a suffix of s stages starts at i in [p-s, L-s] and its first
        # stage ends at j in [p-s+1, L-s+1]; other rows/columns are unreachable.
        rows = slice(p - s, num_layers - s + 1)
        cols = slice(p - s + 1, num_layers - s + 2)
        h[s, rows] = np.min(blocked[rows, cols] + (w[cols] + h[s - 1, cols]), axis=1)
    return h


def _trace_min_sum(
    h: np.ndarray, blocked: np.ndarray, w: np.ndarray, p: int, tol: float
) -> tuple[int, ...]:
    """Lexicographically smallest boundaries achieving ``h[p, 0]`` (within ``tol``)."""
    boundaries, i = [0], 0
    for s in range(p, 0, -1):
        values = blocked[i] + (w + h[s - 1])
        i = int(np.flatnonzero(values <= h[s, i] + tol)[0])
        boundaries.append(i)
    return tuple(boundaries)


def _min_max_table(cost: np.ndarray, p: int) -> np.ndarray:
    """Suffix DP for the smallest possible largest segment cost (inf entries = forbidden)."""
    num_layers = cost.shape[0] - 1
    # g[s, i] = min over ways to split layers [i, L) into exactly s segments of the largest
    #           cost[a, b] among those segments; inf when impossible (g[0, L] = -inf).
    g = np.full((p + 1, num_layers + 1), np.inf)
    g[0, num_layers] = -np.inf
    for s in range(1, p + 1):
        rows = slice(p - s, num_layers - s + 1)
        cols = slice(p - s + 1, num_layers - s + 2)
        g[s, rows] = np.min(np.maximum(cost[rows, cols], g[s - 1, cols]), axis=1)
    return g


def _trace_min_max(g: np.ndarray, cost: np.ndarray, p: int) -> tuple[int, ...]:
    """Lexicographically smallest boundaries achieving ``g[p, 0]``."""
    boundaries, i = [0], 0
    for s in range(p, 0, -1):
        values = np.maximum(cost[i], g[s - 1])
        i = int(np.flatnonzero(values <= g[s, i])[0])
        boundaries.append(i)
    return tuple(boundaries)


def _memory_error(memory: np.ndarray, problem: StageProblem) -> PlanInfeasible:
    p = problem.num_stages
    table = _min_max_table(memory, p)
    smallest = float(table[p, 0])
    where = ""
    if np.isfinite(smallest):
        where = f" (boundaries {list(_trace_min_max(table, memory, p))})"
    return PlanInfeasible(
        f"no partition of {len(problem.layer_time)} layers into {p} stages fits "
        f"memory_limit={problem.memory_limit:.6g} bytes: the smallest achievable largest "
        f"stage memory is {smallest:.6g} bytes{where}; use more stages, a larger "
        "memory_limit, or less memory per layer (e.g. rematerialisation)"
    )


def refit(
    solve: Callable[[float], T],
    memory: Callable[[T], tuple[Sequence[float], Sequence[float]]],
    limit: float,
) -> T:
    """``solve(limit)`` such that its memory fits ``limit`` with what a per-stage model cannot
    price (the parameter layout's padding: it depends on every stage). ``memory(found)``: per
    device, the bytes it needs and the unpriced part of them. While a device does not fit,
    re-solved with the limit lowered by that device's unpriced bytes (a split needing as much
    padding then fits); `PlanInfeasible` with the numbers when no lower limit helps."""
    target, found, best = limit, solve(limit), (math.inf, 0.0)
    for attempt in range(4):
        need, unpriced = memory(found)
        over = [d for d, n in enumerate(need) if n > limit]
        if not over:
            return found
        best = min(best, max((need[d], unpriced[d]) for d in over))
        lower = limit - max(unpriced[d] for d in over)
        if attempt == 3 or lower >= target:
            break
        target = lower
        try:
            found = solve(target)
        except PlanInfeasible as e:
            raise PlanInfeasible(_refit_message(limit, *best)) from e
    raise PlanInfeasible(_refit_message(limit, *best))


def _refit_message(limit: float, need: float, padding: float) -> str:
    return (
        f"no stage split fits memory_limit={limit:.6g} bytes once the parameter layout is "
        f"counted: the best needs {need:.6g} bytes on a device, {padding:.6g} of them padding "
        "(slots hold zeros where another device has a parameter of a shape this one lacks); "
        "use a larger memory_limit, more devices or a tensor axis (in training, an optimizer "
        "that reads no shapes aligns slots by size, which pads less)"
    )


def _segment_values(table: np.ndarray, boundaries: Sequence[int]) -> tuple[float, ...]:
    return tuple(float(table[a, b]) for a, b in zip(boundaries[:-1], boundaries[1:], strict=True))


def _solution(
    boundaries: tuple[int, ...], times: np.ndarray, memory: np.ndarray, m: int
) -> StageSolution:
    stage_times = _segment_values(times, boundaries)
    return StageSolution(
        boundaries=boundaries,
        stage_times=stage_times,
        stage_memory=_segment_values(memory, boundaries),
        step_time=step_time(stage_times, m),
        bubble_fraction=bubble_fraction(stage_times, m),
    )
