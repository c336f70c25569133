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
  2. ``F`` — the stage forward under ``jax.vjp`` — runs if it is the device's action: one
     ``while_loop`` per stage that runs once or never (`_when`). It writes the residuals it
     keeps (not the parameters themselves; only the stage input when the stage
     rematerialises) into their residual slot in place, and sets the activation to send (or
     adds the microbatch loss);
  3. ``lax.switch`` runs the device's backward action — ``B`` (rebuild the VJP from the
     residual slot and pull the cotangent back; with ``W`` split off, only the input gradient
     is computed and XLA drops the weight-gradient half), ``W`` (weight gradient from the same
     residuals and the stored cotangent), or nothing — returning the gradient to send, the
     cotangent to store and the parameter gradients, which are accumulated;
  4. one ``ppermute`` per direction and dtype runs unconditionally.

Why the forward is a loop and not a switch branch: a branch returns new buffers, so the
residuals it made were copied into their slot after the switch, and XLA held them in the
switch's output buffer while they were built — one residual set more than the schedule keeps,
at the forward's peak (and copies of whole buffers when a branch updated the slots itself). The
backward's peak is its own working set, so there a switch costs no memory (a loop per backward,
accumulating gradients in place, measured no lower peak and compiled 1.5× slower).

Slots are assigned by `plan_slots`: each stored value lives from the tick it arrives (or is
made) to the tick it is consumed, and slots are reused greedily, so buffers hold exactly the
schedule's in-flight count — m residual sets for GPipe, at most p for 1F1B. Residual slots are
split into chunks (`plan_chunks`) so that a residual leaf is written and read as a whole row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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

    Every tick stores something into each inbox and cotangent buffer (stores are
    unconditional, outside the switch). A tick with nothing to store writes into a slot holding
    nothing live, so buffers need a spare slot only when every slot is live at such a tick.
    Residuals are written by F only, in place; other ticks' residual store slots go unused.
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
    stored), and the avals of the rest."""

    treedef: Any
    param_index: tuple[int, ...]  # per leaf: index into param_vals, or -1 when stored
    stored: tuple[jax.ShapeDtypeStruct, ...]  # the stored leaves, in order


def _residual_spec(fn: Callable, args: tuple, remat: bool) -> _Residuals:
    """Traces ``jax.vjp`` of a stage abstractly to learn its residual structure."""
    found = {}

    def probe(param_vals, recv_vals, fixed_vals, xs):
        if remat:
            leaves, treedef = jax.tree.flatten(recv_vals)
            found["spec"] = (treedef, [-1] * len(leaves))
            return leaves
        _, vjp_fn = jax.vjp(lambda pv, rv: fn(pv, rv, fixed_vals, xs), param_vals, recv_vals)
        leaves, treedef = jax.tree.flatten(vjp_fn)
        index = [next((i for i, q in enumerate(param_vals) if q is x), -1) for x in leaves]
        found["spec"] = (treedef, index)
        return [x for x, i in zip(leaves, index, strict=True) if i < 0]

    stored = jax.eval_shape(probe, *args)
    treedef, index = found["spec"]
    return _Residuals(treedef=treedef, param_index=tuple(index), stored=tuple(stored))


# --- residual chunks ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Piece:
    """Elements ``[start, start + size)`` of one stored residual leaf of a stage (flattened)
    live in ``chunk[offset : offset + size]``. A leaf is one piece unless it had to be split
    over the free room of several chunks."""

    leaf: int  # index among the stage's stored leaves
    start: int
    chunk: int
    offset: int
    size: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualChunks:
    """Residual slots as one ``(slots, size)`` buffer per chunk, and per stage where each
    stored leaf goes.

    A chunk that holds exactly one leaf of its size is written as one row update of that leaf
    and read back as one row: no packing copy and no offsets. (One flat vector per dtype needs
    either a concatenation, a copy of the whole residual set at the forward's peak, or one 2-D
    update per leaf, which XLA compiled 1.5× slower for the same memory.) Chunks are sized by
    the widest stage; other stages reuse them leaf for leaf where sizes match and pack or split
    the rest into the free room (copies of those leaves only), so the chunks add up to the
    widest stage's residuals in the common cases (identical blocks, a few extra leaves)."""

    chunks: tuple[tuple[str, int], ...]  # (dtype, elements) per chunk
    pieces: tuple[tuple[Piece, ...], ...]  # per stage

    def sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dt, n in self.chunks:
            out[dt] = out.get(dt, 0) + n
        return out


