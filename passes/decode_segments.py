"""Decode segments: each stage's decode step cut at its cache writes, so that every write runs
in place on the carried cache slot and the operators after it read the slot itself.

With the writes lifted out of a single branch (`passes.cache_writes`), a branch still applies
each write to a copy of the group's block for the attention that reads it: one block copy
per cache leaf per tick. Cutting the step there removes that copy: segment j of a stage runs
its operators up to a set of writes (the key and value of one attention, say), returns their
indices and updates, the writes run on the carried slots after the branch, and segment j + 1
reads the written leaves as group g's block of the slots. Values a later segment needs cross
in small flat buffers per dtype (activations, not caches); operators on parameters alone are
given to every segment (XLA keeps the ones a segment uses). Devices with fewer segments are
aligned to the end: the last segment of every device makes the sends and the logits.

A stage cut between a cache write and the attention that reads it sends the written leaf on:
its last segment reads it from the slot (after the write) and sends it. `cut` refuses
(returns None) a stage whose step reads a cache leaf other than by its write; the emitter
then keeps one branch per stage (`passes.emit_generate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from autopipe.passes.cache_writes import SlotWrite, apply_write, write_operands
from autopipe.passes.decode_state import DecodeState
from autopipe.passes.ir import Program
from autopipe.passes.layout import FlatLayout, StageLayout, buffer_sizes, packed
from autopipe.passes.param_layout import ParamLayout, pack_flat, read_params, unpack_flat
from autopipe.passes.tensor_local import TensorPlan, eval_stage
from autopipe.passes.trace import is_key_dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class Segment:
    """One branch of a stage's tick: its operators, the writes after it, what it reads."""

    ops: tuple[int, ...]  # batch operators, program order
    writes: tuple[int, ...]  # op indices of the lifted writes that run after it
    reads: tuple[tuple[int, int], ...]  # (slot, value): written leaves read from the slots
    carry_in: FlatLayout  # values made by the segments before
    carry_out: FlatLayout  # values the segments after need


def cut(
    program: Program,
    layout: StageLayout,
    state: DecodeState,
    writes: Mapping[int, SlotWrite],
    device: int,
    *,
    last: bool,
    aval: Callable[[int], Any] | None = None,
) -> tuple[Segment, ...] | None:
    """``layout``'s batch operators on ``device`` cut before the first operator that reads a
    value written in the current segment; None when a written leaf is read by anything but
    its write. ``aval``: a carried value's aval as a device holds it (default: whole)."""
    lifted = {w.ops[device]: k for k, w in writes.items() if w.ops[device] is not None}
    written = {program.ops[i].outvars[0]: k for i, k in lifted.items()}
    old = {program.ops[i].invars[0] for i in lifted}
    batch = [i for i in layout.ops if program.is_batch_op(program.ops[i])]
    if any(a in old for i in batch if i not in lifted for a in _values(program.ops[i])):
        return None
    parts: list[tuple[list[int], list[int]]] = [([], [])]
    pending: set[int] = set()
    for i in batch:
        op = program.ops[i]
        if any(a in pending for a in _values(op)):
            parts.append(([], []))
            pending = set()
        if i in lifted:
            parts[-1][1].append(i)
            pending.add(op.outvars[0])
        else:
            parts[-1][0].append(i)
    final = set(layout.send.values()) | ({state.logits} if last else set())
    if any(program.ops[i].outvars[0] in final for i in parts[-1][1]):
        parts.append(([], []))  # a written leaf sent on: read from its slot after the write
    made = {v: j for j, (ops, _) in enumerate(parts) for i in ops for v in program.ops[i].outvars}
    need: list[set[int]] = [set() for _ in parts]  # made earlier, read in segment j
    reads: list[set[tuple[int, int]]] = [set() for _ in parts]
    for j, (ops, wr) in enumerate(parts):
        for i in ops + wr:
            for a in _values(program.ops[i])[1 if i in lifted else 0 :]:
                if a in written:
                    reads[j].add((written[a], a))
                elif a in made and made[a] < j:
                    need[j].add(a)
    need[-1] |= {v for v in final if v in made and made[v] < len(parts) - 1}
    reads[-1] |= {(written[v], v) for v in final if v in written}
    carry = [
        [
            v
            for v, at in made.items()
            if at <= j and any(v in need[n] for n in range(j + 1, len(parts)))
        ]
        for j in range(len(parts))
    ]
    aval = aval or program.avals.__getitem__
    layouts = [packed({v: aval(v) for v in sorted(c)}) for c in carry]
    return tuple(
        Segment(
            ops=tuple(ops),
            writes=tuple(wr),
            reads=tuple(sorted(reads[j])),
            carry_in=layouts[j - 1] if j else packed({}),
            carry_out=layouts[j],
        )
        for j, (ops, wr) in enumerate(parts)
    )


