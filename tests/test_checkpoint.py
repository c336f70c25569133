"""Checkpoints: a training state saved at step 3 and restored gives the same steps 4-6 as an
uninterrupted run; unplaced parameters save and load as an ordinary pytree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import autopipe
from autopipe import models
from conftest import BATCH, fill, mesh


def _task():
    model = models.LinenMLP(features=(32, 32, 32, 8))
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(BATCH, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(BATCH, 8)), jnp.float32)

    def loss_fn(params, batch):
        return jnp.mean((model.apply(params, batch[0]) - batch[1]) ** 2)

    return model, loss_fn, fill(models.abstract_linen(model, x)), (x, y)


def test_restored_state_resumes_with_identical_losses(tmp_path):
    _, loss_fn, params, batch = _task()
    trainer = autopipe.train(
        loss_fn, optax.adamw(1e-2), params, batch, mesh=mesh(2, dp=2), num_microbatches=2
    )
    state, straight = trainer.init(params), []
    for step in range(1, 7):
        state, loss = trainer.step(state, batch)
        straight.append(float(loss))
        if step == 3:
            autopipe.save_checkpoint(tmp_path / "ckpt", state, step=step)
    restored, step = autopipe.restore_checkpoint(tmp_path / "ckpt", trainer.init(params))
    assert step == 3
    resumed = []
    for _ in range(3):
        restored, loss = trainer.step(restored, batch)
        resumed.append(float(loss))
    assert resumed == straight[3:]  # the same program on the same values: bit-identical
    for a, b in zip(
        jax.tree.leaves(trainer.unplace(restored)),
        jax.tree.leaves(trainer.unplace(state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_unplaced_parameters_load_into_the_plain_model(tmp_path):
    model, loss_fn, params, batch = _task()
    trainer = autopipe.train(
        loss_fn, optax.sgd(0.1), params, batch, mesh=mesh(2), num_microbatches=2
    )
    state, _ = trainer.step(trainer.init(params), batch)
    trained = trainer.unplace(state)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "params", trained)
    checkpointer.wait_until_finished()
    loaded = checkpointer.restore(tmp_path / "params", jax.tree.map(np.zeros_like, trained))
    np.testing.assert_array_equal(model.apply(loaded, batch[0]), model.apply(trained, batch[0]))


def test_errors_for_checkpoints(tmp_path):
    with pytest.raises(TypeError, match="not the TrainState"):
        autopipe.save_checkpoint(tmp_path / "x", {"w": jnp.ones(3)}, step=0)
    _, loss_fn, params, batch = _task()
    trainer = autopipe.train(
        loss_fn, optax.sgd(0.1), params, batch, mesh=mesh(2), num_microbatches=2
    )
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        autopipe.restore_checkpoint(tmp_path / "empty", trainer.init(params))


def test_a_donated_state_is_refused_with_a_clear_error(tmp_path):
    """plan.step donates its state. Reusing the old state, a common slip, crashed the process on
    jax 0.10.2's CPU client (SIGSEGV on the donated buffer); now every consumer refuses it."""
    _, loss_fn, params, batch = _task()
    trainer = autopipe.train(
        loss_fn, optax.sgd(0.1), params, batch, mesh=mesh(2), num_microbatches=2
    )
    old = trainer.init(params)
    new, _ = trainer.step(old, batch)
    calls = {
        "plan.step": lambda: trainer.step(old, batch),
        "plan.unplace": lambda: trainer.unplace(old),
        "save_checkpoint": lambda: autopipe.save_checkpoint(tmp_path / "c", old, step=0),
    }
    for where, call in calls.items():
        with pytest.raises(ValueError, match=rf"{where}.*donated to an earlier plan\.step"):
            call()
    with pytest.raises(TypeError, match="not the TrainState"):
        trainer.step(trainer.unplace(new), batch)
    new = jax.block_until_ready(new)  # a pytree of its arrays
    assert len(jax.tree.leaves(new)) == len(jax.tree.leaves((new.params, new.opt_state)))
    with pytest.raises(TypeError, match=r"plan\.step for .*cannot be traced.*outside jax\.jit"):
        jax.jit(trainer.step)(new, batch)
    with pytest.raises(TypeError, match=r"plan\.init for .*cannot be traced"):
        jax.jit(trainer.init)(params)
    trainer.step(new, batch)  # the returned state is fine
