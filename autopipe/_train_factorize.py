"""Factorization search for training: ``autopipe.train(..., mesh=N)`` or ``mesh=None``.

As the forward's search (`_factorize`), every (pipeline, data, tensor) layout of the devices
that `_factorize.factorizations` allows is priced from ONE trace of the whole batch: per
pipeline depth the layers are clustered once, per (layers, tp) the tensor strategies are
solved once (one `ShardingCache`), and per data width and microbatch count the training stage
problem (`_train._problem`: forward + backward compute, tensor collectives of both, the
training memory model) is priced at that microbatch's rows — compute, activations and
transfers scale with rows — and solved by the stage DP. The estimated step is the pipeline's
``(m + (p − 1)/v) ·`` slowest device's time per microbatch, plus the data-axis gradient
all-reduce; schedules enter through their peak microbatches in flight
(`schedule.peak_in_flight`; 1F1B's for ``schedule="auto"``), so no table is built.

Scaling compute by rows is exact for the roofline part of a large operator but not for fixed
costs (kernel overheads, weight reads), which dominate at small rows; so, until the best
estimate is a refined one, the best is priced again from a trace at its own microbatch rows,
and, where that refined estimate is more than `RESCALED_ERROR` × the rescaled one (the scaling
underpriced those small microbatches), so is its layout at the microbatch count tried before
(one trace per row count, at most `REFINED_TRACES`; the faster stays), and the best is then
planned exactly (its schedule's lock-step timeline, reusing that trace); if the exact plan
refuses it, the next. ``plan.factorizations`` holds the estimates (the refined ones where refined).

``num_microbatches=None``: from the default count (`_front.default_microbatches`) up through
the divisors of the replica's rows, the fastest estimate that fits in memory (counts are tried
while the estimate improves, each at least 1.5 × the last tried: more microbatches shrink the
bubble until their fixed costs dominate, and need less memory). A layout that
nothing fits is priced ``inf``; if every one is refused, the first refusal is raised.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from autopipe._factorize import Factorization, factorizations
from autopipe._front import (
    Front,
    FrontOptions,
    batch_size_of,
    default_microbatches,
    make_front,
    resolve_hardware,
    with_tensor_axis,
)
from autopipe._planned import Plan
from autopipe._staged import trace
from autopipe._train import (
    _opt_factor,
    _zero_replicas,
    cuts_fused,
    solve_training,
)
from autopipe._train_tensor import held_split, segments, training_shardings
from autopipe.cost_models import comm
from autopipe.cost_models.stage_memory import SegmentBytes
from autopipe.passes import schedule as schedules
from autopipe.passes.cluster import cluster
from autopipe.passes.partition import PlanInfeasible
from autopipe.passes.tensor_parallel import ShardingCache


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
    argnums = lower.pop("batch_argnums")
    search = _Search(loss_fn, args, n, names, lower, plan, optimizer, argnums)
    estimates = search.refine(search.price_all())
    refusals: list[Exception] = list(search.refusals)
    traced = trace(loss_fn, *args, batch_argnums=argnums)
    for f in estimates:
        if not math.isfinite(f.step_time):
            break
        opts = FrontOptions(
            mesh=_mesh(n, (f.pp, f.dp, f.tp), names),
            pipeline_axis=names[0],
            data_axis=names[1],
            tensor_axis=names[2],
            num_microbatches=f.num_microbatches,
            batch_argnums=argnums,
            hardware=lower.get("hardware"),
            training=True,
            virtual_stages=lower.get("virtual_stages") or 1,
            split_fused=search.split_fused,
        )
        try:
            lowered = traced._lower(opts, started, reuse=search.front_at(search.rows_of(f)))
            planned = lowered.plan(optimizer=optimizer, **plan)
        except (PlanInfeasible, ValueError) as e:
            refusals.append(e)
            continue
        out = planned.finish(compile=compile_)
        return dataclasses.replace(
            out,
            factorizations=tuple(estimates),
            planning_seconds=time.perf_counter() - started,
        )
    if refusals:
        raise refusals[0]
    raise PlanInfeasible(f"mesh={devices}: no factorization of {n} devices divides the batch.")


REFINED_TRACES = 4  # microbatch row counts traced to refine estimates
RESCALED_ERROR = 1.15  # a refined estimate this much above the rescaled one re-prices a count


@dataclasses.dataclass
class _Search:
    """One trace of the whole batch and what its layouts share (layers, tensor strategies)."""

    fn: Any
    args: tuple
    n: int
    names: tuple[str, str, str]
    lower: dict
    plan: dict
    optimizer: Any
    argnums: tuple

    def __post_init__(self):
        self.hardware = resolve_hardware(
            self.lower.get("hardware"), _mesh(self.n, (self.n, 1, 1), self.names)
        )
        self.fronts: dict[int, Front] = {}
        self.base = self.front_at(None)
        self.batch = batch_size_of(self.base.traced.spec)
        self.opt_factor = _opt_factor(self.optimizer, self.base)
        self.split_fused = cuts_fused(self.optimizer, self.base)
        self.cut: dict[int, tuple[Front, Front]] = {}  # id(front) → (front, with tensor axis)
        self.caches: dict[int, ShardingCache] = {}  # one per traced program
        self.layers: dict[int, tuple] = {}
        self.shards: dict = {}
        self.held: dict[int, tuple] = {}  # id(forward shardings) → them, training's, its bytes
        self.refusals: list[Exception] = []

    def front_at(self, rows: int | None) -> Front:
        """The loss traced at ``rows`` microbatch rows (None: the whole batch), once."""
        rows = None if rows == getattr(self, "batch", None) else rows
        if rows not in self.fronts:
            opts = FrontOptions(
                mesh={self.names[0]: 1},
                pipeline_axis=self.names[0],
                num_microbatches=1 if rows is None else self.batch // rows,
                batch_argnums=self.argnums,
                hardware=self.hardware,
                training=True,
            )
            self.fronts[rows] = make_front(self.fn, self.args, opts)
        return self.fronts[rows]

    def rows_of(self, f: Factorization) -> int:
        return self.batch // (f.dp * f.num_microbatches)

    def price_all(self) -> list[Factorization]:
        ops = len(self.base.split.pipeline)
        layouts = factorizations(
            self.n, self.batch, devices_per_node=self.hardware.devices_per_node, max_stages=ops
        )
        return _sorted(self.price(pp, dp, tp) for pp, dp, tp in layouts)

    def refine(self, estimates: list[Factorization]) -> list[Factorization]:
        """Until the best estimate is a refined one: the best is priced again from a trace at
        its own microbatch rows (at most `REFINED_TRACES` row counts besides the batch's)."""
        out, refined = list(estimates), set()
        while out and math.isfinite(out[0].step_time):
            f = out[0]
            if (f.pp, f.dp, f.tp) in refined or not self._may_trace(f, f.num_microbatches):
                break
            refined.add((f.pp, f.dp, f.tp))
            tried = [self._refined(f, f.num_microbatches)]
            if tried[0].step_time > RESCALED_ERROR * f.step_time:
                # the whole batch's trace, its fixed costs scaled by rows, underpriced these
                # microbatches: the count tried before them may be faster (if a trace is left)
                counts = self._counts(f.pp, f.dp)
                k = counts.index(f.num_microbatches) if f.num_microbatches in counts else 0
                prev = [m for m in counts[max(k - 1, 0) : k] if self._may_trace(f, m)]
                tried += [self._refined(f, m) for m in prev]
            out = _sorted([min(tried, key=lambda g: g.step_time), *out[1:]])
        return out

    def _may_trace(self, f: Factorization, m: int) -> bool:
        rows = self.batch // (f.dp * m)
        return (None if rows == self.batch else rows) in self.fronts or (
            len(self.fronts) <= REFINED_TRACES
        )

    def _refined(self, f: Factorization, m: int) -> Factorization:
        """``f`` at ``m`` microbatches priced from a trace at those microbatch rows."""
        try:
            front = self.front_at(self.batch // (f.dp * m))
            step, mem = self._estimate(f.pp, f.dp, f.tp, m, front)
        except (PlanInfeasible, ValueError) as e:
            self.refusals.append(e)
            step = mem = math.inf
        return dataclasses.replace(f, num_microbatches=m, step_time=step, memory=mem)

    def _counts(self, pp: int, dp: int) -> list[int]:
        """The microbatch counts `price` tries, in order: the asked one, or from the default
        count up through the divisors of the replica's rows, each ≥ 1.5 × the last."""
        rows = self.batch // dp
        asked = self.lower.get("num_microbatches")
        if asked is not None:
            return [asked] if rows % asked == 0 else []
        counts: list[int] = []
        for m in range(default_microbatches(rows, pp), rows + 1):
            if rows % m == 0 and m >= 1.5 * (counts[-1] if counts else 0):
                counts.append(m)
        return counts

    def price(self, pp: int, dp: int, tp: int) -> Factorization:
        """The layout's fastest fitting estimate from the default microbatch count up."""
        best = _priced(pp, dp, tp, 0, math.inf, math.inf)
        for m in self._counts(pp, dp):
            try:
                step, mem = self._estimate(pp, dp, tp, m, self.base)
            except (PlanInfeasible, ValueError) as e:
                self.refusals.append(e)
                continue
            if step >= best.step_time:
                break
            best = _priced(pp, dp, tp, m, step, mem)
        return best

    def _estimate(self, pp: int, dp: int, tp: int, m: int, traced: Front) -> tuple[float, float]:
        """(step seconds, largest bytes per device) of the layout, priced from ``traced`` with
        its compute and activations scaled to the layout's microbatch rows."""
        v = self.plan.get("virtual_stages") or 1
        S = pp * v
        if tp > 1:  # the IR with fused projections cut apart, as `make_front` cuts it
            if id(traced) not in self.cut:
                cut = with_tensor_axis(traced, self.names[2], self.split_fused)
                self.cut[id(traced)] = (traced, cut)
            traced = self.cut[id(traced)][1]
        front = self._front(traced, pp, dp, tp, m, S)
        zero = _zero_replicas(front, self.plan.get("zero_stage", 0))
        if (S, id(traced)) not in self.layers:
            c = traced.costs
            self.layers[S, id(traced)] = cluster(c.op_times, c.cut_bytes, min_layers=S)
        layers = self.layers[S, id(traced)]
        key = (layers, pp if tp > 1 else 0, tp, id(traced))
        if key not in self.shards:
            cache = self.caches.setdefault(id(traced), ShardingCache())
            raw = training_shardings(front, layers, self.opt_factor / zero, cache, hold_split=False)
            if id(raw) not in self.held:  # one pipeline size's shardings may be another's
                sh = held_split(front, raw)
                self.held[id(raw)] = raw, sh, segments(front, layers, sh)
            self.shards[key] = self.held[id(raw)][1:]
        sh, seg = self.shards[key]
        limit = self.plan.get("memory_limit")
        limit = front.hardware.memory_bytes if limit is None else limit
        kind = "1f1b" if self.plan["schedule"] == "auto" else self.plan["schedule"]
        in_flight = schedules.peak_in_flight(kind, pp, m, v) / v
        remat = self.plan.get("remat")
        rows_scale = self.batch / (dp * m) / traced.traced.microbatch_size
        bounds, times, mems, _ = solve_training(
            front,
            layers,
            sh,
            seg,
            limit=limit / v,
            in_flight=in_flight,
            opt_factor=self.opt_factor / zero,
            remat=remat,
            rows_scale=rows_scale,
            deferred=schedules.peak_deferred(kind, pp, m, v) / v,
        )
        per_device = [sum(times[d::pp]) for d in range(pp)]
        step = (m + (pp - 1) / v) * max(per_device) + self._grad_sum(front, seg, bounds)
        return step, max(sum(mems[d::pp]) for d in range(pp))

    def _front(self, traced: Front, pp: int, dp: int, tp: int, m: int, S: int) -> Front:
        """``traced`` as the stage search sees the layout (its mesh, stages, microbatches)."""
        pp_name, dp_name, tp_name = self.names
        return dataclasses.replace(
            traced,
            mesh_axes=((pp_name, pp), (dp_name, dp), (tp_name, tp)),
            num_stages=S,
            num_microbatches=m,
            data_axis=dp_name if dp > 1 else None,
            tensor_axis=tp_name if tp > 1 else None,
            virtual_stages=S // pp,
        )

    def _grad_sum(self, front: Front, seg: SegmentBytes, bounds) -> float:
        """The data-axis gradient all-reduce of the device holding most parameter bytes."""
        if front.data_axis is None:
            return 0.0
        params = seg.params
        pp = dict(front.mesh_axes)[self.names[0]]
        stage = [float(params[a, b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        held = max(sum(stage[d::pp]) for d in range(pp))
        return comm.collective_time(
            "all_reduce", held, front.data_axis, front.mesh_axes, front.hardware
        )


def _sorted(priced) -> list[Factorization]:
    return sorted(priced, key=lambda f: (f.step_time, f.pp * 1000 + f.tp))


def _priced(pp, dp, tp, m, step, mem) -> Factorization:
    return Factorization(pp=pp, dp=dp, tp=tp, num_microbatches=m, step_time=step, memory=mem)


def _mesh(n: int, shape: tuple[int, int, int], names: tuple[str, str, str]) -> Any:
    """A concrete mesh of this process's devices when there are n of them, else axis sizes."""
    if n == jax.device_count():
        return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), names)
    return dict(zip(names, shape, strict=True))
