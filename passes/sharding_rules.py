"""Sharding strategy rules: per primitive, the ways an operator can run split over a tensor
axis of size ``tp`` (a registry keyed by primitive, used by `passes.sharding`).

Each rule sees an `OpView` (shapes, params, which operands are weights) and yields
`Strategy` values: the `Dim` each operand must have, the `Dim` each result comes out with,
the collective the strategy implies on its result, and the share of the work one device
does. Register a rule with `register_strategy_rule`; a primitive without one is replicated
only (and listed by the sharding pass as unruled).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from autopipe._compat import CALL_JAXPR_PARAM

Dim = int | None
Shape = tuple[int, ...]

_CALLS = CALL_JAXPR_PARAM


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One way to run an operator: required operand Dims, produced result Dims, the collective
    it implies on its results (None if local) and the share of its work one device does."""

    name: str
    ins: tuple[Dim, ...]
    outs: tuple[Dim, ...]
    collective: str | None = None
    compute_fraction: float = 1.0

    @property
    def varies(self) -> bool:
        """Whether its local results differ between the devices of the axis."""
        return self.collective is not None or any(d is not None for d in self.outs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpView:
    """What a strategy rule sees of an operator (a literal operand has shape ``()``)."""

    primitive: str
    in_shapes: tuple[Shape, ...]
    out_shapes: tuple[Shape, ...]
    params: Mapping[str, Any]
    tp: int
    weights: tuple[bool, ...] = ()  # per operand: batch-independent (a parameter or made of them)
    dtypes: tuple[Any, ...] = ()  # per operand

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
    """``gather``: an operand dim taken whole by every slice and not indexed (an embedding's
    hidden dim) passes through to its offset dim of the result; ``vocab``: a float operand dim
    indexed one row at a time (an embedding's rows) is split, every device gathers the rows it
    holds and zeros for the others, and an all-reduce sums them (also with batching dims: the
    label's logit in a cross-entropy over vocab-split logits). Indices stay replicated."""
    dn, sizes = view.params["dimension_numbers"], view.params["slice_sizes"]
    operand = view.in_shapes[0]
    skipped = {*dn.collapsed_slice_dims, *getattr(dn, "operand_batching_dims", ())}
    passthrough = [d for d in range(len(operand)) if d not in skipped]
    for d, o in zip(passthrough, dn.offset_dims, strict=True):
        if sizes[d] == operand[d] and d not in dn.start_index_map:
            yield view.split("gather", (d, None), (o,))
    if not _inexact(view):
        return
    for d in dn.start_index_map:
        if sizes[d] == 1:
            # Megatron's vocab-parallel embedding: each device looks up the rows it holds
            # (zeros elsewhere), partial results summed; every device does the whole lookup
            yield Strategy("vocab", (d, None), (None,), "all_reduce", 1.0)


def _inexact(view: OpView) -> bool:
    return bool(view.dtypes) and jax.dtypes.issubdtype(view.dtypes[0], jax.numpy.inexact)


@register_strategy_rule("scatter")
def _scatter_rule(view: OpView) -> Iterable[Strategy]:
    """An operand dim the update window covers whole (the heads of a KV-cache row written at
    each row's position: ``vmap`` of ``dynamic_update_slice``) stays split on the operand, its
    window dim of the updates and the result; its start index is clamped to 0 on every device,
    which the shard's window covers too. Indices stay replicated."""
    dn = view.params["dimension_numbers"]
    operand, updates = view.in_shapes[0], view.in_shapes[2]
    skipped = {*dn.inserted_window_dims, *getattr(dn, "operand_batching_dims", ())}
    window = [d for d in range(len(operand)) if d not in skipped]
    for d, u in zip(window, dn.update_window_dims, strict=True):
        if updates[u] == operand[d]:
            yield view.split("scatter", (d, None, int(u)), (d,))


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


# --- structural operators: a split survives every dim the operator does not touch ---------------


def _untouched(view: OpView, touched: Iterable[int]) -> list[int]:
    """Dims of the first operand the operator leaves alone (same size in every result)."""
    skip = set(touched)
    return [d for d in range(len(view.in_shapes[0])) if d not in skip]


@register_strategy_rule("split")
def _split_rule(view: OpView) -> Iterable[Strategy]:
    """Cut along ``axis``: any other dim stays split in every piece (fused q/k/v cut on the
    feature axis, heads split elsewhere). The cut axis itself is not split: a shard of the fused
    value holds no whole piece."""
    for d in _untouched(view, (view.params["axis"],)):
        yield view.split("split", (d,), (d,) * len(view.out_shapes))


@register_strategy_rule("concatenate")
def _concatenate_rule(view: OpView) -> Iterable[Strategy]:
    """Every operand split on the same dim, other than the concatenated one (rotary halves)."""
    for d in _untouched(view, (view.params["dimension"],)):
        yield view.split("concatenate", (d,) * len(view.in_shapes), (d,))


def _whole_dims(view: OpView, sizes: Sequence[int], starts: Sequence[int] | None = None):
    """Dims a window takes whole (size of the operand, start 0)."""
    operand = view.in_shapes[0]
    starts = starts or (0,) * len(operand)
    return [d for d in range(len(operand)) if sizes[d] == operand[d] and starts[d] == 0]


@register_strategy_rule("slice")
def _slice_rule(view: OpView) -> Iterable[Strategy]:
    """A dim the slice takes whole (start 0, the operand's size, stride 1) stays split
    (BERT's first token ``x[:, 0]`` with the hidden dim split)."""
    p = view.params
    sizes = [hi - lo for lo, hi in zip(p["start_indices"], p["limit_indices"], strict=True)]
    strides = p["strides"] or (1,) * len(sizes)
    for d in _whole_dims(view, sizes, p["start_indices"]):
        if strides[d] == 1:
            yield view.split("slice", (d,), (d,))


@register_strategy_rule("dynamic_slice")
def _dynamic_slice_rule(view: OpView) -> Iterable[Strategy]:
    """A dim taken whole (its start index is clamped to 0 on every device) stays split; the
    start indices are scalars."""
    rest = (None,) * (len(view.in_shapes) - 1)
    for d in _whole_dims(view, view.params["slice_sizes"]):
        yield view.split("dynamic_slice", (d, *rest), (d,))


@register_strategy_rule("dynamic_update_slice")
def _dynamic_update_slice_rule(view: OpView) -> Iterable[Strategy]:
    """A dim the update covers whole (a cache row written at a position) stays split on both."""
    operand, update = view.in_shapes[0], view.in_shapes[1]
    rest = (None,) * (len(view.in_shapes) - 2)
    for d in range(len(operand)):
        if update[d] == operand[d]:
            yield view.split("dynamic_update_slice", (d, d, *rest), (d,))


@register_strategy_rule("pad")
def _pad_rule(view: OpView) -> Iterable[Strategy]:
    """A dim without padding stays split; the padding value is a scalar."""
    config = view.params["padding_config"]
    for d in range(len(view.in_shapes[0])):
        if tuple(int(x) for x in config[d]) == (0, 0, 0):
            yield view.split("pad", (d, None), (d,))


@register_strategy_rule("rev")
def _rev_rule(view: OpView) -> Iterable[Strategy]:
    for d in _untouched(view, view.params["dimensions"]):
        yield view.split("rev", (d,), (d,))


@register_strategy_rule("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
def _cumulative_rule(view: OpView) -> Iterable[Strategy]:
    for d in _untouched(view, (view.params["axis"],)):
        yield view.split("cumulative", (d,), (d,))


@register_strategy_rule("argmax", "argmin", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor")
def _reduce_kept_rule(view: OpView) -> Iterable[Strategy]:
    """Reductions whose partial results do not combine by a sum, max or min (an index, a
    product): split only on a dim they keep (renumbered)."""
    axes = set(view.params["axes"])
    kept = [d for d in range(len(view.in_shapes[0])) if d not in axes]
    for o, d in enumerate(kept):
        yield view.split("reduce", (d,), (o,))


@register_strategy_rule("top_k")
def _top_k_rule(view: OpView) -> Iterable[Strategy]:
    """Along ``axis`` (the last dim by default): any other dim stays split in both results."""
    axis = view.params.get("axis", len(view.in_shapes[0]) - 1)
    for d in _untouched(view, (axis % len(view.in_shapes[0]),)):
        yield view.split("top_k", (d,), (d, d))


@register_strategy_rule("sort")
def _sort_rule(view: OpView) -> Iterable[Strategy]:
    """Every operand (keys and values) split on the same dim, not the sorted one."""
    n = len(view.in_shapes)
    for d in _untouched(view, (view.params["dimension"],)):
        yield view.split("sort", (d,) * n, (d,) * len(view.out_shapes))


@register_strategy_rule("iota")
def _replicated_rule(view: OpView) -> Iterable[Strategy]:
    """Replicated only (slicing the result for a sharded consumer is free anyway)."""
    return ()
