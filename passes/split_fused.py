"""Fused projections cut apart: ``split(x · W + b)`` becomes one matmul per piece.

GPT-2, GPT-NeoX, Falcon and many Flax ports project q, k and v with ONE matmul and cut its
result with ``jnp.split``. On a tensor axis Megatron splits each of q, k and v by heads
(column-parallel); a contiguous column block of the fused ``[Q | K | V]`` holds no whole heads,
so the fused form can only be run split with a gather or an all-to-all before attention.

`split_fused` rewrites the program: for each piece ``[start, stop)`` of the split axis, a
``block`` operator (`passes.ir`) takes that block of the weight's parameter, the casts between
the parameter and the matmul are repeated on the block, the matmul runs on it, and the bias is
cut and broadcast likewise. The pieces' values keep the
split's value ids, so everything after the split is unchanged. Each output element is the same
dot product as before. The blocks are pieces of their parameter: placed as values of their
own, their gradients are the blocks of the parameter's gradient, and `passes.ir.assembler`
puts the parameter together again.

Only an exclusive chain is rewritten: every value between the parameters and the split is read
by the chain alone, and every piece is read. Anything else is left as it is, and so is a
scanned layer stack (`nn.scan`), whose layers are single operators here (`passes.graph`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from autopipe.passes.graph import dead_code_eliminated
from autopipe.passes.ir import Op, Program

_CASTS = frozenset({"convert_element_type", "copy", "copy_p"})
_BIAS_OPS = _CASTS | {"reshape", "broadcast_in_dim"}


@dataclasses.dataclass(frozen=True)
class _Chain:
    """A parameter and the ops from it to the matmul or the add, producer first, each with its
    result's dim of the split axis (None: broadcast along it)."""

    source: int
    source_dim: int | None
    ops: tuple[tuple[int, int | None], ...]


def split_fused(program: Program) -> Program:
    """The program with every fused projection that is cut by a ``split`` cut apart (see the
    module docstring); ``program`` itself when there is none."""
    readers: dict[int, list[int]] = {}
    for i, op in enumerate(program.ops):
        for a in op.invars:
            if isinstance(a, int):
                readers.setdefault(a, []).append(i)
    for a in program.outvars:
        if isinstance(a, int):
            readers.setdefault(a, []).append(-1)
    producer = program.producers()
    rewrites = {}
    for i, op in enumerate(program.ops):
        if op.kind == "eqn" and op.primitive == "split":
            found = _match(program, i, producer, readers)
            if found is not None:
                rewrites[i] = found
    if not rewrites:
        return program
    avals = list(program.avals)
    batch = set(program.batch_dependent)
    ops: list[Op] = []
    for i, op in enumerate(program.ops):
        if i in rewrites:
            ops.extend(_pieces(program, op, *rewrites[i], avals, batch))
        else:
            ops.append(op)
    return dataclasses.replace(
        program,
        avals=tuple(avals),
        ops=tuple(dead_code_eliminated(ops, program.outvars)),
        batch_dependent=frozenset(batch),
    )


def _only_reader(readers, v: int, i: int) -> bool:
    return readers.get(v) == [i]


def _source(program: Program, producer, readers, v: int, dim: int | None, allowed):
    """The `_Chain` from a parameter through ``allowed`` ops, each of whose values only the
    next reads, to ``v`` (whose dim ``dim`` is the split axis); None
    where there is none."""
    params = set(program.param_invars)
    chain: list[tuple[int, int | None]] = []
    while True:
        if v in params:
            return _Chain(source=v, source_dim=dim, ops=tuple(reversed(chain)))
        i = producer.get(v)
        if i is None or v in program.batch_dependent:
            return None
        op = program.ops[i]
        if op.kind != "eqn" or op.primitive not in allowed or len(op.invars) != 1:
            return None
        (a,) = op.invars
        if not isinstance(a, int) or len(readers.get(a, ())) != 1:
            return None
        chain.append((i, dim))
        dim = _operand_dim(op, program.avals[a].shape, program.avals[v].shape, dim)
        if dim == -1:
            return None
        v = a


def _operand_dim(op: Op, shape: Sequence[int], out: Sequence[int], dim: int | None) -> int | None:
    """The operand's dim that becomes result dim ``dim`` (None: the operand is broadcast along
    it; -1: this op cannot be cut along it)."""
    if dim is None or op.primitive in _CASTS:
        return dim
    if op.primitive == "broadcast_in_dim":
        bd = tuple(op.eqn.params["broadcast_dimensions"])
        if dim not in bd:
            return None
        d = bd.index(dim)
        return d if shape[d] == out[dim] else None
    # reshape: only unit dims added or removed
    if op.eqn.params.get("dimensions") is not None:
        return -1
    big_in = [d for d, n in enumerate(shape) if n != 1]
    big_out = [d for d, n in enumerate(out) if n != 1]
    if [shape[d] for d in big_in] != [out[d] for d in big_out] or dim not in big_out:
        return -1
    return big_in[big_out.index(dim)]


