"""The one place autopipe touches JAX API that is internal, experimental or version-sensitive.

Everything here is a thin wrapper; when JAX moves an API, only this module changes.
Tested against jax 0.10.2.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.core as jex_core

ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr
JaxprEqn = jex_core.JaxprEqn
Literal = jex_core.Literal
Var = jex_core.Var
DropVar = jex_core.DropVar
jaxpr_as_fun = jex_core.jaxpr_as_fun


def bind_eqn(eqn: JaxprEqn, *args: Any) -> list[Any]:
    """Evaluates one jaxpr equation on concrete or traced arguments, as `eval_jaxpr` does."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)  # jax >= 0.10: params only
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*args, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def varying_axes(x: Any) -> frozenset[str]:
    """Manual mesh axes over which `x` is marked varying inside a shard_map."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def to_varying(x: Any, axis: str) -> Any:
    """Marks `x` varying over the manual `axis` (needed for switch branches and scan carries)."""
    if axis in varying_axes(x):
        return x
    return jax.lax.pcast(x, (axis,), to="varying")
