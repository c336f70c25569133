"""Tensor-parallel local evaluation: one operator under its planned `Strategy`, on the shards one
device of the tensor axis holds, with every collective explicit.

The forward emitter (`passes.emit`) makes its ``shard_map`` manual over the tensor axis too, so
XLA's partitioner never decides how a value moves inside a stage: every collective on the
tensor axis is one the plan chose and priced (`passes.sharding`):

  - a value held split on ``src`` that an operator needs on ``dst`` is resharded by `reshard`:
    a local slice (None → d, free), ``all_gather`` (d → None) or ``all_to_all`` (d → d');
  - the operator runs on local shards (`run_local`): its primitive is bound with the parameters
    that name shapes rewritten to the local shapes (a rule per primitive in `LOCAL_PARAM_RULES`;
    primitives whose parameters name no shapes need none);
  - a strategy that leaves partial results (a row-parallel matmul, a reduction over the split
    dim) combines them with the reduction its primitive needs (`COMBINE`: psum, pmax, pmin).

To give a new primitive a sharded strategy whose parameters name shapes (sizes, limits, a
result shape), register how they localise::

    @register_local_param_rule("my_prim")
    def _my_prim_local(params, strategy, in_shapes, out_shapes):  # local shapes
        return {**params, "shape": out_shapes[0]}

A strategy whose local result does not have the local shape it promises is an internal error
(an assertion), caught by the tests that run every strategy of every rule
(tests/test_tp_models.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from autopipe._compat import bind_eqn
from autopipe.passes.ir import Atom, Lit, Op, Program, apply_op, bind, eval_ops, read_atom
from autopipe.passes.sharding import replicated
from autopipe.passes.sharding_rules import Dim, Strategy

# (params, strategy, local operand shapes, local result shapes) -> local params
LocalParamRule = Callable[[Mapping[str, Any], Strategy, Sequence[tuple], Sequence[tuple]], dict]
LOCAL_PARAM_RULES: dict[str, LocalParamRule] = {}

# how partial results of a strategy with collective "all_reduce" are combined, by primitive
COMBINE: dict[str, Callable[[Any, str], Any]] = {
    "reduce_max": jax.lax.pmax,
    "reduce_min": jax.lax.pmin,
}


# primitives whose local form is not the same primitive with other parameters: op, args -> outs
LOCAL_EVAL_RULES: dict[str, Callable[[Op, Sequence[Any]], list[Any]]] = {}

# (primitive, strategy name) whose local form differs too: op, strategy, args, axis -> outs
STRATEGY_EVAL_RULES: dict[tuple[str, str], Callable[..., list[Any]]] = {}


def register_local_param_rule(*names: str) -> Callable[[LocalParamRule], LocalParamRule]:
    """Registers how the shape-naming parameters of primitives `names` become local."""

    def register(rule: LocalParamRule) -> LocalParamRule:
        for name in names:
            LOCAL_PARAM_RULES[name] = rule
        return rule

    return register


def local_shape(shape: Sequence[int], dim: Dim, tp: int) -> tuple[int, ...]:
    """The shape of one device's shard of a value of `shape` split on `dim`."""
    return tuple(n // tp if d == dim else n for d, n in enumerate(shape))


def local_aval(x: Any, dim: Dim, tp: int) -> jax.ShapeDtypeStruct:
    """The aval of one device's shard of ``x`` (an aval or an array) split on `dim`."""
    return jax.ShapeDtypeStruct(local_shape(x.shape, dim, tp), x.dtype)


def reshard(x: Any, src: Dim, dst: Dim, axis: str, tp: int, *, conjugate: bool = False) -> Any:
    """``x`` (a local shard split on `src`, or whole for None) as split on `dst`. ``conjugate``:
    differentiated with Megatron's conjugate collectives (`block`, `gather`), for gradients
    taken inside the manual region."""
    if src == dst:
        return x
    if src is None:  # every device holds it whole: take this device's block, no communication
        return block(x, dst, axis, tp) if conjugate else _block(x, dst, axis, tp)
    if dst is None:
        return gather(x, src, axis) if conjugate else _gather(x, src, axis)
    return jax.lax.all_to_all(x, axis, split_axis=dst, concat_axis=src, tiled=True)


def _block(x: Any, dim: int, axis: str, tp: int) -> Any:
    n = x.shape[dim] // tp
    return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis) * n, n, axis=dim)