PACKED_SHARE = 1 / 32  # per stage and dtype, the smallest leaves up to this share are packed


@dataclasses.dataclass(kw_only=True)
class _Chunk:
    dtype: str
    size: int
    rest: bool  # the dtype's chunk for packed leaves: grows to what the neediest stage packs


def plan_chunks(stored: Sequence[Sequence[Any]]) -> ResidualChunks:
    """Chunks for every stage's stored residual leaves (anything with shape and dtype).

    Stages go widest first, so its leaves define the chunks; each later stage puts a leaf into
    an unused chunk of exactly its size, else into the free room that fits it most tightly, else
    into a new chunk. A stage's smallest leaves (up to `PACKED_SHARE` of its bytes) are packed
    into one growable rest chunk per dtype instead of getting a chunk each."""
    chunks: list[_Chunk] = []
    placed: dict[int, tuple[Piece, ...]] = {}
    for s in sorted(range(len(stored)), key=lambda s: (-_nbytes(stored[s]), s)):
        placed[s] = _place_stage(chunks, stored[s])
    return ResidualChunks(
        chunks=tuple((c.dtype, c.size) for c in chunks),
        pieces=tuple(placed[s] for s in range(len(stored))),
    )


def _dtype(x: Any) -> str:
    return jnp.dtype(x.dtype).name


def _size(x: Any) -> int:
    return int(np.prod(x.shape, dtype=np.int64))


def _nbytes(leaves: Sequence[Any]) -> int:
    return sum(_size(x) * jnp.dtype(x.dtype).itemsize for x in leaves)


def _packed_leaves(leaves: Sequence[Any]) -> set[int]:
    """Per dtype, the smallest leaves whose sizes add up to at most `PACKED_SHARE` of it."""
    packed = set()
    for dt in {_dtype(x) for x in leaves}:
        by_size = sorted((_size(x), k) for k, x in enumerate(leaves) if _dtype(x) == dt)
        budget = PACKED_SHARE * sum(n for n, _ in by_size)
        for n, k in by_size:
            if n > budget:
                break
            packed.add(k)
            budget -= n
    return packed


def _place_stage(chunks: list[_Chunk], leaves: Sequence[Any]) -> tuple[Piece, ...]:
    """Places one stage's leaves, largest first, adding or growing chunks where needed."""
    fill = [0] * len(chunks)  # elements of each chunk this stage uses
    packed = _packed_leaves(leaves)
    pieces = []
    for k in sorted(range(len(leaves)), key=lambda k: (-_size(leaves[k]), k)):
        start = 0
        for c, n in _room_for(chunks, fill, _dtype(leaves[k]), _size(leaves[k]), k in packed):
            pieces.append(Piece(leaf=k, start=start, chunk=c, offset=fill[c], size=n))
            start, fill[c] = start + n, fill[c] + n
            chunks[c].size = max(chunks[c].size, fill[c])
    return tuple(sorted(pieces, key=lambda q: (q.leaf, q.start)))


