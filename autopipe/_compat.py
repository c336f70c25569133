"""The one place autopipe touches JAX API that is internal, experimental or version-sensitive.

Everything here is a thin wrapper; when JAX moves an API, only this module changes.
Tested against jax 0.10.2.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import jax.extend.core as jex_core

ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr
JaxprEqn = jex_core.JaxprEqn
Literal = jex_core.Literal
Var = jex_core.Var
DropVar = jex_core.DropVar
jaxpr_as_fun = jex_core.jaxpr_as_fun

# Call primitives (inlined by the graph pass, looked through by the sharding rules) and the
# parameter each keeps its closed jaxpr in; names as jax 0.10 spells them.
CALL_JAXPR_PARAM = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
}


def bind_eqn(eqn: JaxprEqn, *args: Any) -> list[Any]:
    """Evaluates one jaxpr equation on concrete or traced arguments, as `eval_jaxpr` does."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)  # jax >= 0.10: params only
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*args, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


# --- jax.experimental.roofline: per-primitive FLOP/byte rules ---------------------------------
# Used by autopipe.cost_models.rules where JAX's rule matches XLA (convolution FLOPs over valid
# window positions, gather/scatter traffic). The rule table and the rule context are not public.


@functools.cache
def _roofline_tables() -> tuple[Any, dict[str, Any]]:
    import jax.experimental.roofline  # noqa: F401  (registers jax's rules)

    roofline_module = importlib.import_module("jax.experimental.roofline.roofline")
    table = getattr(roofline_module, "_rooflines", {})
    return roofline_module, {p.name: (p, rule) for p, rule in table.items()}


def _shaped(aval: Any) -> Any:
    from jax._src import core

    if isinstance(aval, core.ShapedArray):
        return aval
    return core.ShapedArray(tuple(aval.shape), aval.dtype)


def roofline_flops_bytes(
    primitive: str, avals_in: Any, avals_out: Any, params: dict
) -> tuple[int, int]:
    """(FLOPs, HBM bytes) of one equation by `jax.experimental.roofline`'s rule (unfused)."""
    from jax._src import source_info_util

    module, rules = _roofline_tables()
    prim, rule = rules[primitive]
    ins, outs = [_shaped(a) for a in avals_in], [_shaped(a) for a in avals_out]
    ctx = module.RooflineRuleContext(
        name_stack=source_info_util.new_name_stack(),
        primitive=prim,
        avals_in=ins,
        avals_out=outs,
        jaxpr_eqn_ctx=None,
        mesh=None,
        pin_lhs_in_vmem=False,
        pin_rhs_in_vmem=False,
    )
    result = rule(ctx, *[module.RooflineShape.from_aval(a) for a in ins], **params)
    return (
        max(result.flops, result.unfused_flops),
        max(result.hbm_bytes, result.unfused_hbm_bytes),
    )


# --- PRNG key dtypes: the implementation behind a key<impl> dtype (passes.layout) -----------


def key_impl_of(dtype: Any) -> Any:
    """The PRNG implementation of a typed key dtype, as ``jax.random.wrap_key_data`` takes it."""
    return dtype._impl


# --- jax.experimental.multihost_utils: collectives between processes (autopipe._distributed) --


def process_allgather(x: Any) -> Any:
    """Every process's copy of the host value `x`, stacked on a new leading axis."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x)


def gather_global(x: Any) -> Any:
    """The whole of a global array that spans processes, as a host array in every process."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)
