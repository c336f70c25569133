"""Training with parameters read by stages on several devices: GPT-2's tied embedding.

`LinenGPT2` / `NnxGPT2` (autopipe.library_models) read the token embedding in the first stage
(lookup) and the last (output head, ``wte.attend``). Each holder keeps a copy; the step sums
the copies' gradients and gives every copy the same update (`autopipe.passes.shared_params`).
Checked against the microbatch-ordered single-device reference of tests/test_training.py (same
microbatches in the same order, then the same optax update; rtol 1e-5, atol 1e-6 as there,
AdamW eps 1e-3 for the reason given there), and the copies' raw slot rows compared bit for bit
after every step. Dropout is off (``deterministic=True``, NNX ``eval()``).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import autopipe
from autopipe import library_models as lm
from autopipe import models
from conftest import GPT, fill, mesh, microbatch_grads, update_fn

CFG = lm.DecoderConfig(layers=2)  # two blocks: enough for 4 stages, quicker to compile
BATCH = 16
STEPS = 3
RTOL, ATOL = 1e-5, 1e-6
ADAMW = optax.adamw(1e-2, eps=1e-3)
# max_norm below the gradient's global norm (asserted in the reference), so the clip scales
# every step and a tied leaf counted once per copy would change the scale
CLIP_NORM = 0.1
OPTIMIZERS = {
    "adamw": ADAMW,
    "clip_adamw": optax.chain(optax.clip_by_global_norm(CLIP_NORM), ADAMW),
    "lamb": optax.lamb(1e-2, eps=1e-3),  # per leaf: its trust ratio on each whole copy
}


def _tokens_batch():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab, (BATCH, CFG.seq)))
    tokens = tokens.astype(jnp.int32)
    return tokens, (tokens, jnp.roll(tokens, -1, axis=1))


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _linen_task():
    tokens, batch = _tokens_batch()
    linen = lm.LinenGPT2(CFG)  # deterministic=True: no dropout
    return (lambda p, b: _xent(linen.apply(p, b[0]), b[1])), _gpt2_vars(), batch


def _gpt2_vars():
    tokens, _ = _tokens_batch()
    return fill(models.abstract_linen(lm.LinenGPT2(CFG), tokens))


def _nnx_task():
    _, batch = _tokens_batch()
    module = lm.nnx_gpt2_from_linen(CFG, _gpt2_vars())  # eval mode: no dropout
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss_fn(p, b):  # the parameters trained; the dropout modules' key state closed over
        return _xent(nnx.merge(graphdef, p, rest)(b[0]), b[1])

    return loss_fn, params, batch


class _ScannedTied(nn.Module):
    """Blocks in one ``nn.scan`` (stacked leaves, rows on different stages) between a token
    embedding and the head tied to it."""

    config: models.GPTConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.config
        wte = nn.Embed(cfg.vocab, cfg.d_model, name="wte")
        blocks = nn.scan(
            models._LinenScanBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=cfg.layers,
        )
        x, _ = blocks(cfg, name="blocks")(wte(tokens), None)
        return wte.attend(nn.LayerNorm(name="ln_f")(x))


def _scanned_task(layers: int):
    cfg = dataclasses.replace(GPT, layers=layers)
    model = _ScannedTied(cfg)
    tokens = models.make_tokens(cfg, BATCH)
    batch = (tokens, jnp.roll(tokens, -1, axis=1))
    params = fill(models.abstract_linen(model, tokens))
    return (lambda p, b: _xent(model.apply(p, b[0]), b[1])), params, batch


def _bias_task():
    """``w`` read by the first and the last stage, ``b`` by every stage."""
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.normal(0, 0.3, (16, 32)), jnp.float32),
        "ws": [jnp.asarray(rng.normal(0, 0.2, (32, 32)), jnp.float32) for _ in range(8)],
        "b": jnp.asarray(rng.normal(0, 0.3, (32,)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(BATCH, 16)), jnp.float32)

    def loss_fn(p, x):
        h = jnp.tanh(x @ p["w"])
        for w in p["ws"]:
            h = jnp.tanh(h @ w + p["b"])
        return jnp.mean((h @ p["w"].T - x) ** 2)

    return loss_fn, params, x


TASKS = {
    "linen": _linen_task,
    "nnx": _nnx_task,
    # two blocks: quick; four where the plan has four stages (with two, a stage boundary falls
    # where an integer value crosses it, which training does not support yet: issue 13)
    "scanned": functools.partial(_scanned_task, 2),
    "scanned4": functools.partial(_scanned_task, 4),
    "bias": _bias_task,
}


@functools.cache
def _task(name: str):
    return TASKS[name]()


@functools.cache
def _reference(style: str, opt: str, m: int, dp: int = 1):
    """Per-step losses and final parameters of single-device training with the pipeline's
    arithmetic: microbatch j of replica r is rows ``(r·m + j)·mb …``, gradients of
    ``loss / (m·dp)`` added in that order, then the optax update."""
    loss_fn, params, batch = _task(style)
    optimizer = OPTIMIZERS[opt]
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b) / (m * dp)))
    update = update_fn(optimizer)
    state = optimizer.init(params)
    losses = []
    for _ in range(STEPS):
        loss, total = microbatch_grads(grad_fn, params, batch, m, dp)
        if opt == "clip_adamw":
            assert float(optax.tree.norm(total)) > CLIP_NORM  # the clip is active
        params, state = update(total, state, params)
        losses.append(loss)
    return np.array(losses), params


def _copies_equal(plan, state) -> int:
    """Asserts every shared value's rows are bit-identical on its holders; returns how many
    shared values there are."""
    shared = plan.emitted.params.shared
    for k, _, holders in shared:
        rows = np.asarray(state.params[k])
        for h in holders[1:]:
            assert rows[h].tobytes() == rows[holders[0]].tobytes(), (k, holders)
    return len(shared)


@functools.cache
def _plan(style, schedule, pp, m, dp=1, opt="adamw"):
    loss_fn, params, batch = _task(style)
    return autopipe.train(
        loss_fn,
        OPTIMIZERS[opt],
        params,
        batch,
        mesh=mesh(pp, dp=dp) if dp > 1 else mesh(pp),
        schedule=schedule,
        num_microbatches=m,
    )


def _check(style, schedule, pp, m, dp=1, opt="adamw"):
    _, params, batch = _task(style)
    plan = _plan(style, schedule, pp, m, dp, opt)
    state = plan.init(params)
    assert _copies_equal(plan, state) >= 1
    losses = []
    for _ in range(STEPS):
        state, loss = plan.step(state, batch)
        losses.append(float(loss))
        _copies_equal(plan, state)
    want_losses, want_params = _reference(style, opt, m, dp)
    np.testing.assert_allclose(losses, want_losses, rtol=RTOL, atol=ATOL)
    got = plan.unplace(state)
    assert jax.tree.structure(got) == jax.tree.structure(want_params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    return plan


SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_paired")
# the default run: one GPT-2 case (global-mode optimizer); the cheap bias model below covers
# local mode, 4 holders, interleaving and the data axis; the rest of the grid is slow
DEFAULT = {("linen", "1f1b", 2, 4, 1, "clip_adamw")}


def _grid():
    cases = [
        (style, schedule, pp, m, 1, opt)
        for style in ("linen", "nnx")
        for schedule in SCHEDULES
        for pp in (2, 4)
        for m in (4, 8)
        for opt in ("adamw", "clip_adamw")
    ]
    cases += [
        (style, schedule, 2, 4, 2, opt)
        for style in ("linen", "nnx")
        for schedule in SCHEDULES
        for opt in ("adamw", "clip_adamw")
    ]
    for case in cases:
        marks = () if case in DEFAULT else (pytest.mark.slow,)
        yield pytest.param(*case, marks=marks, id="-".join(map(str, case)))


@pytest.mark.parametrize(("style", "schedule", "pp", "m", "dp", "opt"), list(_grid()))
def test_tied_gpt2_trains_like_single_device(style, schedule, pp, m, dp, opt):
    plan = _check(style, schedule, pp, m, dp, opt)
    wte = "['params']['wte']['embedding']" if style == "linen" else "['wte']['embedding'].value"
    assert plan.shared_params == ((f"args[0]{wte}", (0, plan.num_stages - 1)),)
    assert "shared parameters" in plan.summary()
    assert autopipe.PlanRecord.from_json(plan.to_json()).shared_params == plan.shared_params


@pytest.mark.parametrize(
    ("schedule", "pp", "dp", "opt"),
    [
        ("1f1b", 4, 1, "adamw"),
        ("interleaved_1f1b", 2, 2, "clip_adamw"),
        ("zb_h1", 4, 1, "lamb"),
        ("zb_paired", 4, 2, "adamw"),  # copies' gradients from fused and moved W's
        pytest.param("zb_h1", 4, 1, "clip_adamw", marks=pytest.mark.slow),
        pytest.param("gpipe", 4, 2, "adamw", marks=pytest.mark.slow),
    ],
)
def test_a_bias_read_by_every_stage_trains_like_single_device(schedule, pp, dp, opt):
    """``b`` has a copy on every device (the ring of `sum_copies` over all holders), ``w`` on
    the first and the last."""
    plan = _check("bias", schedule, pp, 4, dp, opt)
    held = {path: {s % pp for s in st} for path, st in plan.shared_params}
    assert held == {"args[0]['b']": set(range(pp)), "args[0]['w']": {0, pp - 1}}


@pytest.mark.parametrize(
    ("task", "schedule", "pp"),
    [
        pytest.param("scanned", "1f1b", 2, marks=pytest.mark.slow),  # nn.scan: test_training
        pytest.param("scanned4", "1f1b", 4, marks=pytest.mark.slow),
        pytest.param("scanned4", "interleaved_1f1b", 2, marks=pytest.mark.slow),
    ],
)
def test_tied_embedding_around_scanned_blocks(task, schedule, pp):
    plan = _check(task, schedule, pp, 4)
    assert [p for p, _ in plan.shared_params] == ["args[0]['params']['wte']['embedding']"]


def test_tied_state_checkpoints_and_resumes(tmp_path):
    _, params, batch = _task("linen")
    plan = _plan("linen", "1f1b", 2, 4, 1, "clip_adamw")
    state, straight = plan.init(params), []
    for step in range(1, 5):
        state, loss = plan.step(state, batch)
        straight.append(float(loss))
        if step == 2:
            autopipe.save_checkpoint(tmp_path / "ckpt", state, step=step)
    restored, _ = autopipe.restore_checkpoint(tmp_path / "ckpt", plan.init(params))
    resumed = []
    for _ in range(2):
        restored, loss = plan.step(restored, batch)
        resumed.append(float(loss))
        _copies_equal(plan, restored)
    assert resumed == straight[2:]


def test_tied_copies_count_in_the_plan_memory():
    """Each stage's parameter bytes count every leaf it reads: the embedding once on each of
    its two holders, as the step's layout holds it."""
    _, params, _ = _task("linen")
    plan = _plan("linen", "1f1b", 2, 4, 1, "clip_adamw")
    wte = params["params"]["wte"]["embedding"].nbytes
    layout = plan.emitted.params
    for d in range(2):
        held = sum(layout.slots[k].nbytes for k, _ in layout.on(d))
        assert held == plan.stages[d].param_bytes
        assert wte <= plan.stages[d].param_bytes


