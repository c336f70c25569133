"""Emit pass: stage layouts + a schedule → ONE ``jax.jit(jax.shard_map(...))`` program.

The program is manual over the pipeline axis only. Per device:
  - parameters arrive as one flat buffer per dtype, shape ``(1, L_dtype)`` locally (global
    ``(p, L_dtype)`` sharded over the pipeline axis), holding only this device's stage's values;
  - batch leaves arrive replicated, reshaped to ``(m, microbatch, ...)``;
  - a ``lax.scan`` over ticks reads this device's cell of the schedule table, runs its stage
    with ``lax.switch`` (an extra branch idles), packs the values for the next stage into one
    flat buffer per dtype, and after the switch sends it with one unconditional
    ``lax.ppermute`` per dtype (collectives never run inside a branch);
  - the last stage writes its outputs into an (m + 1, microbatch, ...) buffer at the
    microbatch's row (other actions write the spare row), so each device keeps m outputs.

Operators are replayed from a jaxpr traced outside the shard_map, which shard_map's
varying-axes checker cannot type, so the shard_map is built with ``check_vma=False``.
Parameters are packed by `make_packers`: one jitted function per stage that evaluates the
hoisted ops and concatenates that stage's values, run on the stage's own devices, so no device
ever holds another stage's parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autopipe.passes.ir import Program, eval_ops, read_atom
from autopipe.passes.layout import FlatLayout, Split, StageLayout, buffer_sizes, placed_sources
from autopipe.passes.schedule import Schedule


@dataclasses.dataclass(frozen=True, kw_only=True)
class Emitted:
    step: Callable  # jitted (param_bufs, batch_leaves) -> outputs, global (p * B, ...) each
    param_dtypes: tuple[str, ...]
    param_sizes: tuple[int, ...]
    param_sharding: NamedSharding
    batch_sharding: NamedSharding


def _unpack(env: dict, layout: FlatLayout, bufs: dict[str, Any]) -> None:
    for dt, slots in layout.slots:
        for s in slots:
            env[s.value] = jax.lax.slice(bufs[dt], (s.offset,), (s.offset + s.size,)).reshape(
                s.shape
            )


def _pack(env: dict, layout: FlatLayout, sizes: dict[str, int]) -> tuple[Any, ...]:
    slots = dict(layout.slots)
    out = []
    for dt, n in sizes.items():
        parts = [env[s.value].reshape(-1) for s in slots.get(dt, ())]
        used = sum(s.size for s in slots.get(dt, ()))
        if used < n:
            parts.append(jnp.zeros((n - used,), dt))
        out.append(jnp.concatenate(parts) if len(parts) > 1 else parts[0])
    return tuple(out)


def _stage_fn(program: Program, layout: StageLayout, *, last: bool, sizes: dict[str, int]):
    batch_in = [v for v in program.invars if v in program.batch_dependent]

    def run(params: dict, recv: dict, xs: Sequence[Any]):
        env: dict = {}
        _unpack(env, layout.params, params)
        _unpack(env, layout.recv, recv)
        env.update(zip(batch_in, xs, strict=True))
        eval_ops(program, layout.ops, env)
        send = _pack(env, layout.send, sizes)
        outs = tuple(read_atom(env, a) for a in program.outvars) if last else None
        return send, outs

    return run


def _zeros_like_outputs(program: Program) -> tuple[Any, ...]:
    return tuple(jnp.zeros(program.avals[a].shape, program.avals[a].dtype) for a in program.outvars)


def emit(
    program: Program,
    stages: Sequence[StageLayout],
    schedule: Schedule,
    *,
    mesh: Any,
    axis: str,
    batch_size: int,
    replicate_outputs: bool = False,
) -> Emitted:
    """``replicate_outputs``: every device returns the outputs (an all-reduce from the last
    stage) instead of each returning its own block; used by the differentiable `Plan.apply`."""
    p, m = len(stages), schedule.num_microbatches
    param_sizes = buffer_sizes([s.params for s in stages])
    boundary_sizes = buffer_sizes([s.send for s in stages])
    dtypes = tuple(param_sizes)
    runs = [
        _stage_fn(program, st, last=s == p - 1, sizes=boundary_sizes) for s, st in enumerate(stages)
    ]
    stage_table = np.array([[p if c is None else c.stage for c in row] for row in schedule.table])
    mb_table = np.array([[0 if c is None else c.microbatch for c in row] for row in schedule.table])
    perm = [(d, d + 1) for d in range(p - 1)]

    def branch(s):
        def f(params, recv, xs):
            send, outs = runs[s](params, recv, xs)
            outs = _zeros_like_outputs(program) if outs is None else outs
            return send, outs

        return f

    def idle(params, recv, xs):
        send = tuple(jnp.zeros((n,), dt) for dt, n in boundary_sizes.items())
        outs = _zeros_like_outputs(program)
        return send, outs

    branches = [branch(s) for s in range(p)] + [idle]

    def body(param_bufs, batch):
        params = {dt: b[0] for dt, b in zip(dtypes, param_bufs, strict=True)}
        dev = jax.lax.axis_index(axis)
        stages_t, mbs_t = jnp.asarray(stage_table, jnp.int32), jnp.asarray(mb_table, jnp.int32)

        def tick(carry, t):
            recv_bufs, out_bufs = carry
            recv = dict(zip(boundary_sizes, recv_bufs, strict=True))
            j = mbs_t[t, dev]
            xs = [jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False) for x in batch]
            send, outs = jax.lax.switch(stages_t[t, dev], branches, params, recv, xs)
            row = jnp.where(stages_t[t, dev] == p - 1, j, m)  # other actions: the spare row
            out_bufs = tuple(
                jax.lax.dynamic_update_index_in_dim(b, o, row, 0)
                for b, o in zip(out_bufs, outs, strict=True)
            )
            recv_next = tuple(jax.lax.ppermute(x, axis, perm) for x in send)
            return (recv_next, out_bufs), None

        init = (
            tuple(jnp.zeros((n,), dt) for dt, n in boundary_sizes.items()),
            tuple(
                jnp.zeros((m + 1, *program.avals[a].shape), program.avals[a].dtype)
                for a in program.outvars
            ),
        )
        (_, ys), _ = jax.lax.scan(tick, init, jnp.arange(schedule.num_ticks))
        outs = tuple(y[:m].reshape(batch_size, *y.shape[2:]) for y in ys)
        if replicate_outputs:
            last = jax.lax.axis_index(axis) == p - 1
            outs = tuple(jax.lax.psum(jnp.where(last, y, jnp.zeros_like(y)), axis) for y in outs)
        return outs

    smap = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tuple(P(axis) for _ in dtypes), P()),
        out_specs=tuple(P() if replicate_outputs else P(axis) for _ in program.outvars),
        axis_names={axis},
        check_vma=False,  # operators are bound from a jaxpr traced outside the shard_map
    )

    def step(param_bufs, batch_leaves):
        mb = batch_size // m
        batch = tuple(x.reshape(m, mb, *x.shape[1:]) for x in batch_leaves)
        return smap(tuple(param_bufs), batch)

    return Emitted(
        step=jax.jit(step),
        param_dtypes=dtypes,
        param_sizes=tuple(param_sizes.values()),
        param_sharding=NamedSharding(mesh, P(axis)),
        batch_sharding=NamedSharding(mesh, P()),
    )


# --- parameter placement --------------------------------------------------------------------


def _hoist_closure(program: Program, values: Sequence[int]) -> tuple[list, list]:
    """Hoisted ops (program order) and raw inputs needed to compute `values`."""
    producer = program.producers()
    ops, raw, stack, seen = set(), set(), list(values), set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        i = producer.get(v)
        if i is None:
            raw.add(v)
            continue
        ops.add(i)
        stack.extend(a for a in program.ops[i].invars if isinstance(a, int))
    return sorted(ops), sorted(raw)


def make_packers(
    program: Program, split: Split, layouts: Sequence[FlatLayout], *, training: bool = False
) -> list[tuple[Callable, list[int]]]:
    """Per device layout: (jitted pack(raw values) -> per-dtype flat buffers, raw ids read)."""
    sizes = buffer_sizes(layouts)
    sources = placed_sources(program, split, training=training)
    packers = []
    for layout in layouts:
        values = layout.values()
        assert set(values) <= sources, "placed values must be computable before the pipeline"
        ops, raw = _hoist_closure(program, values)

        def pack(*raw_vals, ops=ops, raw=raw, layout=layout):
            env = dict(zip(raw, raw_vals, strict=True))
            eval_ops(program, ops, env)
            return tuple(b[None] for b in _pack(env, layout, sizes))

        packers.append((jax.jit(pack), raw))
    return packers


def pack_traced(
    program: Program, split: Split, layouts: Sequence[FlatLayout], params: Sequence[Any], sharding
) -> tuple[Any, ...]:
    """Traceable packing of parameter leaves into the (p, L) buffers (differentiable)."""
    del split
    sizes = buffer_sizes(layouts)
    param_ids = [v for v in program.invars if v not in program.batch_dependent]
    raw = dict(zip(param_ids, params, strict=True)) | dict(program.consts)
    per_stage = []
    for layout in layouts:
        ops, needed = _hoist_closure(program, layout.values())
        env = {v: raw[v] for v in needed}
        eval_ops(program, ops, env)
        per_stage.append(_pack(env, layout, sizes))
    stacked = [jnp.stack(bufs) for bufs in zip(*per_stage, strict=True)]
    return tuple(jax.sharding.reshard(b, sharding) for b in stacked)
