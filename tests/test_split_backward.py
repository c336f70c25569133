"""zb_h1's split backward: B and W together do one backward's work, and the classification of
parameter uses that splits it (`passes.split_backward`)."""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import autopipe
from autopipe import models
from autopipe.cost_models.durations import action_durations
from autopipe.passes import schedule as schedules
from autopipe.passes.costs import stashed_inputs
from autopipe.passes.graph import build_program
from autopipe.passes.layout import Split
from autopipe.passes.split_backward import weight_uses
from autopipe.passes.stage_fns import stash_keys
from autopipe.passes.trace import trace
from conftest import BATCH, GPT, fill, mesh

ZB = ("zb_h1", "zb_paired")


def _tied_lm(params, tokens):
    """Embedding tied to the output head, a norm with scale, a biased projection."""
    h = params["embed"][tokens]
    h = h / jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * params["scale"]
    h = jnp.tanh(h @ params["w"] + params["b"])
    return h @ params["embed"].T


def test_matmuls_reading_a_parameter_are_tapped_and_every_other_use_is_gated():
    params = {
        "embed": jnp.zeros((16, 8)),
        "scale": jnp.zeros((8,)),
        "w": jnp.zeros((8, 8)),
        "b": jnp.zeros((8,)),
    }
    tokens = jnp.zeros((4, 3), jnp.int32)
    traced = trace(_tied_lm, (params, tokens), batch_argnums=(1,), num_microbatches=1)
    prog = build_program(traced.jaxpr, traced.spec.batch_leaves)
    names = dict(zip(prog.param_invars, ("b", "embed", "scale", "w"), strict=True))
    batch = [v for v in prog.invars if v in prog.batch_dependent]
    uses = weight_uses(prog, range(len(prog.ops)), prog.param_invars, batch, prog.outvars)
    tapped = [prog.ops[i].primitive for i in uses.tapped]
    assert tapped == ["dot_general", "dot_general"]  # h @ w and the tied head; not the lookup
    gated = sorted(prog.ops[i].primitive for i in uses.gated)
    assert "mul" in gated and "add" in gated and "dot_general" not in gated
    assert {names[v] for v in uses.late} == {"w", "embed"}
    assert {names[v] for v in uses.early} == {"b", "embed", "scale"}  # the lookup: B's


def test_w_keeps_each_activation_input_once_and_the_memory_model_counts_it():
    """q, k and v projections of one normed input: three tapped matmuls, one stored input."""

    def attn_in(params, x):
        h = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        q, k, v = (h @ params[n] for n in ("q", "k", "v"))
        return jnp.sum(jax.nn.gelu(q * k) @ params["o"] + v)

    params = {n: jnp.zeros((8, 8)) for n in ("k", "o", "q", "v")}
    x = jnp.zeros((4, 8))
    traced = trace(attn_in, (params, x), batch_argnums=(1,), num_microbatches=1)
    prog = build_program(traced.jaxpr, traced.spec.batch_leaves)
    batch = [v for v in prog.invars if v in prog.batch_dependent]
    uses = weight_uses(prog, range(len(prog.ops)), prog.param_invars, batch, prog.outvars)
    assert len(uses.tapped) == 4 and len(uses.stashed) == 4
    keys, of = stash_keys(prog, None, uses)
    assert len(keys) == 2 and len(set(of.values())) == 2  # h once, gelu(q * k) once
    split = Split(pipeline=tuple(range(len(prog.ops))), hoisted=frozenset(), local=frozenset())
    kept = [v for vs in stashed_inputs(prog, split) for v in vs]
    assert sorted(kept) == sorted(k for k, _ in keys)


def _gpt_plan(schedule):
    model = models.LinenGPT(GPT)
    tokens = models.make_tokens(GPT, BATCH)

    def loss_fn(params, t):
        logits = model.apply(params, t)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], t[:, 1:]).mean()

    params = fill(models.abstract_linen(model, tokens))
    plan = autopipe.train(
        loss_fn,
        optax.sgd(1e-2),
        params,
        tokens,
        mesh=mesh(2),
        schedule=schedule,
        num_microbatches=4,
    )
    return plan, params, tokens


def _dots(hlo: str) -> collections.Counter:
    """The compiled program's matmuls: (result type, dimension numbers) → how many."""
    dots = re.findall(r"= (\w+\[[\d,]*\])\{[^}]*\} dot\([^)]*\), (.*?), metadata", hlo)
    return collections.Counter(dots)


