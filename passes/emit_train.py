"""Emit pass for training: a schedule table → ONE jitted step (pipelined gradients + optax).

The step is ``jit(train_step)`` with parameters and optimizer state donated:

    grads, loss = shard_map(pipeline)(slots, microbatches)      # manual over every axis
    slots, opt_state = optimizer_step.update(grads, opt_state, slots)

With a tensor axis, tensor-split slots are ``(p, *shape)`` arrays sharded over the pipeline
axis and over the tensor axis on their split dimension: each device holds its shard of the
parameter, its gradient and its optimizer state (adam's moments follow the slots' specs); the
stages run their planned strategies with Megatron's conjugate collectives
(`passes.train_actions`). The update runs on the global slots, the tensor axis left to XLA's
partitioner (elementwise updates stay local; a global norm or a per-leaf statistic sums over
the whole leaf once, so both stay exact).

Parameters, gradients and optimizer state all live in the same layout: the slots of a
`ParamLayout` built by size where the optimizer reads no shapes (`optimizer_exact.shape_free`)
and by shape otherwise, each a ``(p, *shape)`` array sharded over the pipeline axis whose
row d is one leaf of device d's stages (``d, d + p, …`` with virtual stages) with its own shape.
`passes.optimizer` runs the optax update per device on those leaves (exact for per-leaf
transforms) or on the whole slots (exact for global norms), and refuses what neither makes
exact; the state persists in the layout across steps.

Inside the shard_map a ``lax.scan`` runs the ticks of the table. Per tick and device:
  1. the activation and the gradient that arrived (sent last tick by the neighbours) are
     stored into inbox slots, as the table's slot plan says;
  2. ``F`` — the stage forward under ``jax.vjp`` — runs if it is the device's action: one
     ``while_loop`` per stage that runs once or never (`_when`). It writes the residuals it
     keeps (not the parameters themselves; only the stage input when the stage
     rematerialises) into their residual slot in place, and sets the activation to send (or
     adds the microbatch loss);
  3. the device's backward action runs the same way, one loop per action: ``B`` (rebuild the
     VJP from the residual slot and pull the cotangent back) or, with ``W`` split off
     (`passes.split_backward`), ``B`` (the input gradient and the cheap weight gradients,
     storing the cotangents and the activation inputs of the matmuls that read parameters)
     and ``W`` (those matmuls' weight gradients, x^T g from what B stored: no second pass
     back through the stage, no recomputation, no residual read; its loop carries only the
     gradient sums — with the stored buffers in its carry XLA hoisted W's matmuls out of the
     loop, to run on every tick). A W in its B's cell runs fused with it (``BW``: B hands
     the cotangents and inputs to W's computation at once, storing nothing), a W apart in its
     own loop; a tick may run a backward and a W apart (only the loop kinds the table uses
     are emitted, each for every stage: `Schedule.loop_kinds`). Each adds its parameter
     gradients into its own rows of the gradient sums in place, and B sets the gradient to
     send. A tick without a backward touches no gradient buffer;
  4. one ``ppermute`` per direction and dtype runs unconditionally; on a tick without a send
     it carries the last one again, which lands in an inbox slot holding nothing live
     (`train_slots.plan_slots`), so no tick zero-fills a send buffer.
After the scan, a parameter held by several devices (a tied embedding) gets the sum of its
copies' gradients on every holder (`passes.shared_params.sum_copies`), outside any branch.

Why the actions are loops and not switch branches: a branch returns new buffers, so the
residuals it made were copied into their slot after the switch, and XLA held them in the
switch's output buffer while they were built — one residual set more than the schedule keeps,
at the forward's peak. A backward switch returned a whole gradient set every tick (zeros on
idle ticks) that was then added to the sums: three passes over the gradients per tick, where
the loops make one, and only on the ticks that have a backward (GPT 8×256, SGD, m 8, one
device, 1F1B: XLA temp 139 → 121 MB; on XLA:CPU every temp byte is faulted in on every step).

Buffer slots for stored values come from `train_slots.plan_slots` (exactly the schedule's
in-flight count); residual slots, and the slots of what B stores for W, are split into chunks
by `residuals.plan_chunks`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autopipe.passes.emit import auto_mesh
from autopipe.passes.inputs import first_microbatch, key_inputs, per_microbatch
from autopipe.passes.ir import Program
from autopipe.passes.layout import StageLayout
from autopipe.passes.optimizer import optimizer_step, zero_spec
from autopipe.passes.optimizer_exact import layout_by
from autopipe.passes.param_layout import ParamLayout
from autopipe.passes.residuals import ResidualChunks, plan_chunks
from autopipe.passes.schedule import Action, Cell, Schedule, actions
from autopipe.passes.sharding_rules import Strategy
from autopipe.passes.shared_params import check_aligned, sum_copies
from autopipe.passes.tensor_local import TensorPlan
from autopipe.passes.train_actions import (
    Actions,
    BackwardState,
    ForwardState,
    TickInputs,
    device_groups,
    set_row,
)
from autopipe.passes.train_slots import SlotPlan, plan_slots

__all__ = [
    "EmittedTrain", "device_groups", "emit_train", "plan_chunks", "plan_slots", "probe_tables"
]  # fmt: skip

# --- the step -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmittedTrain:
    # jitted (slots, opt_state, batch_leaves, inputs, tables) -> (slots, opt_state, loss)
    step: Callable
    tables: dict[str, np.ndarray]  # the schedule's per-tick, per-device tables (`_tables`)
    init_opt: Callable  # jitted slots -> opt_state (laid out as `opt_avals`)
    params: ParamLayout  # by size, or by shape for optimizers that read shapes
    buffers: tuple[jax.ShapeDtypeStruct, ...]  # the slots, global ``(p, *shape)``, sharded
    opt_avals: Any  # the optimizer state's avals with their shardings
    optimizer_mode: str  # "local" (per device, per leaf) or "global" (see passes.optimizer)
    batch_sharding: NamedSharding
    slots: SlotPlan
    residual_sizes: dict[str, int]  # elements per residual slot, per dtype
    residual_chunks: ResidualChunks
    input_sharding: NamedSharding  # inputs (`passes.inputs`): replicated on every device

    def place_tables(self, tables: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Tables (`tables`, or `probe_tables`) as the step takes them: on every device."""
        return {k: jax.device_put(v, self.input_sharding) for k, v in tables.items()}