def _room_for(
    chunks: list[_Chunk], fill: list[int], dt: str, n: int, packed: bool
) -> list[tuple[int, int]]:
    """Where a leaf of ``n`` elements goes, as (chunk, elements) parts: an unused chunk of
    exactly its size, else the tightest free room it fits whole, else (packed leaves) the rest
    chunk, else split over the largest free rooms, else a new chunk."""
    mine = [c for c, chunk in enumerate(chunks) if chunk.dtype == dt]
    free = {c: chunks[c].size - fill[c] for c in mine}
    if not packed:
        exact = [c for c in mine if chunks[c].size == n and not chunks[c].rest and not fill[c]]
        if exact:
            return [(exact[0], n)]
    room = [(k, c) for c, k in free.items() if k >= n]
    if room:
        return [(min(room)[1], n)]
    rest = [c for c in mine if chunks[c].rest]
    if packed and rest:
        return [(rest[0], n)]
    if not packed and sum(free.values()) >= n:
        parts = []
        for k, c in sorted(((k, c) for c, k in free.items() if k), reverse=True):
            parts.append((c, min(k, n - sum(m for _, m in parts))))
            if sum(m for _, m in parts) == n:
                return parts
    chunks.append(_Chunk(dtype=dt, size=0 if packed else n, rest=packed))
    fill.append(0)
    return [(len(chunks) - 1, n)]


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
    residual_sizes: dict[str, int]  # elements per residual slot, per dtype
    residual_chunks: ResidualChunks

    @property
    def buffers(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        """The parameter buffers the step takes: ``(devices, L)`` per dtype."""
        p = len(self.device_layouts)
        return tuple(
            jax.ShapeDtypeStruct((p, n), dt, sharding=self.param_sharding)
            for dt, n in zip(self.param_dtypes, self.param_sizes, strict=True)
        )


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
    data_axis: str | None = None,
) -> EmittedTrain:
    """``data_axis``: each replica runs the pipeline on its rows of every microbatch (`program`
    is traced at that local microbatch); gradients and the loss are summed over the replicas
    before the optimizer update, so parameters and optimizer state stay identical on them."""
    p, m = schedule.num_devices, schedule.num_microbatches
    dp = mesh.shape[data_axis] if data_axis else 1
    mb = batch_size // (m * dp)
    acts = _Actions.build(program, stages, p, mb, remat, loss_scale)
    slots = plan_slots(schedule)
    pipeline = _pipeline(acts, schedule, slots, axis, data_axis)
    rows = P(data_axis) if data_axis else P()
    smap = jax.shard_map(
        pipeline,
        mesh=mesh,
        in_specs=(tuple(P(axis) for _ in acts.param_sizes), rows),
        out_specs=(tuple(P(axis) for _ in acts.param_sizes), P()),
        axis_names={axis, data_axis} if data_axis else {axis},
        check_vma=False,  # operators are bound from a jaxpr traced outside the shard_map
    )

    def train_step(param_bufs, opt_state, batch_leaves):
        batch = tuple(x.reshape(dp, m, mb, *x.shape[1:]) for x in batch_leaves)
        grads, loss = smap(tuple(param_bufs), batch)
        updates, opt_state = optimizer.update(grads, opt_state, tuple(param_bufs))
        return optax.apply_updates(tuple(param_bufs), updates), opt_state, loss

    return EmittedTrain(
        step=jax.jit(train_step, donate_argnums=(0, 1)),
        init_opt=jax.jit(optimizer.init),
        device_layouts=acts.dev_layouts,
        param_dtypes=tuple(acts.param_sizes),
        param_sizes=tuple(acts.param_sizes.values()),
        param_sharding=NamedSharding(mesh, P(axis)),
        batch_sharding=NamedSharding(mesh, rows),
        slots=slots,
        residual_sizes=acts.chunks.sizes(),
        residual_chunks=acts.chunks,
    )


class _Forward(NamedTuple):
    """What forward actions update (in place: see `_when`)."""

    ress: tuple  # residual slots: one (slots, size) buffer per chunk
    loss: Any  # summed over the microbatches
    send_f: tuple  # activation for the next device this tick, one flat buffer per dtype


