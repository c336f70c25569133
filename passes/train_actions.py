"""The actions of a training table, per stage: F (forward under ``jax.vjp``, its matmul and
convolution results written into their residual slots in place, the rest recomputed by B), B
(input gradient, and the weight gradient unless W is split off) and W (the weight gradients of
the matmuls that read parameters, from the cotangents B stored: `passes.split_backward`). See
`passes.emit_train` for how a tick runs them; parameters are read from the device's rows of the
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
from autopipe.passes.layout import FlatLayout, StageLayout, buffer_sizes, packed
from autopipe.passes.param_layout import (
    ParamLayout,
    pack_flat,
    param_layout,
    read_params,
    unpack_flat,
)
from autopipe.passes.residuals import ResidualChunks, plan_chunks, saving
from autopipe.passes.split_backward import (
    Hook,
    Mode,
    WeightUses,
    is_float,
    tap_avals,
    w_treedef,
    weight_uses,
)
from autopipe.passes.tensor_local import TensorPlan, as_one_device, eval_stage, local_shape


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class _StageIO:
    """The differentiable interface of one stage. Integer and boolean values (masks, indices,
    counts) cross stages forward like any other, but carry no cotangent: they enter as
    ``fixed`` and leave as ``aux``, outside the differentiated function."""

    params: tuple[int, ...]  # float parameter values (differentiated)
    recv: tuple[int, ...]  # float values received (differentiated)
    fixed: tuple[int, ...]  # int/bool parameter or received values (not differentiated)
    fixed_recv: tuple[int, ...]  # the received ones among ``fixed``
    outputs: tuple[int, ...]  # float values sent on, or the loss (differentiated)
    aux: tuple[int, ...]  # int/bool values sent on (no cotangent)


def _stage_io(program: Program, layout: StageLayout, last: bool) -> _StageIO:
    params = layout.params
    recv = layout.recv.values()
    floats = lambda vs: tuple(v for v in vs if is_float(program.avals[v]))  # noqa: E731
    others = lambda vs: tuple(v for v in vs if not is_float(program.avals[v]))  # noqa: E731
    sent = tuple(program.outvars) if last else layout.send.values()
    return _StageIO(
        params=floats(params),
        recv=floats(recv),
        fixed=others((*params, *recv)),
        fixed_recv=others(recv),
        outputs=floats(sent) if not last else sent,
        aux=others(sent) if not last else (),
    )


def _apply_fn(
    program: Program,
    layout: StageLayout,
    io: _StageIO,
    consts: dict,
    tensor: TensorPlan | None = None,
    split: Mapping[int, int] | None = None,
    uses: WeightUses | None = None,
    mode: Mode = "B",
) -> Callable:
    """``apply(params, recv, fixed, xs, probes) -> (outputs, aux)``: the stage,
    differentiable in its first two arguments and ``probes`` (`jax.vjp` with ``has_aux``).
    With a tensor axis (``tensor``, conjugate) every operator runs its planned strategy on
    this device's shards (`passes.tensor_local`): parameters in ``split`` (value → dim) arrive
    as shards, everything else whole, and the values leaving the stage are made whole.
    With ``uses`` the backward is split as ``mode``'s action needs (`passes.split_backward`):
    the tapped results follow the outputs (as this device holds them), ``probes`` one zero
    per tapped result (None: no tapping, to learn their shapes)."""
    batch_in = batch_values(program)
    split = split or {}

    def apply(param_vals, recv_vals, fixed_vals, xs, probes=()):
        env = dict(consts)
        env.update(zip(io.params, param_vals, strict=True))
        env.update(zip(io.recv, recv_vals, strict=True))
        env.update(zip(io.fixed, fixed_vals, strict=True))
        env.update(zip(batch_in, xs, strict=True))
        hook = None if uses is None else Hook(uses=uses, mode=mode, probes=probes)
        whole = eval_stage(program, layout.ops, env, tensor, split, hook)
        taps = tuple(hook.taps) if hook is not None else ()
        return tuple(whole(v) for v in io.outputs) + taps, tuple(whole(v) for v in io.aux)

    return apply


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Residuals:
    """How a stage's VJP residuals are stored: which leaves are its own parameters (not
    stored), and the avals of the rest."""

    treedef: Any
    param_index: tuple[int, ...]  # per leaf: index into param_vals, or -1 when stored
    stored: tuple[jax.ShapeDtypeStruct, ...]  # the stored leaves, in order


def batch_values(program: Program) -> list[int]:
    """The values a stage reads per microbatch: batch leaves, then the inputs as this
    microbatch sees them (`passes.inputs`)."""
    return [*(v for v in program.invars if v in program.batch_dependent), *program.input_invars]


def _residual_spec(
    fn: Callable, args: tuple, remat: bool, n_fixed_recv: int, mesh: Any = None
) -> _Residuals:
    """Traces ``jax.vjp`` of a stage abstractly to learn its residual structure (under remat:
    the stage input, i.e. the received values, the last ``n_fixed_recv`` of ``fixed``
    included). ``mesh``: traced inside a shard_map manual over its axes (the stage binds
    collectives), ``args`` being one device's local shapes."""
    found = {}

    def probe(param_vals, recv_vals, fixed_vals, xs, probes):
        if remat:  # the stage input: its float values and the received int/bool ones
            got = (*recv_vals, *fixed_vals[len(fixed_vals) - n_fixed_recv :])
            leaves, treedef = jax.tree.flatten(got)
            found["spec"] = (treedef, [-1] * len(leaves))
            return leaves
        f = saving(fn, fixed_vals, xs)
        _, vjp_fn, _ = jax.vjp(f, param_vals, recv_vals, probes, has_aux=True)
        leaves, treedef = jax.tree.flatten(vjp_fn)
        index = [next((i for i, q in enumerate(param_vals) if q is x), -1) for x in leaves]
        found["spec"] = (treedef, index)
        return [x for x, i in zip(leaves, index, strict=True) if i < 0]

    stored = jax.eval_shape(as_one_device(probe, mesh), *args)
    treedef, index = found["spec"]
    return _Residuals(treedef=treedef, param_index=tuple(index), stored=tuple(stored))