def _assert_same_steps(plan, ref, params, tokens, steps: int = 2) -> None:
    """``plan`` and ``ref`` train alike: losses and parameters after ``steps`` steps."""
    got, want = plan.init(params), ref.init(params)
    for _ in range(steps):
        (got, loss), (want, want_loss) = plan.step(got, tokens), ref.step(want, tokens)
        np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    leaves = [jax.tree.leaves(p.unplace(s)) for p, s in ((plan, got), (ref, want))]
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_zb_h1_does_one_backward_of_work_and_trains_like_1f1b():
    """The step's matmuls (each action's body counted once) are 1F1B's, one for one, and XLA's
    transcendental count is at most 1F1B's: W applies the tapped operators' weight transposes
    to the cotangents and activation inputs B stored, instead of pulling the cotangent back
    through the stage again (1.153 × 1F1B's FLOPs on this GPT) or recomputing those inputs
    from the stored matmul results (1.031 × the FLOPs, 1.34 × the transcendentals: the gelu
    and norms again). XLA's FLOP count also counts elementwise work its fusion duplicates:
    1.018 × here, gelu's derivative fused into both consumers of the cotangent B stores (the
    store and the input-gradient matmul)."""
    (zb, params, tokens), (ref, _, _) = _gpt_plan("zb_h1"), _gpt_plan("1f1b")
    assert _dots(zb.compiled.as_text()) == _dots(ref.compiled.as_text())
    costs = [p.compiled.cost_analysis() for p in (zb, ref)]
    assert costs[0]["flops"] <= 1.02 * costs[1]["flops"], costs
    assert costs[0]["transcendentals"] <= costs[1]["transcendentals"], costs
    _assert_same_steps(zb, ref, params, tokens)


def test_zb_paired_fuses_b_and_w_and_trains_like_1f1b_paired():
    """zb_paired runs 1F1B-paired's ticks with each B fused with its W (one whole backward,
    nothing stored for W) but the W the last device moves into its idle last tick: the same
    steps as 1F1B-paired; only that W's cotangents are stored (one slot)."""
    (zb, params, tokens), (ref, _, _) = _gpt_plan("zb_paired"), _gpt_plan("1f1b_paired")
    assert zb.schedule.deferred() == [0, 1] and zb.emitted.slots.counts["cot"] == 1
    _assert_same_steps(zb, ref, params, tokens)


def test_only_a_w_apart_from_its_b_pays_for_storing_what_it_reads():
    """The duration model: a B and W sharing a cell are one backward; a B whose W runs in
    another tick writes what W reads and W reads it back (`Stage.store_time`, half each)."""
    sched = schedules.make("zb_paired", 2, 4)
    fused = sched.fused()
    apart = [a for a in sched.ticks() if a.kind in "BW" and a not in fused]
    assert apart and fused
    plain, priced = (
        action_durations(
            [3.0, 3.0], training=True, split_backward=True, store_times=store, fused=fused
        )
        for store in ((), (0.4, 0.2))
    )
    for a in sched.ticks():
        extra = (0.2, 0.1)[a.stage] if a in apart else 0.0
        assert priced(a) == pytest.approx(plain(a) + extra)


def test_auto_prefers_the_zero_bubble_table_that_stores_less():
    """zb_h1 and zb_paired tie in unit lock-step time, but every zb_h1 W waits apart from its
    B (its B stores for it) while zb_paired fuses all but the cool-down's: the planner predicts
    zb_paired faster, and ``schedule="auto"`` picks it (measured faster: README, training)."""
    lowered = autopipe.trace(
        lambda p, x: jnp.mean(jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]) ** 2),
        {"a": jax.ShapeDtypeStruct((64, 64), jnp.float32),
         "b": jax.ShapeDtypeStruct((64, 64), jnp.float32)},
        jax.ShapeDtypeStruct((32, 64), jnp.float32),
    ).lower(mesh(2), num_microbatches=8, training=True)  # fmt: skip
    opt = optax.sgd(0.1)
    step = {k: lowered.plan(optimizer=opt, schedule=k).predicted.step_time for k in ZB}
    assert step["zb_paired"] < step["zb_h1"]
    assert lowered.plan(optimizer=opt, schedule="auto").schedule.kind == "zb_paired"


@pytest.mark.parametrize(("schedule", "loops"), [("zb_h1", 6), ("zb_paired", 8)])
def test_every_matmul_runs_inside_its_action(schedule, loops):
    """The tick loop's own body holds no matmul: each action's work stays inside its loop,
    which runs only on the ticks that have that action. (With the stored cotangents in W's
    carry, XLA hoisted W's 24 weight-gradient matmuls of this GPT into the tick body, to run on
    every tick: 2.8 × the step time.)"""
    plan, _, _ = _gpt_plan(schedule)
    hlo = plan.compiled.as_text()
    trips = f'"known_trip_count":{{"n":"{plan.schedule.num_ticks}"}}'
    tick = re.search(r"while\([^)]*\), condition=%?[\w.\-]+, body=%?([\w.\-]+)[^\n]*" + trips, hlo)
    body = re.search(r"\n%?" + re.escape(tick.group(1)) + r" [^\n]*\{\n(.*?)\n\}", hlo, re.S)
    assert body.group(1).count(" while(") >= loops  # F, B, W (and B fused with W) of 2 stages
    assert " dot(" not in body.group(1)
