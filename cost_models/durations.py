"""The action-duration model: seconds per schedule action from per-stage predicted times.

One model for the training planner (its predicted step and bubble), the pictures (`_viz`) and
bench, so that a drawn schedule's makespan is the plan's predicted step.

- Forward-only plans: a stage's time is its forward plus its send; every action is a forward.
- Training plans price a stage as forward + backward (+ one recomputed forward under remat);
  the backward costs `BACKWARD_FACTOR` × the forward (two matmuls per matmul). A schedule that
  splits the backward (ZB-H1) runs half of it as B (input gradients) and half as W (weight
  gradients); under remat B recomputes the stage's forward (W reads only what B stored). A B
  whose W runs in another tick also stores what that W reads (the tapped matmuls' cotangents
  and inputs) and the W reads it back: the stage's `Stage.store_time`, half on each; a B and
  W that share a cell (`Schedule.fused`) run as one backward and pay none of it.

Actions are read by field (``kind``: "F", "B" or "W"; ``stage``), as `passes.schedule.Action`
spells them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

BACKWARD_FACTOR = 2.0  # a backward costs about twice its forward (two matmuls per matmul)


def training_stage_scale(remat: bool) -> float:
    """A training stage's time in units of its forward: forward + backward (+ recompute)."""
    return 1 + BACKWARD_FACTOR + (1 if remat else 0)


def action_durations(
    stage_times: Sequence[float],
    *,
    training: bool,
    split_backward: bool = False,
    remat: Sequence[bool] = (),
    store_times: Sequence[float] = (),
    fused: Collection[Any] = frozenset(),
) -> Callable[[Any], float]:
    """Seconds of each action of a schedule whose stages take ``stage_times`` (the plan's
    `Stage.time`: forward + send for forward-only plans, the training total otherwise).
    ``store_times``: per stage, the seconds a split backward spends storing and re-reading
    what a W apart from its B needs (default none); ``fused``: the B and W actions that share
    a cell (`Schedule.fused`)."""
    if not training:
        return lambda a: stage_times[a.stage]
    remat = tuple(remat) or (False,) * len(stage_times)
    store = tuple(store_times) or (0.0,) * len(stage_times)
    fwd = [t / training_stage_scale(r) for t, r in zip(stage_times, remat, strict=True)]

    def duration(a: Any) -> float:
        if a.kind == "F":
            return fwd[a.stage]
        recompute = fwd[a.stage] if remat[a.stage] and a.kind == "B" else 0.0  # W: none
        if split_backward:  # B and W split the backward's two matmuls
            apart = 0.0 if a in fused else store[a.stage] / 2
            return fwd[a.stage] * BACKWARD_FACTOR / 2 + recompute + apart
        return fwd[a.stage] * BACKWARD_FACTOR + recompute

    return duration
