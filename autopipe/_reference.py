"""`microbatch_reference`: a function computed the way a pipeline computes it, on one device.

A pipeline runs ``fn`` once per microbatch, and every PRNG key input (`autopipe.passes.inputs`)
is folded with the microbatch's global index: microbatch j sees ``jax.random.fold_in(key, j)``.
This is that loop, in plain JAX (differentiable, jittable): the reference a pipelined plan's
outputs, losses and gradients equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from autopipe.passes.graph import build_program
from autopipe.passes.inputs import fold_key, input_leaves, key_inputs
from autopipe.passes.trace import _flat_fn, trace


def microbatch_reference(
    fn: Callable,
    *args: Any,
    num_microbatches: int,
    batch_argnums: Sequence[int] = (1,),
) -> list[Any]:
    """``fn`` on each microbatch, as a pipeline runs it: the leaves of the batch arguments are
    cut into ``num_microbatches`` consecutive row blocks (with d data replicas and m microbatches
    each, ``num_microbatches = d · m`` and replica r's microbatch j is block ``r · m + j``),
    and call j gets every PRNG key input — a typed key among the non-batch arguments, or a raw
    uint32 key in an argument without float leaves — as ``jax.random.fold_in(key, j)``.
    Returns the per-microbatch results in block order: concatenate outputs, or for a mean loss
    take ``sum(losses) / num_microbatches`` (gradients of it accumulate like the pipeline's)."""
    traced = trace(fn, args, batch_argnums=batch_argnums, num_microbatches=num_microbatches)
    spec = traced.spec
    program = build_program(traced.jaxpr, spec.batch_leaves, input_leaves(spec, training=False))
    position = {v: i for i, v in enumerate(program.invars)}
    keys = {position[v]: impl for v, impl in key_inputs(program).items()}
    _, leaves = spec.flatten(args)
    rows = traced.microbatch_size
    flat = _flat_fn(fn, spec)
    outs = []
    for j in range(num_microbatches):
        call = [
            x[j * rows : (j + 1) * rows] if batch else x
            for x, batch in zip(leaves, spec.batch_leaves, strict=True)
        ]
        for i, impl in keys.items():
            call[i] = fold_key(call[i], j, impl)
        outs.append(flat(*call))
    return outs
