"""Decode-state pass: which values of a decode step are its state, and where each one lives.

A decode step ``step(params, cache, tokens, positions) -> (logits, cache)`` takes and returns
state: leaf k of the returned cache is the new value of leaf k of the given one. This pass

- finds the state pairs (input leaf → output value) and checks the step returns its state
  with the same structure, shapes and dtypes (`find_state`), and that the logits are
  ``(rows, vocab)``;
- gives the stage search a program whose only output is the logits (`planning_program`), so
  the new cache values are not counted as live to the end and forwarded through every later
  stage: they stay where they are made;
- assigns each leaf to its *home* stage, the one stage whose operators read it and make its
  new value (`home_stages`); a leaf read by two stages is refused with the stage numbers;
- lays the leaves out like parameters (`cache_layout`): slots of equal shape aligned across
  stages (`passes.param_layout`), slot k one ``(p, groups, rows, ...)`` array sharded over the
  pipeline axis, row s holding stage s's leaf of that slot, so every device holds only its
  stage's caches, for every request group;
- prices the caches for the stage search (`cache_layer_bytes`): the bytes of each leaf, for
  all groups, charged to the layer that reads it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from autopipe.passes.ir import Program
from autopipe.passes.layout import Split, StageLayout
from autopipe.passes.param_layout import ParamLayout, param_layout
from autopipe.passes.trace import ArgSpec

PARAMS, CACHE, TOKENS, POSITIONS = range(4)  # the decode step's arguments


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeState:
    """The state pairs of a decode step's program (value ids)."""

    cache_in: tuple[int, ...]  # per cache leaf (flat order): the input value
    cache_out: tuple[int, ...]  # per cache leaf: the value the step returns for it
    paths: tuple[str, ...]  # per cache leaf: "cache['block_0']['k']"-style path
    tokens: int
    positions: int
    logits: int

    def out_of(self) -> dict[int, int]:
        return dict(zip(self.cache_in, self.cache_out, strict=True))


def find_state(spec: ArgSpec, out_tree: Any, program: Program, fn_name: str) -> DecodeState:
    """The state pairs of ``program`` (traced from ``step(params, cache, tokens, positions)``);
    a clear error when the step does not return ``(logits, cache)`` with the cache unchanged
    in structure, shapes and dtypes."""
    leaves = spec.arg_leaves()
    cache_leaves = leaves[CACHE]
    cache_tree = jax.tree.structure(jax.tree.unflatten(spec.in_tree, range(len(spec.in_avals)))[1])
    outs = jax.tree.unflatten(out_tree, range(len(program.outvars)))
    if not (isinstance(outs, tuple | list) and len(outs) == 2):
        raise ValueError(_NOT_STATE.format(fn=fn_name, got=f"an output with structure {out_tree}"))
    got = jax.tree.structure(outs[1])
    if got != cache_tree:
        raise ValueError(
            _NOT_STATE.format(fn=fn_name, got=f"a second output with structure {got}")
            + f" The cache argument has structure {cache_tree}."
        )
    logits = program.outvars[outs[0]] if isinstance(outs[0], int) else None
    _check_logits(program, logits, fn_name)
    paths = tuple(spec.in_paths[i].replace("args[1]", "cache", 1) for i in cache_leaves)
    cache_in = tuple(program.invars[i] for i in cache_leaves)
    cache_out = tuple(program.outvars[k] for k in jax.tree.leaves(outs[1]))
    for path, v, w in zip(paths, cache_in, cache_out, strict=True):
        _check_pair(program, path, v, w, fn_name)
    return DecodeState(
        cache_in=cache_in,
        cache_out=cache_out,
        paths=paths,
        tokens=program.invars[leaves[TOKENS][0]],
        positions=program.invars[leaves[POSITIONS][0]],
        logits=logits,
    )


_NOT_STATE = (
    "{fn}: a decode step must return (logits, cache), the new cache with the same structure as "
    "the cache argument, but it returns {got}. Return the updated cache as the second output "
    "(for linen: model.apply(..., mutable=['cache']) returns it in its second output)."
)


