"""Emit pass: stage layouts + a schedule → ONE ``jax.jit(jax.shard_map(...))`` program.

The program is manual over every mesh axis (pipeline, data, tensor). Per device:
  - parameters arrive as the slots of a `ParamLayout`: one array per value, ``(1, *shape)``
    locally (global ``(p, *shape)`` sharded over the pipeline axis, and over the tensor axis for
    split values), holding only this device's stage's values, read whole (in place);
  - batch leaves arrive replicated, reshaped to ``(m, microbatch, ...)``;
  - a ``lax.scan`` over ticks reads this device's cell of the schedule table, runs its stage
    with ``lax.switch`` (an extra branch idles), packs the values for the next stage into one
    flat buffer per dtype, and after the switch sends it with one unconditional
    ``lax.ppermute`` per dtype (collectives never run inside a branch);
  - the last stage writes its outputs into an (m + 1, microbatch, ...) buffer at the
    microbatch's row (other actions write the spare row), so each device keeps m outputs;
  - with a tensor axis, each operator of a stage runs on this device's shards under the
    strategy the plan chose for it, and every collective on the tensor axis (the psum of a
    row-parallel matmul, the all-gather of a split value that must become whole, the all-to-all
    that moves a split) is emitted explicitly (`passes.tensor_local`), so XLA's partitioner
    never picks one the plan did not price. Those collectives run inside the stage's branch,
    which every device of the tensor group takes together; values enter and leave a stage
    whole.

Operators are replayed from a jaxpr traced outside the shard_map, which shard_map's
varying-axes checker cannot type, so the shard_map is built with ``check_vma=False``.
Parameters are placed by `param_layout.make_packers`: one jitted function per stage that
evaluates the hoisted ops and writes that stage's values into its rows of the slots, run on the
stage's own devices, so no device ever holds another stage's parameters.
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

from autopipe.passes.inputs import first_microbatch, key_inputs, per_microbatch
from autopipe.passes.ir import Program, read_atom
from autopipe.passes.layout import StageLayout, buffer_sizes
from autopipe.passes.param_layout import (
    ParamLayout,
    pack_flat,
    param_layout,
    read_params,
    unpack_flat,
)
from autopipe.passes.schedule import Schedule
from autopipe.passes.sharding_rules import Strategy
from autopipe.passes.tensor_local import TensorPlan, eval_stage
from autopipe.passes.trace import is_key_dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class Emitted:
    step: Callable  # jitted (slots, batch_leaves) -> outputs, global (p * B, ...) each
    buffers: tuple[jax.ShapeDtypeStruct, ...]  # the parameter slots, global, with shardings
    params: ParamLayout
    batch_sharding: NamedSharding
    mesh: Any  # the mesh the program runs on (the user's devices, every axis Auto)
    input_sharding: NamedSharding | None = None  # inputs (`passes.inputs`): replicated


def auto_mesh(mesh: Any) -> jax.sharding.Mesh:
    """The user's mesh with every axis Auto: the non-manual axes are left to the compiler."""
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def _stage_fn(
    program: Program,
    layout: StageLayout,
    params: ParamLayout,
    device: int,
    *,
    last: bool,
    sizes: dict,
    tensor: TensorPlan | None,
):
    """Stage ``layout`` on ``device`` as ``run(bufs, recv, xs) -> (send, outputs or None)``,
    reading its parameters from its blocks of the buffers of ``params``. With a tensor axis
    (``tensor``) every operator runs on this device's shards under its planned strategy
    (`passes.tensor_local`); values arrive and leave whole."""
    batch_in = [*(v for v in program.invars if v in program.batch_dependent)]
    batch_in += program.input_invars
    key_consts = {v: c for v, c in program.consts if is_key_dtype(program.avals[v].dtype)}
    split = params.split

    def run(bufs: Sequence[Any], recv: dict, xs: Sequence[Any]):
        """``xs``: this microbatch's batch leaves, then the inputs as it sees them."""
        env: dict = dict(key_consts)
        unpack_flat(env, layout.recv, recv)
        env.update(zip(batch_in, xs, strict=True))
        env.update(read_params(program, params, device, bufs))
        whole = eval_stage(program, layout.ops, env, tensor, split)
        leaving = (*layout.send.values(), *(a for a in program.outvars if isinstance(a, int)))
        out_env = {v: whole(v) for v in leaving if v in env}
        send = pack_flat(out_env, layout.send, sizes)
        outs = tuple(read_atom(out_env, a) for a in program.outvars) if last else None
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
    data_axis: str | None = None,
    tensor_axis: str | None = None,
    dims: Mapping[int, int | None] | None = None,
    strategies: Mapping[int, Strategy] | None = None,
    whole: frozenset[int] = frozenset(),
    replicate_outputs: bool = False,
) -> Emitted:
    """The forward pipeline over ``mesh``, manual over every axis: the pipeline axis ``axis``,
    the data axis (each replica runs its rows of every microbatch; `program` is traced at that
    local microbatch) and the tensor axis, where each operator runs its planned strategy from
    ``strategies`` (op index → `Strategy`) on this device's shards, parameters split as
    ``dims`` says, with every collective explicit (`passes.tensor_local`); ``whole``: values
    the plan hands to other sharding segments whole (gathered where they are made).
    ``replicate_outputs``: every device returns the outputs (an all-reduce from the last stage)
    instead of each returning its own block; used by the differentiable `Plan.apply`."""
    mesh = auto_mesh(mesh)
    p, m = len(stages), schedule.num_microbatches
    dp = mesh.shape[data_axis] if data_axis else 1
    tp = mesh.shape[tensor_axis] if tensor_axis else 1
    tensor_axis = tensor_axis if tp > 1 else None
    layout = param_layout(
        program, [st.params for st in stages], dims=dims if tensor_axis else None, tp=tp
    )
    tensor = None
    if tensor_axis:
        tensor = TensorPlan(
            axis=tensor_axis, tp=tp, strategies=dict(strategies or {}), whole=frozenset(whole)
        )
    body = _body(program, stages, schedule, layout, axis, tensor, data_axis)
    if replicate_outputs:
        body = _replicated(body, axis, p)
    rows = P(data_axis) if data_axis else P()
    out_rows = rows if replicate_outputs else P((axis, data_axis) if data_axis else axis)
    smap = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tuple(a.sharding.spec for a in layout.avals(mesh, axis, tensor_axis)), rows, P()),
        out_specs=tuple(out_rows for _ in program.outvars),
        # manual over every axis, also those of size 1 or that only replicate the pipeline:
        # nothing is left to XLA's partitioner, which aborted on a bf16 plan with a size-1 data
        # axis ("Invalid binary instruction opcode copy", tests.random_models seed 0 case 567)
        axis_names=set(mesh.axis_names),
        check_vma=False,  # operators are bound from a jaxpr traced outside the shard_map
    )

    def step(slots, batch_leaves, input_leaves=()):
        batch = tuple(x.reshape(dp, m, batch_size // (dp * m), *x.shape[1:]) for x in batch_leaves)
        return smap(tuple(slots), batch, tuple(input_leaves))

    return Emitted(
        step=jax.jit(step),
        buffers=layout.avals(mesh, axis, tensor_axis),
        params=layout,
        batch_sharding=NamedSharding(mesh, rows),
        mesh=mesh,
        input_sharding=NamedSharding(mesh, P()),
    )


def _replicated(body: Callable, axis: str, p: int) -> Callable:
    """``body`` whose outputs every device returns (summed from the last stage's devices)."""

    def run(slots, batch, inputs):
        last = jax.lax.axis_index(axis) == p - 1
        outs = body(slots, batch, inputs)
        return tuple(jax.lax.psum(jnp.where(last, y, jnp.zeros_like(y)), axis) for y in outs)

    return run


def _body(
    program, stages, schedule, layout: ParamLayout, axis, tensor: TensorPlan | None, data_axis
) -> Callable:
    """The shard_map body: a scan over the table's ticks, one ``switch`` over the stages per tick
    (an extra branch idles), one ppermute per boundary dtype after it."""
    p, m = len(stages), schedule.num_microbatches
    boundary_sizes = buffer_sizes([s.send for s in stages])
    runs = [
        _stage_fn(program, st, layout, s, last=s == p - 1, sizes=boundary_sizes, tensor=tensor)
        for s, st in enumerate(stages)
    ]

    def branch(s):
        def f(slots, recv, xs):
            send, outs = runs[s](slots, recv, xs)
            return send, _zeros_like_outputs(program) if outs is None else outs

        return f

    def idle(slots, recv, xs):
        return tuple(jnp.zeros((n,), dt) for dt, n in boundary_sizes.items()), _zeros_like_outputs(
            program
        )

    branches = [branch(s) for s in range(p)] + [idle]
    stage_table = np.array([[p if c is None else c.stage for c in row] for row in schedule.table])
    mb_table = np.array([[0 if c is None else c.microbatch for c in row] for row in schedule.table])
    perm = [(d, d + 1) for d in range(p - 1)]

    keys = key_inputs(program)
    input_ids = program.input_invars

    def body(slot_bufs, batch, inputs):
        batch = tuple(x[0] for x in batch)  # this data replica's (m, microbatch, ...) rows
        dev = jax.lax.axis_index(axis)
        first = first_microbatch(data_axis, m)
        stages_t = jnp.asarray(stage_table, jnp.int32)[:, dev]
        mbs_t = jnp.asarray(mb_table, jnp.int32)[:, dev]

        def tick(carry, t):
            recv_bufs, out_bufs = carry
            recv = dict(zip(boundary_sizes, recv_bufs, strict=True))
            j = mbs_t[t]
            xs = [jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False) for x in batch]
            xs += per_microbatch(keys, input_ids, inputs, first + j)
            send, outs = jax.lax.switch(stages_t[t], branches, slot_bufs, recv, xs)
            row = jnp.where(stages_t[t] == p - 1, j, m)  # other actions: the spare row
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
        return tuple(y[:m].reshape(-1, *y.shape[2:]) for y in ys)

    return body
