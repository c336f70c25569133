"""The actions of a training table, per stage: F (forward under ``jax.vjp``, its matmul and
convolution results written into their residual slots in place, the rest recomputed by B), B
(input gradient, and the weight gradient unless W is split off) and W (weight gradient from the
stored cotangent). See `passes.emit_train` for how a tick runs them; parameters are read from
the device's rows of the slots of a `ParamLayout`.

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
from jax.sharding import PartitionSpec as P

from autopipe.passes.ir import Program
from autopipe.passes.layout import FlatLayout, StageLayout, buffer_sizes
from autopipe.passes.param_layout import (
    ParamLayout,
    pack_flat,
    param_layout,
    read_params,
    unpack_flat,
)
from autopipe.passes.residuals import ResidualChunks, plan_chunks
from autopipe.passes.tensor_local import TensorPlan, eval_stage, local_shape


def device_groups(stages: Sequence[StageLayout], p: int) -> list[list[int]]:
    """Device d holds the parameters of stages d, d + p, …"""
    return [[v for s in range(d, len(stages), p) for v in stages[s].params] for d in range(p)]


# --- stage functions under vjp -------------------------------------------------------------


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


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
    floats = lambda vs: tuple(v for v in vs if _is_float(program.avals[v]))  # noqa: E731
    others = lambda vs: tuple(v for v in vs if not _is_float(program.avals[v]))  # noqa: E731
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
) -> Callable:
    """``apply(params, recv, fixed, xs) -> (outputs, aux)``: the stage, differentiable in its
    first two arguments (`jax.vjp` with ``has_aux``). With a tensor axis (``tensor``, conjugate)
    every operator runs its planned strategy on this device's shards (`passes.tensor_local`):
    parameters in ``split`` (value → dim) arrive as shards, everything else whole, and the
    values leaving the stage are made whole."""
    batch_in = [*(v for v in program.invars if v in program.batch_dependent)]
    batch_in += program.input_invars  # as this microbatch sees them (`passes.inputs`)
    split = split or {}

    def apply(param_vals, recv_vals, fixed_vals, xs):
        env = dict(consts)
        env.update(zip(io.params, param_vals, strict=True))
        env.update(zip(io.recv, recv_vals, strict=True))
        env.update(zip(io.fixed, fixed_vals, strict=True))
        env.update(zip(batch_in, xs, strict=True))
        whole = eval_stage(program, layout.ops, env, tensor, split)
        return tuple(whole(v) for v in io.outputs), tuple(whole(v) for v in io.aux)

    return apply


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Residuals:
    """How a stage's VJP residuals are stored: which leaves are its own parameters (not
    stored), and the avals of the rest."""

    treedef: Any
    param_index: tuple[int, ...]  # per leaf: index into param_vals, or -1 when stored
    stored: tuple[jax.ShapeDtypeStruct, ...]  # the stored leaves, in order


def _saving(fn: Callable, fixed: Sequence[Any], xs: Sequence[Any]) -> Callable:
    """``(pv, rv) -> fn(pv, rv, fixed, xs)`` whose VJP keeps only its matmul and convolution
    results (and its inputs) as residuals and recomputes the rest in the backward
    (`memory.SAVED_PRIMITIVES`): on a GPT block a quarter of what plain ``jax.vjp`` keeps,
    which every F writes into the residual slots and every B reads back. A PRNG key among
    ``fixed`` or ``xs`` (a dropout key the recomputation needs) is kept as its raw data."""
    raw = [tuple(map(_key_data, vals)) for vals in (fixed, xs)]

    def f(pv, rv):
        return fn(pv, rv, *(tuple(_typed(*k) for k in vals) for vals in raw))

    return jax.checkpoint(f, policy=jax.checkpoint_policies.dots_saveable)


def _key_data(x: Any) -> tuple[Any, Any]:
    """(x, None), or (its raw data, its PRNG implementation) for a typed key array."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x), jax.random.key_impl(x)
    return x, None


def _typed(x: Any, impl: Any) -> Any:
    return x if impl is None else jax.random.wrap_key_data(x, impl=impl)


