"""Per-primitive cost rules and the roofline time model.

`cost_rules` maps a primitive name to a rule ``(avals_in, avals_out, params) -> Cost``.
Register a rule with ``@register_cost_rule("name", ...)``; one rule per primitive. A primitive
with no rule is priced by memory traffic only, logged once (``logging``, logger
``autopipe.cost_models``) and its name is recorded in `Cost.unruled`, so a plan reports what
it could not price (``plan.predicted.unruled_primitives``) — never a silent zero. Control flow
recurses into sub-jaxprs: scan × length, cond = most expensive branch, while = one trip
(flagged as an unknown trip count).

Where `jax.experimental.roofline` has a rule that agrees with XLA (convolution FLOPs counted
over valid window positions, gather/scatter traffic), it is used through `autopipe._compat`.

Costs are hardware-independent: FLOPs (with the matmul part per operand dtype), transcendental
elements, bytes (with the part XLA usually fuses away), launched kernels and communication per
(collective, mesh axis). `op_time` turns a `Cost` into seconds on a `Hardware`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from autopipe.cost_models import comm
from autopipe.cost_models.hardware import Hardware, dtype_class

logger = logging.getLogger("autopipe.cost_models")

Pairs = tuple[tuple[str, float], ...]
CommEntries = tuple[tuple[str, str, float, float], ...]  # (collective, axis, bytes, count)


def _merge(a: Iterable[tuple], b: Iterable[tuple], keys: int = 1) -> tuple:
    """Adds the trailing numeric fields of rows that share their first `keys` fields."""
    out: dict[tuple, list[float]] = {}
    for row in (*a, *b):
        k, vals = tuple(row[:keys]), row[keys:]
        acc = out.setdefault(k, [0.0] * len(vals))
        for i, v in enumerate(vals):
            acc[i] += v
    return tuple(sorted((*k, *v) for k, v in out.items()))


def _scale(rows: Iterable[tuple], k: float, keys: int = 1) -> tuple:
    return tuple((*r[:keys], *(v * k for v in r[keys:])) for r in rows)


@dataclasses.dataclass(frozen=True)
class Cost:
    """Compute, memory traffic and communication of some work; adds and scales.

    ``flops`` counts all arithmetic; ``dot_flops`` is the matmul/convolution part of it, per
    operand dtype class (convolutions as ``"conv:<dtype>"``). ``bytes_accessed`` is unfused
    traffic (every operand read, every result written); ``fusible_bytes`` is the part of it
    from elementwise and layout operators, which XLA usually fuses into neighbours.
    ``kernels`` counts operators that launch their own kernel (``dot_kernels`` the matmuls and
    convolutions among them), ``fusible_ops`` those that usually fuse. ``comm`` holds
    ``(collective, mesh axis, payload bytes per device, count)``.
    """

    flops: float = 0.0
    bytes_accessed: float = 0.0
    unruled: frozenset[str] = frozenset()  # primitives priced by the default rule
    dot_flops: Pairs = ()
    transcendentals: float = 0.0
    fusible_bytes: float = 0.0
    kernels: float = 0.0
    dot_kernels: float = 0.0
    fusible_ops: float = 0.0
    comm: CommEntries = ()

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            flops=self.flops + other.flops,
            bytes_accessed=self.bytes_accessed + other.bytes_accessed,
            unruled=self.unruled | other.unruled,
            dot_flops=_merge(self.dot_flops, other.dot_flops),
            transcendentals=self.transcendentals + other.transcendentals,
            fusible_bytes=self.fusible_bytes + other.fusible_bytes,
            kernels=self.kernels + other.kernels,
            dot_kernels=self.dot_kernels + other.dot_kernels,
            fusible_ops=self.fusible_ops + other.fusible_ops,
            comm=_merge(self.comm, other.comm, keys=2),
        )

    def __mul__(self, k: float) -> Cost:
        return Cost(
            flops=self.flops * k,
            bytes_accessed=self.bytes_accessed * k,
            unruled=self.unruled,
            dot_flops=_scale(self.dot_flops, k),
            transcendentals=self.transcendentals * k,
            fusible_bytes=self.fusible_bytes * k,
            kernels=self.kernels * k,
            dot_kernels=self.dot_kernels * k,
            fusible_ops=self.fusible_ops * k,
            comm=_scale(self.comm, k, keys=2),
        )

    __rmul__ = __mul__

    @staticmethod
    def zeros() -> Cost:
        return Cost()

    @property
    def matmul_flops(self) -> float:
        return float(sum(f for _, f in self.dot_flops))

    def comm_bytes(self) -> dict[str, float]:
        """Payload bytes per device per mesh axis, over all collectives."""
        out: dict[str, float] = {}
        for _, axis, nbytes_, _ in self.comm:
            out[axis] = out.get(axis, 0.0) + nbytes_
        return out


CostRule = Callable[[Sequence[Any], Sequence[Any], dict], Cost]
cost_rules: dict[str, CostRule] = {}


def register_cost_rule(*names: str) -> Callable[[CostRule], CostRule]:
    def register(rule: CostRule) -> CostRule:
        for name in names:
            cost_rules[name] = rule
        return rule

    return register


def size(aval: Any) -> int:
    return math.prod(int(d) for d in getattr(aval, "shape", ()))


def nbytes(aval: Any) -> int:
    dtype = getattr(aval, "dtype", None)
    if dtype is None:
        return 0
    try:
        return size(aval) * np.dtype(dtype).itemsize
    except TypeError:  # extended dtypes (PRNG keys, tokens)
        return 0


def _traffic(avals_in: Sequence[Any], avals_out: Sequence[Any]) -> float:
    return float(sum(nbytes(a) for a in avals_in) + sum(nbytes(a) for a in avals_out))


@functools.cache
def _log_unruled(primitive: str) -> None:
    logger.warning(
        "autopipe: no cost rule for primitive %r; priced by its memory traffic only. Register "
        "one with autopipe.cost_models.rules.register_cost_rule(%r).",
        primitive,
        primitive,
    )


def eqn_cost(primitive: str, avals_in: Sequence[Any], avals_out: Sequence[Any], params: dict):
    rule = cost_rules.get(primitive)
    if rule is None:
        _log_unruled(primitive)
        traffic = _traffic(avals_in, avals_out)
        return Cost(0.0, traffic, frozenset({primitive}), kernels=1.0)
    return rule(avals_in, avals_out, params)


def jaxpr_cost(jaxpr: Any) -> Cost:
    """Sum of eqn costs of an (open or closed) jaxpr, recursing through control flow by rule."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = Cost.zeros()
    for eqn in jaxpr.eqns:
        avals_in = [v.aval for v in eqn.invars]
        avals_out = [v.aval for v in eqn.outvars]
        total = total + eqn_cost(eqn.primitive.name, avals_in, avals_out, eqn.params)
    return total