def emit_train(
    program: Program,
    stages: Sequence[StageLayout],
    schedule: Schedule,
    *,
    mesh: Any,
    axis: str,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    remat: Sequence[bool],
    loss_scale: float,
    data_axis: str | None = None,
    zero_stage: int = 0,
    tensor_axis: str | None = None,
    dims: Mapping[int, int | None] | None = None,
    strategies: Mapping[int, Strategy] | None = None,
    whole: frozenset[int] = frozenset(),
) -> EmittedTrain:
    """``data_axis``: each replica runs the pipeline on its rows of every microbatch (`program`
    is traced at that local microbatch); gradients and the loss are summed over the replicas
    before the optimizer update, so parameters stay identical on them. ``zero_stage=1``: the
    optimizer state is split over the replicas (`passes.optimizer`, ZeRO-1), the gradients
    reduce-scattered to the same split instead of all-reduced. ``tensor_axis``: every
    operator runs its planned strategy (``strategies``) on this device's shards with Megatron's
    conjugate collectives (`passes.tensor_local`), parameters split as ``dims`` says and held,
    with their gradients and optimizer state, as shards; ``whole``: see `passes.emit.emit`."""
    mesh = auto_mesh(mesh)  # the axes outside the shard_map are left to the compiler
    p, m = schedule.num_devices, schedule.num_microbatches
    dp = mesh.shape[data_axis] if data_axis else 1
    tp = mesh.shape[tensor_axis] if tensor_axis else 1
    tensor_axis = tensor_axis if tp > 1 else None
    mb = batch_size // (m * dp)
    leaves = [program.avals[v] for v in program.param_invars]
    by = layout_by(optimizer, leaves)
    tensor = _tensor_plan(tensor_axis, tp, strategies, whole)
    opts = dict(by=by, tensor=tensor, dims=dims, mesh=mesh, split_backward=schedule.split_backward)
    acts = Actions.build(program, stages, p, mb, remat, loss_scale, **opts)
    buffers = acts.params.avals(mesh, axis, tensor_axis)
    shared = check_aligned(acts.params)
    zero_axis = data_axis if zero_stage else None
    opt = optimizer_step(
        optimizer, buffers, mesh=mesh, axis=axis, shared=shared, zero_axis=zero_axis,
        shape_free=by == "size",
    )  # fmt: skip
    grad_specs = tuple(zero_spec(b.shape, axis, zero_axis, dp, b.sharding.spec) for b in buffers)
    slots = plan_slots(schedule)
    pipeline = _pipeline(acts, schedule, slots, axis, data_axis, grad_specs)
    rows = P(data_axis) if data_axis else P()
    smap = jax.shard_map(
        pipeline,
        mesh=mesh,
        in_specs=(tuple(b.sharding.spec for b in buffers), rows, P(), P()),
        out_specs=(grad_specs, P()),
        # Manual over every axis: nothing inside is left to XLA's partitioner (which aborted
        # on a bf16 pipeline with an unused tensor axis: "Invalid binary instruction opcode
        # copy", tests.random_models seed 0 case 145); tensor collectives are explicit.
        axis_names=set(mesh.axis_names),
        check_vma=False,  # operators are bound from a jaxpr traced outside the shard_map
    )

    def train_step(param_slots, opt_state, batch_leaves, input_leaves, tables):
        batch = tuple(x.reshape(dp, m, mb, *x.shape[1:]) for x in batch_leaves)
        grads, loss = smap(tuple(param_slots), batch, tuple(input_leaves), tables)
        param_slots, opt_state = opt.update(grads, opt_state, tuple(param_slots))
        return param_slots, opt_state, loss

    return EmittedTrain(
        step=jax.jit(train_step, donate_argnums=(0, 1)),
        tables=_tables(schedule, slots),
        init_opt=opt.init,
        params=acts.params,
        buffers=buffers,
        opt_avals=opt.state_avals,
        optimizer_mode=opt.mode,
        batch_sharding=NamedSharding(mesh, rows),
        slots=slots,
        residual_sizes=acts.chunks.sizes(),
        residual_chunks=acts.chunks,
        input_sharding=NamedSharding(mesh, P()),
    )


