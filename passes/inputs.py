"""Inputs pass: the non-trained, non-batch inputs of a program, and PRNG keys per microbatch.

An *input* is a flat argument leaf that is neither split into microbatches nor placed on a
stage as a parameter: every leaf of an argument without float leaves (a PRNG key, a step
counter, an integer table), and typed PRNG keys anywhere; in training also every other
non-float leaf of the parameter arguments (`autopipe._front` refuses those the loss reads).
Inputs reach every device replicated, each stage reads the ones it uses directly, and nothing
computed from them is hoisted out of the pipeline (`passes.layout.split_ops`), because

**microbatch j sees every key input folded with j**: ``jax.random.fold_in(key, j)``, with j the
global microbatch index ``r · m + j`` of data replica r's microbatch j (the rows
``batch.reshape(dp, m, mb)[r, j]``). A loop over the microbatches on one device that calls the
function with ``fold_in(key, j)`` draws the same numbers (`autopipe.microbatch_reference`).
Typed keys (``jax.random.key``) are keys by dtype; a raw ``uint32`` key is an input the program
wraps (``random_wrap``), folded with the wrapped implementation. Key arrays fold elementwise.

`constant_key_draws` finds random draws whose key is a constant of the traced function (closed
over, or made from a literal seed): every microbatch and every step repeat those numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax

from autopipe.passes.ir import Program
from autopipe.passes.trace import ArgSpec, is_float, is_key_dtype

DRAWS = frozenset({"random_bits"})  # primitives that turn a key into random numbers


class ConstantKeyWarning(UserWarning):
    """Random numbers drawn from a key that is a constant of the traced function."""


def input_leaves(spec: ArgSpec, *, training: bool) -> tuple[bool, ...]:
    """Per flat leaf: is it an input (see the module docstring)?"""
    in_arg = {i for a in spec.input_args for i in spec.arg_leaves()[a]}
    return tuple(
        not batch and (i in in_arg or is_key_dtype(aval.dtype) or (training and not is_float(aval)))
        for i, (aval, batch) in enumerate(zip(spec.in_avals, spec.batch_leaves, strict=True))
    )


def check_inputs(spec: ArgSpec, program: Program, *, training: bool) -> None:
    """Warns about draws from constant keys; in training, refuses a non-float leaf of a
    parameter argument that the loss reads (the optimizer would be given it)."""
    draws = constant_key_draws(program)
    if draws:
        more = f" and {len(draws) - 1} more" if len(draws) > 1 else ""
        warnings.warn(_CONSTANT_KEY.format(fn=spec.fn_name, where=draws[0] + more),
                      ConstantKeyWarning, stacklevel=4)  # fmt: skip
    if not training:
        return
    read = {a for op in program.ops for a in op.invars if isinstance(a, int)}
    read |= {a for a in program.outvars if isinstance(a, int)}
    in_arg = {i for a in spec.input_args for i in spec.arg_leaves()[a]}
    bad = [
        i
        for i, v in enumerate(program.invars)
        if v in program.inputs and i not in in_arg and v in read
    ]
    if bad:  # name a key first: the likely case is a model's own dropout key
        keyed = [i for i in bad if is_key_dtype(spec.in_avals[i].dtype)]
        i, aval = (keyed or bad)[0], spec.in_avals[(keyed or bad)[0]]
        more = f" ({len(bad) - 1} more such leaves)" if len(bad) > 1 else ""
        text = _TRAINED_NON_FLOAT.format(
            fn=spec.fn_name, path=spec.in_paths[i] + more, aval=f"{aval.dtype}{list(aval.shape)}"
        )
        raise ValueError(text + (_KEY_HINT if keyed else ""))


_CONSTANT_KEY = (
    "{fn}: random numbers are drawn from a PRNG key that is a constant of the traced function "
    "(at {where}): closed over, or made from a literal seed, it gives every microbatch and every "
    "step the same numbers (the same dropout masks). Pass the key as an argument of its own "
    "instead, a fresh one per step (loss_fn(params, batch, key) and plan.step(state, batch, "
    "jax.random.fold_in(key, step))); microbatch j then draws from jax.random.fold_in(key, j)."
)
_TRAINED_NON_FLOAT = (
    "{fn}: parameter {path} is a {aval} leaf of a parameter argument, and the loss reads it. "
    "autopipe.train gives every leaf of the parameter arguments to the optimizer, and only "
    "float leaves have gradients. Pass it as an argument of its own: an argument without float "
    "leaves (a PRNG key, a step counter, an integer table) is an input, given to every "
    "plan.step, sent to the stages that read it and not trained; or close over it if it is a "
    "constant."
)
_KEY_HINT = (
    " For dropout, pass a fresh key to every step (microbatch j draws from "
    "jax.random.fold_in(key, j)); with an NNX module call nnx.reseed(model, dropout=key) in "
    "the loss."
)


def key_inputs(program: Program) -> dict[int, Any]:
    """Input value → None for a typed key, the PRNG implementation for a raw uint32 key."""
    out: dict[int, Any] = {v: None for v in program.inputs if is_key_dtype(program.avals[v].dtype)}
    for op in program.ops:
        if op.primitive == "random_wrap" and op.invars[0] in program.inputs:
            out.setdefault(op.invars[0], op.eqn.params["impl"])
    return out


def fold_key(key: Any, index: Any, impl: Any = None) -> Any:
    """``fold_in(key, index)`` for every key of a (typed, or raw with ``impl``) key array."""
    typed = key if impl is None else jax.random.wrap_key_data(key, impl=impl)
    flat = typed.reshape(-1)
    folded = jax.vmap(lambda k: jax.random.fold_in(k, index))(flat).reshape(typed.shape)
    return folded if impl is None else jax.random.key_data(folded)


def first_microbatch(data_axis: str | None, m: int) -> Any:
    """Inside the pipeline's shard_map: the global index of this replica's microbatch 0."""
    return jax.lax.axis_index(data_axis) * m if data_axis else 0


def per_microbatch(
    keys: Mapping[int, Any], ids: Sequence[int], values: Sequence[Any], index: Any
) -> list[Any]:
    """The input ``values`` (of the input ids ``ids``) as microbatch ``index`` sees them."""
    return [
        fold_key(x, index, keys[v]) if v in keys else x for v, x in zip(ids, values, strict=True)
    ]


def _depends_on_inputs(program: Program) -> set[int]:
    dep = set(program.invars)
    for op in program.ops:
        if any(isinstance(a, int) and a in dep for a in op.invars):
            dep.update(op.outvars)
    return dep


def _draws_inside(eqn: Any) -> bool:
    """Does a higher-order equation (scan, remat, custom_vjp, ...) draw random numbers?"""
    for sub in _subjaxprs(eqn):
        for e in sub.eqns:
            if e.primitive.name in DRAWS or _draws_inside(e):
                return True
    return False


def _subjaxprs(eqn: Any) -> Iterator[Any]:
    for p in eqn.params.values():
        for x in p if isinstance(p, (tuple, list)) else (p,):
            inner = getattr(x, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                yield inner
            elif hasattr(x, "eqns"):
                yield x


def constant_key_draws(program: Program) -> list[str]:
    """Where (operator provenance) random numbers are drawn from a key that depends on no
    argument of the function."""
    dep = _depends_on_inputs(program)
    found = []
    for op in program.ops:
        keys = [a for a in op.invars if isinstance(a, int) and is_key_dtype(program.avals[a].dtype)]
        draws = op.primitive in DRAWS or (op.eqn is not None and _draws_inside(op.eqn))
        if draws and keys and not any(a in dep for a in keys):
            found.append(op.where or op.primitive)
    return found
