"""Sharding pass: tensor-parallel shardings of the operators of one pipeline stage.

A stage's devices form a 1-D tensor axis of size ``tp``. Every value gets one `Dim`: the
dimension split evenly over that axis, or None (replicated). Emission puts
``jax.lax.with_sharding_constraint`` on every value with its Dim and lets XLA's partitioner
insert the collectives; this pass predicts those collectives and picks the cheapest Dims.

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

`solve` minimises Σ op_time(op, strategy) + Σ time of every collective. That is a pairwise
cost problem over nodes (operators and free inputs, one choice each), solved exactly by
`solve_choices`: nodes of degree ≤ 2 are eliminated (min-sum variable elimination), a small
remainder is enumerated, a larger one is a 0/1 program for ``scipy.optimize.milp``. Ties go to
fewer collectives, then replicated operators, then sharded storage of free inputs.

To support a primitive, register a rule yielding its sharded strategies::

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

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.optimize
import scipy.sparse

from autopipe.passes.ir import Lit, Op, Program

Dim = int | None
Shape = tuple[int, ...]

_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
# Tie-break weights, relative to the largest cost: per collective, per sharded operator
# strategy, per replicated free input (so equal-time choices prefer fewer collectives, then
# replicated operators, then sharded storage of parameters).
_TIE_COLLECTIVE, _TIE_SHARDED, _TIE_REPLICATED_INPUT = 4e-9, 2e-9, 1e-9
_MAX_ELIMINATION_TABLE = 64  # largest |choices(p)| x |choices(q)| a degree-2 elimination builds
_MAX_ENUMERATION = 4096  # a core with at most this many joint choices is enumerated, not a MILP


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One way to run an operator: required operand Dims, produced result Dims, the collective
    it implies on its results (None if local) and the share of its work one device does."""

    name: str
    ins: tuple[Dim, ...]
    outs: tuple[Dim, ...]
    collective: str | None = None
    compute_fraction: float = 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpView:
    """What a strategy rule sees of an operator (a literal operand has shape ``()``)."""

    primitive: str
    in_shapes: tuple[Shape, ...]
    out_shapes: tuple[Shape, ...]
    params: Mapping[str, Any]
    tp: int
    weights: tuple[bool, ...] = ()  # per operand: batch-independent (a parameter or made of them)

    def split(
        self, name: str, ins: Sequence[Dim], outs: Sequence[Dim], collective: str | None = None
    ) -> Strategy:
        """A strategy whose work is split evenly over the tensor axis."""
        return Strategy(name, tuple(ins), tuple(outs), collective, 1.0 / self.tp)


StrategyRule = Callable[[OpView], Iterable[Strategy]]
STRATEGY_RULES: dict[str, StrategyRule] = {}


def register_strategy_rule(*names: str) -> Callable[[StrategyRule], StrategyRule]:
    """Registers a rule yielding the sharded strategies of primitives `names`."""

    def register(rule: StrategyRule) -> StrategyRule:
        for name in names:
            STRATEGY_RULES[name] = rule
        return rule

    return register


# --- rules ------------------------------------------------------------------------------------

ELEMENTWISE = frozenset(
    "abs add and atan2 cbrt ceil clamp convert_element_type copy copy_p cos cosh div eq erf "
    "erf_inv erfc exp exp2 expm1 floor ge gt integer_pow is_finite le log log1p logistic lt max "
    "min mul ne neg nextafter not or pow reduce_precision rem round rsqrt select_n sign sin sinh "
    "sqrt square stop_gradient sub tan tanh xor".split()
)


@register_strategy_rule(*ELEMENTWISE)
def _elementwise_rule(view: OpView) -> Iterable[Strategy]:
    """Every operand of the result's shape split on the same dim; scalars and operands of size 1
    there (broadcast) stay replicated."""
    (out,) = view.out_shapes
    if any(len(s) not in (0, len(out)) for s in view.in_shapes):
        return
    for d in range(len(out)):
        ins = [d if s and s[d] == out[d] else None for s in view.in_shapes]
        yield view.split("elementwise", ins, (d,))


