"""``num_microbatches=None`` on a given mesh: the count whose exact plan predicts the fastest step
(`autopipe._microbatches`), priced with each matmul's fixed time (`Hardware.matmul_overhead`)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest

import autopipe
from autopipe._microbatches import TIE, microbatch_counts
from autopipe.cost_models.hardware import PRESETS
from conftest import BATCH, mesh, reference_training

OPTIMIZER = optax.adamw(1e-2, eps=1e-3)  # eps: see tests/test_training.py


def _loss(cases):
    fn, (variables, tokens) = cases["linen_gpt"]
    labels = jax.numpy.roll(tokens, -1, axis=1)

    def loss_fn(params, batch):
        logits = fn(params, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return loss_fn, variables, (tokens, labels)


def test_counts_are_divisors_from_the_device_count_up():
    assert microbatch_counts(32, 2) == [2, 4, 8, 16, 32]
    assert microbatch_counts(24, 4) == [4, 6, 12, 24]
    assert microbatch_counts(24, 4, multiple=4) == [4, 8, 12, 24]
    assert microbatch_counts(2, 4) == [2]  # fewer rows than devices: every row its own


def _chosen_is_the_fewest_within_tie(plan):
    steps = {f.num_microbatches: f.step_time for f in plan.factorizations}
    assert list(steps.values()) == sorted(steps.values())  # fastest first
    fastest = min(steps.values())
    assert plan.num_microbatches == min(m for m, t in steps.items() if t <= (1 + TIE) * fastest)
    return steps


@pytest.mark.parametrize("overhead", [0.0, 2e-4])
def test_forward_count_is_the_fastest_exact_plan(cases, overhead):
    """Each count tried is priced exactly as if asked for; a matmul's fixed time makes small
    microbatches dearer, so the chosen count does not grow with it."""
    fn, args = cases["linen_gpt"]
    hw = dataclasses.replace(PRESETS["cpu"], matmul_overhead=overhead)
    plan = autopipe.plan(fn, *args, mesh={"pp": 2}, hardware=hw, compile=False)
    steps = _chosen_is_the_fewest_within_tie(plan)
    assert len(steps) >= 2 and set(steps) <= set(microbatch_counts(BATCH, 2))
    for m, step in steps.items():
        asked = autopipe.plan(fn, *args, mesh={"pp": 2}, hardware=hw, num_microbatches=m,
                              compile=False)  # fmt: skip
        assert asked.predicted.step_time == pytest.approx(step, rel=1e-12)
    if overhead:  # against the flat roofline: never more microbatches
        flat = autopipe.plan(fn, *args, mesh={"pp": 2}, hardware=PRESETS["cpu"], compile=False)
        assert plan.num_microbatches <= flat.num_microbatches


def test_training_count_respects_the_memory_limit(cases):
    """1F1B holds p microbatches' activations: fewer, larger microbatches need more memory. A
    limit below the fewest's memory skips that count."""
    loss_fn, params, batch = _loss(cases)
    kw = dict(mesh={"pp": 2}, schedule="1f1b", compile=False, remat=False)
    free = autopipe.train(loss_fn, OPTIMIZER, params, batch, **kw)
    mems = {f.num_microbatches: f.memory for f in free.factorizations}
    fewest = min(mems)
    assert mems[fewest] > min(mems.values())
    limit = (mems[fewest] + min(mems.values())) / 2
    plan = autopipe.train(loss_fn, OPTIMIZER, params, batch, memory_limit=limit, **kw)
    assert fewest not in {f.num_microbatches for f in plan.factorizations}
    assert max(plan.predicted.memory_per_device) <= limit
    _chosen_is_the_fewest_within_tie(plan)


def test_interleaved_counts_are_multiples_of_the_devices(cases):
    loss_fn, params, batch = _loss(cases)
    plan = autopipe.train(
        loss_fn, OPTIMIZER, params, batch, mesh={"pp": 4}, schedule="interleaved_1f1b",
        compile=False,
    )  # fmt: skip
    assert {f.num_microbatches for f in plan.factorizations} <= {4, 8}
    assert plan.num_microbatches % 4 == 0


def test_searched_count_trains_like_the_reference(cases):
    """The chosen plan runs: two adam steps equal the single-device loop over the same
    microbatches (its count), schedule chosen too."""
    loss_fn, params, batch = _loss(cases)
    hw = dataclasses.replace(PRESETS["cpu"], matmul_overhead=1e-4)
    plan = autopipe.train(
        loss_fn, OPTIMIZER, params, batch, mesh=mesh(2), schedule="auto", hardware=hw
    )
    m = plan.num_microbatches
    state = plan.init(params)
    losses = []
    for _ in range(2):
        state, loss = plan.step(state, batch)
        losses.append(float(loss))
    want_losses, want_params = reference_training(loss_fn, params, batch, m, 1, OPTIMIZER, 2)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6)
    got = jax.tree.leaves(plan.unplace(state))
    for a, b in zip(got, jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_forward_device_count_search_takes_its_layouts_searched_count(cases):
    """``mesh=N``: the layout is chosen at the default count, then its count is searched as on
    that mesh given (``plan.factorizations`` keeps the layouts)."""
    fn, args = cases["linen_gpt"]
    hw = dataclasses.replace(PRESETS["cpu"], matmul_overhead=1e-4)
    plan = autopipe.plan(fn, *args, mesh=4, hardware=hw, compile=False)
    given = autopipe.plan(fn, *args, mesh=dict(plan.mesh_axes), hardware=hw, compile=False)
    assert plan.num_microbatches == given.num_microbatches
    assert plan.predicted.step_time == pytest.approx(given.predicted.step_time, rel=1e-12)
    assert len({(f.pp, f.dp, f.tp) for f in plan.factorizations}) == len(plan.factorizations)