def test_a_stacked_leaf_read_whole_and_by_rows_is_refused():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.normal(0, 0.3, (6, 16, 16)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(BATCH, 16)), jnp.float32)

    def loss_fn(w, x):  # the rows in a scan, and the whole stack after it
        h, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)
        return jnp.mean(h @ w.sum(0))

    with pytest.raises(ValueError, match=r"args\[0\] is read whole by stages on devices \[1\] "):
        autopipe.train(loss_fn, ADAMW, w, x, mesh=mesh(2), num_microbatches=2, compile=False)


def test_shared_values_take_one_slot_on_all_their_holders():
    from autopipe.passes.param_layout import _align

    # a on devices 0, 1; b on 1, 2; c on 0, 2; the rest held once
    rows = _align([[1, 3, 10], [1, 2], [2, 3, 11, 12]], shared_first=True)
    for v, holders in {1: {0, 1}, 2: {1, 2}, 3: {0, 2}}.items():
        (slot,) = [r for r in rows if v in r]
        assert {d for d, u in enumerate(slot) if u == v} == holders
    assert sorted(u for r in rows for u in r if u is not None) == [1, 1, 2, 2, 3, 3, 10, 11, 12]
    assert len(rows) == 4  # 3 shared slots would clash pairwise; the singles fill the gaps
    # without sharing: device d's k-th value in slot k (the forward layout)
    assert _align([[1, 3], [1]], shared_first=False) == [(1, 1), (3, None)]