class _Inputs(NamedTuple):
    """What an action reads in its tick."""

    params: dict  # dtype -> this device's flat parameters
    xs: list  # this microbatch's batch leaves
    act: tuple  # the received activation
    grad: tuple  # the received gradient
    slots: dict  # slot index per SlotPlan table, this tick and device


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Actions:
    """The F / B / W actions of every stage."""

    program: Program
    stages: tuple[StageLayout, ...]
    ios: tuple[_StageIO, ...]
    fns: tuple[Callable, ...]
    specs: tuple[_Residuals, ...]
    chunks: ResidualChunks
    dev_layouts: tuple[FlatLayout, ...]
    param_sizes: dict[str, int]
    boundary_sizes: dict[str, int]
    remat: tuple[bool, ...]
    seed: float

    @classmethod
    def build(cls, program, stages, p, mb, remat, seed) -> _Actions:
        S = len(stages)
        ios = tuple(_stage_io(program, st, s == S - 1) for s, st in enumerate(stages))
        consts = dict(program.consts)
        fns = tuple(_apply_fn(program, st, io, consts) for st, io in zip(stages, ios, strict=True))
        batch = tuple(
            jax.ShapeDtypeStruct((mb, *program.avals[v].shape[1:]), program.avals[v].dtype)
            for v in program.invars
            if v in program.batch_dependent
        )
        aval = lambda v: jax.ShapeDtypeStruct(program.avals[v].shape, program.avals[v].dtype)  # noqa: E731
        specs = tuple(
            _residual_spec(
                fns[s],
                (*(tuple(map(aval, vs)) for vs in (io.params, io.recv, io.fixed)), batch),
                remat[s],
            )
            for s, io in enumerate(ios)
        )
        dev_layouts = tuple(device_layouts(program, stages, p))
        return cls(
            program=program,
            stages=tuple(stages),
            ios=ios,
            fns=fns,
            specs=specs,
            chunks=plan_chunks([r.stored for r in specs]),
            dev_layouts=dev_layouts,
            param_sizes=buffer_sizes(dev_layouts),
            boundary_sizes=buffer_sizes([s.send for s in stages]),
            remat=tuple(remat),
            seed=seed,
        )

    def _params(self, s: int, params: dict) -> dict:
        env: dict = {}
        wanted = set(self.stages[s].params.values())
        p = len(self.dev_layouts)
        layout = FlatLayout(
            slots=tuple(
                (dt, tuple(x for x in sl if x.value in wanted))
                for dt, sl in self.dev_layouts[s % p].slots
            )
        )
        _unpack(env, layout, params)
        return env

    def _unpack(self, layout: FlatLayout, bufs: tuple) -> dict:
        env: dict = {}
        _unpack(env, layout, dict(zip(self.boundary_sizes, bufs, strict=True)))
        return env

    def forward(self, s: int) -> Callable:
        """F: the stage under ``jax.vjp``; its residuals (not the parameters themselves, or
        only the stage input under remat) are written into their slots in place."""
        io, st = self.ios[s], self.stages[s]

        def action(state: _Forward, x: _Inputs) -> _Forward:
            env = self._params(s, x.params)
            recv_env = self._unpack(st.recv, x.act)
            pv = tuple(env[v] for v in io.params)
            rv = tuple(recv_env[v] for v in io.recv)
            fv = tuple(env[v] if v in env else recv_env[v] for v in io.fixed)
            outs, f_vjp = jax.vjp(lambda a, b: self.fns[s](a, b, fv, x.xs), pv, rv)
            if self.remat[s]:
                stored = list(rv)
            else:
                leaves = jax.tree.leaves(f_vjp)
                index = self.specs[s].param_index
                stored = [y for y, i in zip(leaves, index, strict=True) if i < 0]
            ress = self._store(s, state.ress, x.slots["res_store"], stored)
            if s == len(self.stages) - 1:
                return state._replace(ress=ress, loss=state.loss + outs[0].astype(jnp.float32))
            send = _pack(dict(zip(io.outputs, outs, strict=True)), st.send, self.boundary_sizes)
            return state._replace(ress=ress, send_f=send)

        return action

    def _store(self, s: int, ress: tuple, slot: Any, stored: Sequence[Any]) -> tuple:
        """Writes stage s's residuals into row ``slot`` of the chunks it uses: a chunk is
        either one leaf of its size (no copy) or pieces packed end to end."""
        parts: dict[int, list] = {}
        for q in self.chunks.pieces[s]:
            flat = stored[q.leaf].reshape(-1)
            if q.size < flat.size:
                flat = jax.lax.slice(flat, (q.start,), (q.start + q.size,))
            parts.setdefault(q.chunk, []).append((q.offset, flat))
        ress = list(ress)
        for c, ps in parts.items():
            dt, n = self.chunks.chunks[c]
            xs = [x for _, x in sorted(ps, key=lambda ox: ox[0])]
            used = sum(x.size for x in xs)
            xs += [jnp.zeros((n - used,), dt)] if used < n else []
            ress[c] = _set_row(ress[c], slot, xs[0] if len(xs) == 1 else jnp.concatenate(xs))
        return tuple(ress)

    def _vjp(self, s: int, env: dict, x: _Inputs, ress: tuple) -> Callable:
        """The stage's VJP rebuilt from its residual slot (or recomputed from the saved input)."""
        io, spec = self.ios[s], self.specs[s]
        pv = tuple(env[v] for v in io.params)
        pieces = self.chunks.pieces[s]
        rows = {q.chunk: _row(ress[q.chunk], x.slots["res_read"]) for q in pieces}
        parts: list[list] = [[] for _ in spec.stored]
        for q in pieces:  # in leaf order, each leaf's pieces in order
            parts[q.leaf].append(jax.lax.slice(rows[q.chunk], (q.offset,), (q.offset + q.size,)))
        stored = [
            (ps[0] if len(ps) == 1 else jnp.concatenate(ps)).reshape(leaf.shape)
            for ps, leaf in zip(parts, spec.stored, strict=True)
        ]
        if self.remat[s]:
            fv = tuple(env[v] for v in io.fixed)
            _, f_vjp = jax.vjp(lambda a, b: self.fns[s](a, b, fv, x.xs), pv, tuple(stored))
            return f_vjp
        it = iter(stored)
        leaves = [pv[i] if i >= 0 else next(it) for i in spec.param_index]
        return jax.tree.unflatten(spec.treedef, leaves)

    def backward(self, s: int, *, weights: bool, inputs: bool) -> Callable:
        """B (``inputs``: the input gradient, sent back; with ``weights`` too unless W is split
        off, in which case the cotangent is returned to be stored for W) or W (``weights``
        only: from the stored cotangent), as a switch branch: ``(inputs, ress, cots) ->
        (send_b, cot, grads)``."""
        io, st = self.ios[s], self.stages[s]
        S = len(self.stages)

        def branch(x: _Inputs, ress: tuple, cots: tuple) -> tuple:
            env = self._params(s, x.params)
            if s == S - 1:
                out = self.program.avals[io.outputs[0]]
                g = (jnp.full(out.shape, self.seed, out.dtype),)
            else:  # from the next stage, or for W the cotangent B stored
                got = x.grad if inputs else tuple(_row(b, x.slots["cot_read"]) for b in cots)
                g_env = self._unpack(st.send, got)
                g = tuple(g_env[v] for v in io.outputs)
            d_params, d_recv = self._vjp(s, env, x, ress)(g)
            send_b, cot, grads = self.no_backward(x, ress, cots)
            if weights:
                grads = self._pack_grads(s, d_params)
            if inputs and s > 0:
                send_b = _pack(
                    dict(zip(io.recv, d_recv, strict=True)), st.recv, self.boundary_sizes
                )
            if inputs and not weights and s < S - 1:
                cot = _pack(dict(zip(io.outputs, g, strict=True)), st.send, self.boundary_sizes)
            return send_b, cot, grads

        return branch

    def no_backward(self, x: _Inputs, ress: tuple, cots: tuple) -> tuple:
        """Nothing sent, no gradient, and the cotangent slot stored back as it is (so that
        slot may be live: no spare)."""
        zeros = lambda sizes: tuple(jnp.zeros((k,), dt) for dt, k in sizes.items())  # noqa: E731
        cot = tuple(_row(b, x.slots["cot_store"]) for b in cots)
        return zeros(self.boundary_sizes), cot, zeros(self.param_sizes)

    def _pack_grads(self, s: int, d_params: Sequence[Any]) -> tuple:
        env = dict(zip(self.ios[s].params, d_params, strict=True))
        layout = self.dev_layouts[s % len(self.dev_layouts)]
        for v in layout.values():
            if v not in env:  # another stage's parameter on this device
                env[v] = jnp.zeros(self.program.avals[v].shape, self.program.avals[v].dtype)
        return _pack(env, layout, self.param_sizes)


