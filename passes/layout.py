"""Layout pass: what each stage computes, holds and exchanges, given stage boundaries.

Operators split three ways:
  - *pipeline ops* depend on the batch; they are ordered and cut into stages;
  - *hoisted ops* depend on parameters only and do not grow the data (slices of stacked layer
    weights, reshapes, casts, transposes). They run once when parameters are placed, so each
    stage stores exactly the values it reads — e.g. only its own rows of an ``nn.scan`` stack;
  - *local param ops* depend on parameters only but would grow the data (broadcasts, iota,
    masks); they are recomputed inside every stage that needs them.

For stages given as ranges of pipeline ops, `stage_layouts` derives per stage: its operators, the
parameter values placed on it, and the batch-dependent values it receives from the previous
stage and sends to the next (values that skip stages are forwarded through each one). Boundary
values are packed into one flat buffer per dtype, padded to the largest boundary.

Parameters get a `ParamLayout` (`param_layout`): every placed value is its own array, read
whole. Values of equal dtype and size (or equal shape) are aligned across devices into *slots*:
slot k is one ``(p, *shape)`` array sharded over the pipeline axis whose row d holds device d's
k-th value of that class (zeros where a device has fewer). A device reads ``slot[0]`` (reshaped
to the value's shape, a bitcast), which XLA feeds to its GEMMs in place; a slice of a larger
buffer would be copied on every read (measured: 69 MB of temporaries for 67 MB of weights with
one flat buffer per stage, 0.66 MB with slots). Identical blocks align perfectly; padding is
only where a device holds fewer values of a class than another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from autopipe.cost_models.rules import nbytes
from autopipe.passes.ir import PIECES, Program
from autopipe.passes.trace import is_key_dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class Slot:
    value: int
    offset: int
    size: int  # elements in the buffer
    shape: tuple[int, ...]
    key: Any = None  # a typed PRNG key dtype: the value travels as its key data (uint32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlatLayout:
    """Values packed into one flat buffer per dtype: ``slots[dtype]`` in buffer order."""

    slots: tuple[tuple[str, tuple[Slot, ...]], ...]

    def sizes(self) -> dict[str, int]:
        return {dt: sum(s.size for s in slots) for dt, slots in self.slots}

    def values(self) -> tuple[int, ...]:
        return tuple(s.value for _, slots in self.slots for s in slots)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Split:
    """Classification of a program's operators (positions in `program.ops`)."""

    pipeline: tuple[int, ...]
    hoisted: frozenset[int]
    local: frozenset[int]  # local param ops


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageLayout:
    ops: tuple[int, ...]  # positions in program.ops, program order (pipeline + local param ops)
    params: tuple[int, ...]  # parameter values placed on this stage (whole or tensor-split)
    recv: FlatLayout  # batch values arriving from the previous stage
    send: FlatLayout  # batch values leaving for the next stage
    param_bytes: int  # bytes of the stage's own parameter values (whole)
    device_param_bytes: int = -1  # bytes one device holds (its shard of the split values)
    inputs: tuple[int, ...] = ()  # non-batch inputs the stage reads (`passes.inputs`)


def split_ops(program: Program, *, training: bool = False) -> Split:
    """Classifies operators. For training only pieces (``index``: rows of stacked layer
    weights; ``block``: blocks of fused projections) are hoisted, so every placed value is a
    parameter or a piece of one and gradients with respect to placed values are gradients of
    the parameters; consts are not placed."""
    pre = set(program.param_invars)  # inputs change per microbatch (keys): never hoisted
    if not training:
        pre |= set(placed_consts(program))
    pipeline, hoisted, local = [], set(), set()
    for i, op in enumerate(program.ops):
        if program.is_batch_op(op):
            pipeline.append(i)
            continue
        ins = [a for a in op.invars if isinstance(a, int)]
        grows = sum(program.nbytes(v) for v in op.outvars) > sum(program.nbytes(v) for v in ins)
        effects = op.eqn is not None and bool(op.eqn.effects)
        hoist = op.kind in PIECES if training else not grows and not effects
        if ins and all(v in pre for v in ins) and hoist:
            hoisted.add(i)
            pre.update(op.outvars)
        else:
            local.add(i)
    return Split(pipeline=tuple(pipeline), hoisted=frozenset(hoisted), local=frozenset(local))


def placed_consts(program: Program) -> list[int]:
    """Constants placed like parameters in forward plans: all but PRNG keys (slots cannot
    hold them; every stage reads a key constant from the program, `passes.emit`)."""
    return [v for v, _ in program.consts if not is_key_dtype(program.avals[v].dtype)]


def placed_sources(program: Program, split: Split, *, training: bool = False) -> frozenset[int]:
    """Values available before the pipeline runs: raw parameters, constants, hoisted values."""
    raw = set(program.param_invars)
    if not training:
        raw |= set(placed_consts(program))
    return frozenset(raw | {v for i in split.hoisted for v in program.ops[i].outvars})


