"""Emit pass for training: a schedule table → ONE jitted step (pipelined gradients + optax).

The step is ``jit(train_step)`` with parameters and optimizer state donated:

    grads, loss = shard_map(pipeline)(param_bufs, microbatches)      # manual over 'pp'
    updates, opt_state = optimizer.update(grads, opt_state, param_bufs)
    param_bufs = optax.apply_updates(param_bufs, updates)

Parameters, gradients and optimizer state all live in the same layout: one flat buffer per
dtype, shape ``(p, L)`` sharded over the pipeline axis, device ``d`` holding the values of its
stages (``d, d + p, …`` with virtual stages). An elementwise optimizer (SGD, Adam, AdamW, …)
applied to these buffers does exactly what it does leaf by leaf, on each device's own shard,
with no communication; its state persists in the layout across steps.

Inside the shard_map a ``lax.scan`` runs the ticks of the table. Per tick and device:
  1. the activation and the gradient that arrived (sent last tick by the neighbours) are
     stored into inbox slots, as the table's slot plan says;
  2. ``lax.switch`` runs the device's action — ``F`` (stage forward under ``jax.vjp``; the
     residuals it keeps, except the parameters themselves, go to a residual slot, or only the
     stage input when the stage rematerialises), ``B`` (rebuild the VJP from the residual slot
     and pull the cotangent back; with ``W`` split off, only the input gradient is computed and
     XLA drops the weight-gradient half), ``W`` (weight gradient from the same residuals and
     the stored cotangent), or idle;
  3. the new residuals / cotangent are written to their slots, parameter gradients are
     accumulated, and one ``ppermute`` per direction and dtype runs unconditionally.

Slots are assigned by `plan_slots`: each stored value lives from the tick it arrives (or is
made) to the tick it is consumed, and slots are reused greedily, so buffers hold exactly the
schedule's in-flight count — m residual sets for GPipe, at most p for 1F1B.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autopipe.passes.emit import _pack, _unpack
from autopipe.passes.ir import Program, eval_ops
from autopipe.passes.layout import FlatLayout, StageLayout, _flat, buffer_sizes
from autopipe.passes.schedule import Action, Schedule

# --- slot plan ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlotPlan:
    """Per tick and device: buffer slots to store into and to read from (int [tick, device])."""

    act_store: np.ndarray
    act_read: np.ndarray
    grad_store: np.ndarray
    grad_read: np.ndarray
    res_store: np.ndarray  # F stores residuals
    res_read: np.ndarray  # B (and W) read them
    cot_store: np.ndarray  # B stores its cotangent (split backward)
    cot_read: np.ndarray  # W reads it
    counts: dict[str, int]  # slots per buffer


def _assign(intervals: dict[Any, tuple[int, int]]) -> tuple[dict[Any, int], int]:
    """Greedy interval colouring: slot per key so that no two live intervals share a slot."""
    free_at: list[int] = []  # per slot: first tick it is free again
    slots = {}
    for key, (start, end) in sorted(intervals.items(), key=lambda kv: (kv[1], kv[0])):
        slot = next((k for k, f in enumerate(free_at) if f <= start), None)
        if slot is None:
            slot, free_at = len(free_at), [*free_at, 0]
        free_at[slot] = end + 1
        slots[key] = slot
    return slots, len(free_at)


def plan_slots(schedule: Schedule) -> SlotPlan:
    """Assigns buffer slots to every stored value (see the module docstring).

    Every tick stores something into each buffer (stores are unconditional, outside the
    switch). A tick with nothing to store writes into a slot holding nothing live, so buffers
    need a spare slot only when every slot is live at such a tick.
    """
    s, p = schedule, schedule.num_devices
    ticks = s.ticks()
    # per kind and device: key -> (tick stored, tick last read), and every tick it is read
    spans: dict[str, list[dict]] = {k: [{} for _ in range(p)] for k in SLOT_KINDS}
    reads: dict[str, list[dict]] = {k: [{} for _ in range(p)] for k in SLOT_KINDS}
    for a, t in ticks.items():
        d, j = s.device_of(a.stage), a.microbatch
        if a.kind == "F" and a.stage > 0:
            sent = ticks[Action("F", a.stage - 1, j)]
            spans["act"][d][a], reads["act"][d][a] = (sent + 1, t), [t]
        if a.kind == "B" and a.stage < s.num_stages - 1:
            sent = ticks[Action("B", a.stage + 1, j)]
            spans["grad"][d][a], reads["grad"][d][a] = (sent + 1, t), [t]
        if a.kind == "F":
            users = [ticks[Action("B", a.stage, j)]]
            users += [ticks[Action("W", a.stage, j)]] if s.split_backward else []
            spans["res"][d][a], reads["res"][d][a] = (t, max(users)), users
        if a.kind == "B" and s.split_backward:
            w = ticks[Action("W", a.stage, j)]
            spans["cot"][d][a], reads["cot"][d][a] = (t, w), [w]
    tables: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for kind in SLOT_KINDS:
        # arrivals are stored before the action reads them; residuals/cotangents after
        store_first = kind in ("act", "grad")
        store, read, n = _slot_tables(spans[kind], reads[kind], s.num_ticks, store_first)
        tables[f"{kind}_store"], tables[f"{kind}_read"], counts[kind] = store, read, n
    return SlotPlan(**tables, counts=counts)


SLOT_KINDS = ("act", "grad", "res", "cot")


def _slot_tables(spans, reads, num_ticks: int, store_first: bool):
    p = len(spans)
    assigned = [_assign(iv) for iv in spans]
    count = max((c for _, c in assigned), default=0)
    store = np.full((num_ticks, p), -1, np.int32)
    read = np.zeros((num_ticks, p), np.int32)
    spare = False
    for d, (slots, _) in enumerate(assigned):
        live = np.zeros((num_ticks, max(count, 1)), bool)  # slot holds a value still needed
        for key, slot in slots.items():
            start, end = spans[d][key]
            store[start, d] = slot
            read[reads[d][key], d] = slot
            live[start : end + 1 if store_first else end, slot] = True
        for t in np.flatnonzero(store[:, d] < 0):
            free = np.flatnonzero(~live[t, :count])
            if free.size or not store_first:  # residual buffers: rewrite what a slot holds
                store[t, d] = free[0] if free.size else 0
            else:
                store[t, d], spare = count, True
    return store, read, count + int(spare or count == 0)


# --- stage functions under vjp -------------------------------------------------------------


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _StageIO:
    """The differentiable interface of one stage."""

    params: tuple[int, ...]  # float parameter values (differentiated)
    recv: tuple[int, ...]  # float values received (differentiated)
    fixed: tuple[int, ...]  # int/bool parameter or received values (not differentiated)
    outputs: tuple[int, ...]  # values sent on, or the loss


def _stage_io(program: Program, layout: StageLayout, last: bool) -> _StageIO:
    params = layout.params.values()
    recv = layout.recv.values()
    floats = lambda vs: tuple(v for v in vs if _is_float(program.avals[v]))  # noqa: E731
    fixed = tuple(v for v in (*params, *recv) if not _is_float(program.avals[v]))
    outputs = tuple(program.outvars) if last else layout.send.values()
    return _StageIO(params=floats(params), recv=floats(recv), fixed=fixed, outputs=outputs)


def _apply_fn(program: Program, layout: StageLayout, io: _StageIO, consts: dict) -> Callable:
    batch_in = [v for v in program.invars if v in program.batch_dependent]

    def apply(param_vals, recv_vals, fixed_vals, xs):
        env = dict(consts)
        env.update(zip(io.params, param_vals, strict=True))
        env.update(zip(io.recv, recv_vals, strict=True))
        env.update(zip(io.fixed, fixed_vals, strict=True))
        env.update(zip(batch_in, xs, strict=True))
        eval_ops(program, layout.ops, env)
        return tuple(env[v] for v in io.outputs)

    return apply


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Residuals:
    """How a stage's VJP residuals are stored: which leaves are its own parameters (not
    stored), and the flat layout of the rest."""

    treedef: Any
    param_index: tuple[int, ...]  # per leaf: index into param_vals, or -1 when stored
    layout: FlatLayout  # over pseudo value ids 0..k-1 of the stored leaves


def _residual_spec(fn: Callable, args: tuple, remat: bool) -> _Residuals:
    """Traces ``jax.vjp`` of a stage abstractly to learn its residual structure."""
    found = {}

    def probe(param_vals, recv_vals, fixed_vals, xs):
        if remat:
            leaves, treedef = jax.tree.flatten(recv_vals)
            found["spec"] = (treedef, [-1] * len(leaves), leaves)
            return leaves
        _, vjp_fn = jax.vjp(lambda pv, rv: fn(pv, rv, fixed_vals, xs), param_vals, recv_vals)
        leaves, treedef = jax.tree.flatten(vjp_fn)
        index = [next((i for i, q in enumerate(param_vals) if q is x), -1) for x in leaves]
        found["spec"] = (treedef, index, leaves)
        return [x for x, i in zip(leaves, index, strict=True) if i < 0]

    stored = jax.eval_shape(probe, *args)
    treedef, index, _ = found["spec"]
    pseudo = Program(
        avals=tuple(stored), ops=(), invars=(), outvars=(), consts=(), batch_dependent=frozenset()
    )
    return _Residuals(
        treedef=treedef, param_index=tuple(index), layout=_flat(pseudo, range(len(stored)))
    )


# --- the step -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmittedTrain:
    step: Callable  # jitted (param_bufs, opt_state, batch_leaves) -> (param_bufs, opt_state, loss)
    init_opt: Callable  # jitted param_bufs -> opt_state
    device_layouts: tuple[FlatLayout, ...]
    param_dtypes: tuple[str, ...]
    param_sizes: tuple[int, ...]
    param_sharding: NamedSharding
    batch_sharding: NamedSharding
    slots: SlotPlan
    residual_sizes: dict[str, int]


def device_layouts(program: Program, stages: Sequence[StageLayout], p: int) -> list[FlatLayout]:
    """Device d holds the parameters of stages d, d + p, … in one flat layout."""
    return [
        _flat(program, [v for s in range(d, len(stages), p) for v in stages[s].params.values()])
        for d in range(p)
    ]


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
) -> EmittedTrain:
    p, m, S = schedule.num_devices, schedule.num_microbatches, schedule.num_stages
    dev_layouts = device_layouts(program, stages, p)
    param_sizes = buffer_sizes(dev_layouts)
    dtypes = tuple(param_sizes)
    bsizes = buffer_sizes([s.send for s in stages])
    consts = dict(program.consts)
    ios = [_stage_io(program, st, s == S - 1) for s, st in enumerate(stages)]
    fns = [_apply_fn(program, st, io, consts) for st, io in zip(stages, ios, strict=True)]
    mb = batch_size // m
    batch_avals = [
        jax.ShapeDtypeStruct((mb, *program.avals[v].shape[1:]), program.avals[v].dtype)
        for v in program.invars
        if v in program.batch_dependent
    ]
    aval = lambda v: jax.ShapeDtypeStruct(program.avals[v].shape, program.avals[v].dtype)  # noqa: E731
    res_specs = [
        _residual_spec(
            fns[s],
            (
                tuple(map(aval, io.params)),
                tuple(map(aval, io.recv)),
                tuple(map(aval, io.fixed)),
                tuple(batch_avals),
            ),
            remat[s],
        )
        for s, io in enumerate(ios)
    ]
    rsizes = buffer_sizes([r.layout for r in res_specs])
    slots = plan_slots(schedule)
    n = slots.counts
    seed_ = loss_scale

    def unpack_dev(params: dict, s: int) -> dict:
        env: dict = {}
        wanted = set(stages[s].params.values())
        layout = FlatLayout(
            slots=tuple(
                (dt, tuple(x for x in sl if x.value in wanted))
                for dt, sl in dev_layouts[s % p].slots
            )
        )
        _unpack(env, layout, params)
        return env

    def pack_grads(env: dict, s: int) -> tuple:
        full = {v: env.get(v) for v in dev_layouts[s % p].values()}
        zeros = {
            v: jnp.zeros(program.avals[v].shape, program.avals[v].dtype)
            for v, x in full.items()
            if x is None
        }
        return _pack({**full, **zeros}, dev_layouts[s % p], param_sizes)

    def vjp_of(s: int, env: dict, recv_env: dict, xs, res_buf):
        io, spec = ios[s], res_specs[s]
        pv = tuple(env[v] for v in io.params)
        fv = tuple(env[v] if v in env else recv_env[v] for v in io.fixed)
        stored_env: dict = {}
        _unpack(stored_env, spec.layout, dict(zip(rsizes, res_buf, strict=True)))
        stored = [stored_env[k] for k in range(len(spec.layout.values()))]
        if remat[s]:
            rv = tuple(stored)
            _, f_vjp = jax.vjp(lambda a, b: fns[s](a, b, fv, xs), pv, rv)
            return f_vjp
        it = iter(stored)
        leaves = [pv[i] if i >= 0 else next(it) for i in spec.param_index]
        return jax.tree.unflatten(spec.treedef, leaves)

    def zeros(sizes):
        return tuple(jnp.zeros((k,), dt) for dt, k in sizes.items())

    def result(bufs, send_f=None, send_b=None, res=None, cot=None, grads=None, loss=None):
        """Branch outputs. An action that stores no residual (cotangent) returns what the
        slot it is told to store into holds, so that slot may be live: no spare slot."""
        ress, cots, _, _, r_store, c_store = bufs
        return (
            send_f if send_f is not None else zeros(bsizes),
            send_b if send_b is not None else zeros(bsizes),
            res if res is not None else tuple(read(b, r_store) for b in ress),
            cot if cot is not None else tuple(read(b, c_store) for b in cots),
            grads if grads is not None else zeros(param_sizes),
            loss if loss is not None else jnp.zeros((), jnp.float32),
        )

    def forward(s: int):
        io, st = ios[s], stages[s]

        def f(params, xs, act, grad, bufs):
            env = unpack_dev(params, s)
            recv_env: dict = {}
            _unpack(recv_env, st.recv, dict(zip(bsizes, act, strict=True)))
            pv = tuple(env[v] for v in io.params)
            rv = tuple(recv_env[v] for v in io.recv)
            fv = tuple(env[v] if v in env else recv_env[v] for v in io.fixed)
            outs, f_vjp = jax.vjp(lambda a, b: fns[s](a, b, fv, xs), pv, rv)
            if remat[s]:
                stored = list(rv)
            else:
                leaves = jax.tree.leaves(f_vjp)
                stored = [x for x, i in zip(leaves, res_specs[s].param_index, strict=True) if i < 0]
            res_out = _pack(dict(enumerate(stored)), res_specs[s].layout, rsizes)
            if s == S - 1:
                return result(bufs, res=res_out, loss=outs[0].astype(jnp.float32))
            send = _pack(dict(zip(io.outputs, outs, strict=True)), st.send, bsizes)
            return result(bufs, send_f=send, res=res_out)

        return f

    def backward(s: int, weights: bool, inputs: bool):
        io, st = ios[s], stages[s]

        def f(params, xs, act, grad, bufs):
            ress, cots, r_slot, c_slot, _, _ = bufs  # read-only here: nothing is copied
            res = tuple(read(b, r_slot) for b in ress)
            cot = tuple(read(b, c_slot) for b in cots)
            env = unpack_dev(params, s)
            recv_env: dict = {}
            if inputs:  # the cotangent arrives from the next stage (or is the loss seed)
                g_env: dict = {}
                _unpack(g_env, st.send, dict(zip(bsizes, grad, strict=True)))
            else:  # W: the cotangent B stored
                g_env = {}
                _unpack(g_env, st.send, dict(zip(bsizes, cot, strict=True)))
            if s == S - 1:
                g = (
                    jnp.full(
                        program.avals[io.outputs[0]].shape,
                        seed_,
                        program.avals[io.outputs[0]].dtype,
                    ),
                )
            else:
                g = tuple(g_env[v] for v in io.outputs)
            f_vjp = vjp_of(s, env, recv_env, xs, res)
            d_params, d_recv = f_vjp(g)
            out: dict = {}
            if weights:
                out["grads"] = pack_grads(dict(zip(io.params, d_params, strict=True)), s)
            if inputs and s > 0:
                out["send_b"] = _pack(dict(zip(io.recv, d_recv, strict=True)), st.recv, bsizes)
            if inputs and not weights and s < S - 1:
                out["cot"] = _pack(dict(zip(io.outputs, g, strict=True)), st.send, bsizes)
            return result(bufs, **out)

        return f

    split = schedule.split_backward
    branches = [forward(s) for s in range(S)]
    branches += [backward(s, weights=not split, inputs=True) for s in range(S)]
    if split:
        branches += [backward(s, weights=True, inputs=False) for s in range(S)]
    branches.append(lambda params, xs, act, grad, bufs: result(bufs))
    idle = len(branches) - 1
    kind_base = {"F": 0, "B": S, "W": 2 * S}
    branch_t = np.array(
        [
            [idle if c is None else kind_base[c.kind] + c.stage for c in row]
            for row in schedule.table
        ],
        np.int32,
    )
    mb_t = np.array(
        [[0 if c is None else c.microbatch for c in row] for row in schedule.table], np.int32
    )
    fwd_perm = [(d, (d + 1) % p) for d in range(p)] if S > p else [(d, d + 1) for d in range(p - 1)]
    bwd_perm = [(b, a) for a, b in fwd_perm]

    def store(buf, slot, value):
        return jax.lax.dynamic_update_index_in_dim(buf, value, slot, 0)

    def read(buf, slot):
        return jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)

    def body(param_bufs, batch):
        params = {dt: b[0] for dt, b in zip(dtypes, param_bufs, strict=True)}
        dev = jax.lax.axis_index(axis)
        tables = {
            k: jnp.asarray(v)
            for k, v in dataclasses.asdict(slots).items()
            if isinstance(v, np.ndarray)
        }
        branch_a, mb_a = jnp.asarray(branch_t), jnp.asarray(mb_t)

        def buffers(count, sizes):
            return tuple(jnp.zeros((count, k), dt) for dt, k in sizes.items())

        def tick(carry, t):
            fwd_in, bwd_in, acts, grads_in, ress, cots, gacc, loss = carry
            cell = lambda k: tables[k][t, dev]  # noqa: E731
            acts = tuple(store(b, cell("act_store"), x) for b, x in zip(acts, fwd_in, strict=True))
            grads_in = tuple(
                store(b, cell("grad_store"), x) for b, x in zip(grads_in, bwd_in, strict=True)
            )
            act = tuple(read(b, cell("act_read")) for b in acts)
            grad = tuple(read(b, cell("grad_read")) for b in grads_in)
            j = mb_a[t, dev]
            xs = [jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False) for x in batch]
            bufs = (
                ress,
                cots,
                cell("res_read"),
                cell("cot_read"),
                cell("res_store"),
                cell("cot_store"),
            )
            send_f, send_b, res_out, cot_out, g, mb_loss = jax.lax.switch(
                branch_a[t, dev], branches, params, xs, act, grad, bufs
            )
            r_slot, c_slot = cell("res_store"), cell("cot_store")
            ress = tuple(store(b, r_slot, x) for b, x in zip(ress, res_out, strict=True))
            cots = tuple(store(b, c_slot, x) for b, x in zip(cots, cot_out, strict=True))
            gacc = tuple(a + x for a, x in zip(gacc, g, strict=True))
            fwd_in = tuple(jax.lax.ppermute(x, axis, fwd_perm) for x in send_f)
            bwd_in = tuple(jax.lax.ppermute(x, axis, bwd_perm) for x in send_b)
            return (fwd_in, bwd_in, acts, grads_in, ress, cots, gacc, loss + mb_loss), None

        init = (
            zeros(bsizes),
            zeros(bsizes),
            buffers(n["act"], bsizes),
            buffers(n["grad"], bsizes),
            buffers(n["res"], rsizes),
            buffers(n["cot"], bsizes),
            zeros(param_sizes),
            jnp.zeros((), jnp.float32),
        )
        carry, _ = jax.lax.scan(tick, init, jnp.arange(schedule.num_ticks))
        gacc, loss = carry[6], carry[7]
        return tuple(g[None] for g in gacc), jax.lax.psum(loss * loss_scale, axis)

    smap = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tuple(P(axis) for _ in dtypes), P()),
        out_specs=(tuple(P(axis) for _ in dtypes), P()),
        axis_names={axis},
        check_vma=False,  # operators are bound from a jaxpr traced outside the shard_map
    )

    def train_step(param_bufs, opt_state, batch_leaves):
        batch = tuple(x.reshape(m, mb, *x.shape[1:]) for x in batch_leaves)
        grads, loss = smap(tuple(param_bufs), batch)
        updates, opt_state = optimizer.update(grads, opt_state, tuple(param_bufs))
        return optax.apply_updates(tuple(param_bufs), updates), opt_state, loss

    return EmittedTrain(
        step=jax.jit(train_step, donate_argnums=(0, 1)),
        init_opt=jax.jit(optimizer.init),
        device_layouts=tuple(dev_layouts),
        param_dtypes=dtypes,
        param_sizes=tuple(param_sizes.values()),
        param_sharding=NamedSharding(mesh, P(axis)),
        batch_sharding=NamedSharding(mesh, P()),
        slots=slots,
        residual_sizes=rsizes,
    )