@register_strategy_rule("broadcast_in_dim")
def _broadcast_in_dim_rule(view: OpView) -> Iterable[Strategy]:
    """Result dim d comes from operand dim i (d = broadcast_dimensions[i], same size) or is new:
    then the replicated operand is broadcast straight into the local shard."""
    operand, out = view.in_shapes[0], view.out_shapes[0]
    dims = view.params["broadcast_dimensions"]
    source = {o: i for i, o in enumerate(dims) if operand[i] == out[o]}
    rest = (None,) * (len(view.in_shapes) - 1)
    for d in range(len(out)):
        yield view.split("broadcast", (source.get(d), *rest), (d,))


def _reshape_groups(a: Shape, b: Shape) -> list[tuple[list[int], list[int]]]:
    """Minimal groups (dims of `a`, dims of `b`) of equal size product; size-1 dims left out."""
    ia, ib = [i for i, n in enumerate(a) if n != 1], [j for j, n in enumerate(b) if n != 1]
    if 0 in a or 0 in b or np.prod(a) != np.prod(b):
        return []
    groups, i, j = [], 0, 0
    while i < len(ia):
        ga, gb, pa, pb = [ia[i]], [ib[j]], a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ga.append(ia[i])
                pa, i = pa * a[ia[i]], i + 1
            else:
                gb.append(ib[j])
                pb, j = pb * b[ib[j]], j + 1
        groups.append((ga, gb))
    return groups


@register_strategy_rule("reshape")
def _reshape_rule(view: OpView) -> Iterable[Strategy]:
    """A split dim survives when it is the leading part of its result dim: kept whole, split into
    (a, b, ...) (sharded on a) or the major dim of a merged group."""
    if view.params.get("dimensions") is not None:
        return
    rest = (None,) * (len(view.in_shapes) - 1)
    for ga, gb in _reshape_groups(view.in_shapes[0], view.out_shapes[0]):
        if len(ga) == 1 or len(gb) == 1:
            yield view.split("reshape", (ga[0], *rest), (gb[0],))


@register_strategy_rule("transpose")
def _transpose_rule(view: OpView) -> Iterable[Strategy]:
    for o, i in enumerate(view.params["permutation"]):
        yield view.split("transpose", (i,), (o,))


@register_strategy_rule("squeeze")
def _squeeze_rule(view: OpView) -> Iterable[Strategy]:
    removed = set(view.params["dimensions"])
    kept = [d for d in range(len(view.in_shapes[0])) if d not in removed]
    for o, d in enumerate(kept):
        yield view.split("squeeze", (d,), (o,))


@register_strategy_rule("reduce_sum", "reduce_max", "reduce_min")
def _reduce_rule(view: OpView) -> Iterable[Strategy]:
    """Reducing over other dims is local (the split dim is renumbered); reducing over the split
    dim leaves partial results on each device, combined by an all-reduce."""
    axes = set(view.params["axes"])
    kept = [d for d in range(len(view.in_shapes[0])) if d not in axes]
    for o, d in enumerate(kept):
        yield view.split("reduce", (d,), (o,))
    for d in sorted(axes):
        yield view.split("reduce", (d,), (None,), "all_reduce")


@register_strategy_rule("dot_general")
def _dot_general_rule(view: OpView) -> Iterable[Strategy]:
    """Result dims are (batch..., lhs free..., rhs free...). ``batch``: a shared batch dim split on
    both sides (attention heads); ``lhs``: an lhs free dim split, rhs replicated; ``column``: an
    rhs free dim split, lhs replicated; ``row``: a contracting dim split on both sides, partial
    sums all-reduced into a replicated result.

    A weight (batch-independent rhs) is never multiplied by split rows of the batch: that would
    be data parallelism on the tensor axis, with every device holding and reading the whole
    weight; the planner splits rows on the data axis instead, and the tensor axis splits
    weights (Megatron's column/row parallelism)."""
    (lc, rc), (lb, rb) = view.params["dimension_numbers"]
    lhs, rhs = view.in_shapes
    lfree = [d for d in range(len(lhs)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(rhs)) if d not in rc and d not in rb]
    for k, (a, b) in enumerate(zip(lb, rb, strict=True)):
        yield view.split("batch", (a, b), (k,))
    if not view.weights[1]:  # rows of the batch × a weight: data parallelism, not tensor
        for k, a in enumerate(lfree):
            yield view.split("lhs", (a, None), (len(lb) + k,))
    for k, b in enumerate(rfree):
        yield view.split("column", (None, b), (len(lb) + len(lfree) + k,))
    for a, b in zip(lc, rc, strict=True):
        yield view.split("row", (a, b), (None,), "all_reduce")


