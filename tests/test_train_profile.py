"""`Plan.profile(state, *batch)` of a training plan: action kinds timed inside the compiled
step (probe tables), and the lock-step timeline that turns them into a predicted step. Only
structure and arithmetic are asserted here; how close the prediction comes is measured in
bench/ (`training_speedup`)."""

from __future__ import annotations

import numpy as np
import optax
import pytest

import autopipe
from autopipe import models
from autopipe._train_profile import ActionCost, timeline
from autopipe.passes import schedule as schedules
from autopipe.passes.emit_train import probe_tables
from autopipe.passes.train_slots import plan_slots
from conftest import BATCH, fill, mesh


def test_probe_tables_run_one_kind_on_every_device_or_on_one():
    sched = schedules.make("zb_paired", 2, 4)
    slots = plan_slots(sched)
    real = probe_tables(sched, slots, None)
    actions = ("fwd", "bwd", "wgt")
    # per kind: the table it is in and device 0's entry (B of stage s is s, B fused with its
    # W is S + s, W apart is s; device d runs stage d)
    for kind, table, branch in (
        ("F", "fwd", 0),
        ("B", "bwd", 0),
        ("BW", "bwd", 2),
        ("W", "wgt", 0),
    ):
        every = probe_tables(sched, slots, kind)
        one = probe_tables(sched, slots, kind, device=1)
        assert every.keys() == real.keys()
        assert all(every[k].shape == (sched.num_ticks, 2) for k in every)
        assert (every[table] == [branch, branch + 1]).all()
        assert (one[table] == [-1, branch + 1]).all()
        assert all((every[k] == -1).all() for k in actions if k != table)
        assert all((v == 0).all() for k, v in every.items() if k.endswith(("_store", "_read")))
    assert all((real[k] == -1).all() for k in actions)


def test_timeline_takes_the_longer_of_alone_and_shared():
    sched = schedules.make("gpipe", 2, 2)
    # ticks: [F0.0 -] [F0.1 F1.0] [- F1.1] [- B1.0] [B0.0 B1.1] [B0.1 -]
    costs = [
        ActionCost(kind="F", virtual=0, together=2.0, alone=(1.0, 1.0)),
        ActionCost(kind="B", virtual=0, together=4.0, alone=(3.0, 3.0)),
    ]
    assert timeline(sched, costs) == pytest.approx(1 + 2 + 1 + 3 + 4 + 3)
    # devices that share nothing (alone == together): the plain lock-step timeline
    runs = (("1f1b", 4, 8), ("1f1b_paired", 2, 4), ("zb_h1", 2, 4), ("zb_paired", 4, 8))
    for kind, p, m in runs:
        sched = schedules.make(kind, p, m)
        cost = {"F": 1.0, "B": 2.5, "W": 0.75, "BW": 3.25}  # a fused B + W: both
        flat = [ActionCost(kind=k, virtual=0, together=c, alone=(c,) * p) for k, c in cost.items()]
        want = schedules.lockstep(sched, cost)[1]
        assert timeline(sched, flat) == pytest.approx(want)


@pytest.mark.parametrize(
    ("schedule", "kinds"),
    [("zb_h1", "F B W"), ("zb_paired", "F B BW W"), ("interleaved_1f1b", "F B")],
)
def test_training_profile_times_every_action_and_leaves_the_state_usable(schedule, kinds):
    model = models.LinenMLP(features=(32, 32, 32, 32, 8))
    x = np.random.default_rng(0).normal(size=(BATCH, 16)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(BATCH, 8)).astype(np.float32)
    params = fill(models.abstract_linen(model, x))

    def loss_fn(params, batch):
        return ((model.apply(params, batch[0]) - batch[1]) ** 2).mean()

    plan = autopipe.train(
        loss_fn, optax.adam(1e-2), params, (x, y), mesh=mesh(2), schedule=schedule,
        num_microbatches=4,
    )  # fmt: skip
    state = plan.init(params)
    prof = plan.profile(state, (x, y), repeats=1)
    v = plan.schedule.virtual_stages
    assert {(a.kind, a.virtual) for a in prof.actions} == {
        (k, i) for k in kinds.split() for i in range(v)
    }
    assert all(len(a.alone) == 2 and a.together >= 0 for a in prof.actions)
    assert prof.predicted == pytest.approx(prof.fixed + timeline(plan.schedule, prof.actions))
    assert prof.measured > 0 and prof.ticks == plan.schedule.num_ticks
    assert prof.cost_model == plan.predicted.step_time
    assert schedule in str(prof)
    # the profile ran on copies: the state trains on exactly as a fresh one does
    _, loss = plan.step(state, (x, y))
    _, fresh = plan.step(plan.init(params), (x, y))
    np.testing.assert_array_equal(loss, fresh)
    with pytest.raises(ValueError, match="repeats must be"):
        plan.profile(plan.init(params), (x, y), repeats=0)
