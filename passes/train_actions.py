"""The actions of a training table, per stage: F (forward under ``jax.vjp``, its matmul and
convolution results written into their residual slots in place, the rest recomputed by B), B
(input gradient, and the weight gradient unless W is split off) and W (the weight gradients of
the matmuls that read parameters, from the cotangents and activation inputs B stored:
`passes.split_backward`). The stage functions they differentiate are `passes.stage_fns`'; see
`passes.emit_train` for how a tick runs them. Parameters are read from the device's rows of the
slots of a `ParamLayout`.

With a tensor axis every operator of a stage runs its planned strategy on this device's shards
(`passes.tensor_local.LocalEnv` with ``conjugate=True``), inside ``jax.vjp``: tensor-split
parameters enter as shards and their gradients come out as shards of the same layout, received
values enter whole and the values a stage sends (or its loss) leave whole. Megatron's conjugate
collectives make the gradients taken inside the manual region exact: a whole value read by
split operators is all-reduced once in the backward (its readers' partial cotangents summed
first), a row-parallel psum passes the whole cotangent on, a gather hands each device its block.
The collectives run inside the stage's action, which every device of its tensor group runs in
the same tick (never a pipeline collective: those run after the switch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from autopipe.passes.ir import Program
from autopipe.passes.layout import FlatLayout, StageLayout, buffer_sizes
from autopipe.passes.param_layout import (
    ParamLayout,
    pack_flat,
    param_layout,
    read_params,
    unpack_flat,
)
from autopipe.passes.residuals import ResidualChunks, plan_chunks, saving
from autopipe.passes.split_backward import WeightUses, tap_avals
from autopipe.passes.stage_fns import (
    Residuals,
    StageIO,
    residual_spec,
    stage_fns,
    stage_io,
    stage_weight_uses,
)
from autopipe.passes.tensor_local import as_one_device, local_shape


def device_groups(stages: Sequence[StageLayout], p: int) -> list[list[int]]:
    """Device d holds the parameters of stages d, d + p, …"""
    return [[v for s in range(d, len(stages), p) for v in stages[s].params] for d in range(p)]


def training_layout(
    program: Program,
    stages: Sequence[StageLayout],
    p: int,
    *,
    by: str,
    dims: Mapping[int, int | None] | None = None,
    tp: int = 1,
) -> ParamLayout:
    """A training plan's parameter layout (`passes.param_layout`) over its ``p`` devices: slots
    only (the optimizer sees every leaf as an array), a value several devices hold in one slot
    (their gradients are summed row against row). The planner prices it, the emitter runs it."""
    return param_layout(
        program, device_groups(stages, p), dims=dims, tp=tp, by=by, budget=None, align_shared=True
    )


# --- stage functions under vjp -------------------------------------------------------------


def float_part(layout: FlatLayout) -> FlatLayout:
    """The float buffers of a boundary: only float values carry a cotangent back."""
    floats = [(dt, s) for dt, s in layout.slots if jnp.issubdtype(np.dtype(dt), jnp.inexact)]
    return FlatLayout(slots=tuple(floats))


class ForwardState(NamedTuple):
    """What forward actions update (in place: see `_when`)."""

    ress: tuple  # residual slots: one (slots, size) buffer per chunk
    loss: Any  # summed over the microbatches
    send_f: tuple  # activation for the next device this tick, one flat buffer per dtype


class TickInputs(NamedTuple):
    """What an action reads in its tick."""

    params: tuple  # this device's ``(1, *shape)`` block of every parameter slot
    xs: list  # this microbatch's batch leaves, then the inputs as it sees them
    inbox_f: tuple  # the received activations' slots (F reads row ``slots["act_read"]``)
    inbox_b: tuple  # the received gradients' slots (B reads row ``slots["grad_read"]``)
    slots: dict  # slot index per SlotPlan table, this tick and device


@dataclasses.dataclass(frozen=True, kw_only=True)
class Actions:
    """The F / B / W actions of every stage."""

    program: Program
    stages: tuple[StageLayout, ...]
    ios: tuple[StageIO, ...]
    fns: tuple[Callable, ...]
    fns_w: tuple[Callable | None, ...]  # W's functions (with W split off: `_weight_fn`)
    specs: tuple[Residuals, ...]
    chunks: ResidualChunks
    params: ParamLayout  # the slots of every device's stages (by size or by shape)
    boundary_sizes: dict[str, int]  # forward: one flat buffer per dtype of any boundary
    grad_sizes: dict[str, int]  # backward: the float dtypes only (ints carry no cotangent)
    remat: tuple[bool, ...]
    seed: float
    tp: int = 1  # tensor-split slots hold 1/tp of their shape on each device
    # with W split off (`passes.split_backward`), per stage:
    uses: tuple[WeightUses, ...] = ()
    taps: tuple[tuple[jax.ShapeDtypeStruct, ...], ...] = ()  # the tapped results' avals
    stash: tuple[tuple[jax.ShapeDtypeStruct, ...], ...] = ()  # their activation inputs'
    # where B stores, for W, the tapped results' cotangents, then their activation inputs
    kept: ResidualChunks | None = None

    @classmethod
    def build(
        cls,
        program,
        stages,
        p,
        mb,
        remat,
        seed,
        by="shape",
        tensor=None,
        dims=None,
        mesh=None,
        split_backward=False,
    ) -> Actions:
        """``by``: how parameters align into slots (`passes.param_layout`): by shape, or by
        size where the optimizer does not read shapes (`optimizer_exact.shape_free`).
        ``tensor`` (a conjugate `TensorPlan`), ``dims`` (value → dim split over its axis) and
        ``mesh``: stages run their planned tensor strategies on shards. ``split_backward``:
        B and W share the backward's work (`passes.split_backward`)."""
        S = len(stages)
        dims = dict(dims or {}) if tensor is not None else {}
        tp = tensor.tp if tensor is not None else 1
        layout = training_layout(program, stages, p, by=by, dims=dims, tp=tp)
        split = layout.split
        ios = tuple(stage_io(program, st, s == S - 1) for s, st in enumerate(stages))
        uses = tuple(stage_weight_uses(program, st, io) for st, io in zip(stages, ios, strict=True))
        uses = uses if split_backward else (None,) * S
        fns, fns_w = stage_fns(program, stages, ios, tensor, split, uses)
        aval = lambda v: jax.ShapeDtypeStruct(  # noqa: E731
            layout.shard_shape(program, v), program.avals[v].dtype
        )
        batch = tuple(
            jax.ShapeDtypeStruct((mb, *program.avals[v].shape[1:]), program.avals[v].dtype)
            for v in program.invars
            if v in program.batch_dependent
        ) + tuple(map(aval, program.input_invars))
        mesh = mesh if tensor is not None else None
        args = [
            (*(tuple(map(aval, vs)) for vs in (io.params, io.recv, io.fixed)), batch) for io in ios
        ]
        taps, stash = zip(
            *(
                tap_avals(fns[s], a, len(io.outputs), lambda f: as_one_device(f, mesh))
                if split_backward
                else ((), ())
                for s, (io, a) in enumerate(zip(ios, args, strict=True))
            ),
            strict=True,
        )
        specs = tuple(
            residual_spec(
                fns[s], (*args[s], (taps[s], stash[s])), remat[s], len(ios[s].fixed_recv), mesh
            )
            for s in range(S)
        )
        return cls(
            program=program,
            stages=tuple(stages),
            ios=ios,
            fns=fns,
            fns_w=fns_w,
            specs=specs,
            chunks=plan_chunks([r.stored for r in specs]),
            params=layout,
            boundary_sizes=buffer_sizes([s.send for s in stages]),
            grad_sizes=buffer_sizes([float_part(s.send) for s in stages]),
            remat=tuple(remat),
            seed=seed,
            tp=tp,
            uses=uses if split_backward else (),
            taps=taps,
            stash=stash,
            kept=plan_chunks([(*t, *x) for t, x in zip(taps, stash, strict=True)]),
        )

    def _params(self, s: int, slots: Sequence[Any]) -> dict:
        """Stage s's parameter values from this device's rows of the slots: whole, or this
        device's shard of a tensor-split slot (exact: of the value's shape)."""
        return read_params(
            self.program,
            self.params,
            s % self.params.num_devices,
            slots,
            set(self.stages[s].params),
        )

    def local_shape(self, k: int) -> tuple[int, ...]:
        """Slot k's shape on one device (a shard of a tensor-split slot)."""
        sl = self.params.slots[k]
        return local_shape(sl.shape, sl.dim, self.tp)

    def zero_grads(self) -> tuple:
        """One zero gradient per slot, in this device's slot shapes."""
        return tuple(
            jnp.zeros(self.local_shape(k), sl.dtype) for k, sl in enumerate(self.params.slots)
        )

    def _unpack(self, layout: FlatLayout, bufs: tuple, sizes: dict | None = None) -> dict:
        env: dict = {}
        sizes = self.boundary_sizes if sizes is None else sizes
        unpack_flat(env, layout, dict(zip(sizes, bufs, strict=True)))
        return env

    def forward(self, s: int) -> Callable:
        """F: the stage under ``jax.vjp``; its residuals (not the parameters themselves, or
        only the stage input under remat) are written into their slots in place."""
        io, st = self.ios[s], self.stages[s]

        def action(state: ForwardState, x: TickInputs) -> ForwardState:
            env = self._params(s, x.params)
            act = tuple(row(b, x.slots["act_read"]) for b in x.inbox_f)
            recv_env = self._unpack(st.recv, act)
            pv = tuple(env[v] for v in io.params)
            rv = tuple(recv_env[v] for v in io.recv)
            fv = tuple(env[v] if v in env else recv_env[v] for v in io.fixed)
            f = saving(self.fns[s], fv, x.xs)
            outs, f_vjp, aux = jax.vjp(f, pv, rv, self._probes(s), has_aux=True)
            if self.remat[s]:
                stored = [*rv, *(recv_env[v] for v in io.fixed_recv)]
            else:
                leaves = jax.tree.leaves(f_vjp)
                index = self.specs[s].param_index
                stored = [y for y, i in zip(leaves, index, strict=True) if i < 0]
            ress = _store(self.chunks, s, state.ress, x.slots["res_store"], stored)
            if s == len(self.stages) - 1:
                return state._replace(ress=ress, loss=state.loss + outs[0].astype(jnp.float32))
            sent = dict(zip(io.outputs, outs, strict=True)) | dict(zip(io.aux, aux, strict=True))
            send = pack_flat(sent, st.send, self.boundary_sizes)
            return state._replace(ress=ress, send_f=send)

        return action

    def _probes(self, s: int) -> tuple:
        if not self.uses:
            return ()
        zeros = lambda avals: tuple(jnp.zeros(t.shape, t.dtype) for t in avals)  # noqa: E731
        return zeros(self.taps[s]), zeros(self.stash[s])

    def _vjp(self, s: int, env: dict, x: TickInputs, ress: tuple) -> Callable:
        """The stage's VJP rebuilt from its residual slot (or recomputed from the saved
        input)."""
        io, spec = self.ios[s], self.specs[s]
        pv = tuple(env[v] for v in io.params)
        stored = _load(self.chunks, s, ress, x.slots["res_read"], spec.stored)
        if self.remat[s]:  # the saved input: float values, then the received int/bool ones
            n = len(io.recv)
            rv, got = stored[:n], dict(zip(io.fixed_recv, stored[n:], strict=True))
            fv = tuple(env[v] if v in env else got[v] for v in io.fixed)
            f = saving(self.fns[s], fv, x.xs)
            return jax.vjp(f, pv, tuple(rv), self._probes(s), has_aux=True)[1]
        it = iter(stored)
        leaves = [pv[i] if i >= 0 else next(it) for i in spec.param_index]
        return jax.tree.unflatten(spec.treedef, leaves)

    def backward(self, s: int, fuse_w: bool = False) -> Callable:
        """B: the input gradient (sent back) and the weight gradient, or, with W split off
        (`weights`), the gradients of the parameters no tapped operator reads and the tapped
        results' cotangents and activation inputs, stored for W (`passes.split_backward`) —
        or, ``fuse_w``, handed to W's computation at once (a W in its B's cell: one whole
        backward, nothing stored); an in-place action ``(state, (x, ress)) -> state``: the
        parameter gradients are added into this stage's rows of the gradient sums."""
        io, st = self.ios[s], self.stages[s]
        S, split = len(self.stages), bool(self.uses)

        def action(state: BackwardState, inputs_: tuple) -> BackwardState:
            x, ress = inputs_
            env = self._params(s, x.params)
            if s == S - 1:
                out = self.program.avals[io.outputs[0]]
                g = (jnp.full(out.shape, self.seed, out.dtype),)
            else:  # from the next stage
                got = tuple(row(b, x.slots["grad_read"]) for b in x.inbox_b)
                g_env = self._unpack(float_part(st.send), got, self.grad_sizes)
                g = tuple(g_env[v] for v in io.outputs)
            d_params, d_recv, d_probes = self._vjp(s, env, x, ress)(g)
            early = self.uses[s].early if split else None
            state = state._replace(grads=self._add_grads(s, state.grads, d_params, early))
            if s > 0:
                d_env = dict(zip(io.recv, d_recv, strict=True))
                send = pack_flat(d_env, float_part(st.recv), self.grad_sizes)
                state = state._replace(send_b=send)
            if split and self.taps[s]:
                kept = (*d_probes[0], *d_probes[1])
                if fuse_w:
                    return state._replace(grads=self._weight_grads(s, state.grads, env, kept))
                cots = _store(self.kept, s, state.cots, x.slots["cot_store"], kept)
                state = state._replace(cots=cots)
            return state

        return action

    def weights(self, s: int) -> Callable:
        """W: the tapped operators' weight gradients, the VJP of `stage_fns._weight_fn` at the
        activation inputs and cotangents B stored (no residual of F is read), as an in-place
        action ``(grads, (x, cots)) -> grads`` on the gradient sums alone: with the cotangent
        buffers in its carry, XLA hoisted W's matmuls out of the action to run every tick."""

        def action(grads: tuple, inputs_: tuple) -> tuple:
            x, cots = inputs_
            env = self._params(s, x.params)
            kept = _load(self.kept, s, cots, x.slots["cot_read"], (*self.taps[s], *self.stash[s]))
            return self._weight_grads(s, grads, env, kept)

        return action

    def _weight_grads(self, s: int, grads: tuple, env: dict, kept: Sequence) -> tuple:
        """``grads`` plus the tapped operators' weight gradients from ``kept``: the tapped
        results' cotangents, then their activation inputs."""
        io, n = self.ios[s], len(self.taps[s])
        fixed = tuple(env.get(v) for v in io.fixed)
        f = lambda pv: self.fns_w[s](pv, fixed, kept[n:])  # noqa: E731
        _, vjp = jax.vjp(f, tuple(env[v] for v in io.params))
        (d_params,) = vjp(tuple(kept[:n]))
        return self._add_grads(s, grads, d_params, self.uses[s].late)

    def _add_grads(
        self, s: int, sums: tuple, d_params: Sequence[Any], only: frozenset | None = None
    ) -> tuple:
        """``sums`` with stage s's parameter gradients (``only`` those of these values) added
        into their slots (this device's slot shapes); the other slots are left as they are."""
        env = dict(zip(self.ios[s].params, d_params, strict=True))
        env = env if only is None else {v: g for v, g in env.items() if v in only}
        d = s % self.params.num_devices
        return tuple(
            acc + env[sl.values[d]].reshape(acc.shape) if sl.values[d] in env else acc
            for acc, sl in zip(sums, self.params.slots, strict=True)
        )