def _row(buf, slot):
    return jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)


def _set_row(buf, slot, value):
    return jax.lax.dynamic_update_index_in_dim(buf, value, slot, 0)


def _action_tables(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """Per tick and device: the stage whose forward runs (or -1), and the backward switch
    branch: B of stage s is s, W of stage s is S + s, nothing is the last branch."""
    S = schedule.num_stages
    idle = (2 if schedule.split_backward else 1) * S
    fwd = [[c.stage if c and c.kind == "F" else -1 for c in row] for row in schedule.table]
    base = {"B": 0, "W": S}
    bwd = [
        [base[c.kind] + c.stage if c and c.kind != "F" else idle for c in row]
        for row in schedule.table
    ]
    return np.array(fwd, np.int32), np.array(bwd, np.int32)


def _when(pred, action: Callable, state: _Forward, inputs: _Inputs) -> _Forward:
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


def _pipeline(
    acts: _Actions, schedule: Schedule, slots: SlotPlan, axis: str, data_axis: str | None
) -> Callable:
    """The shard_map body: a scan over the table's ticks (see the module docstring)."""
    p, S = schedule.num_devices, schedule.num_stages
    n, bsizes = slots.counts, acts.boundary_sizes
    fwd_perm = [(d, (d + 1) % p) for d in range(p)] if S > p else [(d, d + 1) for d in range(p - 1)]
    bwd_perm = [(b, a) for a, b in fwd_perm]
    fwd_t, bwd_t = _action_tables(schedule)
    mb_t = np.array(
        [[0 if c is None else c.microbatch for c in row] for row in schedule.table], np.int32
    )
    forwards = [acts.forward(s) for s in range(S)]
    backwards = [
        acts.backward(s, weights=not schedule.split_backward, inputs=True) for s in range(S)
    ]
    if schedule.split_backward:
        backwards += [acts.backward(s, weights=True, inputs=False) for s in range(S)]
    backwards.append(acts.no_backward)

    def zeros(sizes, *lead):
        return tuple(jnp.zeros((*lead, k), dt) for dt, k in sizes.items())

    def body(param_bufs, batch):
        params = {dt: b[0] for dt, b in zip(acts.param_sizes, param_bufs, strict=True)}
        batch = tuple(x[0] for x in batch)  # this data replica's (m, microbatch, ...) rows
        dev = jax.lax.axis_index(axis)
        tables = {
            k: jnp.asarray(v)[:, dev]
            for k, v in {
                **dataclasses.asdict(slots),
                "fwd": fwd_t,
                "bwd": bwd_t,
                "mb": mb_t,
            }.items()
            if isinstance(v, np.ndarray)
        }

        def tick(carry, t):
            fwd_in, bwd_in, inbox_f, inbox_b, cots, gacc, state = carry
            cell = {k: v[t] for k, v in tables.items()}
            inbox_f = tuple(map(_set_row, inbox_f, [cell["act_store"]] * len(fwd_in), fwd_in))
            inbox_b = tuple(map(_set_row, inbox_b, [cell["grad_store"]] * len(bwd_in), bwd_in))
            x = _Inputs(
                params=params,
                xs=[jax.lax.dynamic_index_in_dim(b, cell["mb"], 0, keepdims=False) for b in batch],
                act=tuple(_row(b, cell["act_read"]) for b in inbox_f),
                grad=tuple(_row(b, cell["grad_read"]) for b in inbox_b),
                slots=cell,
            )
            state = state._replace(send_f=zeros(bsizes))
            for s, forward in enumerate(forwards):
                state = _when(cell["fwd"] == s, forward, state, x)
            send_b, cot, grads = jax.lax.switch(cell["bwd"], backwards, x, state.ress, cots)
            cots = tuple(map(_set_row, cots, [cell["cot_store"]] * len(cot), cot))
            gacc = tuple(a + g for a, g in zip(gacc, grads, strict=True))
            fwd_in = tuple(jax.lax.ppermute(y, axis, fwd_perm) for y in state.send_f)
            bwd_in = tuple(jax.lax.ppermute(y, axis, bwd_perm) for y in send_b)
            return (fwd_in, bwd_in, inbox_f, inbox_b, cots, gacc, state), None

        state = _Forward(
            ress=tuple(jnp.zeros((n["res"], k), dt) for dt, k in acts.chunks.chunks),
            loss=jnp.zeros((), jnp.float32),
            send_f=zeros(bsizes),
        )
        init = (
            zeros(bsizes),
            zeros(bsizes),
            zeros(bsizes, n["act"]),
            zeros(bsizes, n["grad"]),
            zeros(bsizes, n["cot"]),
            zeros(acts.param_sizes),
            state,
        )
        carry, _ = jax.lax.scan(tick, init, jnp.arange(schedule.num_ticks))
        gacc, state = carry[-2], carry[-1]
        loss = jax.lax.psum(state.loss * acts.seed, axis)
        if data_axis:  # the replicas' gradients and losses add up
            gacc = tuple(jax.lax.psum(g, data_axis) for g in gacc)
            loss = jax.lax.psum(loss, data_axis)
        return tuple(g[None] for g in gacc), loss

    return body