def _local_closure(program: Program, split: Split, ops: Sequence[int]) -> list[int]:
    """`ops` plus the local param ops they need, in program order."""
    producer = program.producers()
    needed, stack = set(ops), list(ops)
    while stack:
        for a in program.ops[stack.pop()].invars:
            j = producer.get(a) if isinstance(a, int) else None
            if j is not None and j in split.local and j not in needed:
                needed.add(j)
                stack.append(j)
    return sorted(needed)


def flat_layout(program: Program, values: Sequence[int]) -> FlatLayout:
    """`values` packed end to end into one flat buffer per dtype."""
    return packed({v: program.avals[v] for v in sorted(set(values))})


def packed(avals: Mapping[int, Any]) -> FlatLayout:
    """Values (key → aval, in order) packed end to end into one flat buffer per dtype."""
    by_dtype: dict[str, list[Slot]] = {}
    for v, aval in avals.items():
        key = aval.dtype if is_key_dtype(aval.dtype) else None
        data = jax.eval_shape(jax.random.key_data, aval) if key is not None else aval
        slots = by_dtype.setdefault(str(np.dtype(data.dtype)), [])
        offset = slots[-1].offset + slots[-1].size if slots else 0
        size = int(np.prod(data.shape, dtype=np.int64))
        slot = Slot(value=v, offset=offset, size=size, shape=tuple(aval.shape), key=key)
        slots.append(slot)
    return FlatLayout(slots=tuple((dt, tuple(s)) for dt, s in sorted(by_dtype.items())))


def live_across(program: Program, split: Split) -> list[list[int]]:
    """live[k] = batch values that must cross a cut before pipeline op k (k = 1 .. n-1).

    A value crosses cut k if it is defined by a pipeline op before k and used at or after k
    (program outputs count as used after the last op). Batch inputs are not counted: every
    stage reads them directly.
    """
    n = len(split.pipeline)
    pos = {op: k for k, op in enumerate(split.pipeline)}
    defined, last_use = {}, {}
    for k, i in enumerate(split.pipeline):
        for v in program.ops[i].outvars:
            defined[v] = k
    for i in split.pipeline:
        for a in program.ops[i].invars:
            if isinstance(a, int) and a in defined:
                last_use[a] = max(last_use.get(a, -1), pos[i])
    for a in program.outvars:
        if isinstance(a, int) and a in defined:
            last_use[a] = n
    live: list[list[int]] = [[] for _ in range(n + 1)]
    for v, d in sorted(defined.items()):
        for k in range(d + 1, last_use.get(v, d) + 1):
            if k <= n:
                live[k].append(v)
    return live


def stage_layouts(
    program: Program,
    split: Split,
    boundaries: Sequence[int],
    *,
    training: bool = False,
    dims: Mapping[int, int | None] | None = None,
    tp: int = 1,
) -> tuple[StageLayout, ...]:
    """Layouts of the stages holding pipeline ops [boundaries[s], boundaries[s+1]).

    ``dims`` (tensor parallelism of degree ``tp``): the dimension of each placed value split
    over the tensor axis (`StageLayout.device_param_bytes` counts one shard of those)."""
    dims = {} if dims is None or tp == 1 else dims
    live = live_across(program, split)
    sources = placed_sources(program, split, training=training)
    stages = []
    for s in range(len(boundaries) - 1):
        lo, hi = boundaries[s], boundaries[s + 1]
        ops = _local_closure(program, split, split.pipeline[lo:hi])
        reads = {a for i in ops for a in program.ops[i].invars if isinstance(a, int)}
        params = sorted(reads & sources)
        shard = [program.nbytes(v) // (tp if dims.get(v) is not None else 1) for v in params]
        stages.append(
            StageLayout(
                ops=tuple(ops),
                params=tuple(params),
                recv=flat_layout(program, live[lo] if s > 0 else []),
                send=flat_layout(program, live[hi] if hi < len(split.pipeline) else []),
                param_bytes=sum(program.nbytes(v) for v in params),
                device_param_bytes=sum(shard),
                inputs=tuple(sorted(reads & program.inputs)),
            )
        )
    return tuple(stages)


def buffer_sizes(layouts: Sequence[FlatLayout]) -> dict[str, int]:
    """Per dtype, the largest packed size over `layouts` (at least 1 element)."""
    sizes: dict[str, int] = {}
    for layout in layouts:
        for dt, n in layout.sizes().items():
            sizes[dt] = max(sizes.get(dt, 1), n)
    return dict(sorted(sizes.items()))


def cut_bytes(program: Program, live: Sequence[Sequence[int]]) -> list[int]:
    return [sum(nbytes(program.avals[v]) for v in vs) for vs in live]