@register_strategy_rule("conv_general_dilated")
def _conv_rule(view: OpView) -> Iterable[Strategy]:
    """``column``: kernel output features split; ``lhs``: input batch split; ``row``: input
    features split on both sides, partial sums all-reduced."""
    p = view.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    yield view.split("column", (None, rhs_spec[0]), (out_spec[1],))
    if not view.weights[1]:
        yield view.split("lhs", (lhs_spec[0], None), (out_spec[0],))
    yield view.split("row", (lhs_spec[1], rhs_spec[1]), (None,), "all_reduce")


@register_strategy_rule("gather")
def _gather_rule(view: OpView) -> Iterable[Strategy]:
    """An operand dim taken whole by every slice and not indexed (an embedding's hidden dim)
    passes through to its offset dim of the result; indices stay replicated."""
    dn, sizes = view.params["dimension_numbers"], view.params["slice_sizes"]
    operand = view.in_shapes[0]
    skipped = {*dn.collapsed_slice_dims, *getattr(dn, "operand_batching_dims", ())}
    passthrough = [d for d in range(len(operand)) if d not in skipped]
    for d, o in zip(passthrough, dn.offset_dims, strict=True):
        if sizes[d] == operand[d] and d not in dn.start_index_map:
            yield view.split("gather", (d, None), (o,))


@register_strategy_rule("reduce_window_sum", "reduce_window_max", "reduce_window_min")
def _reduce_window_rule(view: OpView) -> Iterable[Strategy]:
    """Dims the window does not touch (size 1, stride 1, no padding or dilation) stay split."""
    p = view.params
    for d in range(len(view.in_shapes[0])):
        window = (p["window_dimensions"][d], p["window_strides"][d], tuple(p["padding"][d]))
        if window == (1, 1, (0, 0)) and p["base_dilation"][d] == p["window_dilation"][d] == 1:
            yield view.split("window", (d,), (d,))


@register_strategy_rule("custom_jvp_call")
def _custom_jvp_rule(view: OpView) -> Iterable[Strategy]:
    """Elementwise when its body is (``jax.nn.relu``), otherwise replicated only."""
    if len(view.out_shapes) == 1 and _is_elementwise(view.params["call_jaxpr"], view.out_shapes[0]):
        yield from _elementwise_rule(view)


def _is_elementwise(closed: Any, shape: Shape) -> bool:
    jaxpr = getattr(closed, "jaxpr", closed)
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _CALLS:
            if not _is_elementwise(eqn.params[_CALLS[name]], shape):
                return False
        elif name not in ELEMENTWISE:
            return False
        if any(tuple(v.aval.shape) not in ((), shape) for v in (*eqn.invars, *eqn.outvars)):
            return False
    return all(tuple(v.aval.shape) in ((), shape) for v in (*jaxpr.invars, *jaxpr.outvars))


