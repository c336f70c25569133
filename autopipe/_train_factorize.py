"""Factorization search for training: ``autopipe.train(..., mesh=N)`` or ``mesh=None``.

Every (pipeline, data, tensor) layout of the devices that `_factorize.factorizations` allows is
planned by the training planner itself (`_train.search_training`: stage DP with forward and
backward tensor collectives, the data-axis gradient all-reduce, parameters, gradients and
optimizer state per shard), without compiling; the fastest predicted step wins and is compiled.
A layout the planner refuses (too few operators for its stages, a batch its replicas ×
microbatches do not divide, nothing fits in memory) is priced ``inf``; if every layout is
refused, the first refusal is raised.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from autopipe._factorize import Factorization, factorizations
from autopipe._front import batch_size_of, resolve_hardware
from autopipe._planned import Plan, Planned
from autopipe._staged import trace
from autopipe.passes.partition import PlanInfeasible


def train_on_devices(
    loss_fn,
    optimizer,
    args,
    *,
    devices: int | None,
    names: tuple[str, str, str],
    lower: dict,
    plan: dict,
    compile_: bool,
    started: float,
) -> Plan:
    """``names``: the (pipeline, data, tensor) axis names; ``lower`` / ``plan``: the keywords
    of ``Traced.lower`` / ``Lowered.plan`` besides the mesh."""
    n = jax.device_count() if devices is None else devices
    if n < 1:
        raise ValueError(f"mesh={devices}: a device count must be at least 1.")
    traced = trace(loss_fn, *args, batch_argnums=lower.pop("batch_argnums"))
    hw = resolve_hardware(lower.get("hardware"), _mesh(n, (n, 1, 1), names))
    batch = batch_size_of(traced.spec)
    candidates: list[tuple[Factorization, Planned | None]] = []
    refusals: list[Exception] = []
    for pp, dp, tp in factorizations(n, batch, devices_per_node=hw.devices_per_node, max_stages=n):
        mesh = _mesh(n, (pp, dp, tp), names)
        try:
            planned = traced.lower(mesh, training=True, **lower).plan(optimizer=optimizer, **plan)
        except (PlanInfeasible, ValueError) as e:
            refusals.append(e)
            candidates.append((_priced(pp, dp, tp, 0, math.inf, math.inf), None))
            continue
        step, mem = planned.predicted.step_time, max(planned.predicted.memory_per_device)
        candidates.append((_priced(pp, dp, tp, planned.num_microbatches, step, mem), planned))
    candidates.sort(key=lambda c: (c[0].step_time, c[0].pp * 1000 + c[0].tp))
    best = candidates[0][1] if candidates else None
    if best is None:
        if refusals:
            raise refusals[0]
        raise PlanInfeasible(f"mesh={devices}: no factorization of {n} devices divides the batch.")
    out = best.finish(compile=compile_)
    return dataclasses.replace(
        out,
        factorizations=tuple(f for f, _ in candidates),
        planning_seconds=time.perf_counter() - started,
    )


def _priced(pp, dp, tp, m, step, mem) -> Factorization:
    return Factorization(pp=pp, dp=dp, tp=tp, num_microbatches=m, step_time=step, memory=mem)


def _mesh(n: int, shape: tuple[int, int, int], names: tuple[str, str, str]) -> Any:
    """A concrete mesh of this process's devices when there are n of them, else axis sizes."""
    if n == jax.device_count():
        return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), names)
    return dict(zip(names, shape, strict=True))