def _written_after(aligned: Sequence[Sequence[Segment | None]], writes) -> list[list[int]]:
    """Per global segment j: the slots some device writes right after it."""
    return [
        sorted(
            k
            for d, segs in enumerate(aligned)
            if segs[j] is not None
            for k, w in writes.items()
            if w.ops[d] in segs[j].writes
        )
        for j in range(len(aligned[0]))
    ]


def _values(op) -> tuple[int, ...]:
    """The operator's operand value ids in order, a literal as -1 (no value has that id)."""
    return tuple(a if isinstance(a, int) else -1 for a in op.invars)


def segmented_tick(
    program: Program,
    stages: Sequence[StageLayout],
    state: DecodeState,
    params: ParamLayout,
    writes: Mapping[int, SlotWrite],
    cuts: Sequence[Sequence[Segment]],
    send_sizes: Mapping[str, int],
    tensor: TensorPlan | None = None,
    split: Mapping[int, Any] | None = None,
    made: Mapping[int, Any] | None = None,
) -> Callable:
    """``tick(pslots, cache, g, recv, tok, pos, which) -> (send, cache, logits)``: every
    segment of the stages as one ``switch`` on ``which`` (device d's branch d, or p: idle),
    the writes in place on ``cache`` after each. With a tensor axis (``tensor``) operators
    run their planned strategies on this device's shards (`passes.tensor_local`): ``split``
    holds the Dim of each split parameter and cache leaf, ``made`` the Dim a value is made on
    (a carried value crosses to the next segment on it)."""
    split, made = split or {}, made or {}
    p, s = len(stages), max(len(c) for c in cuts)
    aligned = [[None] * (s - len(c)) + list(c) for c in cuts]
    carry_sizes = buffer_sizes([seg.carry_out for c in cuts for seg in c])
    after = _written_after(aligned, writes)
    aval = program.avals[state.logits]
    key_consts = {v: c for v, c in program.consts if is_key_dtype(program.avals[v].dtype)}

    def nothing(j):
        zeros = tuple(jnp.zeros((n,), dt) for dt, n in carry_sizes.items())
        sent = tuple(jnp.zeros((n,), dt) for dt, n in send_sizes.items())
        wr = {k: (*writes[k].no_write(), jnp.bool_(False)) for k in after[j]}
        return zeros, wr, sent, jnp.zeros(aval.shape, aval.dtype)

    def branch(d, j):
        seg, stage = aligned[d][j], stages[d]
        if seg is None:
            return lambda *args: nothing(j)
        fixed = [i for i in stage.ops if not program.is_batch_op(program.ops[i])]

        def run(bufs, slots, g, recv, tok, pos, carry):
            env: dict = dict(key_consts)
            unpack_flat(env, stage.recv, recv)
            env[state.tokens], env[state.positions] = tok, pos
            env.update(read_params(program, params, d, bufs))
            unpack_flat(env, seg.carry_in, dict(zip(carry_sizes, carry, strict=True)))
            env.update(
                (v, jax.lax.dynamic_index_in_dim(slots[k], g, 0, False)) for k, v in seg.reads
            )
            crossing = (*seg.carry_in.values(), *(v for _, v in seg.reads))
            dims = {**split, **{v: made.get(v) for v in crossing}}
            get = eval_stage(program, fixed + list(seg.ops), env, tensor, dims)
            _, wr, sent, logits = nothing(j)
            for k in after[j]:
                if writes[k].ops[d] in seg.writes:
                    wr[k] = (*write_operands(program, writes[k], d, get), jnp.bool_(True))
            if j == s - 1:
                sent = pack_flat({v: get(v) for v in stage.send.values()}, stage.send, send_sizes)
                logits = get(state.logits) if d == p - 1 else logits
            out = {v: get(v, made.get(v)) for v in seg.carry_out.values()}
            return pack_flat(out, seg.carry_out, carry_sizes), wr, sent, logits

        return run

    branches = [[branch(d, j) for d in range(p)] + [lambda *a, j=j: nothing(j)] for j in range(s)]

    def tick(pslots, cache, g, recv, tok, pos, which) -> tuple[Any, tuple, Any]:
        carry = nothing(0)[0]
        for j in range(s):
            carry, wr, sent, logits = jax.lax.switch(
                which, branches[j], pslots, cache, g, recv, tok, pos, carry
            )
            cache = tuple(
                apply_write(x, g, wr[k][-1], writes[k], wr[k][:-1]) if k in wr else x
                for k, x in enumerate(cache)
            )
        return sent, cache, logits

    return tick