# --- elementwise and layout -------------------------------------------------------------------

_TRANSCENDENTAL = frozenset(
    "exp exp2 log log1p tanh logistic sin cos tan sqrt rsqrt cbrt pow erf erf_inv erfc expm1 "
    "asin acos atan atan2 sinh cosh asinh acosh atanh lgamma digamma".split()
)
_ELEMENTWISE = (
    "add sub mul div neg max min abs select_n clamp sign floor ceil round rem and or not xor "
    "eq ne lt le gt ge is_finite square integer_pow nextafter add_any shift_left "
    "shift_right_logical shift_right_arithmetic population_count clz imag real conj complex "
    "reduce_precision convert_element_type copy copy_p threefry2x32 random_bits random_wrap "
    "random_unwrap random_seed random_fold_in random_split"
).split()


@register_cost_rule(*_ELEMENTWISE)
def _elementwise_rule(avals_in, avals_out, params) -> Cost:
    # one flop per output element (integer_pow: one per multiply); read every operand, write
    # the result — all of it fusible with neighbouring elementwise operators.
    n = float(sum(size(a) for a in avals_out))
    y = params.get("y")
    per = max(1, abs(int(y)).bit_length() + bin(abs(int(y))).count("1") - 2) if y else 1
    traffic = _traffic(avals_in, avals_out)
    return Cost(flops=n * per, bytes_accessed=traffic, fusible_bytes=traffic, fusible_ops=1.0)