@register_strategy_rule("iota")
def _replicated_rule(view: OpView) -> Iterable[Strategy]:
    """Replicated only (slicing the result for a sharded consumer is free anyway)."""
    return ()


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
    return OpView(
        primitive=op.primitive,
        in_shapes=tuple(
            np.shape(a.val) if isinstance(a, Lit) else tuple(program.avals[a].shape)
            for a in op.invars
        ),
        out_shapes=tuple(tuple(program.avals[v].shape) for v in op.outvars),
        params=op.eqn.params,
        tp=tp,
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


# --- the generic choice problem -----------------------------------------------------------------


def choice_cost(
    unary: Sequence[Sequence[float]],
    pairwise: Mapping[tuple[int, int], Any],
    choice: Sequence[int],
) -> float:
    """Σ_n unary[n][c_n] + Σ_(a,b) pairwise[a, b][c_a, c_b]."""
    total = sum(float(u[c]) for u, c in zip(unary, choice, strict=True))
    return total + sum(float(np.asarray(m)[choice[a], choice[b]]) for (a, b), m in pairwise.items())


def solve_choices(
    unary: Sequence[Sequence[float]],
    pairwise: Mapping[tuple[int, int], Any],
    *,
    presolve: bool = True,
) -> tuple[tuple[int, ...], float]:
    """One choice per node minimising `choice_cost`; returns (choices, cost).

    ``unary[n][c]`` is node n's cost for choice c; ``pairwise[a, b][c_a, c_b]`` an edge's cost.
    With `presolve`, nodes of degree ≤ 2 (or with one choice) are eliminated exactly first and
    a small remainder is enumerated; otherwise the remainder is a 0/1 program (`_milp`). Ties go
    to lower choice indices as far as elimination and enumeration decide them.
    """
    u = [np.asarray(c, dtype=float).copy() for c in unary]
    pair: dict[tuple[int, int], np.ndarray] = {}
    for (a, b), m in pairwise.items():
        m = np.asarray(m, dtype=float)
        key, m = ((a, b), m) if a < b else ((b, a), m.T)
        assert a != b and m.shape == (len(u[key[0]]), len(u[key[1]])), (a, b, m.shape)
        pair[key] = pair[key] + m if key in pair else m
    adj: dict[int, set[int]] = {n: set() for n in range(len(u))}
    for a, b in pair:
        adj[a].add(b)
        adj[b].add(a)
    steps = _eliminate(u, pair, adj) if presolve else []
    core = sorted(adj)
    small = presolve and np.prod([len(u[n]) for n in core]) <= _MAX_ENUMERATION
    choice = (_enumerate if small else _milp)(u, pair, core)
    for n, nbrs, arg in reversed(steps):
        choice[n] = int(arg[tuple(choice[p] for p in nbrs)])
    result = tuple(choice[n] for n in range(len(u)))
    return result, choice_cost(unary, pairwise, result)


def _oriented(pair: dict, n: int, p: int) -> np.ndarray:
    """The edge matrix between n and p indexed [choice of n, choice of p]."""
    return pair[n, p] if n < p else pair[p, n].T


def _eliminate(u: list, pair: dict, adj: dict) -> list[tuple[int, tuple[int, ...], np.ndarray]]:
    """Min-sum variable elimination of nodes with one choice or degree ≤ 2, in place.

    Each step (n, neighbours, arg) records n's best choice per choice of its neighbours:
    # arg[c_p, c_q] = argmin_i u[n][i] + M[n,p][i, c_p] + M[n,q][i, c_q]
    """
    steps, changed = [], True
    while changed:
        changed = False
        for n in sorted(adj):
            nbrs = tuple(sorted(adj[n]))
            if len(u[n]) == 1:
                for p in nbrs:
                    u[p] += _oriented(pair, p, n)[:, 0]
                nbrs, table = (), u[n]
            elif len(nbrs) > 2 or np.prod([len(u[p]) for p in nbrs]) > _MAX_ELIMINATION_TABLE:
                continue
            else:
                table = u[n].reshape(-1, *[1] * len(nbrs))
                for k, p in enumerate(nbrs):
                    shape = [len(u[n])] + [1] * len(nbrs)
                    shape[k + 1] = len(u[p])
                    table = table + _oriented(pair, n, p).reshape(shape)
            best, arg = table.min(axis=0), table.argmin(axis=0)
            if len(nbrs) == 1:
                u[nbrs[0]] += best
            elif len(nbrs) == 2:
                p, q = nbrs
                pair[p, q] = pair[p, q] + best if (p, q) in pair else best
                adj[p].add(q)
                adj[q].add(p)
            for p in adj.pop(n):
                adj[p].discard(n)
                pair.pop((min(n, p), max(n, p)))
            steps.append((n, nbrs, np.asarray(arg)))
            changed = True
    return steps


def _enumerate(u: list, pair: dict, nodes: list[int]) -> dict[int, int]:
    """The remaining problem by evaluating every joint choice (cheaper than a MILP when small).
    # total[c_0, c_1, ...] = Σ_n u[n][c_n] + Σ_(a,b) M[a,b][c_a, c_b]"""
    pos = {n: k for k, n in enumerate(nodes)}
    total = np.zeros([len(u[n]) for n in nodes])
    for n in nodes:
        total = total + u[n].reshape([-1 if k == pos[n] else 1 for k in range(len(nodes))])
    for (a, b), m in pair.items():
        shape = [1] * len(nodes)
        shape[pos[a]], shape[pos[b]] = m.shape
        total = total + m.reshape(shape)
    best = np.unravel_index(int(np.argmin(total)), total.shape) if nodes else ()
    return {n: int(c) for n, c in zip(nodes, best, strict=True)}


def _milp(u: list, pair: dict, nodes: list[int]) -> dict[int, int]:
    """The remaining problem as a 0/1 program: x[n, c] = node n takes choice c; y[e, i, j] = edge
    e takes (i, j), tied to x by its marginals (Σ_j y[e, i, j] = x[a, i], Σ_i y = x[b, j]), which
    makes y the product of the x's for integral x, so y may stay continuous."""
    if not pair:
        return {n: int(np.argmin(u[n])) for n in nodes}
    start, size = {}, 0
    for n in nodes:
        start[n], size = size, size + len(u[n])
    num_x, edges = size, sorted(pair.items())
    rows, cols, row = [], [], 0
    for n in nodes:  # Σ_c x[n, c] = 1
        rows += [row] * len(u[n])
        cols += range(start[n], start[n] + len(u[n]))
        row += 1
    equal_one = row
    vals = [1.0] * len(rows)
    for (a, b), m in edges:
        grid = size + np.arange(m.size).reshape(m.shape)
        size += m.size
        for n, lines in ((a, grid), (b, grid.T)):
            for i, line in enumerate(lines):  # Σ y[line] - x[n, i] = 0
                rows += [row] * (len(line) + 1)
                cols += [*line.tolist(), start[n] + i]
                vals += [1.0] * len(line) + [-1.0]
                row += 1
    shifted = [u[n] - u[n].min() for n in nodes] + [m.ravel() - m.min() for _, m in edges]
    cost = np.concatenate(shifted)
    cost /= max(float(np.abs(cost).max()), 1e-300)
    matrix = scipy.sparse.csr_array((vals, (rows, cols)), shape=(row, size))
    rhs = np.zeros(row)
    rhs[:equal_one] = 1.0
    result = scipy.optimize.milp(
        cost,
        constraints=scipy.optimize.LinearConstraint(matrix, rhs, rhs),
        integrality=np.r_[np.ones(num_x), np.zeros(size - num_x)],
        bounds=scipy.optimize.Bounds(0.0, 1.0),
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise RuntimeError(f"sharding MILP failed: {result.message}")
    return {n: int(np.argmax(result.x[start[n] : start[n] + len(u[n])])) for n in nodes}


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


def _costs(seg: _Segment, op_time: Callable, comm: Callable, store: Callable | None) -> _Costs:
    """The unary and pairwise tables; reads of a fixed input only add to the reader's unary."""
    program, tables = seg.program, {}

    def table(v):  # reshard table of value v
        key = (len(program.avals[v].shape), program.nbytes(v) / seg.tp)
        if key not in tables:
            tables[key] = _reshard_table(*key, comm)
        return tables[key]

    costs = _Costs([], {}, [], {})
    for n in range(len(seg.ops)):
        time, ties = _own_costs(seg, n, op_time, comm, table)
        for v, need in _needs(seg, n).items():
            t, count = table(v)
            src = seg.source(v)
            if src is None:  # a fixed input: its reshards depend on this op only
                time += need @ t[_index(seg.fixed[v])]
                ties += _TIE_COLLECTIVE * (need @ count[_index(seg.fixed[v])])
            else:  # pair[node, n][c_node, c_n] += Σ_d need[c_n, d] · t[src(c_node), d]
                node, rows = src
                costs.pair[node, n] = costs.pair.get((node, n), 0.0) + t[rows] @ need.T
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
) -> Sharding:
    """The cheapest shardings of segment `ops` (op indices, program order); see the module
    docstring. Every value read but not made by `ops` is free unless `fixed` pins it, so pin
    batch inputs and incoming boundary values; a value made by `ops` and in `fixed` must end up
    on that Dim. ``op_time(op_index, strategy)`` prices one op, ``comm_time(kind, bytes)`` one
    collective of `bytes` per device (`collective_bytes`' convention), ``store_cost(v, dim)``
    (optional) the price of holding free input v with that Dim (a memory term)."""
    seg = _segment(program, ops, tp, fixed)
    memo: dict[tuple[str, float], float] = {}

    def comm(kind, nbytes):
        if (kind, nbytes) not in memo:
            memo[kind, nbytes] = float(comm_time(kind, nbytes))
        return memo[kind, nbytes]

    costs = _costs(seg, op_time, comm, store_cost)
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
