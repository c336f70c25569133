"""Cache-write pass: which cache writes of a decode step run in place on the carried cache slot.

A decode step writes each cache leaf with one ``scatter`` (a per-row ``dynamic_update_slice``
under ``vmap``) or one ``dynamic_update_slice`` of the leaf it was given: a row's new key at
its position. Inside a stage's conditional branch that write cannot update the carried slot
(a conditional copies an operand it updates), so the emitter copied the group's block out
and back every tick. This pass finds, per cache slot, the write every holder makes
(`slot_writes`); the emitter then lifts it: the branch still applies the write to its
read-only view of the group's block for the operators that read the new cache, and returns
only the write's indices and updates (`write_operands`); after the branch one gated scatter
writes them into the group's block of the carried slot in place (`apply_write`), dropped
on a device that did not write (idle, or no leaf in that slot).

A slot is lifted when every device that holds a leaf in it writes it the same way (the same
primitive, dimension numbers, mode and operand shapes), the write reads the step's own
input leaf, and its output is the leaf's new value. Any other slot keeps the copy-back.

On a tensor axis (``tensor``) the write runs on shards: a cache split by heads is written on
the dim the slot holds it split on (the write's planned strategy keeps it there, its window
covering the dim whole), the updates on their planned dim, the indices whole; operands and
block are this device's shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from autopipe.passes.decode_state import DecodeState
from autopipe.passes.ir import Lit, Program
from autopipe.passes.layout import StageLayout
from autopipe.passes.param_layout import ParamLayout
from autopipe.passes.tensor_local import TensorPlan, local_aval, local_shape

_MODE = jax.lax.GatherScatterMode


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlotWrite:
    """How every holder of one cache slot writes its leaf, and where (op index per device)."""

    primitive: str  # "scatter" | "dynamic_update_slice"
    params: tuple[tuple[str, Any], ...]  # the scatter's parameters (dnums, mode, flags)
    block: tuple[int, ...]  # one group's block of the slot: the leaf's shape (this shard's)
    operands: tuple[jax.ShapeDtypeStruct, ...]  # indices then updates, as the branch returns
    dims: tuple[int | None, ...]  # each operand's Dim on the tensor axis (None: whole)
    ops: tuple[int | None, ...]  # per device: the write's op index (None: nothing to write)

    def no_write(self) -> tuple:
        """The operands of a device that writes nothing (an idle branch, an empty slot)."""
        return tuple(jnp.zeros(a.shape, a.dtype) for a in self.operands)


def slot_writes(
    program: Program,
    stages: Sequence[StageLayout],
    state: DecodeState,
    caches: ParamLayout,
    tensor: TensorPlan | None = None,
) -> dict[int, SlotWrite]:
    """Slot index → its write, for the slots whose write can be lifted out of the branch."""
    producer = program.producers()
    out_of = state.out_of()
    writes: dict[int, SlotWrite] = {}
    for k, slot in enumerate(caches.slots):
        found = [
            _write_of(program, producer, stages[d], v, out_of[v], slot.dim, tensor)
            if v is not None
            else None
            for d, v in enumerate(slot.values)
        ]
        held = [w for w, v in zip(found, slot.values, strict=True) if v is not None]
        if not held or any(w is None for w in held) or len({w[0] for w in held}) != 1:
            continue
        primitive, params, operands, dims = held[0][0]
        ops = tuple(w[1] if w is not None else None for w in found)
        tp = tensor.tp if tensor is not None else 1
        writes[k] = SlotWrite(
            primitive=primitive,
            params=params,
            block=local_shape(slot.shape, slot.dim, tp),
            operands=operands,
            dims=dims,
            ops=ops,
        )
    return writes


def _write_of(
    program: Program,
    producer: Mapping[int, int],
    stage: StageLayout,
    v: int,
    w,
    dim,
    tensor: TensorPlan | None,
):
    """``(signature, op index)`` of the write that makes ``w`` from ``v`` on ``stage``, or
    None when it is not a liftable write (on a tensor axis: one that keeps the leaf on the
    slot's ``dim``)."""
    i = producer.get(w) if isinstance(w, int) else None
    if i is None or i not in set(stage.ops):
        return None
    op = program.ops[i]
    if op.kind != "eqn" or not op.invars or op.invars[0] != v:
        return None
    if op.primitive == "scatter" and op.eqn.params.get("update_jaxpr") is None:
        params = tuple(
            (name, op.eqn.params[name])
            for name in ("dimension_numbers", "mode", "indices_are_sorted", "unique_indices")
        )
    elif op.primitive == "dynamic_update_slice":
        params = ()
    else:
        return None
    s = tensor.strategies.get(i) if tensor is not None else None
    ins = s.ins if s is not None else (None,) * len(op.invars)
    if ins[0] != dim or (s.outs[0] if s is not None else None) != dim:
        return None
    tp = tensor.tp if tensor is not None else 1
    at = _operand_positions(op)
    dims = tuple(ins[j] for j in at)
    operands = tuple(_aval(program, op.invars[j], ins[j], tp) for j in at)
    return (op.primitive, params, operands, dims), i


def _aval(program: Program, a, dim, tp: int) -> jax.ShapeDtypeStruct:
    return local_aval(jnp.asarray(a.val) if isinstance(a, Lit) else program.avals[a], dim, tp)


def write_operands(program: Program, write: SlotWrite, device: int, get: Callable) -> tuple:
    """The indices and updates of ``device``'s write into its slot, in `SlotWrite.operands`
    order: ``get(atom, dim)`` reads each from the branch's values on its Dim."""
    op = program.ops[write.ops[device]]
    at = _operand_positions(op)
    return tuple(
        jnp.asarray(get(op.invars[j], d), aval.dtype)
        for j, d, aval in zip(at, write.dims, write.operands, strict=True)
    )


def _operand_positions(op) -> tuple[int, ...]:
    """Where a write's operands after the cache leaf sit in ``op.invars``: indices, then the
    updates."""
    n = len(op.invars)
    if op.primitive == "dynamic_update_slice":  # (operand, update, *start indices)
        return (*range(2, n), 1)
    return tuple(range(1, n))  # scatter: (operand, indices, updates)


def apply_write(slot, g, wrote, write: SlotWrite, operands: Sequence[Any]):
    """``slot`` (G, *block) with group ``g``'s block written as the step wrote its leaf, in
    place; nothing written where ``wrote`` is false (the group index is sent out of bounds,
    and the scatter drops it)."""
    g = jnp.where(wrote, g, slot.shape[0]).astype(jnp.int32)
    if write.primitive == "dynamic_update_slice":
        *starts, update = operands
        starts = [
            jnp.clip(s.astype(jnp.int32), 0, n - u)
            for s, n, u in zip(starts, write.block, update.shape, strict=True)
        ]
        dnums = jax.lax.ScatterDimensionNumbers(
            update_window_dims=tuple(range(update.ndim)),
            inserted_window_dims=(0,),
            scatter_dims_to_operand_dims=tuple(range(update.ndim + 1)),
        )
        return jax.lax.scatter(
            slot, jnp.stack([g, *starts]), update, dnums, mode=_MODE.FILL_OR_DROP
        )
    params = dict(write.params)
    dn = params["dimension_numbers"]
    indices, update = operands
    indices = indices.astype(jnp.int32)
    if _MODE.from_any(params["mode"]) != _MODE.FILL_OR_DROP:  # clip, as the step's scatter does
        indices = jnp.clip(indices, 0, jnp.asarray(_max_starts(dn, write.block, update.shape)))
    lead = jnp.broadcast_to(g, (*indices.shape[:-1], 1))
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=tuple(dn.update_window_dims),
        inserted_window_dims=(0, *(d + 1 for d in dn.inserted_window_dims)),
        scatter_dims_to_operand_dims=(0, *(d + 1 for d in dn.scatter_dims_to_operand_dims)),
        operand_batching_dims=tuple(d + 1 for d in dn.operand_batching_dims),
        scatter_indices_batching_dims=tuple(dn.scatter_indices_batching_dims),
    )
    return jax.lax.scatter(
        slot,
        jnp.concatenate([lead, indices], axis=-1),
        update,
        dnums,
        indices_are_sorted=params["indices_are_sorted"],
        unique_indices=params["unique_indices"],
        mode=_MODE.FILL_OR_DROP,
    )


def _max_starts(dn, block: Sequence[int], update_shape: Sequence[int]) -> list[int]:
    """Per index component: the largest start that keeps its window inside the block."""
    point = set(dn.inserted_window_dims) | set(dn.operand_batching_dims)
    window = [d for d in range(len(block)) if d not in point]
    size = dict(zip(window, (update_shape[d] for d in dn.update_window_dims), strict=True))
    return [block[o] - size.get(o, 1) for o in dn.scatter_dims_to_operand_dims]
