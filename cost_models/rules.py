"""Per-primitive cost rules and the roofline time model.

`cost_rules` maps a primitive name to a rule ``(avals_in, avals_out, params) -> Cost``.
Register a rule with ``@register_cost_rule("name", ...)``. A primitive with no rule is
priced by memory traffic only and its name is recorded in `Cost.unruled`, so a plan can
report what it could not price (never a silent zero). Control flow recurses into
sub-jaxprs: scan × length, cond = most expensive branch, while = one trip (flagged).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from autopipe.cost_models.hardware import Hardware


@dataclasses.dataclass(frozen=True)
class Cost:
    """Compute and memory traffic of some work; adds and scales."""

    flops: float = 0.0
    bytes_accessed: float = 0.0
    unruled: frozenset[str] = frozenset()  # primitives priced by the default rule

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.flops + other.flops,
            self.bytes_accessed + other.bytes_accessed,
            self.unruled | other.unruled,
        )

    def __mul__(self, k: float) -> Cost:
        return Cost(self.flops * k, self.bytes_accessed * k, self.unruled)

    __rmul__ = __mul__

    @staticmethod
    def zeros() -> Cost:
        return Cost()


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


def eqn_cost(primitive: str, avals_in: Sequence[Any], avals_out: Sequence[Any], params: dict):
    rule = cost_rules.get(primitive)
    if rule is None:
        return Cost(0.0, _traffic(avals_in, avals_out), frozenset({primitive}))
    return rule(avals_in, avals_out, params)


def jaxpr_cost(jaxpr: Any) -> Cost:
    """Sum of eqn costs of an (open) jaxpr, recursing through control flow by rule."""
    total = Cost.zeros()
    for eqn in jaxpr.eqns:
        avals_in = [v.aval for v in eqn.invars]
        avals_out = [v.aval for v in eqn.outvars]
        total = total + eqn_cost(eqn.primitive.name, avals_in, avals_out, eqn.params)
    return total


# --- rules ------------------------------------------------------------------------------

_ELEMENTWISE = (
    "add sub mul div neg max min abs exp exp2 log log1p tanh logistic sin cos tan sqrt rsqrt "
    "pow integer_pow erf erf_inv erfc select_n clamp sign floor ceil round rem and or not xor "
    "eq ne lt le gt ge is_finite square cbrt atan2 nextafter add_any shift_left "
    "shift_right_logical shift_right_arithmetic population_count imag real conj expm1 "
    "asin acos atan sinh cosh asinh acosh atanh"
).split()


@register_cost_rule(*_ELEMENTWISE)
def _elementwise_rule(avals_in, avals_out, params) -> Cost:
    # one flop per output element; read every operand, write the result
    return Cost(float(sum(size(a) for a in avals_out)), _traffic(avals_in, avals_out))


_DATA_MOVEMENT = (
    "reshape broadcast_in_dim transpose squeeze expand_dims convert_element_type "
    "concatenate pad slice dynamic_slice dynamic_update_slice gather scatter scatter-add "
    "scatter_add iota copy copy_p rev select_and_gather_add stop_gradient bitcast_convert_type "
    "reduce_precision split sharding_constraint pcast device_put optimization_barrier"
).split()


@register_cost_rule(*_DATA_MOVEMENT)
def _data_movement_rule(avals_in, avals_out, params) -> Cost:
    return Cost(0.0, _traffic(avals_in, avals_out))


@register_cost_rule(
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
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
    return Cost(float(size(avals_in[0])), _traffic(avals_in, avals_out))


@register_cost_rule("sort")
def _sort_rule(avals_in, avals_out, params) -> Cost:
    n = size(avals_in[0])
    dim = params.get("dimension", 0)
    k = avals_in[0].shape[dim] if avals_in[0].shape else 1
    return Cost(float(n * max(1.0, math.log2(max(k, 2)))), _traffic(avals_in, avals_out))


@register_cost_rule("dot_general")
def _dot_general_rule(avals_in, avals_out, params) -> Cost:
    # 2 · (output elements) · (contracted elements per output)
    (lhs_contract, _), _ = params["dimension_numbers"]
    k = int(np.prod([avals_in[0].shape[d] for d in lhs_contract], dtype=np.int64))
    return Cost(2.0 * size(avals_out[0]) * k, _traffic(avals_in, avals_out))


@register_cost_rule("conv_general_dilated")
def _conv_rule(avals_in, avals_out, params) -> Cost:
    # each output element: 2 · (kernel elements per output feature)
    rhs = avals_in[1]
    out_features = rhs.shape[params["dimension_numbers"].rhs_spec[0]]
    per_output = size(rhs) // max(out_features, 1)
    return Cost(2.0 * size(avals_out[0]) * per_output, _traffic(avals_in, avals_out))


@register_cost_rule("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint")
def _call_rule(avals_in, avals_out, params) -> Cost:
    inner = params.get("jaxpr") or params.get("call_jaxpr")
    return jaxpr_cost(getattr(inner, "jaxpr", inner))


@register_cost_rule("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
def _custom_rule(avals_in, avals_out, params) -> Cost:
    inner = params.get("call_jaxpr") or params.get("fun_jaxpr") or params.get("jaxpr")
    return jaxpr_cost(getattr(inner, "jaxpr", inner))


@register_cost_rule("scan")
def _scan_rule(avals_in, avals_out, params) -> Cost:
    return jaxpr_cost(params["jaxpr"].jaxpr) * params["length"]


@register_cost_rule("cond")
def _cond_rule(avals_in, avals_out, params) -> Cost:
    costs = [jaxpr_cost(b.jaxpr) for b in params["branches"]]
    return max(costs, key=lambda c: (c.flops, c.bytes_accessed))


@register_cost_rule("while")
def _while_rule(avals_in, avals_out, params) -> Cost:
    body = jaxpr_cost(params["body_jaxpr"].jaxpr) + jaxpr_cost(params["cond_jaxpr"].jaxpr)
    return body + Cost(unruled=frozenset({"while (unknown trip count, priced as one trip)"}))


def op_time(cost: Cost, hw: Hardware) -> float:
    """Roofline time of one operator: max(compute, memory) at achievable rates + overhead."""
    compute = cost.flops / (hw.peak_flops * hw.flops_efficiency)
    memory = cost.bytes_accessed / (hw.memory_bandwidth * hw.bandwidth_efficiency)
    return max(compute, memory) + hw.op_overhead


def transfer_time(nbytes_: float, hw: Hardware) -> float:
    """Alpha-beta time of one point-to-point send between pipeline neighbours."""
    if nbytes_ <= 0:
        return 0.0
    return hw.link_latency + nbytes_ / hw.link_bandwidth
