"""Shared test set-up: 8 simulated CPU devices and small reference models with fixed values."""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from autopipe import models  # noqa: E402

BATCH = 8
GPT = models.GPTConfig(vocab=64, seq=8, d_model=32, heads=2, layers=4, mlp_ratio=2)


def fill(abstract, seed: int = 0):
    """Deterministic values for an abstract variable tree (BatchNorm variances kept positive)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        value = rng.normal(0.0, 0.3, size=x.shape)
        if jax.tree_util.keystr(path).endswith("['var']"):
            value = np.abs(value) + 0.5
        return jnp.asarray(value, x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def microbatch_grads(grad_fn, params, batch, m: int, dp: int = 1, extra=lambda k: ()):
    """One training step's loss and gradient as a pipeline sums them, on one device: replica r's
    microbatch j is global microbatch k = r·m + j, the rows ``k·mb … (k+1)·mb`` of ``batch``;
    ``grad_fn(params, rows, *extra(k))`` (a value_and_grad of the scaled loss) is added in
    microbatch order within a replica, replicas summed after. Returns (sum of losses, grads)."""
    mb = jax.tree.leaves(batch)[0].shape[0] // (m * dp)
    loss, total = 0.0, None
    for r in range(dp):
        acc = None
        for j in range(m):
            k = r * m + j
            rows = jax.tree.map(lambda x, k=k: x[k * mb : (k + 1) * mb], batch)
            part, g = grad_fn(params, rows, *extra(k))
            loss += float(part)
            acc = g if acc is None else tree_add(acc, g)
        total = acc if total is None else tree_add(total, acc)
    return loss, total


@jax.jit
def tree_add(a, b):
    """Leafwise a + b, compiled once per tree structure (the eager map compiles each leaf's
    add on its own)."""
    return jax.tree.map(jnp.add, a, b)


def update_fn(optimizer):
    """``(grads, state, params) -> (params, state)``: the optax update and its application,
    compiled as one program as the pipeline's step compiles it."""

    def update(grads, state, params):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(update)


def reference_training(loss_fn, params, batch, m: int, dp: int, optimizer, steps: int):
    """Single-device training that does the pipeline's arithmetic: per step, the gradient of
    ``loss / (m·dp)`` summed over the microbatches as `microbatch_grads` does, then the same
    optax update. Per-step losses and final parameters."""
    scale = 1.0 / (m * dp)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b) * scale))
    update = update_fn(optimizer)
    state = optimizer.init(params)
    losses = []
    for _ in range(steps):
        loss, grads = microbatch_grads(grad_fn, params, batch, m, dp)
        params, state = update(grads, state, params)
        losses.append(loss)
    return np.array(losses), params


def _linen(model, x):
    return model.apply, (fill(models.abstract_linen(model, x)), x)


def _cases() -> dict:
    tokens = models.make_tokens(GPT, BATCH)
    features = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, 16)), jnp.float32)
    images = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, 8, 8, 3)), jnp.float32)
    gpt_fn, (gpt_vars, _) = _linen(models.LinenGPT(GPT), tokens)
    nnx_mlp = models.abstract_nnx(lambda: models.NnxMLP((16, 32, 32, 32, 8), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(nnx_mlp)
    scanned = models.ScannedLinenGPT(GPT)
    return {
        "linen_mlp": _linen(models.LinenMLP(features=(32, 32, 32, 8)), features),
        "nnx_mlp": (lambda m, x: m(x), (nnx.merge(graphdef, fill(state)), features)),
        "linen_gpt": (gpt_fn, (gpt_vars, tokens)),
        "nnx_gpt": (lambda m, t: m(t), (models.nnx_gpt_from_linen(GPT, gpt_vars), tokens)),
        "scanned_gpt": (
            scanned.apply,
            (models.stack_linen_gpt_params(gpt_vars, GPT.layers), tokens),
        ),
        "cnn": _linen(models.LinenCNN(), images),
    }


@pytest.fixture(scope="session")
def cases() -> dict:
    return _cases()


def mesh(pp: int, **other: int):
    names = ("pp", *other)
    shape = (pp, *other.values())
    return jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])