@register_cost_rule(*_TRANSCENDENTAL)
def _transcendental_rule(avals_in, avals_out, params) -> Cost:
    # an elementwise operator whose every output element is one transcendental evaluation
    base = _elementwise_rule(avals_in, avals_out, params)
    return base + Cost(transcendentals=float(sum(size(a) for a in avals_out)))


# Metadata-only: no data moves (XLA emits a bitcast or nothing).
_FREE = (
    "reshape squeeze expand_dims stop_gradient pcast pvary sharding_constraint "
    "optimization_barrier device_put axis_index bitcast_convert_type name"
).split()


@register_cost_rule(*_FREE)
def _free_rule(avals_in, avals_out, params) -> Cost:
    return Cost()


_LAYOUT = "broadcast_in_dim transpose concatenate pad rev iota split select_and_gather_add".split()


@register_cost_rule(*_LAYOUT)
def _layout_rule(avals_in, avals_out, params) -> Cost:
    traffic = _traffic(avals_in, avals_out)
    return Cost(bytes_accessed=traffic, fusible_bytes=traffic, fusible_ops=1.0)


@register_cost_rule("slice", "dynamic_slice")
def _slice_rule(avals_in, avals_out, params) -> Cost:
    # reads only the selected window (plus the scalar start indices), writes it once
    traffic = 2.0 * sum(nbytes(a) for a in avals_out) + sum(nbytes(a) for a in avals_in[1:])
    if params.get("start_indices") is not None:  # static slice: no index operands
        traffic = 2.0 * sum(nbytes(a) for a in avals_out)
    return Cost(bytes_accessed=traffic, fusible_bytes=traffic, fusible_ops=1.0)


@register_cost_rule("dynamic_update_slice")
def _dynamic_update_slice_rule(avals_in, avals_out, params) -> Cost:
    # in place: reads and writes the update only
    return Cost(bytes_accessed=2.0 * nbytes(avals_in[1]), kernels=1.0)


def _gather_scatter_rule(primitive: str) -> CostRule:
    def rule(avals_in, avals_out, params) -> Cost:
        from autopipe import _compat

        flops, traffic = _compat.roofline_flops_bytes(primitive, avals_in, avals_out, params)
        return Cost(flops=float(flops), bytes_accessed=float(traffic), kernels=1.0)

    return rule


for _name in ("gather", "scatter", "scatter-add", "scatter_add", "scatter_mul", "scatter_min"):
    register_cost_rule(_name)(_gather_scatter_rule(_name.replace("-", "_")))
register_cost_rule("scatter_max", "scatter_sub")(_gather_scatter_rule("scatter_max"))

# --- reductions, scans, sort ------------------------------------------------------------------


@register_cost_rule(
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
    "reduce_xor",
    "argmax",
    "argmin",
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "cumlogsumexp",
    "reduce_precision_sum",
)
def _reduction_rule(avals_in, avals_out, params) -> Cost:
    # one flop per input element; operands read and results written by one reduction kernel
    return Cost(
        flops=float(size(avals_in[0])), bytes_accessed=_traffic(avals_in, avals_out), kernels=1.0
    )


@register_cost_rule(
    "reduce_window_sum",
    "reduce_window_max",
    "reduce_window_min",
    "reduce_window",
    "select_and_scatter_add",
    "select_and_scatter",
)
def _window_rule(avals_in, avals_out, params) -> Cost:
    # one flop per (output element × window element); operand read once, result written
    window = math.prod(int(d) for d in params.get("window_dimensions", (1,)))
    flops = float(sum(size(a) for a in avals_out) * window)
    return Cost(flops=flops, bytes_accessed=_traffic(avals_in, avals_out), kernels=1.0)


