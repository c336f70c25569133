"""Trace pass: a user function and example arguments → a closed jaxpr at microbatch size.

The function may be a Flax linen ``model.apply``-style function ``fn(variables, x, ...)``, a
function taking NNX modules as arguments (each module is split into its graph definition and
state; the state leaves become ordinary inputs), or any JAX function. Example arguments may be
arrays or ``jax.ShapeDtypeStruct``: tracing is abstract, so nothing is allocated.

Arguments named in ``batch_argnums`` carry the batch on their leading axis; every leaf in them
is split into ``num_microbatches`` equal microbatches and the jaxpr is traced at microbatch
size, which is the shape each pipeline tick computes on. All other arguments are parameters,
except the *inputs* of `passes.inputs` (arguments without float leaves, PRNG keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from autopipe._compat import ClosedJaxpr


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArgSpec:
    """How a call's positional arguments map to flat jaxpr inputs."""

    fn_name: str
    num_args: int
    nnx_graphdefs: tuple[Any, ...]  # per argument: an NNX graphdef, or None for a plain pytree
    in_tree: Any  # treedef of the (NNX-split) argument tuple
    in_paths: tuple[str, ...]  # per flat leaf: "args[1]['params']['w']"-style path
    in_avals: tuple[jax.ShapeDtypeStruct, ...]  # per flat leaf, full batch
    batch_leaves: tuple[bool, ...]  # per flat leaf: does it carry the batch axis?
    batch_args: tuple[int, ...]  # positions of the batch arguments

    def arg_leaves(self) -> tuple[tuple[int, ...], ...]:
        """Per argument, the indices of its flat leaves."""
        tree = jax.tree.unflatten(self.in_tree, range(len(self.in_avals)))
        return tuple(tuple(jax.tree.leaves(a)) for a in tree)

    @property
    def input_args(self) -> tuple[int, ...]:
        """Non-batch arguments with leaves but no float leaf (keys, counters): inputs, not
        parameters (`passes.inputs`)."""
        return tuple(
            a
            for a, leaves in enumerate(self.arg_leaves())
            if a not in self.batch_args
            and leaves
            and not any(is_float(self.in_avals[i]) for i in leaves)
        )

    def flatten(self, args: Sequence[Any]) -> tuple[Any, list[Any]]:
        """Splits NNX modules and flattens; returns (treedef, leaves)."""
        leaves, treedef = jax.tree.flatten(tuple(_split_nnx(a)[1] for a in args))
        return treedef, leaves


@dataclasses.dataclass(frozen=True, kw_only=True)
class Traced:
    """The trace pass's result: a jaxpr at microbatch size plus the facts to call it again."""

    spec: ArgSpec
    jaxpr: ClosedJaxpr  # inputs: flat leaves at microbatch size; outputs: flat outputs
    out_tree: Any
    batch_size: int
    num_microbatches: int

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.num_microbatches

    def fingerprint(self) -> str:
        """A hash of the traced program, used to check a saved plan still fits the function."""
        text = f"{self.spec.in_tree}|{self.out_tree}|{self.jaxpr}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_key_dtype(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def is_float(aval: Any) -> bool:
    """A float leaf: one with a gradient (PRNG keys are not)."""
    return not is_key_dtype(aval.dtype) and jax.numpy.issubdtype(aval.dtype, np.inexact)


def function_name(fn: Callable) -> str:
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, type):  # a bound method: model.apply
        return f"{type(owner).__name__}.{getattr(fn, '__name__', 'method')}"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module else name


def _split_nnx(arg: Any) -> tuple[Any, Any]:
    if isinstance(arg, nnx.Module):
        graphdef, state = nnx.split(arg)
        return graphdef, state
    return None, arg


def _abstract(leaf: Any, path: str) -> jax.ShapeDtypeStruct:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        dtype = leaf.dtype  # typed PRNG keys have an extended dtype numpy cannot name
        if not jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
            dtype = np.dtype(dtype)
        return jax.ShapeDtypeStruct(tuple(leaf.shape), dtype)
    if isinstance(leaf, (bool, int, float, complex)):
        return jax.ShapeDtypeStruct((), jax.numpy.asarray(leaf).dtype)
    raise TypeError(
        f"argument {path} is a {type(leaf).__name__}, not an array: autopipe traces array "
        "arguments only. Close over static Python values (functools.partial) instead."
    )


