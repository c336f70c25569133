"""The action-duration model: seconds per schedule action from per-stage predicted times.

One model for the training planner (its predicted step and bubble), the pictures (`_viz`) and
bench, so that a drawn schedule's makespan is the plan's predicted step.

- Forward-only plans: a stage's time is its forward plus its send; every action is a forward.
- Training plans price a stage as forward + backward (+ one recomputed forward under remat);
  the backward costs `BACKWARD_FACTOR` × the forward (two matmuls per matmul). A schedule that
  splits the backward (ZB-H1) runs half of it as B (input gradients) and half as W (weight
  gradients); under remat the emitted step recomputes the stage's forward before B and before
  W alike, so both carry the recomputation.

Actions are read by field (``kind``: "F", "B" or "W"; ``stage``), as `passes.schedule.Action`
spells them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
) -> Callable[[Any], float]:
    """Seconds of each action of a schedule whose stages take ``stage_times`` (the plan's
    `Stage.time`: forward + send for forward-only plans, the training total otherwise)."""
    if not training:
        return lambda a: stage_times[a.stage]
    remat = tuple(remat) or (False,) * len(stage_times)
    fwd = [t / training_stage_scale(r) for t, r in zip(stage_times, remat, strict=True)]

    def duration(a: Any) -> float:
        if a.kind == "F":
            return fwd[a.stage]
        recompute = fwd[a.stage] if remat[a.stage] and a.kind == "B" else 0.0  # W: none
        if split_backward:  # B and W split the backward's two matmuls
            return fwd[a.stage] * BACKWARD_FACTOR / 2 + recompute
        return fwd[a.stage] * BACKWARD_FACTOR + recompute

    return duration