def _check_logits(program: Program, logits: Any, fn_name: str) -> None:
    shape = tuple(program.avals[logits].shape) if isinstance(logits, int) else ()
    aval = program.avals[logits] if isinstance(logits, int) else None
    if aval is None or len(shape) != 2 or not jax.numpy.issubdtype(aval.dtype, jax.numpy.floating):
        raise ValueError(
            f"{fn_name}: the first output of a decode step must be float logits of shape "
            f"(rows, vocab), one row per token; got shape {shape}. For (rows, 1, vocab) "
            "logits return logits[:, -1]."
        )


def _check_pair(program: Program, path: str, v: int, w: Any, fn_name: str) -> None:
    a = program.avals[v]
    b = program.avals[w] if isinstance(w, int) else None
    if b is None or (tuple(a.shape), a.dtype) != (tuple(b.shape), b.dtype):
        got = "a constant" if b is None else f"{tuple(b.shape)} {b.dtype}"
        raise ValueError(
            f"{fn_name}: the returned {path} is {got}, but the given one is {tuple(a.shape)} "
            f"{a.dtype} (shapes at one request group's rows). A decode step must return every "
            "cache leaf with its shape and dtype (write new entries with .at[...].set or "
            "dynamic_update_slice)."
        )
    if w not in program.batch_dependent:
        raise ValueError(
            f"{fn_name}: the returned {path} does not depend on the given cache or tokens; "
            "return the updated cache leaf itself."
        )


def planning_program(program: Program, state: DecodeState) -> Program:
    """``program`` with the logits as its only output (the stage search's view)."""
    return dataclasses.replace(program, outvars=(state.logits,))


def home_stages(
    program: Program, layouts: Sequence[StageLayout], state: DecodeState, fn_name: str
) -> tuple[int, ...]:
    """Per cache leaf: the one stage that reads it and makes its new value."""
    readers: dict[int, set[int]] = {v: set() for v in state.cache_in}
    makers: dict[int, int] = {}
    for s, lay in enumerate(layouts):
        for i in lay.ops:
            op = program.ops[i]
            for a in op.invars:
                if isinstance(a, int) and a in readers:
                    readers[a].add(s)
            makers.update((v, s) for v in op.outvars)
    homes = []
    for path, v, w in zip(state.paths, state.cache_in, state.cache_out, strict=True):
        stages = readers[v] | ({makers[w]} if w in makers else set())
        if not stages:  # neither read nor changed: keep it on the first stage
            stages = {0}
        if len(stages) != 1:
            raise ValueError(
                f"{fn_name}: {path} is read or written by stages {sorted(stages)}; a cache leaf "
                "must be read and updated by one stage (the layer that owns it). Read it only "
                "in the layer that writes it, or plan with fewer stages."
            )
        homes.append(stages.pop())
    return tuple(homes)


def cache_layout(
    program: Program,
    state: DecodeState,
    homes: Sequence[int],
    num_stages: int,
    dims: Mapping[int, int | None] | None = None,
) -> ParamLayout:
    """Slots of the cache leaves (one group's rows each), aligned by shape (and by the dim
    ``dims`` splits over the tensor axis) across stages."""
    pairs = list(zip(state.cache_in, homes, strict=True))
    groups = [[v for v, h in pairs if h == s] for s in range(num_stages)]
    dims = {v: d for v, d in (dims or {}).items() if v in state.cache_in and d is not None}
    return param_layout(program, groups, by="shape", budget=None, dims=dims)


def cache_layer_bytes(
    program: Program,
    split: Split,
    layers: Sequence[int],
    state: DecodeState,
    groups: int,
    scale: Mapping[int, float] | None = None,
) -> np.ndarray:
    """Per layer: bytes of the cache leaves its operators read first, for all ``groups``, a
    leaf's bytes times ``scale[leaf]`` (1/tp for a leaf split over the tensor axis)."""
    out = np.zeros(len(layers) - 1)
    first: dict[int, int] = {}
    for k, i in enumerate(split.pipeline):
        for a in program.ops[i].invars:
            if isinstance(a, int) and a in state.cache_in:
                first.setdefault(a, k)
    for v, k in first.items():
        layer = next(j for j, (a, b) in enumerate(itertools.pairwise(layers)) if a <= k < b)
        out[layer] += groups * program.nbytes(v) * (scale or {}).get(v, 1.0)
    return out
