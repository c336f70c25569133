"""Tests for passes/partition.py: the exact stage DP against brute force, hand cases, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from autopipe.passes.partition import (
    PlanInfeasible,
    StageProblem,
    StageSolution,
    additive_segment_memory,
    bubble_fraction,
    refit,
    solve_stages,
    step_time,
)

# ---------------------------------------------------------------------------- reference


def _stage_times(layer_time, cut_time, boundaries):
    """Independent recomputation of the stage times of a partition."""
    num_layers = len(layer_time)
    times = []
    for a, b in zip(boundaries[:-1], boundaries[1:], strict=True):
        send = cut_time[b - 1] if b < num_layers else 0.0
        times.append(sum(layer_time[a:b]) + send)
    return times


def _brute_force(layer_time, cut_time, memory, limit, p, m):
    """All (objective, boundaries) pairs of memory-feasible partitions into p stages."""
    num_layers = len(layer_time)
    found = []
    for inner in itertools.combinations(range(1, num_layers), p - 1):
        boundaries = (0, *inner, num_layers)
        pairs = zip(boundaries[:-1], boundaries[1:], strict=True)
        if all(memory[a][b] <= limit for a, b in pairs):
            times = _stage_times(layer_time, cut_time, boundaries)
            found.append((step_time(times, m), boundaries))
    return found


def _random_problem(rng, *, max_layers, integer):
    num_layers = int(rng.integers(1, max_layers + 1))
    p = int(rng.integers(1, num_layers + 1))
    m = int(rng.integers(1, 9))
    if integer:
        layer_time = rng.integers(0, 4, num_layers).astype(float)
        cut_time = rng.integers(0, 4, num_layers - 1).astype(float)
        layer_bytes = rng.integers(1, 6, num_layers).astype(float)
    else:
        layer_time = rng.random(num_layers)
        scale = rng.choice([0.0, 0.1, 1.0, 5.0])
        cut_time = rng.random(num_layers - 1) * scale * (rng.random(num_layers - 1) < 0.7)
        layer_bytes = rng.random(num_layers) * 10
    memory = additive_segment_memory(layer_bytes, stage_overhead=float(rng.integers(0, 3)))
    unlimited = rng.random() < 0.3
    limit = math.inf if unlimited else float(rng.uniform(0.2, 1.0) * (layer_bytes.sum() + 2))
    return StageProblem(
        layer_time=tuple(float(x) for x in layer_time),
        cut_time=tuple(float(x) for x in cut_time),
        segment_memory=memory,
        memory_limit=limit,
        num_stages=p,
        num_microbatches=m,
    )


def _check_against_brute_force(problem: StageProblem) -> StageSolution | None:
    """Assert solve_stages is exact; return the solution (None when infeasible)."""
    lt, ct, mem = problem.layer_time, problem.cut_time, problem.segment_memory
    p, m, limit = problem.num_stages, problem.num_microbatches, problem.memory_limit
    found = _brute_force(lt, ct, mem, limit, p, m)
    if not found:
        with pytest.raises(ValueError, match="no partition of"):
            solve_stages(problem)
        return None
    solution = solve_stages(problem)
    best = min(value for value, _ in found)
    assert solution.step_time == pytest.approx(best, rel=1e-9, abs=1e-12), problem
    b = solution.boundaries
    assert len(b) == p + 1 and b[0] == 0 and b[-1] == len(lt)
    assert all(x < y for x, y in zip(b[:-1], b[1:], strict=True))
    own_times = _stage_times(lt, ct, b)
    assert solution.stage_times == pytest.approx(own_times, rel=1e-12, abs=1e-12)
    assert step_time(own_times, m) == pytest.approx(best, rel=1e-9, abs=1e-12)
    memory = [mem[x][y] for x, y in zip(b[:-1], b[1:], strict=True)]
    assert solution.stage_memory == pytest.approx(memory)
    assert max(memory) <= limit
    return solution


# ---------------------------------------------------------------------------- brute force


@pytest.mark.parametrize("block", range(5))
def test_matches_brute_force_on_random_tables(block):
    # 5 blocks x 50 = 250 random float cost tables (L <= 9), some of them infeasible.
    rng = np.random.default_rng(1000 + block)
    for _ in range(50):
        _check_against_brute_force(_random_problem(rng, max_layers=9, integer=False))


@pytest.mark.parametrize("block", range(3))
def test_returns_lexicographically_smallest_optimum(block):
    # Small integer costs are exact in floating point and produce many exact ties.
    rng = np.random.default_rng(2000 + block)
    for _ in range(50):
        problem = _random_problem(rng, max_layers=9, integer=True)
        solution = _check_against_brute_force(problem)
        if solution is None:
            continue
        found = _brute_force(
            problem.layer_time,
            problem.cut_time,
            problem.segment_memory,
            problem.memory_limit,
            problem.num_stages,
            problem.num_microbatches,
        )
        best = min(value for value, _ in found)
        assert solution.boundaries == min(b for value, b in found if value == best)


def test_matches_brute_force_with_more_layers_and_few_microbatches():
    # Small m makes the cut sum matter, so the search visits many caps T.
    rng = np.random.default_rng(3000)
    for _ in range(12):
        num_layers = int(rng.integers(10, 14))
        problem = StageProblem(
            layer_time=tuple(rng.random(num_layers)),
            cut_time=tuple(rng.random(num_layers - 1) * rng.choice([0.3, 1.0, 3.0])),
            segment_memory=additive_segment_memory(rng.random(num_layers)),
            memory_limit=math.inf,
            num_stages=int(rng.integers(2, 6)),
            num_microbatches=int(rng.integers(2, 4)),
        )
        _check_against_brute_force(problem)


# ---------------------------------------------------------------------------- hand cases


def _problem(layer_time, cut_time, *, p, m, layer_bytes=None, limit=math.inf):
    layer_bytes = [1.0] * len(layer_time) if layer_bytes is None else layer_bytes
    return StageProblem(
        layer_time=tuple(layer_time),
        cut_time=tuple(cut_time),
        segment_memory=additive_segment_memory(layer_bytes),
        memory_limit=limit,
        num_stages=p,
        num_microbatches=m,
    )


def test_four_equal_layers_two_stages():
    # Split 2+2: t = (2, 2); step = (2 + 2) + (4 - 1) * 2 = 10.
    # bubble = 1 - m * sum(t) / (p * step) = 1 - 4 * 4 / (2 * 10) = 0.2 = (p-1)/(m+p-1) = 1/5.
    solution = solve_stages(_problem([1.0] * 4, [0.0] * 3, p=2, m=4))
    assert solution.boundaries == (0, 2, 4)
    assert solution.stage_times == (2.0, 2.0)
    assert solution.step_time == 10.0
    assert solution.bubble_fraction == pytest.approx(0.2)
    assert solution.stage_memory == (2.0, 2.0)


def test_send_time_counts_for_the_sending_stage():
    # layers (3, 1, 1, 1), cuts (0, 2, 0), p = 2, m = 3:
    #   b1 = 1: t = (3 + 0, 3)     -> 6 + 2 * 3 = 12   <- best
    #   b1 = 2: t = (4 + 2, 2)     -> 8 + 2 * 6 = 20
    #   b1 = 3: t = (5 + 0, 1)     -> 6 + 2 * 5 = 16
    solution = solve_stages(_problem([3.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0], p=2, m=3))
    assert solution.boundaries == (0, 1, 4)
    assert solution.stage_times == (3.0, 3.0)
    assert solution.step_time == 12.0


@pytest.mark.parametrize(
    ("m", "boundaries", "step"),
    [
        # layers (1, 1, 1, 1), cuts (0, 0.5, 0), p = 2:
        #   b1 = 1: t = (1, 3)          sum 4,   max 3
        #   b1 = 2: t = (2 + 0.5, 2)    sum 4.5, max 2.5
        #   b1 = 3: t = (3, 1)          sum 4,   max 3
        (1, (0, 1, 4), 4.0),  # 4 vs 4.5 vs 4: tie b1 = 1 / 3, lexicographically smallest wins
        (2, (0, 1, 4), 7.0),  # 4 + 3 = 7 vs 4.5 + 2.5 = 7: tie, lexicographically smallest wins
        (4, (0, 2, 4), 12.0),  # 4 + 3 * 3 = 13 vs 4.5 + 3 * 2.5 = 12: balance beats cut cost
    ],
)
def test_microbatches_trade_cut_cost_against_balance(m, boundaries, step):
    solution = solve_stages(_problem([1.0] * 4, [0.0, 0.5, 0.0], p=2, m=m))
    assert solution.boundaries == boundaries
    assert solution.step_time == step


def test_memory_limit_forces_an_unbalanced_split():
    # layer bytes (30, 10, 10, 10), all layer times 1, p = 2, m = 4:
    #   limit 40: b1 = 2 has memory (40, 20) -> allowed; t = (2, 2), step = 4 + 3 * 2 = 10.
    #   limit 35: only b1 = 1 fits (30, 30);  t = (1, 3), step = 4 + 3 * 3 = 13.
    kwargs = dict(p=2, m=4, layer_bytes=[30.0, 10.0, 10.0, 10.0])
    loose = solve_stages(_problem([1.0] * 4, [0.0] * 3, limit=40.0, **kwargs))
    assert (loose.boundaries, loose.step_time) == ((0, 2, 4), 10.0)
    tight = solve_stages(_problem([1.0] * 4, [0.0] * 3, limit=35.0, **kwargs))
    assert (tight.boundaries, tight.step_time) == ((0, 1, 4), 13.0)
    assert tight.stage_memory == (30.0, 30.0)


def test_single_stage_and_one_layer_per_stage():
    # p = 1: one stage, no send; step = m * sum = 3 * 6 = 18.
    one = solve_stages(_problem([1.0, 2.0, 3.0], [5.0, 5.0], p=1, m=3))
    assert one.boundaries == (0, 3)
    assert one.step_time == 18.0
    assert one.bubble_fraction == 0.0
    # p = L: t = (1 + 5, 2 + 5, 3) = (6, 7, 3); step = 16 + 2 * 7 = 30.
    every = solve_stages(_problem([1.0, 2.0, 3.0], [5.0, 5.0], p=3, m=3))
    assert every.boundaries == (0, 1, 2, 3)
    assert every.stage_times == (6.0, 7.0, 3.0)
    assert every.step_time == 30.0


def test_equal_stages_bubble_matches_gpipe_formula():
    for p, m in [(2, 1), (4, 4), (8, 3)]:
        times = [1.5] * p
        assert bubble_fraction(times, m) == pytest.approx((p - 1) / (m + p - 1))
    assert bubble_fraction([0.0, 0.0], 4) == 0.0


def test_step_time_formula():
    # sum 1 + 4 + 2 = 7, max 4, m = 5 -> 7 + 4 * 4 = 23.
    assert step_time([1.0, 4.0, 2.0], 5) == 23.0
    assert step_time((3.0,), 1) == 3.0


def test_additive_segment_memory_table():
    table = additive_segment_memory([1.0, 2.0, 4.0], stage_overhead=10.0)
    assert table.shape == (4, 4)
    assert table[0, 3] == 17.0  # 1 + 2 + 4 + 10
    assert table[1, 2] == 12.0  # 2 + 10
    assert np.isinf(table[2, 1]) and np.isinf(table[2, 2])


# ---------------------------------------------------------------------------- determinism


def test_deterministic_and_callable_memory_matches_array():
    rng = np.random.default_rng(7)
    num_layers = 40
    layer_bytes = rng.random(num_layers)
    table = additive_segment_memory(layer_bytes, stage_overhead=0.5)
    common = dict(
        layer_time=tuple(np.round(rng.random(num_layers), 1)),  # coarse values -> many ties
        cut_time=tuple(np.round(rng.random(num_layers - 1) * 0.3, 1)),
        memory_limit=float(layer_bytes.sum() / 3),
        num_stages=6,
        num_microbatches=4,
    )
    first = solve_stages(StageProblem(segment_memory=table, **common))
    again = solve_stages(StageProblem(segment_memory=table.copy(), **common))
    as_callable = solve_stages(
        StageProblem(segment_memory=lambda i, j: float(table[i, j]), **common)
    )
    assert first == again == as_callable


# ---------------------------------------------------------------------------- errors


def test_rejects_bad_stage_counts():
    with pytest.raises(ValueError, match=r"num_stages must be >= 1, got 0"):
        solve_stages(_problem([1.0, 1.0], [0.0], p=0, m=1))
    with pytest.raises(ValueError, match=r"cannot form 5 stages from 3 layers.*at most 3 stages"):
        solve_stages(_problem([1.0] * 3, [0.0] * 2, p=5, m=1))


def test_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match=r"cut_time has 3 entries but layer_time has 3 layers"):
        solve_stages(_problem([1.0] * 3, [0.0] * 3, p=2, m=1))
    with pytest.raises(ValueError, match="layer_time is empty"):
        solve_stages(_problem([], [], p=1, m=1))


def test_rejects_bad_numbers():
    with pytest.raises(ValueError, match=r"num_microbatches must be >= 1, got 0"):
        solve_stages(_problem([1.0] * 3, [0.0] * 2, p=2, m=0))
    with pytest.raises(ValueError, match=r"layer_time\[1\] = -1.0 is not a finite time"):
        solve_stages(_problem([1.0, -1.0], [0.0], p=2, m=1))
    with pytest.raises(ValueError, match=r"cut_time\[0\] = nan"):
        solve_stages(_problem([1.0, 1.0], [math.nan], p=2, m=1))
    with pytest.raises(ValueError, match=r"memory_limit must be >= 0 bytes"):
        solve_stages(_problem([1.0, 1.0], [0.0], p=2, m=1, limit=math.nan))
    bad_shape = StageProblem(
        layer_time=(1.0, 1.0),
        cut_time=(0.0,),
        segment_memory=np.zeros((2, 2)),
        num_stages=1,
        num_microbatches=1,
    )
    with pytest.raises(ValueError, match=r"segment_memory has shape \(2, 2\).*need \(3, 3\)"):
        solve_stages(bad_shape)


def test_memory_error_reports_smallest_achievable_memory():
    # layer bytes (30, 10, 10, 10), p = 2: best split for memory is b1 = 1 with (30, 30).
    problem = _problem([1.0] * 4, [0.0] * 3, p=2, m=4, layer_bytes=[30, 10, 10, 10], limit=25.0)
    with pytest.raises(ValueError, match=r"memory_limit=25 bytes.*largest stage memory is 30 "):
        solve_stages(problem)
    with pytest.raises(ValueError, match=r"boundaries \[0, 1, 4\].*use more stages"):
        solve_stages(problem)


def test_refit_lowers_the_limit_until_what_the_stages_cannot_price_fits():
    # layer bytes (30, 10, 10, 10), p = 2, plus 8 bytes the stage DP cannot see (a parameter
    # layout's padding: it depends on every stage) on the first of the shortest stages
    kwargs = dict(p=2, m=4, layer_bytes=[30.0, 10.0, 10.0, 10.0])
    solve = lambda lim: solve_stages(_problem([1.0] * 4, [0.0] * 3, limit=lim, **kwargs))  # noqa: E731

    def padded(sol):
        pad = [8.0 * (s == int(np.argmin(np.diff(sol.boundaries)))) for s in range(2)]
        return [m + x for m, x in zip(sol.stage_memory, pad, strict=True)], pad

    # 50: the DP's (0, 2, 4) needs (40 + 8, 20) and fits as it is
    assert refit(solve, padded, 50.0).boundaries == (0, 2, 4)
    # 40: it does not (48); re-solved under 40 - 8, (0, 1, 4) needs (30 + 8, 30): fits
    assert refit(solve, padded, 40.0).boundaries == (0, 1, 4)
    # 35: (0, 1, 4) needs 38; under 35 - 8 nothing fits
    with pytest.raises(PlanInfeasible, match=r"memory_limit=35 bytes.*needs 38 bytes.*8 of"):
        refit(solve, padded, 35.0)


# ---------------------------------------------------------------------------- size


def test_large_problem_solves():
    rng = np.random.default_rng(11)
    num_layers, p = 300, 64
    problem = StageProblem(
        layer_time=tuple(rng.random(num_layers)),
        cut_time=tuple(rng.random(num_layers - 1) * 0.2),
        segment_memory=additive_segment_memory(rng.random(num_layers)),
        memory_limit=math.inf,
        num_stages=p,
        num_microbatches=8,
    )
    solution = solve_stages(problem)
    assert len(solution.boundaries) == p + 1
    assert solution.step_time == pytest.approx(step_time(solution.stage_times, 8))