def _tensor_plan(tensor_axis, tp, strategies, whole) -> TensorPlan | None:
    """The stage operators' tensor strategies, differentiated with the conjugate collectives."""
    if not tensor_axis:
        return None
    strategies, whole = dict(strategies or {}), frozenset(whole)
    return TensorPlan(axis=tensor_axis, tp=tp, strategies=strategies, whole=whole, conjugate=True)


def _replica_sum(data_axis: str, g: jax.Array, spec: P) -> jax.Array:
    """The replicas' sum of a gradient row: all-reduced, or reduce-scattered to this replica's
    part where ``spec`` (the row's leading axis included) splits a dimension over the axis."""
    dims = [d for d, name in enumerate(spec) if name == data_axis]
    if not dims:
        return jax.lax.psum(g, data_axis)
    return jax.lax.psum_scatter(g, data_axis, scatter_dimension=dims[0] - 1, tiled=True)


def _action_tables(schedule: Schedule) -> dict[str, np.ndarray]:
    """Per tick and device: the stage whose forward runs, the backward branch (B of stage s is
    s, B fused with its W is S + s) and the stage whose W runs (a W apart from its B), -1
    for none, and the forward's and the backward's microbatches (`schedule.actions`)."""
    S, fused = schedule.num_stages, schedule.fused()
    shape = (schedule.num_ticks, schedule.num_devices)
    fwd, bwd, wgt = (np.full(shape, -1, np.int32) for _ in range(3))
    mb_f, mb_b = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    cells = [
        (t, d, a) for t, r in enumerate(schedule.table) for d, c in enumerate(r) for a in actions(c)
    ]
    for t, d, a in cells:
        if a.kind == "F":
            fwd[t, d], mb_f[t, d] = a.stage, a.microbatch
        elif a.kind == "B":
            bwd[t, d], mb_b[t, d] = a.stage + (S if a in fused else 0), a.microbatch
        elif a not in fused:
            wgt[t, d] = a.stage
    return {"fwd": fwd, "bwd": bwd, "wgt": wgt, "mb_f": mb_f, "mb_b": mb_b}


