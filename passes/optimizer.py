"""How a training step runs an optax optimizer on the pipeline's parameter slots, exactly.

Parameters, gradients and optimizer state live in the slots of a `ParamLayout` (by shape, or
by size where the update reads no shapes, `optimizer_exact.shape_free`):
slot k is a ``(p, *shape)`` array whose row d is one leaf of device d's stage(s) with its own
shape (or zeros where d holds nothing in that slot). Two ways to run ``optimizer.update``:

- ``"local"``: inside a ``shard_map`` manual over the pipeline axis, each device updates its own
  row of every slot: the transform sees every leaf with its own shape (zeros slots are leaves of
  their own, with zero gradients), so per-leaf transforms (lamb's trust ratio, adafactor's
  factored moments, ``mask=`` by ndim) are exact. Wrong for transforms that combine leaves
  (``clip_by_global_norm``): each device would see only its own.
- ``"global"``: on the whole ``(p, *shape)`` slots, as one array each: sums over all leaves are
  exact (the zeros add nothing; a tied parameter's copies beyond the first are such zeros to
  the update, see `passes.shared_params`), but a per-leaf statistic would mix the leaves of p
  stages and a shape-dependent choice would see the extra leading axis.

ZeRO-1 (``zero_axis``, a data axis of size dp): every state leaf with the pipeline's leading
axis is split over the data axis along its first dimension that dp divides (`zero_spec`;
leaves no dimension of which dp divides stay whole), and so are the gradients the pipeline
returns (reduce-scattered over the replicas instead of all-reduced); XLA's partitioner runs the
update on each replica's part and all-gathers the new parameters, which stay whole on every
replica. Per-leaf statistics (lamb's norms) become sums over the parts, which XLA all-reduces.

`choose_mode` reads the update's jaxpr: with no output depending on two leaves, ``"local"``;
otherwise ``"global"`` if no per-leaf statistic reaches an output and the update does the same
operations on the slots as on the leaves; otherwise the optimizer is refused with an error —
never run wrongly. Leaves are the slot rows, so a leaf's dependencies are tracked by slot.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autopipe._compat import Literal as JaxLiteral
from autopipe.passes.shared_params import Shared, copy_first, only_first_copy

Mode = Literal["local", "global"]
_SUMS = frozenset({"add", "add_any"})

# primitives that act element by element (with broadcasting of scalars)
ELEMENTWISE = frozenset(
    """abs add and atan2 broadcast_in_dim cbrt ceil clamp convert_element_type copy copy_p cos
    cosh div eq erf erf_inv exp exp2 expm1 floor ge gt integer_pow is_finite le log log1p
    logistic lt max min mul ne neg nextafter not or pow rem round rsqrt select_n sign sin sinh
    sqrt square stop_gradient sub tan tanh xor""".split()
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerStep:
    """``update(grads, state, params) -> (params, state)`` and ``init(params) -> state`` on the
    global slots, and the state's avals with their shardings."""

    mode: Mode
    update: Callable
    init: Callable
    state_avals: Any


def zero_spec(
    shape: Sequence[int], axis: str, zero_axis: str | None, dp: int, base: P | None = None
) -> P:
    """``base`` (default ``P(axis)``; a tensor-split slot's spec), with the first dimension
    after the leading one that it leaves whole and ``dp`` divides split over ``zero_axis``
    (ZeRO-1; see the module docstring)."""
    names = list(base or P(axis)) + [None] * len(shape)
    names = names[: len(shape)] if shape else names[:1]
    if zero_axis is not None:
        for d, n in enumerate(shape[1:], start=1):
            if names[d] is None and n % dp == 0:
                names[d] = zero_axis
                break
    while len(names) > 1 and names[-1] is None:
        names.pop()
    return P(*names)


def optimizer_step(
    optimizer: optax.GradientTransformation,
    param_avals: Sequence[jax.ShapeDtypeStruct],
    *,
    mesh: Any,
    axis: str,
    shared: Shared = (),
    zero_axis: str | None = None,
    shape_free: bool = False,
) -> OptimizerStep:
    """The optimizer on the slots ``param_avals`` (global ``(p, *shape)``, sharded over
    ``axis``), in the mode `choose_mode` picks. ``shared``: values held by several devices
    (`ParamLayout.shared`), whose gradients are already summed; in the global mode they are
    counted once (`passes.shared_params`). ``zero_axis``: the state split over that data axis
    (ZeRO-1), the gradients given split as `zero_spec` says. ``shape_free``: the update reads
    no shapes (`optimizer_exact.shape_free`), so the local mode may run on the slots' blocks
    as they are (`_local`)."""
    mode = choose_mode(optimizer, param_avals)
    if mode == "local":
        init, update = _local(optimizer, mesh, axis, param_avals, rows=not shape_free)
    else:
        init, update = _global(optimizer, shared, mesh, axis)
    p = param_avals[0].shape[0] if param_avals else 1
    dp = mesh.shape[zero_axis] if zero_axis else 1
    specs = tuple(_slot_spec(a, axis) for a in param_avals)

    def sharding(x, base=None):
        on_axis = mode == "local" or (x.ndim >= 1 and x.shape[0] == p)
        spec = zero_spec(x.shape, axis, zero_axis, dp, base) if on_axis else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    state = jax.eval_shape(init, tuple(param_avals))
    state_avals = _like_params(state, param_avals, specs, sharding)
    shardings = jax.tree.map(lambda a: a.sharding, state_avals)
    laid = tuple(NamedSharding(mesh, spec) for spec in specs)

    def laid_out_update(grads, state, params):
        params, state = update(grads, state, params)
        constrain = jax.lax.with_sharding_constraint
        return constrain(params, laid), constrain(state, shardings)

    return OptimizerStep(
        mode=mode,
        update=laid_out_update,
        init=jax.jit(init, out_shardings=shardings),
        state_avals=state_avals,
    )


