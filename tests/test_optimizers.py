"""Every optax optimizer either equals single-device training or is refused, never run wrongly.

Pipelined training (pp = 2, 1F1B, m = 4) for 3 steps against a single-device reference that
does the pipeline's arithmetic: each microbatch's gradient of ``loss / m`` added in microbatch
order, then the same optax update on the user's parameter tree. The MLP has no parameter whose
gradient is zero in exact arithmetic, so sign-based and tiny-eps optimizers (lion, adam with
eps 1e-8) see real gradients, not float noise; float32 agreement is ~1e-7.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autopipe
from autopipe import models
from conftest import BATCH, fill, mesh, reference_training

M, STEPS = 4, 3


def _ndim_mask(params):
    return jax.tree.map(lambda x: x.ndim > 1, params)


def _by_ndim(params):
    return jax.tree.map(lambda x: "matrix" if x.ndim > 1 else "vector", params)


def _by_name(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "decay" if "kernel" in jax.tree_util.keystr(path) else "plain", params
    )


EXACT = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw_ndim_mask": lambda: optax.adamw(1e-2, weight_decay=0.3, mask=_ndim_mask),
    "lamb": lambda: optax.lamb(1e-2),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(1e-2),
    "muon": lambda: optax.contrib.muon(1e-2),
    "rmsprop": lambda: optax.rmsprop(1e-2),
    "clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(1e-2)),
    "multi_transform_ndim": lambda: optax.multi_transform(
        {"matrix": optax.adamw(1e-2), "vector": optax.sgd(0.1)}, _by_ndim
    ),
    "multi_steps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
    "warmup_cosine": lambda: optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
}
QUICK = {"sgd", "adamw_ndim_mask", "clip_adamw"}  # lamb and adamw masks: also tests/test_layout.py


@functools.cache
def _task():
    model = models.LinenMLP(features=(32, 32, 24, 8))
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(BATCH, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(BATCH, 8)), jnp.float32)

    def loss_fn(params, batch):
        return jnp.mean((model.apply(params, batch[0]) - batch[1]) ** 2)

    return loss_fn, fill(models.abstract_linen(model, x)), (x, y)


def _reference(optimizer):
    return reference_training(*_task(), M, 1, optimizer, STEPS)


@pytest.mark.parametrize(
    "name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in EXACT]
)
def test_optimizer_equals_single_device_training(name):
    loss_fn, params, batch = _task()
    trainer = autopipe.train(
        loss_fn, EXACT[name](), params, batch, mesh=mesh(2), schedule="1f1b", num_microbatches=M
    )
    state, losses = trainer.init(params), []
    for _ in range(STEPS):
        state, loss = trainer.step(state, batch)
        losses.append(float(loss))
    want_losses, want = _reference(EXACT[name]())
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(trainer.unplace(state)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        (
            lambda: optax.multi_transform(
                {"decay": optax.adamw(1e-2), "plain": optax.sgd(0.1)}, _by_name
            ),
            "decides by the leaf's path",
        ),
        (
            lambda: optax.chain(optax.clip_by_global_norm(0.1), optax.lamb(1e-2)),
            "also computes per-leaf statistics",
        ),
    ],
    ids=["labels by name", "global norm then per-leaf norm"],
)
def test_optimizers_that_cannot_be_exact_are_refused(optimizer, match):
    loss_fn, params, batch = _task()
    with pytest.raises(ValueError, match=match):
        autopipe.train(loss_fn, optimizer(), params, batch, mesh=mesh(2), num_microbatches=M)


def test_adam_updates_its_moments_in_place():
    """The update of an optimizer that reads no shapes runs on each device's ``(1, *shape)``
    blocks as they are: XLA writes adam's moments into their donated buffers, where dropping
    and restoring the leading axis made it copy every moment (one stage's parameter bytes per
    moment) at the start of the step."""
    loss_fn, params, batch = _task()
    plan = autopipe.train(
        loss_fn, optax.adam(1e-2), params, batch, mesh=mesh(2), num_microbatches=M
    )
    hlo = plan.compiled.as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    state = set(re.findall(r"%(param[.\d]*) = [^\n]*op_name=\"opt_state", entry))
    assert len(state) >= 2 * len(jax.tree.leaves(params))  # mu and nu are entry parameters
    copied = set(re.findall(r"= \S+ copy\(%(param[.\d]*)\)", entry))
    assert not state & copied
