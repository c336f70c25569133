"""autopipe's operator IR: a flat, topologically ordered list of operators over numbered values.

A jaxpr is turned into a `Program` by the graph pass: calls (`pjit`/`closed_call`) are
inlined, layer scans are split into one `scan_step` per iteration, and every value gets an
integer id. Passes after that (cluster, partition, layout, emit) work on `Program` only.

Operator kinds:
  - ``eqn``: one jaxpr equation, evaluated by binding its primitive.
  - ``index``: row ``i`` of a stacked value (the per-iteration slice of a scan's ``xs``).
  - ``scan_step``: one iteration of a split scan: body(consts, carry, x_i) → (carry, y_i).
  - ``stack``: the per-iteration ``y_i`` of a split scan stacked back into ``ys``.
  - ``block``: a contiguous block of a parameter along one axis (a piece of a fused projection
    cut apart by `passes.split_fused`).

``index`` and ``block`` are the *pieces*: a placed value that is a piece of a parameter (or a
piece of a piece) is put together again by `assemble`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from autopipe._compat import ClosedJaxpr, JaxprEqn, bind_eqn, jaxpr_as_fun
from autopipe.cost_models.rules import nbytes

OpKind = Literal["eqn", "index", "scan_step", "stack", "block"]
PIECES = ("index", "block")


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand (a Python or NumPy scalar baked into the program)."""

    val: Any


Atom = int | Lit


@dataclasses.dataclass(frozen=True, kw_only=True)
class Op:
    kind: OpKind
    primitive: str  # primitive name ("scan" for scan_step, "index"/"stack" for the others)
    invars: tuple[Atom, ...]
    outvars: tuple[int, ...]
    eqn: JaxprEqn | None = None  # for "eqn" and "scan_step"
    iteration: int = 0  # for "index" (row) and "scan_step" (which iteration)
    scan_id: int = -1  # for "scan_step"/"stack": which split scan it came from
    where: str = ""  # provenance, e.g. "jit(block)/dot_general"
    window: tuple[int, int, int] = ()  # for "block": (axis, start, stop)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Program:
    avals: tuple[jax.ShapeDtypeStruct, ...]  # by value id
    ops: tuple[Op, ...]
    invars: tuple[int, ...]  # the function's flat inputs
    outvars: tuple[Atom, ...]  # the function's flat outputs
    consts: tuple[tuple[int, Any], ...]  # (value id, concrete array) closed over by the jaxpr
    batch_dependent: frozenset[int]  # value ids that depend on a batch input
    # non-batch inputs that are not parameters: keys, counters (`passes.inputs`)
    inputs: frozenset[int] = frozenset()

    @functools.cached_property
    def param_invars(self) -> tuple[int, ...]:
        """The inputs placed on the stages as parameters (trained, in training)."""
        others = self.batch_dependent | self.inputs
        return tuple(v for v in self.invars if v not in others)

    @property
    def input_invars(self) -> tuple[int, ...]:
        """The non-batch inputs sent to every device, in input order (`passes.inputs`)."""
        return tuple(v for v in self.invars if v in self.inputs)

    @functools.cached_property
    def value_bytes(self) -> tuple[int, ...]:
        return tuple(nbytes(a) for a in self.avals)

    def nbytes(self, v: int) -> int:
        return self.value_bytes[v]

    def producers(self) -> dict[int, int]:
        """value id → index of the op that defines it."""
        return dict(self._producers)

    @functools.cached_property
    def differentiated(self) -> frozenset[int]:
        """Float values whose cotangents a training step's backward computes: those that depend
        on a parameter and reach an output, both through operators that pass cotangents (not
        `stop_gradient`, not integer values). JAX's AD drops the symbolic zeros of the rest:
        constants, masks, a softmax's stop_gradient'd max, values only integers are read from."""

        def inexact(v: int) -> bool:
            return jnp.issubdtype(self.avals[v].dtype, jnp.inexact)

        passing = [op for op in self.ops if op.primitive != "stop_gradient"]
        depends = set(self.param_invars)
        for op in passing:
            if any(isinstance(a, int) and a in depends for a in op.invars):
                depends.update(v for v in op.outvars if inexact(v))
        reaches = set(self.outvars)
        for op in reversed(passing):
            if any(v in reaches and inexact(v) for v in op.outvars):
                reaches.update(a for a in op.invars if isinstance(a, int))
        return frozenset(v for v in depends & reaches if inexact(v))

    @functools.cached_property
    def _producers(self) -> dict[int, int]:
        return {v: i for i, op in enumerate(self.ops) for v in op.outvars}

    def is_batch_op(self, op: Op) -> bool:
        return any(v in self.batch_dependent for v in op.outvars)


def read_atom(env: dict[int, Any], a: Atom) -> Any:
    return a.val if isinstance(a, Lit) else env[a]


