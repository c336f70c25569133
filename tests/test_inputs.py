"""Inputs that are not trained (issue 13): int/bool values between stages, PRNG keys, dropout.

Pipelined training equals a single-device reference that does the pipeline's arithmetic
(`_reference`: the same microbatches, gradients of ``loss / (m·dp)`` summed in microbatch
order, replicas after, the same optax update) and the documented dropout convention
(microbatch ``r·m + j`` draws from ``jax.random.fold_in(key, r·m + j)``), so float32 agreement
is ~1e-7 and the tolerance is rtol 1e-5. The dropout decoder is `LinenGPT2` as
written, its head tied to the token embedding (tests/test_tied.py covers tied training alone).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autopipe
from autopipe import library_models as lm
from autopipe import models
from conftest import BATCH, fill, mesh, microbatch_grads, update_fn

CFG = lm.DecoderConfig(layers=2)  # 2 blocks keep compiles short; still ≥ 4 stages of operators
STEPS = 3
OPTIMIZER = optax.adamw(1e-2, eps=1e-3)  # eps: see tests/test_training.py (zero gradients)
RTOL, ATOL = 1e-5, 1e-6
PAD = 0
SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_paired"]
# (pp, m, dp): the grid; the default run takes a few of them (`DEFAULT`)
GRID = [(2, 4, 1), (2, 8, 1), (4, 4, 1), (4, 8, 1), (2, 4, 2)]
DEFAULT = {("bert", "1f1b", (2, 4, 1)), ("dropout_gpt2", "zb_h1", (2, 4, 1))}  # dp: the masks test


# --- tasks ---------------------------------------------------------------------------------


def _bert_task():
    """BERT fine-tuned for classification; the padding mask is computed from the tokens
    (``tokens != PAD``) in the first stage and read by every block (a bool crossing stages)."""
    rng = np.random.default_rng(0)
    lengths = np.array([8, 3, 5, 8, 1, 6, 7, 2])
    tokens = rng.integers(1, CFG.vocab, (BATCH, CFG.seq))
    tokens = np.where(np.arange(CFG.seq)[None] < lengths[:, None], tokens, PAD)
    types = (np.arange(CFG.seq)[None] >= 4).astype(np.int32).repeat(BATCH, 0)
    labels = rng.integers(0, CFG.classes, (BATCH,))
    batch = tuple(jnp.asarray(a, jnp.int32) for a in (tokens, types, labels))
    model = lm.LinenBert(CFG)

    def loss_fn(params, batch):
        tokens, types, labels = batch
        logits = model.apply(params, tokens, tokens != PAD, types)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), batch[0], batch[0] != PAD, batch[1])
    )
    return loss_fn, fill(abstract), batch, False


def _dropout_gpt2_task():
    """GPT-2 (tied head) with dropout in training mode; the key is a non-batch argument."""
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab, (BATCH, CFG.seq)))
    tokens = tokens.astype(jnp.int32)
    labels = jnp.roll(tokens, -1, axis=1)
    model = lm.LinenGPT2(CFG, deterministic=False)

    def loss_fn(params, batch, key):
        t, lab = batch
        logits = model.apply(params, t, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, lab).mean()

    abstract = models.abstract_linen(lm.LinenGPT2(CFG), tokens)
    return loss_fn, fill(abstract), (tokens, labels), True


TASKS = {"bert": _bert_task, "dropout_gpt2": _dropout_gpt2_task}


@functools.cache
def _task(name):
    return TASKS[name]()


def _step_keys():
    return [jax.random.fold_in(jax.random.key(7), s) for s in range(STEPS)]


# --- the reference -------------------------------------------------------------------------


@functools.cache
def _grad_fn(loss_fn, m, dp):
    scale = 1.0 / (m * dp)
    return jax.jit(jax.value_and_grad(lambda p, b, *k: loss_fn(p, b, *k) * scale))


def _microbatch_grads(loss_fn, params, batch, key, m, dp):
    """Gradient and loss of one step as the pipeline sums them (see the module docstring)."""
    args = lambda k: () if key is None else (jax.random.fold_in(key, k),)  # noqa: E731
    return microbatch_grads(_grad_fn(loss_fn, m, dp), params, batch, m, dp, args)


@functools.cache
def _reference(name, m, dp):
    loss_fn, params, batch, keyed = _task(name)
    update = update_fn(OPTIMIZER)
    state = OPTIMIZER.init(params)
    losses = []
    for key in _step_keys():
        loss, grads = _microbatch_grads(loss_fn, params, batch, key if keyed else None, m, dp)
        params, state = update(grads, state, params)
        losses.append(loss)
    return np.array(losses), params


def _max_rel(got, want) -> float:
    rel = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(b)), 1e-30))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    ]
    return max(rel)


def _check(name, schedule, pp, m, dp):
    loss_fn, params, batch, keyed = _task(name)
    args = (jax.random.key(0),) if keyed else ()
    plan = autopipe.train(
        loss_fn,
        OPTIMIZER,
        params,
        batch,
        *args,
        mesh=mesh(pp, dp=dp) if dp > 1 else mesh(pp),
        schedule=schedule,
        num_microbatches=m,
    )
    state = plan.init(params)
    losses = []
    for key in _step_keys():
        state, loss = plan.step(state, batch, *((key,) if keyed else ()))
        losses.append(float(loss))
    want_losses, want = _reference(name, m, dp)
    got = plan.unplace(state)
    np.testing.assert_allclose(losses, want_losses, rtol=RTOL)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    return float(np.max(np.abs(np.array(losses) / want_losses - 1))), _max_rel(got, want)


def _grid(default: bool):
    cases = itertools.product(TASKS, SCHEDULES, GRID)
    return [
        (n, s, g)
        for n, s, g in cases
        if ((n, s, g) in DEFAULT) == default
        and not (s == "interleaved_1f1b" and g[1] % g[0])  # interleaved: m divisible by p
    ]


@pytest.mark.parametrize(("name", "schedule", "grid"), _grid(default=True))
def test_training_with_masks_and_dropout_matches_microbatch_reference(name, schedule, grid):
    _check(name, schedule, *grid)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "schedule", "grid"), _grid(default=False))
def test_training_with_masks_and_dropout_rest_of_grid(name, schedule, grid):
    _check(name, schedule, *grid)


# --- int/bool values between stages, inputs that are not trained ----------------------------


def _mlp_loss(p, batch, *inputs):
    """Ints and bools made in the first layers, read after a stage boundary; optional
    inputs: a raw uint32 key and an int step counter."""
    x, y = batch
    mask, count = x != 0, x.sum(-1, keepdims=True)
    h = x.astype(jnp.float32)
    for i in range(4):
        h = jnp.tanh(h @ p[f"w{i}"])
        if inputs:
            raw, step = inputs
            keep = jax.random.bernoulli(jax.random.fold_in(raw, i), 0.75, h.shape)
            h = jnp.where(keep, h / 0.75, 0.0) * (1.0 + 0.0 * step)
    h = jnp.where(mask, h, 0.0) + 0.01 * count
    return jnp.mean((h - y) ** 2)


def _mlp_data():
    rng = np.random.default_rng(2)
    params = {f"w{i}": jnp.asarray(rng.normal(size=(16, 16)) * 0.3, jnp.float32) for i in range(4)}
    x = jnp.asarray(rng.integers(0, 3, (BATCH, 16)), jnp.int32)
    y = jnp.asarray(rng.normal(size=(BATCH, 16)), jnp.float32)
    return params, (x, y)


@pytest.mark.parametrize("remat", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_int_bool_values_and_raw_key_and_counter_inputs(remat):
    """A raw uint32 key and an int counter are inputs: passed to `step`, not trained, no
    optimizer state; ints/bools cross the stage boundary without a cotangent."""
    params, batch = _mlp_data()
    raw, step = jax.random.PRNGKey(3), jnp.int32(0)
    plan = autopipe.train(
        _mlp_loss, optax.adam(1e-2), params, batch, raw, step,
        mesh=mesh(2), schedule="1f1b", num_microbatches=4, remat=remat,
    )  # fmt: skip
    assert plan.program.inputs and not plan.program.inputs & set(plan.program.param_invars)
    state = plan.init(params)
    adam_state = state.opt_state[0]  # optimizer state only for the float parameter slots
    assert [x.shape for x in adam_state.mu] == [b.shape for b in state.params]
    assert all(jnp.issubdtype(b.dtype, jnp.floating) for b in state.params)
    opt, ref_state, ref = optax.adam(1e-2), optax.adam(1e-2).init(params), params
    for s in range(STEPS):
        key = jax.random.fold_in(raw, s)
        state, loss = plan.step(state, batch, key, jnp.int32(s))
        want_loss, grads = _microbatch_grads(
            lambda p, b, k, s=s: _mlp_loss(p, b, k, jnp.int32(s)), ref, batch, key, 4, 1
        )
        updates, ref_state = opt.update(grads, ref_state, ref)
        ref = optax.apply_updates(ref, updates)
        np.testing.assert_allclose(float(loss), want_loss, rtol=RTOL)
    for k in params:
        np.testing.assert_allclose(plan.unplace(state)[k], ref[k], rtol=RTOL, atol=ATOL)


# --- dropout: the convention, masks, rate -------------------------------------------------

RATE = 0.3


def _keep_mask(params, x, key):
    """The dropout keep-mask a stage draws (as floats), after a batch-dependent operator."""
    h = jnp.tanh(x @ params["w"])
    keep = jax.random.bernoulli(key, 1.0 - RATE, h.shape)
    return jnp.where(keep, 1.0, 0.0) + 0.0 * h


def test_dropout_masks_follow_the_convention_and_the_rate():
    """Microbatch j draws from fold_in(key, j): masks equal `autopipe.microbatch_reference`,
    differ between microbatches and between steps, and drop RATE of the entries (within 3σ)."""
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
    m = 4
    plan = autopipe.plan(
        _keep_mask, params, x, jax.random.key(0), mesh=mesh(2, dp=2), num_microbatches=m
    )
    masks = []
    for step in range(2):
        key = jax.random.fold_in(jax.random.key(5), step)
        got = np.asarray(plan(params, x, key))
        want = autopipe.microbatch_reference(_keep_mask, params, x, key, num_microbatches=m * 2)
        np.testing.assert_array_equal(got, np.concatenate(want))
        masks.append(got.reshape(m * 2, -1))
    blocks = np.concatenate(masks)  # (steps · microbatches, entries)
    assert len({b.tobytes() for b in blocks}) == len(blocks)  # no two masks alike
    n = blocks.size
    dropped = 1.0 - blocks.mean()
    sigma = np.sqrt(RATE * (1 - RATE) / n)
    assert abs(dropped - RATE) < 3 * sigma, (dropped, RATE, sigma)


def test_closed_over_key_warns():
    key = jax.random.key(0)
    params = {"w": jnp.ones((8, 8))}
    fn = lambda p, x: jax.random.bernoulli(key, 0.5, x.shape) * jnp.tanh(x @ p["w"])  # noqa: E731
    with pytest.warns(autopipe.ConstantKeyWarning, match="constant of the traced function"):
        autopipe.plan(fn, params, jnp.ones((8, 8)), mesh=mesh(2), num_microbatches=2)


def test_errors_for_inputs():
    params, batch = _mlp_data()
    with_int = {**params, "table": jnp.arange(16)}

    def reads_int(p, b):
        return _mlp_loss({k: v for k, v in p.items() if k != "table"}, b) + p["table"].sum()

    with pytest.raises(ValueError, match=r"parameter args\[0\]\['table'\] is a int32\[16\] leaf"):
        autopipe.train(reads_int, optax.sgd(0.1), with_int, batch, mesh=mesh(2), compile=False)
    keys = jax.random.split(jax.random.key(0), BATCH + 1)  # one too many per-example keys

    def per_example(p, b):
        (x, y), k = b
        return _mlp_loss(p, (x, y)) + 0.0 * jax.vmap(jax.random.uniform)(k).sum()

    with pytest.raises(ValueError, match=r"looks like a PRNG key: per-example keys need the batch"):
        autopipe.train(per_example, optax.sgd(0.1), params, (batch, keys), mesh=mesh(2))


def _per_example_loss(p, batch):
    """Per-example keys (a batch argument) split in the first stage, read in every layer: typed
    keys cross stage boundaries (as their key data) and are not folded."""
    x, y, keys = batch
    ks = jax.vmap(lambda k: jax.random.split(k, 4))(keys)
    h = x.astype(jnp.float32)
    for i in range(4):
        h = jnp.tanh(h @ p[f"w{i}"])
        keep = jax.vmap(lambda k, n=h.shape[1:]: jax.random.bernoulli(k, 0.75, n))(ks[:, i])
        h = jnp.where(keep, h / 0.75, 0.0)
    return jnp.mean((h - y) ** 2)


def test_per_example_keys_cross_stages():
    params, (x, y) = _mlp_data()
    batch = (x, y, jax.random.split(jax.random.key(1), BATCH))
    plan = autopipe.train(
        _per_example_loss, optax.sgd(0.1), params, batch, mesh=mesh(2), num_microbatches=4
    )
    assert any(s.key is not None for st in plan.layouts for _, ss in st.recv.slots for s in ss)
    state, loss = plan.step(plan.init(params), batch)
    rows = lambda j: jax.tree.map(lambda a: a[2 * j : 2 * j + 2], batch)  # noqa: E731
    want_loss, grads = jax.value_and_grad(
        lambda p: sum(_per_example_loss(p, rows(j)) for j in range(4)) / 4
    )(params)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=RTOL)
    got = plan.unplace(state)
    for k in params:
        np.testing.assert_allclose(got[k], params[k] - 0.1 * grads[k], rtol=RTOL, atol=ATOL)


def test_nnx_dropout_key_inside_the_module_is_refused_for_training():
    """An NNX module in training mode reads its own dropout key: constant across steps, and a
    non-float leaf of the trained argument. Refused, with the fix."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(16, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

        def __call__(self, x):
            return self.b(self.drop(jnp.tanh(self.a(x))))

    net = Net(nnx.Rngs(0))
    _, (x, y) = _mlp_data()

    def loss_fn(model, batch):
        return jnp.mean((model(batch[0].astype(jnp.float32)) - batch[1]) ** 2)

    refused = r"\['key'\]\.value \(1 more such leaves\) is a key<fry>\[\] leaf .* nnx\.reseed"
    with pytest.raises(ValueError, match=refused):
        autopipe.train(loss_fn, optax.sgd(0.1), net, (x, y), mesh=mesh(2), compile=False)
