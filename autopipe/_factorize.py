"""Factorization search: which (pipeline, data, tensor) mesh to lay N devices out as.

`search_factorizations` prices every factorization from ONE trace of the whole batch: per
(pp, tp) the layers are clustered and sharded once (one `ShardingCache` for the program), per
dp the microbatch rows — and with them compute, activations and transfers — are scaled, then
the exact stage search runs. `plan_on_devices` plans the best one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from autopipe._front import FrontOptions, default_microbatches, make_front, with_tensor_axis
from autopipe._microbatches import fastest_count
from autopipe._plan import Factorization
from autopipe._planned import Plan
from autopipe._stage_search import layer_problem, layers_for, shard
from autopipe._staged import trace
from autopipe.cost_models.hardware import Hardware
from autopipe.passes.partition import PlanInfeasible, solve_stages
from autopipe.passes.tensor_parallel import ShardingCache


def factorizations(
    devices: int, batch: int, *, devices_per_node: int, max_stages: int
) -> list[tuple[int, int, int]]:
    """Every (pp, dp, tp) with pp·dp·tp = devices such that the tensor axis stays inside a node
    (tp divides devices_per_node), dp divides the batch and pp ≤ max_stages."""
    out = []
    for tp in range(1, devices + 1):
        if devices % tp or devices_per_node % tp:
            continue
        for pp in range(1, min(devices // tp, max_stages) + 1):
            if (devices // tp) % pp == 0 and batch % (dp := devices // (tp * pp)) == 0:
                out.append((pp, dp, tp))
    return out


def search_factorizations(
    fn: Callable,
    *example_args: Any,
    devices: int,
    num_microbatches: int | None = None,
    batch_argnums: Sequence[int] = (1,),
    hardware: str | Hardware | Any | None = None,
    memory_limit: float | None = None,
    pipeline_axis: str = "pp",
    tensor_axis: str = "tp",
) -> list[Factorization]:
    """Prices every factorization of `devices` (best first) from ONE trace of the whole batch:
    per (pp, tp) the layers are clustered and sharded once, per dp the microbatch rows (and with
    them compute, activations and transfers) are scaled, then the exact stage search runs. The
    estimate that picks the mesh; the chosen mesh is then planned exactly (`plan`)."""
    opts = FrontOptions(
        mesh={pipeline_axis: 1},
        pipeline_axis=pipeline_axis,
        num_microbatches=1,
        batch_argnums=batch_argnums,
        hardware=hardware,
    )
    base = make_front(fn, example_args, opts)
    # with a tensor axis: the IR with fused projections cut apart, as `make_front` cuts it
    cut = with_tensor_axis(base, tensor_axis)
    hw = base.hardware
    limit = hw.memory_bytes if memory_limit is None else memory_limit
    batch = base.traced.batch_size
    caches = {False: ShardingCache(), True: ShardingCache()}  # one per program: base, cut
    shards: dict = {}
    out = []
    for pp, dp, tp in factorizations(
        devices, batch, devices_per_node=hw.devices_per_node, max_stages=len(base.split.pipeline)
    ):
        m = num_microbatches or default_microbatches(batch // dp, pp)
        if (batch // dp) % m:
            continue
        front = cut if tp > 1 else dataclasses.replace(base, tensor_axis=tensor_axis)
        layers = layers_for(front, pp)
        step = mem = math.inf  # unless some stage split fits in memory
        for lean in (False, True) if tp > 1 else (False,):
            key = (tuple(layers), pp if lean else 0, tp, lean)
            if key not in shards:
                axes = ((pipeline_axis, pp), ("dp", dp), (tensor_axis, tp))
                shards[key] = shard(
                    front, layers, lean=lean, mesh_axes=axes, cache=caches[tp > 1], pipeline=pp
                )
            problem = layer_problem(
                front,
                layers,
                limit,
                shards[key],
                rows_scale=1.0 / (dp * m),
                num_stages=pp,
                num_microbatches=m,
            )
            try:
                sol = solve_stages(problem)
            except PlanInfeasible:
                continue
            step, mem = sol.step_time, max(sol.stage_memory)
            break
        out.append(
            Factorization(pp=pp, dp=dp, tp=tp, num_microbatches=m, step_time=step, memory=mem)
        )
    return sorted(out, key=lambda f: (f.step_time, f.pp * 1000 + f.tp))


def plan_on_devices(
    fn, args, *, devices, pipeline_axis, data_axis, tensor_axis, compile_, started, **options
) -> Plan:
    """`plan` for ``mesh=None`` (this process's devices) or ``mesh=N`` (N devices): picks the
    factorization by `search_factorizations`, then plans that mesh exactly (its microbatch
    count searched, `autopipe._microbatches`, unless given)."""
    n = jax.device_count() if devices is None else devices
    if n < 1:
        raise ValueError(f"mesh={devices}: a device count must be at least 1.")
    candidates = search_factorizations(
        fn, *args, devices=n, pipeline_axis=pipeline_axis, tensor_axis=tensor_axis, **options
    )
    best = candidates[0] if candidates else None
    if best is None or math.isinf(best.step_time):
        raise PlanInfeasible(
            f"no factorization of {n} devices into pipeline × data × tensor fits the model in "
            f"the memory limit (or divides the batch); tried {len(candidates)}. Use more "
            f"devices, a smaller batch per device, or a larger memory_limit."
        )
    names = (pipeline_axis, data_axis, tensor_axis)
    traced = trace(fn, *args, batch_argnums=options.get("batch_argnums", (1,)))
    refusals = []
    for f in (f for f in candidates if not math.isinf(f.step_time)):
        # in estimated order: the exact plan may still refuse (the layout's padding)
        shape = (f.pp, f.dp, f.tp)
        if n == jax.device_count():
            mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), names)
        else:
            mesh = dict(zip(names, shape, strict=True))
        lowered = traced.lower(
            mesh,
            hardware=options.get("hardware"),
            num_microbatches=f.num_microbatches,
            pipeline_axis=pipeline_axis,
            data_axis=data_axis,
            tensor_axis=tensor_axis,
        )
        try:
            if options.get("num_microbatches") is None:  # the chosen layout's count, searched
                at = functools.partial(_plan_at, lowered, options.get("memory_limit"))
                planned = fastest_count(lowered, at, multiple=1)
            else:
                planned = lowered.plan(memory_limit=options.get("memory_limit"))
            break
        except PlanInfeasible as e:
            refusals.append(e)
    else:
        raise refusals[0]
    out = planned.finish(compile=compile_)
    return dataclasses.replace(
        out, factorizations=tuple(candidates), planning_seconds=time.perf_counter() - started
    )


def _plan_at(lowered, memory_limit, m: int):
    return lowered.plan(num_microbatches=m, memory_limit=memory_limit)