@register_cost_rule("sort")
def _sort_rule(avals_in, avals_out, params) -> Cost:
    n = size(avals_in[0])
    dim = params.get("dimension", 0)
    k = avals_in[0].shape[dim] if avals_in[0].shape else 1
    flops = float(n * max(1.0, math.log2(max(k, 2))))
    return Cost(flops=flops, bytes_accessed=_traffic(avals_in, avals_out), kernels=1.0)


@register_cost_rule("top_k")
def _top_k_rule(avals_in, avals_out, params) -> Cost:
    n = size(avals_in[0])
    k = int(params.get("k", 1))
    flops = float(n * max(1.0, math.log2(max(k, 2))))
    return Cost(flops=flops, bytes_accessed=_traffic(avals_in, avals_out), kernels=1.0)


# --- matmul and convolution -------------------------------------------------------------------


def _dot_cost(flops: float, avals_in, avals_out, *, conv: bool = False) -> Cost:
    dt = ("conv:" if conv else "") + dtype_class(avals_in[0].dtype)
    return Cost(
        flops=flops,
        bytes_accessed=_traffic(avals_in, avals_out),
        dot_flops=((dt, flops),),
        kernels=1.0,
        dot_kernels=1.0,
    )


@register_cost_rule("dot_general")
def _dot_general_rule(avals_in, avals_out, params) -> Cost:
    # 2 · (output elements) · (contracted elements per output): one multiply-add each
    (lhs_contract, _), _ = params["dimension_numbers"]
    k = int(np.prod([avals_in[0].shape[d] for d in lhs_contract], dtype=np.int64))
    return _dot_cost(2.0 * size(avals_out[0]) * k, avals_in, avals_out)


@register_cost_rule("conv_general_dilated")
def _conv_rule(avals_in, avals_out, params) -> Cost:
    # 2 · multiply-adds over window positions that fall inside the (unpadded) input, as XLA
    # counts them; jax.experimental.roofline's conv rule implements exactly that.
    from autopipe import _compat

    flops, _ = _compat.roofline_flops_bytes("conv_general_dilated", avals_in, avals_out, params)
    return _dot_cost(float(flops), avals_in, avals_out, conv=True)


# --- control flow and calls -------------------------------------------------------------------


@register_cost_rule("pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint")
def _call_rule(avals_in, avals_out, params) -> Cost:
    inner = params.get("jaxpr") or params.get("call_jaxpr")
    return jaxpr_cost(inner)


@register_cost_rule("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin")
def _custom_rule(avals_in, avals_out, params) -> Cost:
    inner = params.get("call_jaxpr") or params.get("fun_jaxpr") or params.get("jaxpr")
    if inner is None:
        return Cost(0.0, _traffic(avals_in, avals_out), frozenset({"custom call (opaque)"}))
    return jaxpr_cost(inner)


@register_cost_rule("scan")
def _scan_rule(avals_in, avals_out, params) -> Cost:
    return jaxpr_cost(params["jaxpr"]) * params["length"]


@register_cost_rule("cond")
def _cond_rule(avals_in, avals_out, params) -> Cost:
    costs = [jaxpr_cost(b) for b in params["branches"]]
    return max(costs, key=lambda c: (c.flops, c.bytes_accessed))


@register_cost_rule("while")
def _while_rule(avals_in, avals_out, params) -> Cost:
    body = jaxpr_cost(params["body_jaxpr"]) + jaxpr_cost(params["cond_jaxpr"])
    return body + Cost(unruled=frozenset({"while (unknown trip count, priced as one trip)"}))


# --- collectives ------------------------------------------------------------------------------


def _axes(params: dict) -> tuple[str, ...]:
    names = params.get("axis_name", params.get("axes", ()))
    names = names if isinstance(names, tuple | list) else (names,)
    return tuple(str(n) for n in names if not isinstance(n, int))