def make_arg_spec(fn: Callable, args: Sequence[Any], batch_argnums: Sequence[int]) -> ArgSpec:
    split = [_split_nnx(a) for a in args]
    plain = tuple(state for _, state in split)
    path_leaves, in_tree = jax.tree_util.tree_flatten_with_path(plain)
    paths = tuple("args" + jax.tree_util.keystr(p) for p, _ in path_leaves)
    bad = [i for i in batch_argnums if not -len(args) <= i < len(args)]
    if bad:
        raise ValueError(
            f"batch_argnums={tuple(batch_argnums)} names argument {bad[0]}, but "
            f"{function_name(fn)} was given {len(args)} arguments."
        )
    batch_set = {i % len(args) for i in batch_argnums}
    batch = tuple(int(p[0].idx) in batch_set for p, _ in path_leaves)
    return ArgSpec(
        fn_name=function_name(fn),
        num_args=len(args),
        nnx_graphdefs=tuple(g for g, _ in split),
        in_tree=in_tree,
        in_paths=paths,
        in_avals=tuple(_abstract(x, p) for p, (_, x) in zip(paths, path_leaves, strict=True)),
        batch_leaves=batch,
        batch_args=tuple(sorted(batch_set)),
    )


def batch_size_of(spec: ArgSpec) -> int:
    sizes = {}
    for path, aval, is_batch in zip(spec.in_paths, spec.in_avals, spec.batch_leaves, strict=True):
        if not is_batch:
            continue
        if not aval.shape:
            raise ValueError(
                f"{spec.fn_name}: batch argument {path} is a scalar; every leaf of a batch "
                "argument needs a leading batch axis. Move it out of batch_argnums."
            )
        sizes[path] = aval.shape[0]
    if not sizes:
        raise ValueError(
            f"{spec.fn_name}: batch_argnums names no array argument; give the index of the "
            "argument whose leading axis is the batch (default batch_argnums=(1,))."
        )
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{p}: {n}" for p, n in sizes.items())
        raise ValueError(
            f"{spec.fn_name}: batch leaves disagree on the batch size ({listing}); every leaf "
            "of a batch argument must have the same leading axis." + _key_hint(spec, sizes)
        )
    return next(iter(sizes.values()))


def _key_hint(spec: ArgSpec, sizes: dict[str, int]) -> str:
    """For a PRNG key among disagreeing batch leaves: where a key goes."""
    common = max(set(sizes.values()), key=list(sizes.values()).count)
    keys = [
        p
        for p, a in zip(spec.in_paths, spec.in_avals, strict=True)
        if p in sizes and sizes[p] != common and (is_key_dtype(a.dtype) or a.dtype == np.uint32)
    ]
    if not keys:
        return ""
    return (
        f" {keys[0]} looks like a PRNG key: per-example keys need the batch axis "
        f"(jax.random.split(key, {common})); a key for the whole batch goes in an argument "
        "outside batch_argnums, and microbatch j then draws from jax.random.fold_in(key, j)."
    )


def _flat_fn(fn: Callable, spec: ArgSpec) -> Callable:
    def flat(*leaves):
        plain = jax.tree.unflatten(spec.in_tree, leaves)
        args = [
            a if g is None else nnx.merge(g, a)
            for g, a in zip(spec.nnx_graphdefs, plain, strict=True)
        ]
        return fn(*args)

    return flat


def trace(
    fn: Callable,
    args: Sequence[Any],
    *,
    batch_argnums: Sequence[int],
    num_microbatches: int,
) -> Traced:
    """Traces ``fn(*args)`` at microbatch size; see the module docstring."""
    spec = make_arg_spec(fn, args, batch_argnums)
    batch = batch_size_of(spec)
    if num_microbatches < 1 or batch % num_microbatches:
        raise ValueError(
            f"{spec.fn_name}: the batch size {batch} is not divisible by "
            f"num_microbatches={num_microbatches}. Choose a divisor of {batch} "
            f"(e.g. {_divisors(batch)}) or change the batch size."
        )
    micro = batch // num_microbatches
    avals = [
        jax.ShapeDtypeStruct((micro, *a.shape[1:]), a.dtype) if b else a
        for a, b in zip(spec.in_avals, spec.batch_leaves, strict=True)
    ]
    flat = _flat_fn(fn, spec)
    try:
        jaxpr, out_shape = jax.make_jaxpr(flat, return_shape=True)(*avals)
    except jax.errors.ConcretizationTypeError as e:
        raise ValueError(_control_flow_message(spec.fn_name, e)) from None
    except jax.errors.TracerBoolConversionError as e:
        raise ValueError(_control_flow_message(spec.fn_name, e)) from None
    except jax.errors.TracerIntegerConversionError as e:
        raise ValueError(_control_flow_message(spec.fn_name, e)) from None
    out_tree = jax.tree.structure(out_shape)
    return Traced(
        spec=spec,
        jaxpr=jaxpr,
        out_tree=out_tree,
        batch_size=batch,
        num_microbatches=num_microbatches,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0][:8]


def _control_flow_message(name: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"{name}: Python control flow depends on a traced value ({first}). autopipe traces "
        "the function once with abstract shapes, so `if`/`while`/`int()` on array values "
        "cannot be resolved. Use jax.lax.cond / jax.lax.while_loop / jnp.where, or make the "
        "value static (a Python constant closed over by the function)."
    )