def probe_tables(
    schedule: Schedule,
    slots: SlotPlan,
    kind: str | None,
    index: int = 0,
    device: int | None = None,
) -> dict[str, np.ndarray]:
    """Tables of the schedule's shapes in which every device d (only ``device``, if given)
    runs ``kind`` ("F", "B", "W", "BW": a B fused with its W; None: nothing) of its stage
    ``index · p + d`` at every tick, every slot 0: the step run with them times one action
    kind (`autopipe._train_profile`). What the actions compute from slots nobody filled is
    meaningless; only the time counts."""
    p, m = schedule.num_devices, schedule.num_microbatches

    def cell(t: int, d: int) -> Cell:
        if kind is None or device not in (None, d):
            return None
        run = [Action(k, index * p + d, t % m) for k in kind]  # type: ignore[arg-type]
        return run[0] if len(run) == 1 else tuple(run)

    table = tuple(tuple(cell(t, d) for d in range(p)) for t in range(schedule.num_ticks))
    zero = {k: np.zeros_like(v) for k, v in _slot_tables(slots).items()}
    return zero | _action_tables(dataclasses.replace(schedule, table=table))


def _when(pred, action: Callable, state: Any, inputs: Any) -> Any:
    """``action(state, inputs)`` if ``pred``, as a while loop that runs once or never.

    A while loop updates its carried buffers in place, where a switch branch would return new
    ones (see the module docstring). The loop counter goes through an optimization barrier
    with the inputs, so XLA cannot hoist the action out of the loop; a boolean "done" flag
    instead of a counter let XLA prove the loop runs at most once and hoist the whole forward
    out of it, to run every tick."""
    trips = pred.astype(jnp.int32)

    def body(carry):
        i, state = carry
        x, _ = jax.lax.optimization_barrier((inputs, i))
        return i + 1, action(state, x)

    return jax.lax.while_loop(lambda c: c[0] < trips, body, (jnp.zeros((), jnp.int32), state))[1]


def _tables(schedule: Schedule, slots: SlotPlan) -> dict[str, np.ndarray]:
    """Every per-tick, per-device int table the scan reads: slots, actions, microbatch."""
    return _slot_tables(slots) | _action_tables(schedule)


def _slot_tables(slots: SlotPlan) -> dict[str, np.ndarray]:
    return {k: v for k, v in dataclasses.asdict(slots).items() if isinstance(v, np.ndarray)}


def _zeros(sizes: dict[str, int], *lead: int) -> tuple:
    return tuple(jnp.zeros((*lead, k), dt) for dt, k in sizes.items())


def _chunk_zeros(chunks: ResidualChunks | None, slots: int) -> tuple:
    return tuple(jnp.zeros((slots, k), dt) for dt, k in chunks.chunks) if chunks else ()


def _initial_carry(acts: Actions, n: dict[str, int]) -> tuple:
    """(sent forward, sent backward, inboxes, forward state, backward state)."""
    b, g = acts.boundary_sizes, acts.grad_sizes
    state = ForwardState(
        ress=_chunk_zeros(acts.chunks, n["res"]),
        loss=jnp.zeros((), jnp.float32),
        send_f=_zeros(b),
    )
    back = BackwardState(
        send_b=_zeros(g), cots=_chunk_zeros(acts.kept, n["cot"]), grads=acts.zero_grads()
    )
    return _zeros(b), _zeros(g), _zeros(b, n["act"]), _zeros(g, n["grad"]), state, back


