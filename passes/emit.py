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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autopipe.passes.ir import Program, apply_op, eval_ops, read_atom
from autopipe.passes.layout import FlatLayout, Split, StageLayout, buffer_sizes, placed_sources
from autopipe.passes.schedule import Schedule


@dataclasses.dataclass(frozen=True, kw_only=True)
class Emitted:
    step: Callable  # jitted (buffers, batch_leaves) -> outputs, global (p * B, ...) each
    buffers: tuple[jax.ShapeDtypeStruct, ...]  # parameter buffers: whole ones, then split ones
    batch_sharding: NamedSharding
    mesh: Any  # the mesh the program runs on (the user's devices, every axis Auto)


def auto_mesh(mesh: Any) -> jax.sharding.Mesh:
    """The user's mesh with every axis Auto: the non-manual axes are left to the compiler."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _unpack(env: dict, layout: FlatLayout, bufs: dict[str, Any]) -> None:
    for dt, slots in layout.slots:
        for s in slots:
            env[s.value] = jax.lax.slice(bufs[dt], (s.offset,), (s.offset + s.size,)).reshape(
                s.shape
            )


def _unpack_split(env: dict, layout: FlatLayout, bufs: dict[str, Any], tensor_axis) -> None:
    """Split values from ``(tp, L)`` buffers whose row t holds shard t of every value. Each
    device reads its own row inside a shard_map manual over the tensor axis, so unpacking moves
    no data between devices (left to the compiler, reshaping the rows into the split value can
    turn into collective-permutes, which deadlock inside the stage's branch)."""
    for dt, slots in layout.slots:
        if not slots:
            continue

        def local(buf, slots=slots):
            tp = jax.lax.axis_size(tensor_axis)
            return tuple(
                jax.lax.slice(buf[0], (s.offset,), (s.offset + s.size,)).reshape(
                    *s.shape[: s.dim], s.shape[s.dim] // tp, *s.shape[s.dim + 1 :]
                )
                for s in slots
            )

        specs = tuple(
            P(*[tensor_axis if d == s.dim else None for d in range(len(s.shape))]) for s in slots
        )
        values = jax.shard_map(
            local,
            in_specs=P(tensor_axis),
            out_specs=specs,
            axis_names={tensor_axis},
            check_vma=False,
        )(bufs[dt])
        env.update((s.value, x) for s, x in zip(slots, values, strict=True))


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


def _pack_split(env: dict, layout: FlatLayout, sizes: dict[str, int], tp: int) -> tuple:
    """Per dtype a ``(tp, L)`` buffer: row t = shard t of every split value."""
    shards = []
    for t in range(tp):
        part = {
            s.value: jnp.split(env[s.value], tp, axis=s.dim)[t]
            for _, slots in layout.slots
            for s in slots
        }
        shards.append(_pack(part, layout, sizes))
    return tuple(jnp.stack(rows) for rows in zip(*shards, strict=True))


def _stage_fn(
    program: Program, layout: StageLayout, *, last: bool, sizes: dict, constrain, tensor_axis
):
    batch_in = [v for v in program.invars if v in program.batch_dependent]

    def run(params: dict, split: dict, recv: dict, xs: Sequence[Any]):
        env: dict = {}
        _unpack(env, layout.params, params)
        _unpack(env, layout.recv, recv)
        env.update(zip(batch_in, xs, strict=True))
        for v in env:  # whole on every device of the tensor axis, as planned
            env[v] = constrain(None, env[v])
        _unpack_split(env, layout.sharded, split, tensor_axis)
        for i in layout.ops:
            op = program.ops[i]
            outs = apply_op(op, [read_atom(env, a) for a in op.invars])
            env.update((v, constrain(v, x)) for v, x in zip(op.outvars, outs, strict=True))
        for v in (*layout.send.values(), *(a for a in program.outvars if isinstance(a, int))):
            if v in env:  # values leave the stage whole on every device of the tensor axis
                env[v] = constrain(None, env[v])
        send = _pack(env, layout.send, sizes)
        outs = tuple(read_atom(env, a) for a in program.outvars) if last else None
        return send, outs

    return run


def _constrainer(program: Program, dims: Mapping[int, int | None], tensor_axis: str | None):
    """``constrain(v, x)``: x laid out over the tensor axis as the plan says (identity without
    a tensor axis). Every value gets one, so the compiler partitions exactly as planned."""
    if tensor_axis is None:
        return lambda v, x: x

    def constrain(v, x):
        """``v=None``: replicated."""
        dim = None if v is None else dims.get(v)
        spec = [tensor_axis if d == dim else None for d in range(x.ndim)]
        return jax.lax.with_sharding_constraint(x, P(*spec))

    return constrain


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
    data_axis: str | None = None,
    tensor_axis: str | None = None,
    dims: Mapping[int, int | None] | None = None,
    replicate_outputs: bool = False,
) -> Emitted:
    """The forward pipeline over ``mesh``: manual over the pipeline axis ``axis`` and the data
    axis (each replica runs its rows of every microbatch; `program` is traced at that local
    microbatch), the tensor axis left to the compiler with a sharding constraint per value from
    ``dims``. ``replicate_outputs``: every device returns the outputs (an all-reduce from the
    last stage) instead of each returning its own block; used by the differentiable
    `Plan.apply`."""
    mesh = auto_mesh(mesh)
    p, m = len(stages), schedule.num_microbatches
    dp = mesh.shape[data_axis] if data_axis else 1
    tp = mesh.shape[tensor_axis] if tensor_axis else 1
    tensor_axis = tensor_axis if tp > 1 else None
    param_sizes = buffer_sizes([s.params for s in stages])
    split_sizes = buffer_sizes([s.sharded for s in stages]) if tensor_axis else {}
    boundary_sizes = buffer_sizes([s.send for s in stages])
    constrain = _constrainer(program, dims or {}, tensor_axis)
    runs = [
        _stage_fn(
            program,
            st,
            last=s == p - 1,
            sizes=boundary_sizes,
            constrain=constrain,
            tensor_axis=tensor_axis,
        )
        for s, st in enumerate(stages)
    ]
    stage_table = np.array([[p if c is None else c.stage for c in row] for row in schedule.table])
    mb_table = np.array([[0 if c is None else c.microbatch for c in row] for row in schedule.table])
    perm = [(d, d + 1) for d in range(p - 1)]

    def branch(s):
        def f(params, split, recv, xs):
            send, outs = runs[s](params, split, recv, xs)
            outs = _zeros_like_outputs(program) if outs is None else outs
            return send, outs

        return f

    def idle(params, split, recv, xs):
        send = tuple(jnp.zeros((n,), dt) for dt, n in boundary_sizes.items())
        outs = _zeros_like_outputs(program)
        return send, outs

    branches = [branch(s) for s in range(p)] + [idle]

    def body(param_bufs, split_bufs, batch):
        params = {dt: b[0] for dt, b in zip(param_sizes, param_bufs, strict=True)}
        split = {dt: b[0] for dt, b in zip(split_sizes, split_bufs, strict=True)}
        batch = tuple(x[0] for x in batch)  # this data replica's (m, microbatch, ...) rows
        dev = jax.lax.axis_index(axis)
        stages_t, mbs_t = jnp.asarray(stage_table, jnp.int32), jnp.asarray(mb_table, jnp.int32)

        def tick(carry, t):
            recv_bufs, out_bufs = carry
            recv = dict(zip(boundary_sizes, recv_bufs, strict=True))
            j = mbs_t[t, dev]
            xs = [jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False) for x in batch]
            send, outs = jax.lax.switch(stages_t[t, dev], branches, params, split, recv, xs)
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
        outs = tuple(y[:m].reshape(-1, *y.shape[2:]) for y in ys)
        if tensor_axis:  # whole outputs on every device of the tensor axis
            outs = tuple(jax.lax.with_sharding_constraint(y, P()) for y in outs)
        if replicate_outputs:
            last = jax.lax.axis_index(axis) == p - 1
            outs = tuple(jax.lax.psum(jnp.where(last, y, jnp.zeros_like(y)), axis) for y in outs)
        return outs

    rows = P(data_axis) if data_axis else P()
    out_rows = rows if replicate_outputs else P((axis, data_axis) if data_axis else axis)
    smap = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(
            tuple(P(axis) for _ in param_sizes),
            tuple(P(axis) for _ in split_sizes),
            rows,
        ),
        out_specs=tuple(out_rows for _ in program.outvars),
        axis_names={axis, data_axis} if data_axis else {axis},
        check_vma=False,  # operators are bound from a jaxpr traced outside the shard_map
    )

    def step(param_bufs, batch_leaves):
        whole, split = param_bufs[: len(param_sizes)], param_bufs[len(param_sizes) :]
        batch = tuple(x.reshape(dp, m, batch_size // (dp * m), *x.shape[1:]) for x in batch_leaves)
        return smap(tuple(whole), tuple(split), batch)

    whole_sharding = NamedSharding(mesh, P(axis))
    split_sharding = NamedSharding(mesh, P(axis, tensor_axis))
    buffers = tuple(
        jax.ShapeDtypeStruct((p, n), dt, sharding=whole_sharding) for dt, n in param_sizes.items()
    ) + tuple(
        jax.ShapeDtypeStruct((p, tp, n), dt, sharding=split_sharding)
        for dt, n in split_sizes.items()
    )
    return Emitted(
        step=jax.jit(step),
        buffers=buffers,
        batch_sharding=NamedSharding(mesh, rows),
        mesh=mesh,
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
    program: Program,
    split: Split,
    layouts: Sequence[FlatLayout],
    *,
    training: bool = False,
    split_layouts: Sequence[FlatLayout] = (),
    tp: int = 1,
) -> list[tuple[Callable, list[int]]]:
    """Per stage: (jitted pack(raw values) -> its blocks of the parameter buffers — ``(1, L)``
    per dtype for `layouts`, then ``(1, tp, L)`` per dtype for `split_layouts` — raw ids read)."""
    sizes = buffer_sizes(layouts)
    split_sizes = buffer_sizes(split_layouts) if split_layouts else {}
    sources = placed_sources(program, split, training=training)
    packers = []
    for s, layout in enumerate(layouts):
        split_layout = split_layouts[s] if split_layouts else FlatLayout(slots=())
        values = (*layout.values(), *split_layout.values())
        assert set(values) <= sources, "placed values must be computable before the pipeline"
        ops, raw = _hoist_closure(program, values)

        def pack(*raw_vals, ops=ops, raw=raw, layout=layout, split_layout=split_layout):
            env = dict(zip(raw, raw_vals, strict=True))
            eval_ops(program, ops, env)
            whole = tuple(b[None] for b in _pack(env, layout, sizes))
            return whole + tuple(b[None] for b in _pack_split(env, split_layout, split_sizes, tp))

        packers.append((jax.jit(pack), raw))
    return packers


def pack_traced(
    program: Program, stages: Sequence[StageLayout], params: Sequence[Any], buffers: Sequence[Any]
) -> tuple[Any, ...]:
    """Traceable packing of parameter leaves into the buffers of `Emitted.buffers`
    (differentiable)."""
    sizes = buffer_sizes([st.params for st in stages])
    split_sizes = buffer_sizes([st.sharded for st in stages]) if len(buffers) > len(sizes) else {}
    tp = buffers[-1].shape[1] if split_sizes else 1
    param_ids = [v for v in program.invars if v not in program.batch_dependent]
    raw = dict(zip(param_ids, params, strict=True)) | dict(program.consts)
    per_stage = []
    for st in stages:
        ops, needed = _hoist_closure(program, (*st.params.values(), *st.sharded.values()))
        env = {v: raw[v] for v in needed}
        eval_ops(program, ops, env)
        per_stage.append(
            _pack(env, st.params, sizes) + _pack_split(env, st.sharded, split_sizes, tp)
        )
    stacked = [jnp.stack(bufs) for bufs in zip(*per_stage, strict=True)]
    return tuple(jax.device_put(b, spec.sharding) for b, spec in zip(stacked, buffers, strict=True))