def _slot_spec(aval: Any, axis: str) -> P:
    """A slot's spec: ``P(axis)``, or its own (a tensor-split slot's) when it has one."""
    spec = getattr(getattr(aval, "sharding", None), "spec", None)
    return P(axis) if spec is None else spec


def _like_params(state: Any, param_avals: Sequence[Any], specs: Sequence[P], sharding) -> Any:
    """The state's avals with their shardings: a subtree laid out like the parameters (adam's
    moments: a tuple of leaves of the slots' shapes) is split like them over the tensor axis;
    any other leaf gets ``sharding(x)``."""
    shapes = tuple((tuple(a.shape), a.dtype) for a in param_avals)

    def like(x) -> bool:
        if type(x) is not tuple or len(x) != len(shapes):
            return False
        return all(getattr(y, "shape", None) is not None for y in x) and shapes == tuple(
            (tuple(y.shape), y.dtype) for y in x
        )

    def lay(x):
        if like(x):
            return tuple(sharding(y, spec) for y, spec in zip(x, specs, strict=True))
        return sharding(x)

    if not param_avals:
        return jax.tree.map(sharding, state)
    return jax.tree.map(lay, state, is_leaf=like)


def _global(optimizer, shared: Shared, mesh, axis) -> tuple[Callable, Callable]:
    """init and update on the whole slots; a shared value's rows on its other holders are
    zero padding to the optimizer, then get the first holder's new row."""

    def init(params):
        return optimizer.init(only_first_copy(params, shared))

    def update(grads, state, params):
        params = only_first_copy(params, shared)
        updates, state = optimizer.update(only_first_copy(grads, shared), state, params)
        new = optax.apply_updates(params, updates)
        return copy_first(new, shared, mesh=mesh, axis=axis), state

    return init, update


def _local(optimizer, mesh, axis, param_avals, rows: bool = True) -> tuple[Callable, Callable]:
    """init and update run per device on its rows of the slots (leaves with their shapes), or,
    ``rows=False`` (an update that reads no shapes, `optimizer_exact.shape_free`), on its
    ``(1, *shape)`` blocks as they are, the state leaves laid out like them too: the same
    arithmetic, and XLA updates the donated buffers in place (dropping and restoring the
    leading axis made it copy adam's moments, one stage's parameter bytes each)."""
    leaf = lambda a, lead: jax.ShapeDtypeStruct((*lead, *a.shape[1:]), a.dtype)  # noqa: E731
    by_row = jax.eval_shape(optimizer.init, tuple(leaf(a, ()) for a in param_avals))
    # per state leaf: whether it is a parameter-like block kept with its leading axis
    keep = jax.tree.map(lambda r: False, by_row)
    if not rows:
        by_block = jax.eval_shape(optimizer.init, tuple(leaf(a, (1,)) for a in param_avals))
        keep = jax.tree.map(lambda r, b: b.shape == (1, *r.shape), by_row, by_block)
    strip = lambda tree, k: jax.tree.map(lambda x, b: x if b else x[0], tree, k)  # noqa: E731
    add = lambda tree, k: jax.tree.map(  # noqa: E731
        lambda x, b: x if b else jnp.asarray(x)[None], tree, k
    )
    whole = tuple(not rows for _ in param_avals)

    def smap(fn):
        return jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=P(axis),
            out_specs=P(axis),
            axis_names={axis},
            check_vma=False,  # optimizer constants (counts) are the same on every device
        )

    def init(params):
        return smap(lambda ps: add(optimizer.init(strip(ps, whole)), keep))(params)

    def local_update(grads, state, params):
        g, s, q = strip(grads, whole), strip(state, keep), strip(params, whole)
        updates, s = optimizer.update(g, s, q)
        return add(optax.apply_updates(q, updates), whole), add(s, keep)

    def update(grads, state, params):
        return smap(local_update)(grads, state, params)

    return init, update


# --- choosing the mode -----------------------------------------------------------------------