def _pipeline(
    acts: Actions,
    schedule: Schedule,
    slots: SlotPlan,
    axis: str,
    data_axis: str | None,
    grad_specs: Sequence[P],
) -> Callable:
    """The shard_map body: a scan over the table's ticks (see the module docstring).
    ``grad_specs``: how the gradients leave it (split over the data axis: ZeRO-1)."""
    p, S = schedule.num_devices, schedule.num_stages
    fwd_perm = [(d, (d + 1) % p) for d in range(p)] if S > p else [(d, d + 1) for d in range(p - 1)]
    bwd_perm = [(b, a) for a, b in fwd_perm]
    forwards = [acts.forward(s) for s in range(S)]
    kinds = schedule.loop_kinds()
    backwards = [(s, acts.backward(s)) for s in range(S) if "B" in kinds]
    backwards += [(S + s, acts.backward(s, fuse_w=True)) for s in range(S) if "BW" in kinds]
    weights = [(s, acts.weights(s)) for s in range(S) if "W" in kinds]
    keys, input_ids = key_inputs(acts.program), acts.program.input_invars
    m = schedule.num_microbatches

    def body(params, batch, inputs, all_tables):
        batch = tuple(x[0] for x in batch)  # this data replica's (m, microbatch, ...) rows
        dev = jax.lax.axis_index(axis)
        first = first_microbatch(data_axis, m)
        tables = {k: v[:, dev] for k, v in all_tables.items()}
        ticks = all_tables["fwd"].shape[0]

        def tick(carry, t):
            fwd_in, bwd_in, inbox_f, inbox_b, state, back = carry
            cell = {k: v[t] for k, v in tables.items()}
            inbox_f = tuple(map(set_row, inbox_f, [cell["act_store"]] * len(fwd_in), fwd_in))
            inbox_b = tuple(map(set_row, inbox_b, [cell["grad_store"]] * len(bwd_in), bwd_in))

            def microbatch(j):  # its batch leaves, then the inputs as it sees them
                xs = [jax.lax.dynamic_index_in_dim(b, j, 0, keepdims=False) for b in batch]
                return xs + per_microbatch(keys, input_ids, inputs, first + j)

            x = TickInputs(
                params=params,
                xs=microbatch(cell["mb_f"]),
                inbox_f=inbox_f,
                inbox_b=inbox_b,
                slots=cell,
            )
            for s, forward in enumerate(forwards):
                state = _when(cell["fwd"] == s, forward, state, x)
            x = x._replace(xs=microbatch(cell["mb_b"]))  # a pair's backward: its own microbatch
            for b, backward in backwards:
                back = _when(cell["bwd"] == b, backward, back, (x, state.ress))
            for s, w in weights:  # on the gradient sums alone (`Actions.weights`)
                grads = _when(cell["wgt"] == s, w, back.grads, (x, back.cots))
                back = back._replace(grads=grads)
            fwd_in = tuple(jax.lax.ppermute(y, axis, fwd_perm) for y in state.send_f)
            bwd_in = tuple(jax.lax.ppermute(y, axis, bwd_perm) for y in back.send_b)
            return (fwd_in, bwd_in, inbox_f, inbox_b, state, back), None

        init = _initial_carry(acts, slots.counts)
        carry, _ = jax.lax.scan(tick, init, jnp.arange(ticks))
        state, gacc = carry[-2], carry[-1].grads
        loss = jax.lax.psum(state.loss * acts.seed, axis)
        if data_axis:  # the replicas' gradients and losses add up
            gacc = tuple(map(functools.partial(_replica_sum, data_axis), gacc, grad_specs))
            loss = jax.lax.psum(loss, data_axis)
        gacc = sum_copies(gacc, acts.params.shared, axis, p)  # tied copies: one gradient
        return tuple(g[None] for g in gacc), loss

    return body
