"""Training checkpoints with orbax: a `TrainState` saved sharded as it lives, restored in place.

Each array is written by the processes that hold its shards (orbax's sharded save), so no
stage's parameters or optimizer state are gathered; restoring needs a state of the same plan
(``trainer.init(params)``) whose shapes and shardings the saved arrays are read back onto.
`plan.unplace(state)` gives an ordinary pytree that any pytree checkpointer saves.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from autopipe._executable import TrainState, check_live


def _tree(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state}


def _manager(directory: str | os.PathLike) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)))


def save_checkpoint(directory: str | os.PathLike, state: TrainState, *, step: int) -> None:
    """Save ``state`` as checkpoint ``step`` under ``directory`` (every process calls this)."""
    if not isinstance(state, TrainState):
        raise TypeError(
            f"save_checkpoint: state is a {type(state).__name__}, not the TrainState that "
            "trainer.init / trainer.step return. Save trainer.unplace(state) with any pytree "
            "checkpointer instead if you want the plain parameters."
        )
    check_live(state, "save_checkpoint")
    with _manager(directory) as manager:
        manager.save(step, args=ocp.args.StandardSave(_tree(state)))
        manager.wait_until_finished()


def restore_checkpoint(
    directory: str | os.PathLike, like: TrainState, *, step: int | None = None
) -> tuple[TrainState, int]:
    """Restore checkpoint ``step`` (default: the latest) onto the shapes and shardings of
    ``like`` (a state of the same plan, e.g. ``trainer.init(params)``); returns the state and
    its step."""
    with _manager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"restore_checkpoint: no checkpoint under {os.fspath(directory)!r}; save one "
                "with autopipe.save_checkpoint(directory, state, step=...) first."
            )
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _tree(like)
        )
        tree = manager.restore(step, args=ocp.args.StandardRestore(target))
    state = TrainState(
        params=tuple(tree["params"]), opt_state=tree["opt_state"], frozen=like.frozen
    )
    return state, step
