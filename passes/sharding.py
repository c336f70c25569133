"""Sharding pass: tensor-parallel shardings of the operators of one pipeline stage.

A stage's devices form a 1-D tensor axis of size ``tp``. Every value gets one `Dim`: the
dimension split evenly over that axis, or None (replicated). This pass picks the cheapest
strategies and Dims and lists the collectives they imply; emission (`passes.tensor_local`)
runs each operator's strategy on local shards and emits exactly those collectives.

The model:
  - an operator runs one `Strategy` from its primitive's rule: the Dims its operands must have,
    the Dims its results come out with, a collective it implies on its result (a row-parallel
    dot_general ends in an all-reduce) and the share of its work one device does;
  - an operand whose Dim differs from the one its consumer requires is resharded (`reshard`):
    slicing a replicated value is free, gathering a sharded one is an all-gather, moving the
    split to another dimension an all-to-all. Each consumer pays its own reshard;
  - values made outside the segment are *fixed* (a Dim the caller pins: boundary activations)
    or *free* (placed parameters: stored with whatever Dim the solver picks, at no cost);
    a segment output in ``fixed`` must end up with that Dim, so its reshard is charged too.

For training (``backward=True``) every collective is priced with its conjugate in the
backward pass, Megatron's f/g pair: an all-reduce's cotangent needs none (g), an all-gather's
is reduce-scattered, an all-to-all's moved back; and a replicated value read by an operator
whose results vary over the axis (a column-parallel matmul reading its whole input, f) has
partial cotangents that are all-reduced, once per value (each reader pays its share).

`solve` minimises Σ op_time(op, strategy) + Σ time of every collective. That is a pairwise
cost problem over nodes (operators and free inputs, one choice each), solved exactly by
`passes.choices.solve_choices`: nodes of degree ≤ 2 are eliminated (min-sum variable
elimination), a small remainder is enumerated, a larger one is a 0/1 program for
``scipy.optimize.milp``. Ties go to fewer collectives, then replicated operators, then sharded
storage of free inputs.

To support a primitive, register a rule (`passes.sharding_rules`) yielding its sharded
strategies::

    @register_strategy_rule("cumsum")
    def _cumsum_rule(view: OpView) -> Iterable[Strategy]:
        axis = view.params["axis"]
        for d in range(len(view.out_shapes[0])):
            if d != axis:
                yield view.split("elementwise", (d,), (d,))

`strategies` puts the replicated strategy first and drops strategies whose Dims are out of range,
not divisible by ``tp`` or on a literal. A primitive without a rule is replicated only and listed
in `Sharding.unruled`; ``scan_step``/``index``/``stack`` ops and ops with effects are replicated
by design.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from autopipe.passes.choices import choice_cost as choice_cost
from autopipe.passes.choices import solve_choices as solve_choices
from autopipe.passes.ir import Lit, Op, Program
from autopipe.passes.sharding_rules import STRATEGY_RULES as STRATEGY_RULES
from autopipe.passes.sharding_rules import Dim as Dim
from autopipe.passes.sharding_rules import OpView as OpView
from autopipe.passes.sharding_rules import Shape as Shape
from autopipe.passes.sharding_rules import Strategy as Strategy
from autopipe.passes.sharding_rules import StrategyRule as StrategyRule
from autopipe.passes.sharding_rules import register_strategy_rule as register_strategy_rule

# Tie-break weights, relative to the largest cost: per collective, per sharded operator
# strategy, per replicated free input (so equal-time choices prefer fewer collectives, then
# replicated operators, then sharded storage of parameters).
_TIE_COLLECTIVE, _TIE_SHARDED, _TIE_REPLICATED_INPUT = 4e-9, 2e-9, 1e-9
# backward conjugates (module docstring), each as costly as its forward on the alpha-beta model
BACKWARD_CONJUGATE = {"all_gather": "reduce_scatter", "all_to_all": "all_to_all"}


# --- strategies -------------------------------------------------------------------------------


def replicated(op: Op) -> Strategy:
    return Strategy("replicated", (None,) * len(op.invars), (None,) * len(op.outvars))


def _rule(op: Op) -> StrategyRule | None:
    if op.kind != "eqn" or op.eqn.effects:
        return None
    return STRATEGY_RULES.get(op.primitive)


def _is_unruled(op: Op) -> bool:
    return op.kind == "eqn" and not op.eqn.effects and op.primitive not in STRATEGY_RULES


def _view(program: Program, op: Op, tp: int) -> OpView:
    # the IR's avals (a rewrite such as cutting fused projections changes them, not the eqn's)
    avals = [np.asarray(a.val) if isinstance(a, Lit) else program.avals[a] for a in op.invars]
    return OpView(
        primitive=op.primitive,
        in_shapes=tuple(tuple(a.shape) for a in avals),
        out_shapes=tuple(tuple(program.avals[v].shape) for v in op.outvars),
        params=op.eqn.params,
        tp=tp,
        dtypes=tuple(a.dtype for a in avals),
        weights=tuple(
            not isinstance(a, Lit) and a not in program.batch_dependent for a in op.invars
        ),
    )


def _splittable(shape: Shape, d: Dim, tp: int) -> bool:
    return d is None or (0 <= d < len(shape) and shape[d] >= tp and shape[d] % tp == 0)


def _fits(s: Strategy, view: OpView, op: Op) -> bool:
    assert len(s.ins) == len(op.invars) and len(s.outs) == len(op.outvars), (view.primitive, s)
    for a, d, shape in zip(op.invars, s.ins, view.in_shapes, strict=True):
        if d is not None and (isinstance(a, Lit) or not _splittable(shape, d, view.tp)):
            return False
    outs = zip(view.out_shapes, s.outs, strict=True)
    return all(_splittable(shape, d, view.tp) for shape, d in outs)


def strategies(program: Program, op_index: int, tp: int) -> tuple[Strategy, ...]:
    """The strategies of ``program.ops[op_index]`` on a tensor axis of size `tp`, replicated
    first, without duplicates, every split dim divisible by `tp`."""
    op = program.ops[op_index]
    found = [replicated(op)]
    rule = _rule(op)
    if rule is None or tp < 2:
        return tuple(found)
    view = _view(program, op, tp)
    seen = {(found[0].ins, found[0].outs, None)}
    for s in rule(view):
        key = (s.ins, s.outs, s.collective)
        if key not in seen and _fits(s, view, op):
            seen.add(key)
            found.append(s)
    return tuple(found)


def value_dims(program: Program, v: int, tp: int) -> tuple[Dim, ...]:
    """Dims value `v` can have: None, then every dim divisible by `tp`."""
    shape = tuple(program.avals[v].shape)
    if tp < 2:
        return (None,)
    return (None, *(d for d in range(len(shape)) if _splittable(shape, d, tp)))


def local_bytes(program: Program, op_index: int, strategy: Strategy, tp: int) -> float:
    """Bytes one device reads and writes running an op with `strategy` (a split value: 1/tp)."""
    op = program.ops[op_index]
    pairs = [(a, d) for a, d in zip(op.invars, strategy.ins, strict=True) if isinstance(a, int)]
    pairs += zip(op.outvars, strategy.outs, strict=True)
    return float(sum(program.nbytes(v) / (1 if d is None else tp) for v, d in pairs))


# --- collectives ------------------------------------------------------------------------------


def reshard(src: Dim, dst: Dim) -> str | None:
    """The collective turning a value split on `src` into one split on `dst` (None if free)."""
    if src == dst or src is None:
        return None
    return "all_gather" if dst is None else "all_to_all"


def collective_bytes(kind: str, nbytes: float, tp: int) -> float:
    """Payload per device in `cost_models.comm`'s convention for a value of `nbytes` in full:
    the local shard for all_gather / all_to_all, the full value for all_reduce / reduce_scatter."""
    return nbytes / tp if kind in ("all_gather", "all_to_all") else float(nbytes)


# --- solve ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sharding:
    """The chosen shardings of one segment.

    ``dims``: every value read or written, with its Dim as produced (free inputs: as stored;
    fixed inputs: as fixed). ``collectives``: (kind, value, bytes per device) of every collective
    implied, op collectives and reshards, including reshards of outputs to their fixed Dim.
    ``time``: the objective. ``free``: the free inputs. ``unruled``: primitives replicated for
    want of a rule.
    """

    tp: int
    ops: tuple[int, ...]
    dims: Mapping[int, Dim]
    strategies: Mapping[int, Strategy]
    time: float
    collectives: tuple[tuple[str, int, float], ...]
    free: tuple[int, ...]
    unruled: frozenset[str] = frozenset()

    def param_bytes(self, program: Program, values: Iterable[int] | None = None) -> float:
        """Bytes per device of `values` (default: the free inputs) under their chosen Dims."""
        values = self.free if values is None else values
        return float(
            sum(program.nbytes(v) / (1 if self.dims[v] is None else self.tp) for v in values)
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Segment:
    """The solver's view of a segment: nodes are its ops, then its free inputs."""

    program: Program
    ops: tuple[int, ...]
    tp: int
    fixed: Mapping[int, Dim]
    choices: tuple[tuple[Strategy, ...], ...]  # per op
    free: tuple[int, ...]
    free_dims: tuple[tuple[Dim, ...], ...]
    producer: Mapping[int, tuple[int, int]]  # value -> (node, output position)

    def source(self, v: int) -> tuple[int, list[int]] | None:
        """(node, reshard-table index of v's Dim per choice of that node) of a value made by a
        node (an op or a free input); None for a fixed input."""
        if v in self.fixed and v not in self.producer:
            return None
        node, k = self.producer[v]
        if node < len(self.ops):
            return node, [_index(s.outs[k]) for s in self.choices[node]]
        return node, [_index(d) for d in self.free_dims[node - len(self.ops)]]