class BackwardState(NamedTuple):
    """What backward actions update (in place: see `passes.emit_train._when`)."""

    send_b: tuple  # gradient for the previous device this tick, one flat buffer per dtype
    cots: tuple  # stored cotangents (for W): one (slots, size) buffer per dtype
    grads: tuple  # the parameter gradients summed so far, one per slot


def _store(chunks: ResidualChunks, s: int, bufs: tuple, slot: Any, leaves: Sequence) -> tuple:
    """Writes stage s's ``leaves`` into row ``slot`` of the chunk buffers it uses: a chunk is
    either one leaf of its size (no copy) or pieces packed end to end."""
    parts: dict[int, list] = {}
    for q in chunks.pieces[s]:
        flat = leaves[q.leaf].reshape(-1)
        if q.size < flat.size:
            flat = jax.lax.slice(flat, (q.start,), (q.start + q.size,))
        parts.setdefault(q.chunk, []).append((q.offset, flat))
    bufs = list(bufs)
    for c, ps in parts.items():
        dt, n = chunks.chunks[c]
        xs = [x for _, x in sorted(ps, key=lambda ox: ox[0])]
        used = sum(x.size for x in xs)
        xs += [jnp.zeros((n - used,), dt)] if used < n else []
        bufs[c] = set_row(bufs[c], slot, xs[0] if len(xs) == 1 else jnp.concatenate(xs))
    return tuple(bufs)


def _load(chunks: ResidualChunks, s: int, bufs: tuple, slot: Any, avals: Sequence) -> list:
    """Stage s's leaves (of ``avals``' shapes) read back from row ``slot`` of the chunks."""
    pieces = chunks.pieces[s]
    rows = {q.chunk: row(bufs[q.chunk], slot) for q in pieces}
    parts: list[list] = [[] for _ in avals]
    for q in pieces:  # in leaf order, each leaf's pieces in order
        parts[q.leaf].append(jax.lax.slice(rows[q.chunk], (q.offset,), (q.offset + q.size,)))
    return [
        (ps[0] if len(ps) == 1 else jnp.concatenate(ps)).reshape(leaf.shape)
        for ps, leaf in zip(parts, avals, strict=True)
    ]


def row(buf, slot):
    """Row ``slot`` of ``buf``; of a one-row buffer, without a slice (XLA:CPU copied it)."""
    if buf.shape[0] == 1:
        return buf.reshape(buf.shape[1:])
    return jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)


def set_row(buf, slot, value):
    if buf.shape[0] == 1:
        return value.reshape(buf.shape)
    return jax.lax.dynamic_update_index_in_dim(buf, value, slot, 0)
