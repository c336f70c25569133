"""A saved training plan (`Plan.to_json` of `autopipe.train`) replays without searching:
`Plan.from_json(text, loss_fn, *args, mesh=..., optimizer=...)` gives the same JSON and the same
step, bit for bit — with a tied embedding across stages, virtual stages, a data and a tensor
axis, ZeRO-1 and a summed loss."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autopipe
import autopipe._staged
import autopipe._train
from autopipe import library_models as lm
from autopipe import models
from conftest import BATCH, GPT, fill, mesh

ADAMW = optax.adamw(1e-2, eps=1e-3)


def _xent(logits, labels, reduction="mean"):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean() if reduction == "mean" else loss.sum()


def _gpt(reduction: str = "mean"):
    model = models.LinenGPT(GPT)
    tokens = models.make_tokens(GPT, BATCH)
    params = fill(models.abstract_linen(model, tokens))
    loss_fn = lambda p, b: _xent(model.apply(p, b[0]), b[1], reduction)  # noqa: E731
    return loss_fn, params, (tokens, jnp.roll(tokens, -1, axis=1))


def _tied():
    cfg = lm.DecoderConfig(layers=2)
    model = lm.LinenGPT2(cfg)  # the head reads the token embedding: tied across stages
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (BATCH, cfg.seq)))
    tokens = tokens.astype(jnp.int32)
    params = fill(models.abstract_linen(model, tokens))
    loss_fn = lambda p, b: _xent(model.apply(p, b[0]), b[1])  # noqa: E731
    return loss_fn, params, (tokens, jnp.roll(tokens, -1, axis=1))


CASES = {  # task, mesh, autopipe.train keywords
    "tied_pp4_1f1b": (_tied, lambda: mesh(4), dict(schedule="1f1b", num_microbatches=4)),
    "interleaved_pp2": (
        _gpt,
        lambda: mesh(2),
        dict(schedule="interleaved_1f1b", num_microbatches=4),
    ),
    "pp2_dp2_tp2_zero_sum": (
        lambda: _gpt("sum"),
        lambda: mesh(2, dp=2, tp=2),
        dict(schedule="zb_paired", num_microbatches=2, zero_stage=1, reduction="sum"),
    ),
}


def _no_search(*args, **kwargs):
    raise AssertionError("a saved training plan must replay without searching")


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_saved_training_plan_replays_without_searching_and_steps_identically(name, monkeypatch):
    task, make_mesh, kw = CASES[name]
    loss_fn, params, batch = task()
    m = make_mesh()
    plan = autopipe.train(loss_fn, ADAMW, params, batch, mesh=m, **kw)
    text = plan.to_json()
    saved = json.loads(text)
    assert saved["remat"] == list(plan.remat) and saved["reduction"] == kw.get("reduction", "mean")
    assert saved["optimizer_state"] == pytest.approx(2.0, rel=1e-3)  # adamw: two moments
    monkeypatch.setattr(autopipe._staged, "search_training", _no_search)
    monkeypatch.setattr(autopipe._train, "solve_training", _no_search)
    again = autopipe.Plan.from_json(text, loss_fn, params, batch, mesh=m, optimizer=ADAMW)
    assert again.to_json() == text
    assert again.shared_params == plan.shared_params
    a, b = plan.init(params), again.init(params)
    for _ in range(2):
        a, loss_a = plan.step(a, batch)
        b, loss_b = again.step(b, batch)
        assert float(loss_a) == float(loss_b)
    for x, y in zip(
        jax.tree.leaves(plan.unplace(a)), jax.tree.leaves(again.unplace(b)), strict=True
    ):
        np.testing.assert_array_equal(x, y)


def test_replaying_a_training_plan_refuses_what_it_cannot_replay():
    loss_fn, params, batch = _gpt()
    plan = autopipe.train(loss_fn, ADAMW, params, batch, mesh=mesh(2), num_microbatches=4)
    text = plan.to_json()
    record = autopipe.PlanRecord.from_json(text)
    traced = autopipe.trace(loss_fn, params, batch)
    staged = traced.lower(mesh(2), training=True, num_microbatches=4).replay(
        record, optimizer=ADAMW
    )
    assert staged.to_json() == text  # the staged API replays it too
    with pytest.raises(ValueError, match=r"training plan: .*pass optimizer="):
        autopipe.Plan.from_json(text, loss_fn, params, batch, mesh=mesh(2))
    with pytest.raises(ValueError, match=r"different program.*autopipe\.train"):
        autopipe.Plan.from_json(
            text, lambda p, b: 2 * loss_fn(p, b), params, batch, mesh=mesh(2), optimizer=ADAMW
        )
    with pytest.raises(ValueError, match=r"2 stages and 4 microbatches; .* give 4 and 4"):
        autopipe.Plan.from_json(text, loss_fn, params, batch, mesh=mesh(4), optimizer=ADAMW)
    other = r"state is 2\.\d+ × the parameter bytes; optimizer= holds 0 ×"
    with pytest.raises(ValueError, match=other):
        autopipe.Plan.from_json(
            text, loss_fn, params, batch, mesh=mesh(2), optimizer=optax.sgd(1e-2)
        )
    old = json.loads(text)
    del old["remat"]  # saved before training plans were replayable
    with pytest.raises(ValueError, match="records no remat per stage or no optimizer state"):
        autopipe.Plan.from_json(
            json.dumps(old), loss_fn, params, batch, mesh=mesh(2), optimizer=ADAMW
        )