def _segment(program: Program, ops: Sequence[int], tp: int, fixed: Mapping[int, Dim]) -> _Segment:
    ops = tuple(ops)
    producer = {v: (n, k) for n, i in enumerate(ops) for k, v in enumerate(program.ops[i].outvars)}
    reads = {a for i in ops for a in program.ops[i].invars if isinstance(a, int)}
    free = tuple(sorted(v for v in reads if v not in producer and v not in fixed))
    producer.update({v: (len(ops) + k, 0) for k, v in enumerate(free)})
    for v, d in fixed.items():
        if (v in producer or v in reads) and d not in value_dims(program, v, tp):
            shape = tuple(program.avals[v].shape)
            raise ValueError(
                f"fixed Dim {d} of value {v} (shape {shape}) cannot be split {tp} ways: pin it "
                f"to None or to a dim whose size is a multiple of tp={tp}."
            )
    return _Segment(
        program=program,
        ops=ops,
        tp=tp,
        fixed=fixed,
        choices=tuple(strategies(program, i, tp) for i in ops),
        free=free,
        free_dims=tuple(value_dims(program, v, tp) for v in free),
        producer=producer,
    )


def _index(d: Dim) -> int:
    """Row/column of Dim d in a reshard table: 0 for None, d + 1 otherwise."""
    return 0 if d is None else d + 1