def eval_ops(program: Program, ops: Any, env: dict[int, Any]) -> dict[int, Any]:
    """Evaluates `program.ops[i]` for i in `ops` (in order), reading and writing `env`."""
    for i in ops:
        op = program.ops[i]
        outs = apply_op(op, [read_atom(env, a) for a in op.invars])
        env.update(zip(op.outvars, outs, strict=True))
    return env


def apply_op(op: Op, args: list[Any]) -> list[Any]:
    """Evaluates one operator (on arrays or tracers)."""
    if op.kind == "eqn":
        return bind(op.eqn, *args)
    if op.kind == "index":
        return [jax.lax.index_in_dim(args[0], op.iteration, keepdims=False)]
    if op.kind == "stack":
        return [jnp.stack(args)]
    if op.kind == "block":
        axis, start, stop = op.window
        return [jax.lax.slice_in_dim(args[0], start, stop, axis=axis)]
    body: ClosedJaxpr = op.eqn.params["jaxpr"]
    return list(jaxpr_as_fun(body)(*args))


def bind(eqn: JaxprEqn, *args: Any) -> list[Any]:
    """Binds one equation, by `BIND_RULES` where its primitive has one."""
    rule = BIND_RULES.get(eqn.primitive.name)
    return rule(eqn, args) if rule else bind_eqn(eqn, *args)


def _free_block(ndim: int, contracting: tuple, batch: tuple) -> tuple[int, int] | None:
    """(first, count) of an operand's free dims where they are ≥ 2 consecutive dims."""
    free = [d for d in range(ndim) if d not in contracting and d not in batch]
    if len(free) < 2 or free != list(range(free[0], free[0] + len(free))):
        return None
    return free[0], len(free)


def _merge(x: Any, block: tuple[int, int] | None) -> tuple[Any, Callable[[int], int]]:
    """``x`` with its free-dim block as one dim, and how its other dims renumber."""
    if block is None:
        return x, lambda d: d
    k, n = block
    s = tuple(x.shape)
    return x.reshape(s[:k] + (int(np.prod(s[k : k + n])),) + s[k + n :]), (
        lambda d: d if d < k else d - (n - 1)
    )


def _bind_dot_general(eqn: JaxprEqn, args: tuple) -> list[Any]:
    """A matmul whose operand has several free dims (x of shape (batch, seq, d) · W) bound
    with those dims merged into one (a free reshape): its weight transpose then contracts
    one dim, which XLA:CPU runs on the stored operands as they are; contracting (batch, seq)
    it transposed the cotangent into a copy first, a memory pass per matmul per backward.
    Same products and sums; the result is reshaped back."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    x, w = args
    blocks = (_free_block(x.ndim, lc, lb), _free_block(w.ndim, rc, rb))
    if lb or rb or blocks == (None, None):
        return bind_eqn(eqn, *args)
    (x2, fx), (w2, fw) = _merge(x, blocks[0]), _merge(w, blocks[1])
    dims = ((tuple(map(fx, lc)), tuple(map(fw, rc))), ((), ()))
    (y,) = bind_eqn(eqn.replace(params={**eqn.params, "dimension_numbers": dims}), x2, w2)
    free = lambda a, c: [a.shape[d] for d in range(a.ndim) if d not in c]  # noqa: E731
    return [y.reshape(*free(x, lc), *free(w, rc))]


BIND_RULES: dict[str, Callable[[JaxprEqn, tuple], list[Any]]] = {
    "dot_general": _bind_dot_general,
}


def source_of(program: Program, v: int) -> tuple[int, tuple[tuple[str, int], ...]]:
    """(the parameter, the path of pieces down to ``v``): ``()`` for the parameter itself,
    ``(("index", 3),)`` for row 3 of a stacked one, ``(("index", 3), ("block", 64))`` for the
    block starting at 64 of that row."""
    producer = program._producers
    path: list[tuple[str, int]] = []
    while (i := producer.get(v)) is not None and program.ops[i].kind in PIECES:
        op = program.ops[i]
        path.append((op.kind, op.iteration if op.kind == "index" else op.window[1]))
        v = op.invars[0]
    return v, tuple(reversed(path))


def assembler(program: Program, got: Mapping[int, Any]) -> Callable[[int], Any]:
    """value → that value (a NumPy array) from ``got``, or put together from its pieces in
    ``got``: rows stacked, blocks concatenated (pieces of pieces likewise)."""
    pieces: dict[int, list[Op]] = {}
    for op in program.ops:
        if op.kind in PIECES:
            pieces.setdefault(op.invars[0], []).append(op)

    def value(v: int) -> Any:
        if v in got:
            return got[v]
        if v not in pieces:
            raise KeyError(f"value {v} is neither held nor made of held pieces")
        if pieces[v][0].kind == "index":
            rows = sorted(pieces[v], key=lambda op: op.iteration)
            return np.stack([value(op.outvars[0]) for op in rows])
        blocks = sorted(pieces[v], key=lambda op: op.window[1])
        return np.concatenate([value(op.outvars[0]) for op in blocks], axis=blocks[0].window[0])

    return value