def _residual_spec(
    fn: Callable, args: tuple, remat: bool, n_fixed_recv: int, mesh: Any = None
) -> _Residuals:
    """Traces ``jax.vjp`` of a stage abstractly to learn its residual structure (under remat:
    the stage input, i.e. the received values, the last ``n_fixed_recv`` of ``fixed``
    included). ``mesh``: traced inside a shard_map manual over its axes (the stage binds
    collectives), ``args`` being one device's local shapes."""
    found = {}

    def probe(param_vals, recv_vals, fixed_vals, xs):
        if remat:  # the stage input: its float values and the received int/bool ones
            got = (*recv_vals, *fixed_vals[len(fixed_vals) - n_fixed_recv :])
            leaves, treedef = jax.tree.flatten(got)
            found["spec"] = (treedef, [-1] * len(leaves))
            return leaves
        f = _saving(fn, fixed_vals, xs)
        _, vjp_fn, _ = jax.vjp(f, param_vals, recv_vals, has_aux=True)
        leaves, treedef = jax.tree.flatten(vjp_fn)
        index = [next((i for i, q in enumerate(param_vals) if q is x), -1) for x in leaves]
        found["spec"] = (treedef, index)
        return [x for x, i in zip(leaves, index, strict=True) if i < 0]

    if mesh is not None:
        probe = jax.shard_map(
            probe,
            mesh=mesh,
            in_specs=P(),
            out_specs=P(),
            axis_names=set(mesh.axis_names),
            check_vma=False,  # as the pipeline's shard_map (`passes.emit_train`)
        )
    stored = jax.eval_shape(probe, *args)
    treedef, index = found["spec"]
    return _Residuals(treedef=treedef, param_index=tuple(index), stored=tuple(stored))


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
    specs: tuple[_Residuals, ...]
    chunks: ResidualChunks
    params: ParamLayout  # the slots of every device's stages (by size or by shape)
    boundary_sizes: dict[str, int]  # forward: one flat buffer per dtype of any boundary
    grad_sizes: dict[str, int]  # backward: the float dtypes only (ints carry no cotangent)
    remat: tuple[bool, ...]
    seed: float
    tp: int = 1  # tensor-split slots hold 1/tp of their shape on each device

    @classmethod
    def build(
        cls, program, stages, p, mb, remat, seed, by="shape", tensor=None, dims=None, mesh=None
    ) -> Actions:
        """``by``: how parameters align into slots (`passes.param_layout`): by shape, or by
        size where the optimizer does not read shapes (`optimizer_exact.shape_free`).
        ``tensor`` (a conjugate `TensorPlan`), ``dims`` (value → dim split over its axis) and
        ``mesh``: stages run their planned tensor strategies on shards."""
        S = len(stages)
        dims = dict(dims or {}) if tensor is not None else {}
        tp = tensor.tp if tensor is not None else 1
        layout = param_layout(
            program,
            device_groups(stages, p),
            dims=dims,
            tp=tp,
            by=by,
            budget=None,
            align_shared=True,
        )
        split = layout.split
        ios = tuple(_stage_io(program, st, s == S - 1) for s, st in enumerate(stages))
        consts = dict(program.consts)
        fns = tuple(
            _apply_fn(program, st, io, consts, tensor, split)
            for st, io in zip(stages, ios, strict=True)
        )
        aval = lambda v: jax.ShapeDtypeStruct(  # noqa: E731
            layout.shard_shape(program, v), program.avals[v].dtype
        )
        batch = tuple(
            jax.ShapeDtypeStruct((mb, *program.avals[v].shape[1:]), program.avals[v].dtype)
            for v in program.invars
            if v in program.batch_dependent
        ) + tuple(map(aval, program.input_invars))
        specs = tuple(
            _residual_spec(
                fns[s],
                (*(tuple(map(aval, vs)) for vs in (io.params, io.recv, io.fixed)), batch),
                remat[s],
                len(io.fixed_recv),
                mesh if tensor is not None else None,
            )
            for s, io in enumerate(ios)
        )
        return cls(
            program=program,
            stages=tuple(stages),
            ios=ios,
            fns=fns,
            specs=specs,
            chunks=plan_chunks([r.stored for r in specs]),
            params=layout,
            boundary_sizes=buffer_sizes([s.send for s in stages]),
            grad_sizes=buffer_sizes([float_part(s.send) for s in stages]),
            remat=tuple(remat),
            seed=seed,
            tp=tp,
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
            outs, f_vjp, aux = jax.vjp(_saving(self.fns[s], fv, x.xs), pv, rv, has_aux=True)
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

    def _vjp(self, s: int, env: dict, x: TickInputs, ress: tuple) -> Callable:
        """The stage's VJP rebuilt from its residual slot (or recomputed from the saved input)."""
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
            return jax.vjp(_saving(self.fns[s], fv, x.xs), pv, tuple(rv), has_aux=True)[1]
        it = iter(stored)
        leaves = [pv[i] if i >= 0 else next(it) for i in spec.param_index]
        return jax.tree.unflatten(spec.treedef, leaves)

    def backward(self, s: int, *, weights: bool, inputs: bool) -> Callable:
        """B (``inputs``: the input gradient, sent back; with ``weights`` too unless W is split
        off, in which case the cotangent is stored for W) or W (``weights`` only: from the
        stored cotangent), as an in-place action ``(state, (x, ress)) -> state``: the
        parameter gradients are added into this stage's rows of the gradient sums."""
        io, st = self.ios[s], self.stages[s]
        S = len(self.stages)

        def action(state: BackwardState, inputs_: tuple) -> BackwardState:
            x, ress = inputs_
            env = self._params(s, x.params)
            if s == S - 1:
                out = self.program.avals[io.outputs[0]]
                g = (jnp.full(out.shape, self.seed, out.dtype),)
            else:  # from the next stage, or for W the cotangent B stored
                got = x.grad if inputs else tuple(row(b, x.slots["cot_read"]) for b in state.cots)
                g_env = self._unpack(float_part(st.send), got, self.grad_sizes)
                g = tuple(g_env[v] for v in io.outputs)
            d_params, d_recv = self._vjp(s, env, x, ress)(g)
            if weights:
                state = state._replace(grads=self._add_grads(s, state.grads, d_params))
            if inputs and s > 0:
                d_env = dict(zip(io.recv, d_recv, strict=True))
                send = pack_flat(d_env, float_part(st.recv), self.grad_sizes)
                state = state._replace(send_b=send)
            if inputs and not weights and s < S - 1:
                g_env = dict(zip(io.outputs, g, strict=True))
                cot = pack_flat(g_env, float_part(st.send), self.grad_sizes)
                slot = x.slots["cot_store"]
                state = state._replace(cots=tuple(map(set_row, state.cots, [slot] * len(cot), cot)))
            return state

        return action

    def _add_grads(self, s: int, sums: tuple, d_params: Sequence[Any]) -> tuple:
        """``sums`` with stage s's parameter gradients added into their slots (this device's
        slot shapes); the other slots are left as they are."""
        env = dict(zip(self.ios[s].params, d_params, strict=True))
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