def _reshard_table(rank: int, shard_bytes: float, comm: Callable) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, collectives) of resharding a value, indexed [_index(src), _index(dst)]."""
    count = np.ones((rank + 1, rank + 1))
    count[0, :] = 0.0  # slicing a replicated value is free
    np.fill_diagonal(count, 0.0)
    time = count * comm("all_to_all", shard_bytes)
    time[1:, 0] = comm("all_gather", shard_bytes)
    return time, count


def _needs(seg: _Segment, n: int) -> dict[int, np.ndarray]:
    """Per value op n reads: need[c, _index(d)] = its strategy c requires the value on Dim d."""
    op = seg.program.ops[seg.ops[n]]
    needs: dict[int, np.ndarray] = {}
    for pos, a in enumerate(op.invars):
        if isinstance(a, int):
            rank = len(seg.program.avals[a].shape)
            need = needs.setdefault(a, np.zeros((len(seg.choices[n]), rank + 1)))
            for c, s in enumerate(seg.choices[n]):
                need[c, _index(s.ins[pos])] = 1.0  # a value needed twice on one Dim: once
    return needs


@dataclasses.dataclass(frozen=True)
class _Costs:
    """The segment's choice problem, twice: in seconds and in tie-break counts."""

    unary: list[np.ndarray]
    pair: dict[tuple[int, int], np.ndarray]
    unary_ties: list[np.ndarray]
    pair_ties: dict[tuple[int, int], np.ndarray]