def _stage_fns(program, stages, ios, tensor, split, uses) -> tuple[tuple, tuple]:
    """Every stage's `_apply_fn` as B differentiates it, and as W does."""
    consts = dict(program.consts)
    return tuple(
        tuple(
            _apply_fn(program, st, io, consts, tensor, split, u, mode)
            for st, io, u in zip(stages, ios, uses, strict=True)
        )
        for mode in ("B", "W")
    )


def _weight_uses(program: Program, layout: StageLayout, io: _StageIO) -> WeightUses:
    acts = (*io.recv, *io.fixed_recv, *batch_values(program))
    return weight_uses(program, layout.ops, io.params, acts, (*io.outputs, *io.aux))


class ForwardState(NamedTuple):
    """What forward actions update (in place: see `_when`)."""

    ress: tuple  # residual slots: one (slots, size) buffer per chunk
    loss: Any  # summed over the microbatches
    send_f: tuple  # activation for the next device this tick, one flat buffer per dtype


class TickInputs(NamedTuple):
    """What an action reads in its tick."""

    params: tuple  # this device's ``(1, *shape)`` block of every parameter slot
    xs: list  # this microbatch's batch leaves, then the inputs as it sees them
    act: tuple  # the received activation
    grad: tuple  # the received gradient
    slots: dict  # slot index per SlotPlan table, this tick and device