def choose_mode(
    optimizer: optax.GradientTransformation, param_avals: Sequence[jax.ShapeDtypeStruct]
) -> Mode:
    """``"local"`` or ``"global"`` (see the module docstring); raises when neither is exact."""
    rows = tuple(jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in param_avals)
    local = update_jaxpr(optimizer, rows)
    n = len(rows)
    ins = [
        _Flow(deps=frozenset({k % n}), owner=k % n) if k < 2 * n else _Flow()
        for k in range(len(local.invars))
    ]
    outs = _flow(local, ins)
    if all(len(f.deps) <= 1 for f in outs):
        return "local"
    if any(f.owner is not None and f.owner in f.local for f in outs):
        raise ValueError(
            "optimizer: this optax transformation combines parameter leaves (a global norm, as "
            "optax.clip_by_global_norm computes) and also computes per-leaf statistics (as "
            "optax.lamb, optax.adafactor or optax.contrib.muon do); on the pipeline's per-stage "
            f"slots ({n} of them) both cannot be computed exactly. Use the global transform "
            "with elementwise ones only (e.g. chain(clip_by_global_norm(...), adamw(...))), "
            "or the per-leaf optimizer without the global transform."
        )
    glob = update_jaxpr(optimizer, tuple(param_avals))
    if _primitive_counts(glob) != _primitive_counts(local):
        raise ValueError(
            "optimizer: this optax transformation combines parameter leaves (a global norm, as "
            "optax.clip_by_global_norm computes) and treats leaves differently by their shape "
            "(e.g. adamw's mask= by ndim, or multi_transform labels by shape); on the "
            "pipeline's per-stage slots both cannot be exact at once. Drop the global "
            "transform or the shape-dependent choice."
        )
    return "global"


@dataclasses.dataclass(frozen=True)
class _Flow:
    """What one value of the update is made of: the leaves it depends on, the leaf it is
    element-aligned with (None: a statistic or a constant), and the leaves one of whose
    statistics (a reduction over that leaf alone, not yet combined with another leaf's) it
    carries."""

    deps: frozenset = frozenset()
    owner: int | None = None
    local: frozenset = frozenset()
    combined: bool = False  # carries statistics of several leaves combined (a global norm)


def update_jaxpr(optimizer, avals: tuple) -> Any:
    state = jax.eval_shape(optimizer.init, avals)
    return jax.make_jaxpr(lambda g, p, s: optimizer.update(g, s, p))(avals, avals, state).jaxpr


def call_body(eqn) -> Any | None:
    """The jaxpr a call-like eqn runs on exactly its operands (pjit, custom_jvp/vjp calls)."""
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(name)
        j = getattr(j, "jaxpr", j)
        if j is not None and hasattr(j, "eqns") and len(j.invars) == len(eqn.invars):
            return j
    return None


def _flow(jaxpr, ins: Sequence[_Flow]) -> list[_Flow]:
    """The `_Flow` of every output of ``jaxpr`` given its inputs'."""
    env: dict[Any, _Flow] = dict(zip(jaxpr.invars, ins, strict=True))

    def read(a):
        return _Flow() if isinstance(a, JaxLiteral) else env.get(a, _Flow())

    for eqn in jaxpr.eqns:
        flows = [read(a) for a in eqn.invars]
        sub = call_body(eqn)
        if sub is not None:
            outs = _flow(sub, flows)
        elif "branches" in eqn.params:  # cond: any branch, chosen by the predicate
            per_branch = [_flow(b.jaxpr, flows[1:]) for b in eqn.params["branches"]]
            outs = [_join([flows[0], *col]) for col in zip(*per_branch, strict=True)]
        elif eqn.primitive.name in ELEMENTWISE:
            outs = [_join(flows, summing=eqn.primitive.name in _SUMS)] * len(eqn.outvars)
        else:
            outs = [_reduce(eqn, flows)] * len(eqn.outvars)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(a) for a in jaxpr.outvars]


def _join(flows: Sequence[_Flow], *, summing: bool = False) -> _Flow:
    """Elementwise: statistics of two different leaves combined make a global one. A sum of
    statistics that already holds a combination stays one (a global norm summed leaf by leaf:
    ``((n0 + n1) + n2) + ...``), where the statistic of a single leaf would otherwise seem to
    survive into the total."""
    owners = {f.owner for f in flows if f.owner is not None}
    local = frozenset().union(*(f.local for f in flows))
    combined = any(f.combined for f in flows)
    absorbed = summing and combined and not owners
    if len(local) > 1 or absorbed:
        local, combined = frozenset(), True
    return _Flow(
        deps=frozenset().union(*(f.deps for f in flows)),
        owner=owners.pop() if len(owners) == 1 else None,
        local=local,
        combined=combined,
    )


def _reduce(eqn, flows: Sequence[_Flow]) -> _Flow:
    """A non-elementwise operation: a statistic of the leaves whose elements it reads."""
    joined = _join(flows)
    read = {
        f.owner
        for a, f in zip(eqn.invars, flows, strict=True)
        if f.owner is not None and getattr(getattr(a, "aval", None), "ndim", 0) > 0
    }
    local = joined.local | frozenset(read)
    if len(local) > 1:
        return _Flow(deps=joined.deps, owner=None, combined=True)
    return _Flow(deps=joined.deps, owner=None, local=local, combined=joined.combined)


def _primitive_counts(jaxpr) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for sub in jex_core.jaxprs_in_params(eqn.params):
            counts += _primitive_counts(sub)
    return counts