def _own_costs(
    seg: _Segment, n: int, op_time: Callable, comm: Callable, table: Callable
) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, tie-break count) per strategy of op n on its own: its time, its collective and
    the reshards of its outputs to their fixed Dims."""
    program, i = seg.program, seg.ops[n]
    time, ties = [], []
    for c, s in enumerate(seg.choices[n]):
        t, k = op_time(i, s), _TIE_SHARDED * (c > 0)
        for v, d in zip(program.ops[i].outvars, s.outs, strict=True):
            if s.collective is not None:
                t += comm(s.collective, collective_bytes(s.collective, program.nbytes(v), seg.tp))
                k += _TIE_COLLECTIVE
            if v in seg.fixed:  # an output that must end up on its fixed Dim
                seconds, count = table(v)
                at = _index(d), _index(seg.fixed[v])
                t, k = t + seconds[at], k + _TIE_COLLECTIVE * count[at]
        time.append(t)
        ties.append(k)
    return np.array(time, float), np.array(ties)


def _backward_sums(seg: _Segment, n: int, comm: Callable, readers) -> dict[int, np.ndarray]:
    """Per differentiated value op n reads: sums[c] = the backward all-reduce of its cotangent
    that strategy c implies when the value is replicated (c varies), the value's share over
    its ``readers`` (value → how many ops of the segment read it)."""
    program, i = seg.program, seg.ops[n]
    vary = np.array([s.varies for s in seg.choices[n]], float)
    return {
        a: vary * comm("all_reduce", float(program.nbytes(a))) / readers[a]
        for a in _reads(program.ops[i]) & program.differentiated
    }


def _reads(op: Op) -> set[int]:  # the values (not literals) an op reads
    return {a for a in op.invars if isinstance(a, int)}


def _costs(
    seg: _Segment, op_time: Callable, comm: Callable, store: Callable | None, backward: bool
) -> _Costs:
    """The unary and pairwise tables; reads of a fixed input only add to the reader's unary."""
    program, tables = seg.program, {}

    def table(v):  # reshard table of value v
        key = (len(program.avals[v].shape), program.nbytes(v) / seg.tp)
        if key not in tables:
            tables[key] = _reshard_table(*key, comm)
        return tables[key]

    costs = _Costs([], {}, [], {})
    readers = collections.Counter(a for i in seg.ops for a in _reads(program.ops[i]))
    for n in range(len(seg.ops)):
        time, ties = _own_costs(seg, n, op_time, comm, table)
        sums = _backward_sums(seg, n, comm, readers) if backward else {}
        for v, need in _needs(seg, n).items():
            t, count = table(v)
            src = seg.source(v)
            if src is None:  # a fixed input: its reshards depend on this op only
                time += need @ t[_index(seg.fixed[v])]
                ties += _TIE_COLLECTIVE * (need @ count[_index(seg.fixed[v])])
                if v in sums and seg.fixed[v] is None:
                    time += sums[v]
            else:  # pair[node, n][c_node, c_n] += Σ_d need[c_n, d] · t[src(c_node), d]
                node, rows = src
                pair = t[rows] @ need.T
                if v in sums:  # replicated as made (row 0) and read by a varying strategy
                    pair = pair + np.outer(np.array(rows) == 0, sums[v])
                costs.pair[node, n] = costs.pair.get((node, n), 0.0) + pair
                tied = _TIE_COLLECTIVE * (count[rows] @ need.T)
                costs.pair_ties[node, n] = costs.pair_ties.get((node, n), 0.0) + tied
        costs.unary.append(time)
        costs.unary_ties.append(ties)
    for v, dims in zip(seg.free, seg.free_dims, strict=True):
        costs.unary.append(np.array([0.0 if store is None else store(v, d) for d in dims]))
        costs.unary_ties.append(np.array([_TIE_REPLICATED_INPUT * (d is None) for d in dims]))
    return costs


def solve(
    program: Program,
    ops: Sequence[int],
    *,
    tp: int,
    fixed: Mapping[int, Dim],
    op_time: Callable[[int, Strategy], float],
    comm_time: Callable[[str, float], float],
    store_cost: Callable[[int, Dim], float] | None = None,
    backward: bool = False,
) -> Sharding:
    """The cheapest shardings of segment `ops` (op indices, program order); see the module
    docstring. Every value read but not made by `ops` is free unless `fixed` pins it, so pin
    batch inputs and incoming boundary values; a value made by `ops` and in `fixed` must end up
    on that Dim. ``op_time(op_index, strategy)`` prices one op, ``comm_time(kind, bytes)`` one
    collective of `bytes` per device (`collective_bytes`' convention), ``store_cost(v, dim)``
    (optional) the price of holding free input v with that Dim (a memory term);
    ``backward``: price the backward pass's conjugate collectives too (training)."""
    seg = _segment(program, ops, tp, fixed)
    memo: dict[tuple[str, float], float] = {}
    conjugates = BACKWARD_CONJUGATE if backward else {}

    def comm(kind, nbytes):
        if (kind, nbytes) not in memo:
            t = float(comm_time(kind, nbytes))
            memo[kind, nbytes] = t * (2 if kind in conjugates else 1)
        return memo[kind, nbytes]

    costs = _costs(seg, op_time, comm, store_cost, backward)
    tables = [*costs.unary, *costs.pair.values()]
    scale = max([float(np.abs(t).max()) for t in tables if t.size] + [1e-30])
    choice, _ = solve_choices(
        [t + scale * k for t, k in zip(costs.unary, costs.unary_ties, strict=True)],
        {key: m + scale * costs.pair_ties[key] for key, m in costs.pair.items()},
    )
    return _sharding(seg, choice, choice_cost(costs.unary, costs.pair, choice))


