"""Schedules as tables: builders, validation, bubble fractions, in-flight memory."""

from __future__ import annotations

import dataclasses

import pytest

from autopipe.passes import schedule as S
from autopipe.passes.schedule import Action
from autopipe.passes.schedule_check import validate

KINDS = ["inference", "gpipe", "1f1b", "1f1b_paired", "interleaved_1f1b", "zb_h1", "zb_paired"]
SIZES = [(2, 4), (2, 8), (4, 4), (4, 8), (8, 8)]


@pytest.mark.parametrize(("p", "m"), SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_builders_make_valid_tables(kind, p, m):
    v = 2 if kind == "interleaved_1f1b" else 1
    s = S.make(kind, p, m, v)
    validate(s)
    per_mb = {"inference": 1, "zb_h1": 3, "zb_paired": 3}.get(kind, 2)
    assert sum(len(S.actions(c)) for row in s.table for c in row) == per_mb * m * p * v


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_bubble_fractions_match_formulas(p, m):
    gpipe_formula = (p - 1) / (m + p - 1)
    # GPipe and 1F1B: (p−1)/(m+p−1), whatever the backward costs relative to the forward
    for kind in ("inference", "gpipe", "1f1b"):
        for durations in ({"F": 1, "B": 1, "W": 0}, {"F": 1, "B": 2, "W": 0}):
            s = S.make(kind, p, m)
            assert s.bubble_fraction(durations) == pytest.approx(gpipe_formula), kind
    # interleaved (Megatron): bubble (p−1)/(v·m) of the ideal time, i.e. (p−1)/(v·m+p−1)
    for v in (2, 4):
        s = S.interleaved_1f1b(p, m, v)
        assert s.bubble_fraction() == pytest.approx((p - 1) / (v * m + p - 1))
    # ZB-H1 (F = B = W, so 1F1B's backward is B + W = 2): below 1F1B at the same p, m
    zb = S.zb_h1(p, m).bubble_fraction({"F": 1, "B": 1, "W": 1})
    assert zb < S.one_f_one_b(p, m).bubble_fraction({"F": 1, "B": 2, "W": 0}) - 0.02


@pytest.mark.parametrize(("p", "m"), SIZES)
def test_lockstep_time_is_the_tick_maxima(p, m):
    """One SPMD program: every tick as long as its slowest device; never below the event-driven
    makespan. With F = 1, B = 2, GPipe's table costs (m+p−1)·(F+B) and 1F1B's more (its
    mixed ticks cost a backward)."""
    durations = {"F": 1.0, "B": 2.0, "W": 1.0}
    for kind in KINDS:
        s = S.make(kind, p, m, 2 if kind == "interleaved_1f1b" else 1)
        lock = S.lockstep(s, durations)[1]
        assert lock >= S.simulate(s, durations)[1] - 1e-9, kind
        assert S.lockstep(s, durations, tick_overhead=0.5)[1] == pytest.approx(
            lock + 0.5 * s.num_ticks
        )
    assert S.lockstep(S.gpipe(p, m), durations)[1] == (m + p - 1) * 3.0
    assert S.lockstep(S.one_f_one_b(p, m), durations)[1] > (m + p - 1) * 3.0
    assert S.lockstep(S.inference(p, m), durations)[1] == m + p - 1
    # paired 1F1B: GPipe's lock-step time in m + 2(p − 1) ticks, 2(p − d) − 1 in flight
    paired = S.one_f_one_b_paired(p, m)
    assert S.lockstep(paired, durations)[1] == (m + p - 1) * 3.0
    assert paired.num_ticks == m + 2 * (p - 1) < S.one_f_one_b(p, m).num_ticks
    assert paired.in_flight() == [min(m, 2 * (p - d) - 1) for d in range(p)]
    assert paired.bubble_fraction(durations) == pytest.approx((p - 1) / (m + p - 1))


def test_pairs_must_be_a_forward_then_a_backward():
    s = S.one_f_one_b_paired(2, 4)
    t, d = next(
        (t, d) for t, row in enumerate(s.table) for d, c in enumerate(row) if isinstance(c, tuple)
    )
    rows = [list(r) for r in s.table]
    rows[t][d] = rows[t][d][::-1]
    with pytest.raises(ValueError, match="at most one action of each kind, in the order F, B, W"):
        validate(dataclasses.replace(s, table=tuple(map(tuple, rows))))


def _without_w(s: S.Schedule) -> list[list[tuple]]:
    return [[tuple(a for a in S.actions(c) if a.kind != "W") for c in row] for row in s.table]


def test_zb_paired_fuses_the_steady_state_and_moves_ws_into_the_cool_down():
    """zb_paired: 1F1B-paired's F and B ticks, each B fused with its W except the W's moved to
    a later tick of their device where that tick has room; lock-step with unit F, B, W it takes
    zb_h1's time in m + 2(p − 1) ticks, never longer than 1F1B-paired with B = F + W."""
    unit, whole = {"F": 1, "B": 1, "W": 1}, {"F": 1, "B": 2, "W": 0}
    for p in range(1, 7):
        for m in range(1, 20):
            zb, paired = S.zb_paired(p, m), S.one_f_one_b_paired(p, m)
            assert zb.num_ticks == paired.num_ticks == m + 2 * (p - 1)
            assert S.lockstep(zb, unit)[1] == S.lockstep(S.zb_h1(p, m), unit)[1], (p, m)
            assert S.lockstep(zb, unit)[1] <= S.lockstep(paired, whole)[1]
            assert _without_w(zb) == _without_w(paired)  # the same F and B, tick for tick
            ticks, fused = zb.ticks(), zb.fused()
            moved = [a for a in ticks if a.kind == "W" and a not in fused]
            assert all(ticks[a] > ticks[Action("B", a.stage, a.microbatch)] for a in moved)
            assert len(fused) == 2 * (p * m - len(moved))
    s = S.zb_paired(4, 8)
    assert s.in_flight() == [7, 5, 3, 1] and s.deferred() == [0, 1, 2, 3]
    assert list(S.actions(s.table[-1][3])) == [Action("W", 3, 5)]  # waits no more


def test_in_flight_microbatches_bound_activation_memory():
    p, m = 4, 8
    assert S.gpipe(p, m).in_flight() == [8, 8, 8, 8]  # GPipe: m per device
    assert S.one_f_one_b(p, m).in_flight() == [4, 3, 2, 1]  # 1F1B: min(p − r, m) on rank r
    assert S.zb_h1(p, m).in_flight() == [4, 3, 2, 1]  # W reads only what B stored: same bound


def test_peak_in_flight_formula_equals_the_tables():
    for kind in KINDS[1:]:
        for v in (2, 3) if kind == "interleaved_1f1b" else (1,):
            for p in range(1, 7):
                for m in range(1, 3 * p + 2):
                    if kind == "interleaved_1f1b" and m % p:
                        continue
                    table = max(S.make(kind, p, m, v).in_flight())
                    assert S.peak_in_flight(kind, p, m, v) == table, (kind, p, m, v)
                    deferred = max(S.make(kind, p, m, v).deferred())
                    assert S.peak_deferred(kind, p, m, v) == deferred, (kind, p, m, v)


def _swap(s: S.Schedule, t1: int, t2: int, d: int) -> S.Schedule:
    rows = [list(r) for r in s.table]
    rows[t1][d], rows[t2][d] = rows[t2][d], rows[t1][d]
    return dataclasses.replace(s, table=tuple(tuple(r) for r in rows))


def test_validation_rejects_broken_tables():
    s = S.one_f_one_b(2, 4)
    ticks = s.ticks()
    # missing dependency: the last stage's backward before its forward
    t_f, t_b = ticks[Action("F", 1, 0)], ticks[Action("B", 1, 0)]
    with pytest.raises(ValueError, match=r"B1\.0 needs F1\.0 first"):
        validate(_swap(s, t_f, t_b, 1))
    # wrong counts: a dropped backward, a duplicated forward
    rows = [list(r) for r in s.table]
    rows[ticks[Action("B", 0, 3)]][0] = None
    with pytest.raises(ValueError, match=r"never runs B0\.3"):
        validate(dataclasses.replace(s, table=tuple(tuple(r) for r in rows)))
    with pytest.raises(ValueError, match="runs twice"):
        validate(dataclasses.replace(s, table=s.table + (s.table[0],)))
    # wrong device, W in a schedule that does not split the backward
    bad = dataclasses.replace(s, table=((None, Action("F", 0, 0)),) + s.table[1:])
    with pytest.raises(ValueError, match="placed on device 1"):
        validate(bad)
    with pytest.raises(ValueError, match="does not split the backward"):
        validate(dataclasses.replace(s, table=s.table + ((Action("W", 0, 0), None),)))


def test_deadlocking_orders_are_refused():
    # device 0 waits for B1.0 before running F0.0, which device 1 needs for F1.0
    orders = [
        [Action("B", 0, 0), Action("F", 0, 0)],
        [Action("F", 1, 0), Action("B", 1, 0)],
    ]
    with pytest.raises(ValueError, match="deadlocks at tick 0"):
        S.from_orders("bad", orders, num_stages=2, num_microbatches=1, training=True)


def test_forward_only_table_and_unknown_name():
    s = S.inference(4, 8)
    assert s.num_ticks == 11 and s.table[0] == (Action("F", 0, 0), None, None, None)
    assert s.table[3][3] == Action("F", 3, 0)
    F = Action
    table = ((F("F", 0, 0), None), (F("F", 0, 1), None), (None, F("F", 1, 0)), (None, F("F", 1, 1)))
    late = S.Schedule(
        kind="inference", num_devices=2, num_stages=2, num_microbatches=2, table=table
    )
    # F1.0 runs two ticks after F0.0 sent its input: the receive buffer holds F0.1's by then
    with pytest.raises(ValueError, match="tick after its input is sent"):
        validate(late)
    with pytest.raises(ValueError, match="not one of"):
        S.make("pipedream", 2, 2)
    with pytest.raises(ValueError, match="divisible by the pipeline size"):
        S.interleaved_1f1b(4, 6, 2)
