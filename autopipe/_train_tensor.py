"""The tensor axis in the training planner: which parameters a training step holds split
(`held_split`), the activations a device holds, a layer's time with its forward and backward
collectives (`tensor_layer_time`), and the memory-lean training shardings themselves."""

from __future__ import annotations

import dataclasses

from autopipe._front import Front
from autopipe._stage_search import shard
from autopipe.cost_models.stage_memory import SegmentBytes, segment_bytes
from autopipe.passes.layout import placed_sources
from autopipe.passes.sharding import strategies as strategies_of
from autopipe.passes.tensor_parallel import LayerShardings, ShardingCache


def segments(front: Front, layers, sh: LayerShardings) -> SegmentBytes:
    """The training memory model's per-segment bytes: activations as one device holds them,
    parameters as its shards."""
    scale = sh.param_scale(sh.dims) if sh.tp > 1 else None
    return segment_bytes(split_activations(front, sh), layers, front.program.nbytes, scale)


_VIEWS = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "squeeze", "transpose"})


def held_split(front: Front, sh: LayerShardings) -> LayerShardings:
    """The forward's shardings with parameters held split where all their readers read them
    split. The forward prices taking a block of a whole parameter as free (a local slice), but
    in training its backward gathers the blocks' gradients whole on every device (an all-gather
    per such parameter and microbatch: a column-parallel bias reshaped for broadcasting, for
    instance). So, from the last operator back: a replicated view of a parameter (reshape,
    broadcast, cast) whose results every reader takes split on one dim runs split instead (its
    rule's strategy with that result dim), and a parameter every reader takes split on one dim
    is held split: no reshard, no gather, 1/tp of the memory."""
    if sh.tp == 1:
        return sh
    prog = front.program
    strategies = dict(sh.op_strategies)
    readers: dict[int, list[int]] = {}
    for i, op in enumerate(prog.ops):
        for a in op.invars:
            if isinstance(a, int):
                readers.setdefault(a, []).append(i)

    def wanted(v: int) -> set:
        out = set()
        for i in readers.get(v, ()):
            s = strategies.get(i)
            out |= {s.ins[k] if s else None for k, a in enumerate(prog.ops[i].invars) if a == v}
        return out

    derived = set(placed_sources(prog, front.split, training=True))
    views = []
    for i, op in enumerate(prog.ops):  # views of placed values, in program order
        ins = [a for a in op.invars if isinstance(a, int)]
        if op.primitive in _VIEWS and len(op.outvars) == 1 and ins and set(ins) <= derived:
            derived.add(op.outvars[0])
            views.append(i)
    for i in reversed(views):
        s, (w,) = strategies.get(i), prog.ops[i].outvars
        ds = wanted(w)
        if (s and any(d is not None for d in (*s.ins, *s.outs))) or w in sh.whole:
            continue
        if len(ds) == 1 and None not in ds:
            got = [c for c in strategies_of(prog, i, sh.tp) if c.outs == tuple(ds)]
            if got:
                strategies[i] = got[0]
    dims = dict(sh.dims)
    for v in sorted(placed_sources(prog, front.split, training=True)):
        ds = wanted(v)
        if dims.get(v) is None and len(ds) == 1 and None not in ds:
            dims[v] = next(iter(ds))
    for i in views:  # the split views' results are held as they are made
        s = strategies.get(i)
        if s is not None:
            dims.update((w, d) for w, d in zip(prog.ops[i].outvars, s.outs, strict=True))
    return dataclasses.replace(sh, dims=dims, op_strategies=strategies)


def split_activations(front: Front, sh: LayerShardings):
    """The operator costs with each operator's results counted as one device holds them (a
    result its strategy splits: 1/tp), so residuals and working sets count shards."""
    if sh.tp == 1:
        return front.costs
    prog, c = front.program, front.costs
    acts, saved = [], []
    for k, i in enumerate(front.split.pipeline):
        s = sh.op_strategies.get(i)
        outs = s.outs if s is not None else (None,) * len(prog.ops[i].outvars)
        whole = sum(prog.nbytes(v) for v in prog.ops[i].outvars) or 1
        held = sum(
            prog.nbytes(v) / (sh.tp if d is not None else 1)
            for v, d in zip(prog.ops[i].outvars, outs, strict=True)
        )
        acts.append(int(c.act_bytes[k] * held / whole))
        saved.append(c.saved_bytes[k] * held / whole)
    return dataclasses.replace(c, act_bytes=tuple(acts), saved_bytes=tuple(saved))


def tensor_layer_time(
    sh: LayerShardings, k: int, scale: float, remat: bool, rows_scale: float, seconds
) -> float:
    """Layer k's training seconds: its sharded compute × ``scale``, its forward collectives
    (twice under remat) and their backward conjugates (as the sharding search priced them;
    the forward's again where none are recorded); ``rows_scale`` scales compute and
    collective bytes; ``seconds(kind, bytes)`` prices one collective on the tensor axis."""

    def colls(r: float, listed) -> float:
        return sum(seconds(kind, r * b) for kind, b in listed)

    fwd = sh.collectives[k]
    bwd = sh.backward_collectives[k] if sh.backward_collectives else fwd
    compute = sh.times[k] - colls(1.0, fwd)
    forward = (2 if remat else 1) * colls(rows_scale, fwd)
    return rows_scale * scale * compute + forward + colls(rows_scale, bwd)


def training_shardings(
    front: Front, layers, opt_factor: float, cache: ShardingCache | None = None, hold_split=True
) -> LayerShardings:
    """The tensor strategies of a training step, memory-lean: a device holds each parameter
    byte with its gradient and ``opt_factor`` bytes of optimizer state, so a weight is split
    wherever its split's collectives cost less than sending those bytes (Megatron splits
    every weight, its embeddings included); then `held_split` unless not ``hold_split``."""
    sh = shard(front, layers, lean=True, held=2 + opt_factor, cache=cache)
    return held_split(front, sh) if hold_split else sh