def _sharding(seg: _Segment, choice: Sequence[int], time: float) -> Sharding:
    program, nops = seg.program, len(seg.ops)
    chosen = {i: seg.choices[n][choice[n]] for n, i in enumerate(seg.ops)}
    dims: dict[int, Dim] = {v: d for v, d in seg.fixed.items()}
    dims.update({v: seg.free_dims[k][choice[nops + k]] for k, v in enumerate(seg.free)})
    for i, s in chosen.items():
        dims.update(zip(program.ops[i].outvars, s.outs, strict=True))
    collectives = []
    for i, s in chosen.items():
        op = program.ops[i]
        needs = {(a, d) for a, d in zip(op.invars, s.ins, strict=True) if isinstance(a, int)}
        for v, d in sorted(needs, key=lambda p: (p[0], _index(p[1]))):
            collectives.append((reshard(dims[v], d), v))
        for v, d in zip(op.outvars, s.outs, strict=True):
            collectives.append((s.collective, v))
            if v in seg.fixed:
                collectives.append((reshard(d, seg.fixed[v]), v))
    reads = {v for i in seg.ops for v in program.ops[i].invars if isinstance(v, int)}
    return Sharding(
        tp=seg.tp,
        ops=seg.ops,
        dims={v: d for v, d in sorted(dims.items()) if v in reads or v in seg.producer},
        strategies=chosen,
        time=time,
        collectives=tuple(
            (kind, v, collective_bytes(kind, program.nbytes(v), seg.tp))
            for kind, v in collectives
            if kind is not None
        ),
        free=seg.free,
        unruled=frozenset(program.ops[i].primitive for i in seg.ops if _is_unruled(program.ops[i])),
    )


# --- caching by structure -----------------------------------------------------------------------


def _canonical_values(program: Program, ops: Sequence[int]) -> list[int]:
    """The values a segment reads or writes, in order of first appearance."""
    seen: dict[int, None] = {}
    for i in ops:
        op = program.ops[i]
        seen.update((a, None) for a in op.invars if isinstance(a, int))
        seen.update((v, None) for v in op.outvars)
    return list(seen)


def _hashable(x: Any) -> Hashable:
    if isinstance(x, bool | int | str | type(None)):
        return x
    if isinstance(x, float):
        return repr(x)  # nan == nan
    if isinstance(x, tuple | list):
        return (type(x).__name__, tuple(_hashable(y) for y in x))
    if isinstance(x, dict):
        return tuple(sorted((str(k), _hashable(y)) for k, y in x.items()))
    return str(x)


def signature(program: Program, ops: Sequence[int], fixed: Mapping[int, Dim]) -> Hashable:
    """A key equal for segments that `solve` treats alike: same primitives, params, avals, wiring
    and fixed Dims (value ids and layer rows of ``index`` ops aside). It leaves out tp and the
    cost functions: cache by (signature, tp) and move a solution with `transfer`."""
    values = _canonical_values(program, ops)
    local = {v: k for k, v in enumerate(values)}
    params: dict[int, Hashable] = {}  # by id(eqn): scan_step ops of one scan share theirs

    def op_key(op: Op) -> Hashable:
        if op.eqn is not None and id(op.eqn) not in params:
            params[id(op.eqn)] = _hashable(dict(op.eqn.params))
        ins = tuple(("lit", repr(a.val)) if isinstance(a, Lit) else local[a] for a in op.invars)
        return (op.kind, op.primitive, None if op.eqn is None else params[id(op.eqn)], ins)

    avals = tuple(
        (tuple(program.avals[v].shape), str(program.avals[v].dtype), v in fixed, fixed.get(v))
        for v in values
    )
    return tuple(op_key(program.ops[i]) for i in ops), avals


def transfer(sharding: Sharding, program: Program, ops: Sequence[int]) -> Sharding:
    """`sharding` (solved for segment ``sharding.ops``) moved onto segment `ops` of the same
    program, which must have an equal `signature`."""
    src, dst = _canonical_values(program, sharding.ops), _canonical_values(program, ops)
    to = dict(zip(src, dst, strict=True))
    op_to = dict(zip(sharding.ops, ops, strict=True))
    return dataclasses.replace(
        sharding,
        ops=tuple(ops),
        dims={to[v]: d for v, d in sharding.dims.items()},
        strategies={op_to[i]: s for i, s in sharding.strategies.items()},
        collectives=tuple((k, to[v], b) for k, v, b in sharding.collectives),
        free=tuple(sorted(to[v] for v in sharding.free)),
    )