def _match(program: Program, s: int, producer, readers):
    """(x's dot op, weight chain, weight operand position, bias chain or None, add op or None)
    for a split at ``s`` that cuts a fused projection, else None."""
    split = program.ops[s]
    (y,) = split.invars
    axis = split.eqn.params["axis"]
    if y not in program.batch_dependent or not _only_reader(readers, y, s):
        return None
    if any(not readers.get(v) for v in split.outvars):
        return None
    top = producer.get(y)
    if top is None or program.ops[top].kind != "eqn":
        return None
    add, bias = None, None
    if program.ops[top].primitive == "add":
        add = program.ops[top]
        batch = [a for a in add.invars if isinstance(a, int) and a in program.batch_dependent]
        if len(batch) != 1 or len(add.invars) != 2 or not isinstance(add.invars[0], int):
            return None
        if not all(isinstance(a, int) for a in add.invars):
            return None
        (z,) = batch
        (b,) = [a for a in add.invars if a != z]
        if not _only_reader(readers, z, top) or not _only_reader(readers, b, top):
            return None
        b_shape, y_shape = program.avals[b].shape, program.avals[y].shape
        if len(b_shape) != len(y_shape):
            return None
        bias = _source(
            program, producer, readers, b, axis if b_shape[axis] != 1 else None, _BIAS_OPS
        )
        if bias is None or producer.get(z) is None:
            return None
        top = producer[z]
    dot = program.ops[top]
    if dot.kind != "eqn" or dot.primitive != "dot_general":
        return None
    found = _weight(program, dot, axis)
    if found is None:
        return None
    w_pos, w_dim = found
    w = dot.invars[w_pos]
    if not isinstance(w, int) or not _only_reader(readers, w, top):
        return None
    weight = _source(program, producer, readers, w, w_dim, _CASTS)
    if weight is None:
        return None
    return top, weight, w_pos, bias, producer[y] if add is not None else None


def _weight(program: Program, dot: Op, axis: int) -> tuple[int, int] | None:
    """(operand position, its dim) of the batch-independent operand of ``dot`` whose free dim
    becomes result dim ``axis``."""
    (lc, rc), (lb, rb) = dot.eqn.params["dimension_numbers"]
    shapes = [program.avals[a].shape for a in dot.invars]
    free = [
        [d for d in range(len(shapes[k])) if d not in (lc, rc)[k] and d not in (lb, rb)[k]]
        for k in (0, 1)
    ]
    k, d = (
        (0, axis - len(lb)) if axis < len(lb) + len(free[0]) else (1, axis - len(lb) - len(free[0]))
    )
    if d < 0 or dot.invars[k] in program.batch_dependent:
        return None
    return k, free[k][d]


def _pieces(program, split, dot_i, weight, w_pos, bias, add_i, avals, batch) -> list[Op]:
    """The ops that compute each piece of ``split`` from blocks of the weight and bias."""
    axis = split.eqn.params["axis"]
    sizes = [int(n) for n in split.eqn.params["sizes"]]
    dot = program.ops[dot_i]
    out: list[Op] = []

    def new(shape, dtype) -> int:
        avals.append(jax.ShapeDtypeStruct(tuple(shape), dtype))
        return len(avals) - 1

    def cut(chain: _Chain, start: int, stop: int) -> int:
        """The chain replayed on the source's block ``[start, stop)`` along its dim."""
        v = chain.source
        if chain.source_dim is not None:
            shape = list(avals[v].shape)
            shape[chain.source_dim] = stop - start
            b = new(shape, avals[v].dtype)
            window = (chain.source_dim, start, stop)
            where = f"{dot.where}/block"
            out.append(
                Op(
                    kind="block",
                    primitive="block",
                    invars=(v,),
                    outvars=(b,),
                    window=window,
                    where=where,
                )
            )
            v = b
        for i, dim in chain.ops:
            op = program.ops[i]
            shape = list(program.avals[op.outvars[0]].shape)
            if dim is not None:
                shape[dim] = stop - start
            r = new(shape, program.avals[op.outvars[0]].dtype)
            out.append(
                dataclasses.replace(op, invars=(v,), outvars=(r,), eqn=_resized(op.eqn, shape))
            )
            v = r
        return v

    start = 0
    for piece, size in zip(split.outvars, sizes, strict=True):
        stop = start + size
        w = cut(weight, start, stop)
        ins = list(dot.invars)
        ins[w_pos] = w
        shape = list(program.avals[dot.outvars[0]].shape)
        shape[axis] = size
        z = piece if add_i is None else new(shape, program.avals[dot.outvars[0]].dtype)
        out.append(dataclasses.replace(dot, invars=tuple(ins), outvars=(z,)))
        batch.add(z)
        if add_i is not None:
            add = program.ops[add_i]
            b = cut(bias, start, stop)
            ins = tuple(z if a in program.batch_dependent else b for a in add.invars)
            out.append(dataclasses.replace(add, invars=ins, outvars=(piece,)))
        start = stop
    return out


def _resized(eqn, shape: list[int]):
    """``eqn`` with the result shape its parameters name (reshape, broadcast) set to ``shape``."""
    if eqn.primitive.name == "reshape":
        return eqn.replace(params={**eqn.params, "new_sizes": tuple(shape)})
    if eqn.primitive.name == "broadcast_in_dim":
        return eqn.replace(params={**eqn.params, "shape": tuple(shape), "sharding": None})
    return eqn