@dataclasses.dataclass(frozen=True, kw_only=True)
class Actions:
    """The F / B / W actions of every stage."""

    program: Program
    stages: tuple[StageLayout, ...]
    ios: tuple[_StageIO, ...]
    fns: tuple[Callable, ...]
    fns_w: tuple[Callable, ...]  # the same, differentiated as W (with W split off)
    specs: tuple[_Residuals, ...]
    chunks: ResidualChunks
    params: ParamLayout  # the slots of every device's stages (by size or by shape)
    boundary_sizes: dict[str, int]  # forward: one flat buffer per dtype of any boundary
    grad_sizes: dict[str, int]  # backward: the float dtypes only (ints carry no cotangent)
    remat: tuple[bool, ...]
    seed: float
    tp: int = 1  # tensor-split slots hold 1/tp of their shape on each device
    # with W split off (`passes.split_backward`), per stage:
    uses: tuple[WeightUses, ...] = ()
    w_treedefs: tuple[Any, ...] = ()  # the VJP's structure as W differentiates
    taps: tuple[tuple[jax.ShapeDtypeStruct, ...], ...] = ()  # the tapped results' avals
    cots: tuple[FlatLayout, ...] = ()  # their cotangents B stores for W (keyed by tap index)

    @property
    def cot_sizes(self) -> dict[str, int]:
        """The cotangent buffers' elements per dtype (one flat buffer each)."""
        return buffer_sizes(self.cots)

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
        ios = tuple(_stage_io(program, st, s == S - 1) for s, st in enumerate(stages))
        uses = tuple(_weight_uses(program, st, io) for st, io in zip(stages, ios, strict=True))
        uses = uses if split_backward else (None,) * S
        fns, fns_w = _stage_fns(program, stages, ios, tensor, split, uses)
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
        taps = tuple(
            tap_avals(fns[s], a, len(io.outputs), lambda f: as_one_device(f, mesh))
            if split_backward
            else ()
            for s, (io, a) in enumerate(zip(ios, args, strict=True))
        )
        spec = lambda f, s: _residual_spec(  # noqa: E731
            f[s], (*args[s], taps[s]), remat[s], len(ios[s].fixed_recv), mesh
        )
        specs = tuple(spec(fns, s) for s in range(S))
        w_treedefs = tuple(w_treedef(specs[s], spec(fns_w, s)) for s in range(S) if uses[s])
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
            w_treedefs=w_treedefs,
            taps=taps,
            cots=tuple(packed(dict(enumerate(t))) for t in taps),
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
            recv_env = self._unpack(st.recv, x.act)
            pv = tuple(env[v] for v in io.params)
            rv = tuple(recv_env[v] for v in io.recv)
            fv = tuple(env[v] if v in env else recv_env[v] for v in io.fixed)
            f = saving(self.fns[s], fv, x.xs)
            outs, f_vjp, aux = jax.vjp(f, pv, rv, self._probes(s), has_aux=True)
            outs = outs[: len(io.outputs)]
            if self.remat[s]:
                stored = [*rv, *(recv_env[v] for v in io.fixed_recv)]
            else:
                leaves = jax.tree.leaves(f_vjp)
                index = self.specs[s].param_index
                stored = [y for y, i in zip(leaves, index, strict=True) if i < 0]
            ress = self._store(s, state.ress, x.slots["res_store"], stored)
            if s == len(self.stages) - 1:
                return state._replace(ress=ress, loss=state.loss + outs[0].astype(jnp.float32))
            sent = dict(zip(io.outputs, outs, strict=True)) | dict(zip(io.aux, aux, strict=True))
            send = pack_flat(sent, st.send, self.boundary_sizes)
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
            ress[c] = set_row(ress[c], slot, xs[0] if len(xs) == 1 else jnp.concatenate(xs))
        return tuple(ress)

    def _probes(self, s: int) -> tuple:
        return tuple(jnp.zeros(t.shape, t.dtype) for t in self.taps[s]) if self.taps else ()

    def _vjp(self, s: int, env: dict, x: TickInputs, ress: tuple, w: bool = False) -> Callable:
        """The stage's VJP rebuilt from its residual slot (or recomputed from the saved input),
        as B (or with ``w``, as W) differentiates it."""
        io, spec = self.ios[s], self.specs[s]
        pv = tuple(env[v] for v in io.params)
        pieces = self.chunks.pieces[s]
        rows = {q.chunk: row(ress[q.chunk], x.slots["res_read"]) for q in pieces}
        parts: list[list] = [[] for _ in spec.stored]
        for q in pieces:  # in leaf order, each leaf's pieces in order
            parts[q.leaf].append(jax.lax.slice(rows[q.chunk], (q.offset,), (q.offset + q.size,)))
        stored = [
            (ps[0] if len(ps) == 1 else jnp.concatenate(ps)).reshape(leaf.shape)
            for ps, leaf in zip(parts, spec.stored, strict=True)
        ]
        if self.remat[s]:  # the saved input: float values, then the received int/bool ones
            n = len(io.recv)
            rv, got = stored[:n], dict(zip(io.fixed_recv, stored[n:], strict=True))
            fv = tuple(env[v] if v in env else got[v] for v in io.fixed)
            f = saving((self.fns_w if w else self.fns)[s], fv, x.xs)
            return jax.vjp(f, pv, tuple(rv), self._probes(s), has_aux=True)[1]
        it = iter(stored)
        leaves = [pv[i] if i >= 0 else next(it) for i in spec.param_index]
        return jax.tree.unflatten(self.w_treedefs[s] if w else spec.treedef, leaves)

    def backward(self, s: int, *, weights: bool, inputs: bool) -> Callable:
        """B (``inputs``: the input gradient, sent back; with ``weights`` the weight gradient
        too) or, with W split off, B (``inputs`` only: the gradients of the parameters no
        tapped operator reads, and the tapped results' cotangents stored for W) and W
        (``weights`` only: the tapped operators' weight gradients from those cotangents; see
        `passes.split_backward`), as an in-place action ``(state, (x, ress)) -> state``: the
        parameter gradients are added into this stage's rows of the gradient sums."""
        io, st = self.ios[s], self.stages[s]
        S, split = len(self.stages), bool(self.uses)
        late = split and not inputs  # W
        adds = None if not split else self.uses[s].late if late else self.uses[s].early

        def action(state: BackwardState, inputs_: tuple) -> BackwardState:
            x, ress = inputs_
            env = self._params(s, x.params)
            outs = [self.program.avals[v] for v in io.outputs]
            if late:  # every cotangent W needs enters at the tapped results
                g = tuple(jnp.zeros(a.shape, a.dtype) for a in outs)
                cot = tuple(row(b, x.slots["cot_read"]) for b in state.cots)
                g_env = self._unpack(self.cots[s], cot, self.cot_sizes)
                g_taps = tuple(g_env[k] for k in range(len(self.taps[s])))
            else:
                if s == S - 1:
                    g = (jnp.full(outs[0].shape, self.seed, outs[0].dtype),)
                else:  # from the next stage
                    g_env = self._unpack(float_part(st.send), x.grad, self.grad_sizes)
                    g = tuple(g_env[v] for v in io.outputs)
                g_taps = self._probes(s)
            d_params, d_recv, d_taps = self._vjp(s, env, x, ress, late)((*g, *g_taps))
            if weights or split:
                state = state._replace(grads=self._add_grads(s, state.grads, d_params, adds))
            if inputs and s > 0:
                d_env = dict(zip(io.recv, d_recv, strict=True))
                send = pack_flat(d_env, float_part(st.recv), self.grad_sizes)
                state = state._replace(send_b=send)
            if split and inputs and d_taps:
                cot = pack_flat(dict(enumerate(d_taps)), self.cots[s], self.cot_sizes)
                slot = x.slots["cot_store"]
                state = state._replace(cots=tuple(map(set_row, state.cots, [slot] * len(cot), cot)))
            return state

        return action

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


def row(buf, slot):
    return jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)


def set_row(buf, slot, value):
    return jax.lax.dynamic_update_index_in_dim(buf, value, slot, 0)