def _collective_rule(kind: str) -> CostRule:
    def rule(avals_in, avals_out, params) -> Cost:
        payload = float(sum(nbytes(a) for a in avals_in))
        axes = _axes(params) or ("?",)
        # one collective spread over several axes: its payload is charged to each axis
        rows = tuple((kind, a, payload, 1.0) for a in axes)
        flops = float(sum(size(a) for a in avals_in)) if kind in comm.REDUCING else 0.0
        return Cost(flops=flops, bytes_accessed=_traffic(avals_in, avals_out), comm=rows)

    return rule


for _kind, _names in {
    "all_reduce": ("psum", "psum_invariant", "pmax", "pmin", "unreduced_psum"),
    "all_gather": ("all_gather", "all_gather_invariant"),
    "reduce_scatter": ("reduce_scatter", "unreduced_reduce_scatter"),
    "all_to_all": ("all_to_all", "ragged_all_to_all"),
    "ppermute": ("ppermute", "psend", "precv", "pbroadcast"),
}.items():
    register_cost_rule(*_names)(_collective_rule(_kind))


# --- time model -------------------------------------------------------------------------------


def _dot_time(kind: str, flops: float, hw: Hardware) -> float:
    """`kind` is a dtype class, prefixed "conv:" for convolutions."""
    if kind.startswith("conv:"):
        rate = hw.matmul_flops(kind[5:]) * hw.conv_efficiency
    else:
        rate = hw.matmul_flops(kind)
    return flops / (rate * hw.flops_efficiency)


def compute_time(cost: Cost, hw: Hardware) -> float:
    """Seconds of arithmetic: matmul FLOPs at each dtype's achievable rate, the rest at the
    achievable vector rate, plus transcendental elements."""
    matmul = sum(_dot_time(dt, f, hw) for dt, f in cost.dot_flops)
    vector = max(cost.flops - cost.matmul_flops, 0.0) / hw.vector_rate
    return matmul + vector + cost.transcendentals * hw.transcendental_time


def memory_time(cost: Cost, hw: Hardware) -> float:
    """Seconds of memory traffic; fusion removes `fusion_discount` of the fusible bytes."""
    moved = cost.bytes_accessed - hw.fusion_discount * cost.fusible_bytes
    return max(moved, 0.0) / (hw.memory_bandwidth * hw.bandwidth_efficiency)


def overhead_time(cost: Cost, hw: Hardware) -> float:
    """Fixed cost of launched kernels; fused operators cost (1 − fusion_discount) of one; a
    matmul or convolution adds `Hardware.matmul_overhead` (small ones run below the rate)."""
    launched = cost.kernels + (1.0 - hw.fusion_discount) * cost.fusible_ops
    return hw.op_overhead * launched + hw.matmul_overhead * cost.dot_kernels


def comm_time(cost: Cost, hw: Hardware, mesh_axes: Sequence[tuple[str, int]] = ()) -> float:
    """Alpha-beta time of the collectives in `cost` (see `comm.collective_time`)."""
    return sum(
        comm.collective_time(kind, nbytes_ / count, axis, mesh_axes, hw) * count
        for kind, axis, nbytes_, count in cost.comm
        if count > 0
    )


def op_time(cost: Cost, hw: Hardware, mesh_axes: Sequence[tuple[str, int]] = ()) -> float:
    """Roofline time: max(compute, memory) at achievable rates + kernel overhead + collectives.

    An operator with no kernel of its own (a reshape, a fused elementwise op) still pays a
    fraction of `op_overhead`; every operator pays at least one `op_overhead` when the cost
    carries no kernel count (costs built by hand, ``Cost(flops, bytes)``).
    """
    launched = cost.kernels + cost.fusible_ops
    overhead = overhead_time(cost, hw) if launched else hw.op_overhead
    if cost == Cost.zeros():
        overhead = 0.0
    roof = max(compute_time(cost, hw), memory_time(cost, hw))
    return roof + overhead + comm_time(cost, hw, mesh_axes)


def transfer_time(nbytes_: float, hw: Hardware) -> float:
    """Alpha-beta time of one point-to-point send between pipeline neighbours."""
    if nbytes_ <= 0:
        return 0.0
    return hw.link_latency + nbytes_ / hw.link_bandwidth
