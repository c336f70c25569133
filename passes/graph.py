"""Graph pass: closed jaxpr → `Program` (flat operator IR) and a costed networkx graph.

Lowering to the IR, in one walk over ``jaxpr.eqns`` with an environment from jaxpr variables
to value ids:
  - calls (``pjit``/``jit``/``closed_call``/``core_call``) are inlined, so a model wrapped in
    ``jax.jit`` or built from jitted helpers is as divisible as a plain one;
  - ``custom_jvp_call``/``custom_vjp_call``/``remat`` stay single operators (their
    differentiation rules must survive);
  - a *layer scan* — a ``scan`` with a batch-dependent carry and parameter ``xs`` stacked along
    the layer axis, as Flax ``nn.scan``/``nnx.scan`` emit — is split into one ``scan_step`` per
    iteration, so stages can be cut between layers;
  - dead operators are removed.

To make another higher-order primitive inlinable, add its name to
``autopipe._compat.CALL_JAXPR_PARAM`` with how to read
its inner jaxpr; to keep one intact, do nothing (it is bound as one operator).

`operator_graph` then prices every operator with the cost rules of `cost_models` and returns a
DiGraph: node per operator (primitive, kind, output shapes, flops, bytes, time, batch), edge per
value (bytes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import networkx as nx

from autopipe._compat import CALL_JAXPR_PARAM, ClosedJaxpr, DropVar, Literal
from autopipe.cost_models.hardware import Hardware
from autopipe.cost_models.rules import Cost, eqn_cost, jaxpr_cost, nbytes, op_time
from autopipe.passes.ir import Atom, Lit, Op, Program

_CALLS = CALL_JAXPR_PARAM
_MAX_SPLIT_LENGTH = 4096  # longer scans are time loops, not layer stacks: kept whole


@dataclasses.dataclass
class _Builder:
    avals: list = dataclasses.field(default_factory=list)
    ops: list = dataclasses.field(default_factory=list)
    batch: set = dataclasses.field(default_factory=set)
    consts: list = dataclasses.field(default_factory=list)
    num_scans: int = 0

    def new(self, aval: Any, batch: bool) -> int:
        self.avals.append(aval)
        v = len(self.avals) - 1
        if batch:
            self.batch.add(v)
        return v

    def is_batch(self, atoms: Sequence[Atom]) -> bool:
        return any(isinstance(a, int) and a in self.batch for a in atoms)

    def emit(self, op_kind: str, primitive: str, invars, out_avals, **kw) -> tuple[int, ...]:
        batch = self.is_batch(invars)
        outs = tuple(self.new(a, batch) for a in out_avals)
        self.ops.append(
            Op(kind=op_kind, primitive=primitive, invars=tuple(invars), outvars=outs, **kw)
        )
        return outs


def _read(env: dict, v: Any) -> Atom:
    return Lit(v.val) if isinstance(v, Literal) else env[v]


def _bind_consts(b: _Builder, closed: ClosedJaxpr, env: dict) -> None:
    for var, val in zip(closed.jaxpr.constvars, closed.consts, strict=True):
        v = b.new(var.aval, False)
        b.consts.append((v, val))
        env[var] = v


def _lower(b: _Builder, jaxpr: Any, env: dict, where: str) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        invars = [_read(env, v) for v in eqn.invars]
        if name in _CALLS:
            _lower_call(b, eqn, invars, env, where)
        elif name == "scan" and _is_layer_scan(b, eqn, invars):
            _lower_layer_scan(b, eqn, invars, env, where)
        else:
            outs = b.emit(
                "eqn", name, invars, [v.aval for v in eqn.outvars], eqn=eqn, where=f"{where}{name}"
            )
            for var, v in zip(eqn.outvars, outs, strict=True):
                if not isinstance(var, DropVar):
                    env[var] = v


def _lower_call(b: _Builder, eqn: Any, invars: list[Atom], env: dict, where: str) -> None:
    closed = eqn.params[_CALLS[eqn.primitive.name]]
    inner_env: dict = {}
    _bind_consts(b, closed, inner_env)
    for var, a in zip(closed.jaxpr.invars, invars, strict=True):
        inner_env[var] = a
    label = eqn.params.get("name", eqn.primitive.name)
    _lower(b, closed.jaxpr, inner_env, f"{where}{label}/")
    for outer, inner in zip(eqn.outvars, closed.jaxpr.outvars, strict=True):
        if not isinstance(outer, DropVar):
            env[outer] = _read(inner_env, inner)


def _is_layer_scan(b: _Builder, eqn: Any, invars: list[Atom]) -> bool:
    p = eqn.params
    start = p["num_consts"] + p["num_carry"]
    carry, xs = invars[p["num_consts"] : start], invars[start:]
    return (
        2 <= p["length"] <= _MAX_SPLIT_LENGTH
        and b.is_batch(carry)
        and any(isinstance(x, int) and x not in b.batch for x in xs)
    )


def _lower_layer_scan(b: _Builder, eqn: Any, invars: list[Atom], env: dict, where: str) -> None:
    p = eqn.params
    nc, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
    body: ClosedJaxpr = p["jaxpr"]
    consts, carry, xs = invars[:nc], invars[nc : nc + ncarry], invars[nc + ncarry :]
    carry_avals = body.out_avals[:ncarry]
    y_avals = body.out_avals[ncarry:]
    scan_id, b.num_scans = b.num_scans, b.num_scans + 1
    rows: dict[int, tuple[int, ...]] = {}
    for k in range(length):
        i = length - 1 - k if p["reverse"] else k
        x_i = [
            b.emit("index", "index", [x], [a], iteration=i, where=f"{where}scan[{i}]/xs")[0]
            for x, a in zip(xs, body.in_avals[nc + ncarry :], strict=True)
        ]
        outs = b.emit(
            "scan_step",
            "scan",
            [*consts, *carry, *x_i],
            [*carry_avals, *y_avals],
            eqn=eqn,
            iteration=i,
            scan_id=scan_id,
            where=f"{where}scan[{i}]",
        )
        carry, rows[i] = list(outs[:ncarry]), outs[ncarry:]
    for var, v in zip(eqn.outvars[:ncarry], carry, strict=True):
        if not isinstance(var, DropVar):
            env[var] = v
    for j, var in enumerate(eqn.outvars[ncarry:]):
        if isinstance(var, DropVar):
            continue
        per_row = [rows[i][j] for i in range(length)]
        (env[var],) = b.emit(
            "stack", "stack", per_row, [var.aval], scan_id=scan_id, where=f"{where}scan/ys"
        )


def dead_code_eliminated(ops: Sequence[Op], outvars: Sequence[Atom]) -> list[Op]:
    """``ops`` without those whose results nothing reads (effects kept)."""
    live = {a for a in outvars if isinstance(a, int)}
    kept = []
    for op in reversed(ops):
        effects = op.eqn is not None and op.kind == "eqn" and bool(op.eqn.effects)
        if effects or any(v in live for v in op.outvars):
            kept.append(op)
            live.update(a for a in op.invars if isinstance(a, int))
    return kept[::-1]


def build_program(
    closed: ClosedJaxpr, batch_inputs: Sequence[bool], inputs: Sequence[bool] = ()
) -> Program:
    """Lowers a traced jaxpr to the flat operator IR (see the module docstring). ``inputs``:
    per input, whether it is a non-batch input that is not a parameter (`passes.inputs`)."""
    b = _Builder()
    env: dict = {}
    invars = tuple(
        b.new(v.aval, is_batch)
        for v, is_batch in zip(closed.jaxpr.invars, batch_inputs, strict=True)
    )
    for var, v in zip(closed.jaxpr.invars, invars, strict=True):
        env[var] = v
    _bind_consts(b, closed, env)
    _lower(b, closed.jaxpr, env, "")
    outvars = tuple(_read(env, v) for v in closed.jaxpr.outvars)
    return Program(
        avals=tuple(b.avals),
        ops=tuple(dead_code_eliminated(b.ops, outvars)),
        invars=invars,
        outvars=outvars,
        consts=tuple(b.consts),
        batch_dependent=frozenset(b.batch),
        inputs=frozenset(v for v, x in zip(invars, inputs, strict=False) if x),
    )


def op_cost(program: Program, op: Op) -> Cost:
    avals_in = [program.avals[a] for a in op.invars if isinstance(a, int)]
    avals_out = [program.avals[v] for v in op.outvars]
    if op.kind == "eqn":
        return eqn_cost(op.primitive, avals_in, avals_out, op.eqn.params)
    if op.kind == "scan_step":
        return jaxpr_cost(op.eqn.params["jaxpr"].jaxpr)
    return Cost(0.0, float(sum(nbytes(a) for a in avals_in + avals_out)))


def operator_graph(program: Program, hw: Hardware) -> nx.DiGraph:
    """Node per operator (position in `program.ops`) with its costs; edge per value."""
    g = nx.DiGraph()
    producer: dict[int, int] = {}
    for i, op in enumerate(program.ops):
        cost = op_cost(program, op)
        g.add_node(
            i,
            primitive=op.primitive,
            kind=op.kind,
            where=op.where,
            shapes=tuple(tuple(program.avals[v].shape) for v in op.outvars),
            flops=cost.flops,
            bytes=cost.bytes_accessed,
            time=op_time(cost, hw),
            unruled=tuple(sorted(cost.unruled)),
            batch=program.is_batch_op(op),
        )
        for a in op.invars:
            if isinstance(a, int) and a in producer:
                g.add_edge(producer[a], i, value=a, bytes=nbytes(program.avals[a]))
        for v in op.outvars:
            producer[v] = i
    return g