def _gather(x: Any, dim: int, axis: str) -> Any:
    return jax.lax.all_gather(x, axis, axis=dim, tiled=True)


# --- conjugate collectives: the backward Megatron pairs with each forward ------------------------
# Inside the manual region a whole value's cotangent is the same on every device of the tensor
# axis. JAX's own transposes (psum of the cotangent for psum, psum_scatter for all_gather, a
# zero-padded block for a slice) assume per-device partial cotangents instead and, taken inside
# the region, give tp × the gradient or partial ones. The pairs below keep whole cotangents whole.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def block(x: Any, dim: int, axis: str, tp: int) -> Any:
    """This device's block of a whole value; backward: the blocks' cotangents gathered whole
    (Megatron's f: identity forward, all-reduce backward, for an input read by split ops)."""
    return _block(x, dim, axis, tp)


def _block_fwd(x, dim, axis, tp):
    return _block(x, dim, axis, tp), None


def _block_bwd(dim, axis, tp, _, ct):
    return (_gather(ct, dim, axis),)


block.defvjp(_block_fwd, _block_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def gather(x: Any, dim: int, axis: str) -> Any:
    """The whole value from its blocks; backward: this device's block of the whole cotangent."""
    return _gather(x, dim, axis)


def _gather_fwd(x, dim, axis):
    return _gather(x, dim, axis), None


def _gather_bwd(dim, axis, _, ct):
    tp = jax.lax.axis_size(axis)
    return (_block(ct, dim, axis, tp),)


gather.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def shared(x: Any, axis: str) -> Any:
    """A whole value read by an operator whose work is split (the input of a column-parallel
    matmul): identity; backward: the devices' partial cotangents summed (Megatron's f)."""
    return x


shared.defvjp(lambda x, axis: (x, None), lambda axis, _, ct: (jax.lax.psum(ct, axis),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def psum_whole(x: Any, axis: str) -> Any:
    """Partial sums combined; backward: the whole cotangent to every partial (Megatron's g)."""
    return jax.lax.psum(x, axis)


psum_whole.defvjp(lambda x, axis: (jax.lax.psum(x, axis), None), lambda axis, _, ct: (ct,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def pextreme_whole(x: Any, axis: str, kind: str) -> Any:
    """pmax / pmin of partial extremes; backward: the cotangent to the partials that won."""
    return (jax.lax.pmax if kind == "max" else jax.lax.pmin)(x, axis)


def _pextreme_fwd(x, axis, kind):
    y = pextreme_whole(x, axis, kind)
    return y, x == y


def _pextreme_bwd(axis, kind, won, ct):
    return (jnp.where(won, ct, jnp.zeros_like(ct)),)


pextreme_whole.defvjp(_pextreme_fwd, _pextreme_bwd)

# how partial results are combined under conjugate collectives, by primitive
CONJUGATE_COMBINE: dict[str, Callable[[Any, str], Any]] = {
    "reduce_max": functools.partial(pextreme_whole, kind="max"),
    "reduce_min": functools.partial(pextreme_whole, kind="min"),
}


def run_local(
    op: Op,
    strategy: Strategy,
    args: Sequence[Any],
    out_shapes: Sequence[tuple[int, ...]],
    axis: str,
    tp: int,
    *,
    conjugate: bool = False,
) -> list[Any]:
    """``op``'s results under ``strategy`` from operands already laid out as it requires: local
    shards for split operands, whole values otherwise; results laid out as ``strategy.outs``.
    ``out_shapes``: the results' global shapes; ``conjugate``: see `reshard`."""
    outs_local = [local_shape(s, d, tp) for s, d in zip(out_shapes, strategy.outs, strict=True)]
    if all(d is None for d in (*strategy.ins, *strategy.outs)):
        outs = apply_op(op, list(args))
    elif (op.primitive, strategy.name) in STRATEGY_EVAL_RULES:
        outs = STRATEGY_EVAL_RULES[op.primitive, strategy.name](op, strategy, args, axis)
    elif op.primitive in LOCAL_EVAL_RULES:
        outs = LOCAL_EVAL_RULES[op.primitive](op, args)
    else:
        outs = bind(_local_eqn(op, strategy, args, outs_local), *args)
    if strategy.collective == "all_reduce":
        combine = (
            CONJUGATE_COMBINE.get(op.primitive, psum_whole)
            if conjugate
            else COMBINE.get(op.primitive, jax.lax.psum)
        )
        outs = [combine(y, axis) for y in outs]
    else:
        assert strategy.collective is None, (op.primitive, strategy)
    got = [tuple(y.shape) for y in outs]
    assert got == outs_local, (op.primitive, strategy, got, outs_local)
    return outs


def _local_eqn(op: Op, strategy: Strategy, args: Sequence[Any], outs: Sequence[tuple]):
    """``op.eqn`` with its shape-naming parameters rewritten for local operands."""
    assert op.kind == "eqn", (op.kind, op.primitive)
    rule = LOCAL_PARAM_RULES.get(op.primitive)
    if rule is None:
        return op.eqn
    ins = [tuple(getattr(a, "shape", ())) for a in args]
    return op.eqn.replace(params=rule(op.eqn.params, strategy, ins, outs))


# --- rules -------------------------------------------------------------------------------------


@register_local_param_rule("reshape")
def _reshape_local(params, strategy, ins, outs):
    return {**params, "new_sizes": outs[0]}


@register_local_param_rule("broadcast_in_dim")
def _broadcast_local(params, strategy, ins, outs):
    return {**params, "shape": outs[0]}


@register_local_param_rule("gather", "dynamic_slice")
def _slice_sizes_local(params, strategy, ins, outs):
    """The split operand dim is taken whole by every slice: its slice size is the shard's."""
    sizes, d = list(params["slice_sizes"]), strategy.ins[0]
    if d is not None:
        sizes[d] = ins[0][d]
    return {**params, "slice_sizes": tuple(sizes)}


@register_local_param_rule("slice")
def _slice_local(params, strategy, ins, outs):
    """The split dim is taken whole (start 0, stride 1): its limit is the shard's size."""
    limits, d = list(params["limit_indices"]), strategy.ins[0]
    if d is not None:
        limits[d] = ins[0][d]
    return {**params, "limit_indices": tuple(limits)}


# --- a stage's operators -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorPlan:
    """What the emitter needs to run a stage's operators split over the tensor axis."""

    axis: str
    tp: int
    strategies: Mapping[int, Strategy]  # op index → its planned strategy (missing: replicated)
    # values the plan hands to other segments whole: gathered where they are made (as priced),
    # and their readers there slice the whole value
    whole: frozenset[int] = frozenset()
    conjugate: bool = False  # Megatron's conjugate backward (gradients inside the region)


@dataclasses.dataclass(kw_only=True)
class LocalEnv:
    """Values as one device of the tensor axis holds them: ``env[v]`` laid out on ``held[v]``
    (None: whole), with each reshard made once per (value, Dim)."""

    plan: TensorPlan
    env: dict[int, Any]
    held: dict[int, Dim]
    cache: dict[tuple[int, Dim], Any] = dataclasses.field(default_factory=dict)
    hook: Any = None  # a `split_backward.Hook`: applied to each operator's inputs and results

    def get(self, a: Atom, dim: Dim) -> Any:
        if isinstance(a, Lit):
            return a.val
        src = self.held.get(a)
        if src == dim:
            return self.env[a]
        if (a, dim) not in self.cache:
            x = self.env[a]
            if (a, None) in self.cache:  # a whole copy: slicing it is free
                x, src = self.cache[a, None], None
            self.cache[a, dim] = reshard(
                x, src, dim, self.plan.axis, self.plan.tp, conjugate=self.plan.conjugate
            )
        return self.cache[a, dim]

    def _shared(self, a: int, x: Any) -> Any:
        """``x`` (``a`` whole) as the operators that split their work read it: one `shared` per
        value, so the partial cotangents of all its split readers (q, k and v projections of
        one input) are summed first and all-reduced once, as Megatron's f does."""
        if (a, "shared") not in self.cache:
            self.cache[a, "shared"] = shared(x, self.plan.axis)
        return self.cache[a, "shared"]

    def run(self, program: Program, i: int) -> None:
        """Evaluates ``program.ops[i]`` under its planned strategy."""
        op = program.ops[i]
        s = self.plan.strategies.get(i) or replicated(op)
        args = [self.get(a, d) for a, d in zip(op.invars, s.ins, strict=True)]
        if self.plan.conjugate and any(d is not None for d in (*s.ins, *s.outs)):
            args = [
                self._shared(a, x) if d is None and isinstance(a, int) else x
                for a, d, x in zip(op.invars, s.ins, args, strict=True)
            ]
        shapes = [tuple(program.avals[v].shape) for v in op.outvars]
        if self.hook is not None:
            args = self.hook.args(i, op.invars, args)
        outs = run_local(
            op, s, args, shapes, self.plan.axis, self.plan.tp, conjugate=self.plan.conjugate
        )
        if self.hook is not None:
            outs = self.hook.outs(i, outs)
        for v, y, d in zip(op.outvars, outs, s.outs, strict=True):
            self.env[v], self.held[v] = y, d
            if v in self.plan.whole and d is not None:
                self.get(v, None)


def made_dims(program: Program, tensor: TensorPlan | None) -> dict[int, Dim]:
    """Value → the Dim its operator's planned strategy makes it on (none: whole)."""
    if tensor is None:
        return {}
    return {
        v: d
        for i, s in tensor.strategies.items()
        for v, d in zip(program.ops[i].outvars, s.outs, strict=True)
        if d is not None
    }


def eval_stage(
    program: Program,
    ops: Sequence[int],
    env: dict,
    tensor: TensorPlan | None,
    split: Mapping,
    hook: Any = None,
    seeds: Mapping[tuple[int, Dim], Any] | None = None,
) -> Callable[[int], Any]:
    """Evaluates ``program.ops[i]`` for ``i`` in ``ops`` on ``env``: whole, or without a tensor
    plan, or each under its planned strategy on this device's shards (values of ``env`` held
    split as ``split`` says: value → dim). ``hook`` (a `split_backward.Hook`) wraps each
    operator's inputs and results. ``seeds``: values given as an operator reads them,
    (value, Dim) → this device's array (`input_dim`), for operators whose producers are not
    evaluated. Returns how to read a value: ``get(atom, dim=None)``, whole or on ``dim`` (on
    this device's shard)."""
    seeds = seeds or {}
    if tensor is None:
        env.update({a: x for (a, _), x in seeds.items()})
        if hook is None:
            eval_ops(program, ops, env)
        else:
            for i in ops:
                op = program.ops[i]
                args = hook.args(i, op.invars, [read_atom(env, a) for a in op.invars])
                env.update(zip(op.outvars, hook.outs(i, apply_op(op, args)), strict=True))
        return lambda a, dim=None: read_atom(env, a)
    local = LocalEnv(plan=tensor, env=env, held={v: split.get(v) for v in env}, hook=hook)
    for (a, d), x in seeds.items():
        local.cache[a, d] = x
        if a not in env:
            env[a], local.held[a] = x, d
    for i in ops:
        local.run(program, i)
    return lambda a, dim=None: local.get(a, dim)


def input_dim(program: Program, tensor: TensorPlan | None, i: int, j: int) -> Dim:
    """The Dim operator i reads its input j on under its planned strategy (None: whole)."""
    if tensor is None:
        return None
    op = program.ops[i]
    return (tensor.strategies.get(i) or replicated(op)).ins[j]


def _custom_jvp_local(op: Op, args: Sequence[Any]) -> list[Any]:
    """An elementwise body with a custom derivative (``jax.nn.relu``; `sharding_rules.
    _custom_jvp_rule`) on the shards: each shard is zero-padded to the operator's own shape,
    the operator bound as it was traced, and the result cut back to the shard. So its custom
    rule differentiates it (relu's derivative at 0 is 0; its body ``max(x, 0)`` would give
    0.5, a wrong gradient where zero-padded rows meet a zero bias), at tp × the elementwise
    work of this one operator and no collective."""
    whole = [tuple(v.aval.shape) for v in op.eqn.invars]
    pairs = list(zip(args, whole, strict=True))
    local = next((tuple(x.shape) for x, w in pairs if tuple(x.shape) != w), None)
    if local is None:
        return bind_eqn(op.eqn, *args)
    padded = [x if tuple(x.shape) == w else _pad_to(x, w) for x, w in pairs]
    outs = bind_eqn(op.eqn, *padded)
    return [jax.lax.slice(y, (0,) * y.ndim, local) for y in outs]


def _pad_to(x: Any, shape: tuple[int, ...]) -> Any:
    """``x`` zero-padded at the end of each dimension to ``shape``."""
    pads = [(0, b - a, 0) for a, b in zip(x.shape, shape, strict=True)]
    return jax.lax.pad(x, jnp.zeros((), x.dtype), pads)


LOCAL_EVAL_RULES["custom_jvp_call"] = _custom_jvp_local


def _vocab_gather_local(op: Op, strategy: Strategy, args: Sequence[Any], axis: str) -> list[Any]:
    """A lookup of rows split over the tensor axis (`sharding_rules._gather_rule`'s ``vocab``):
    each device gathers the rows it holds from indices shifted to its block, zeros for the rest
    (the caller sums them). The whole lookup's index semantics are kept: clamped indices
    (``clip`` / ``promise_in_bounds``, as XLA clamps) are clamped to the whole table first; an
    index outside it under ``fill`` gives the fill value, from the first device only."""
    table, indices = args
    params = op.eqn.params
    d = strategy.ins[0]
    k = params["dimension_numbers"].start_index_map.index(d)
    rows = table.shape[d]
    whole = rows * jax.lax.axis_size(axis)
    t = jax.lax.axis_index(axis)
    idx = indices[..., k]
    fill = params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP
    if not fill:
        idx = jnp.clip(idx, 0, whole - 1)
    shifted = indices.at[..., k].set(idx - t * rows)
    local = dict(params, mode=jax.lax.GatherScatterMode.FILL_OR_DROP, fill_value=0)
    (y,) = bind_eqn(op.eqn.replace(params=local), table, shifted)
    if fill:
        outside = ((idx < 0) | (idx >= whole)) & (t == 0)
        batch = [a for a in range(y.ndim) if a not in params["dimension_numbers"].offset_dims]
        outside = jax.lax.broadcast_in_dim(outside, y.shape, tuple(batch))
        value = jnp.nan if params["fill_value"] is None else params["fill_value"]
        y = jnp.where(outside, jnp.asarray(value, y.dtype), y)
    return [y]


STRATEGY_EVAL_RULES["gather", "vocab"] = _vocab_gather_local


def as_one_device(fn: Callable, mesh: Any) -> Callable:
    """``fn`` traced as one device of ``mesh`` runs it (None: as it is)."""
    if mesh is None:
        return fn
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=P(),
        out_specs=P(),
        axis_names=set(mesh.axis_names),
        check_vma=False,  # as the pipeline's shard_map (`passes.emit_train`)
    )
