"""Tensor-sharding search: tensor parallelism inside stages, priced per layer for the stage
search.

The program's pipeline operators are cut into *sharding segments* (`passes.tensor_segments`)
at points where a single value is live (the residual stream between transformer blocks, the
activation between layers of a chain). Each segment is one exact sharding problem
(`passes.sharding.solve`): the value at each segment boundary, batch inputs, program outputs
and parameters read by more than one segment are replicated over the tensor axis;
inside a segment the solver picks every operator's strategy (column/row-parallel matmuls,
heads, ...) and every parameter's split. Identical segments (repeated blocks) share one solve
through a structural signature.

The stage search then sees additive per-layer costs: a layer's time is the sum of its operators'
times under their strategies plus the collectives attributed to them (an operator's own, and
the reshards of the values it makes), and a stage boundary that cuts a split value pays the
all-gather that sends it whole to the next stage.

Memo: `ShardingCache` holds what calls on one program reuse (operator costs, segments, their
solutions), keyed by all a value depends on (hardware, tensor axis and link, tp, memory price).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from autopipe.cost_models import comm
from autopipe.cost_models.hardware import Hardware, Link
from autopipe.cost_models.rules import compute_time, memory_time, op_time
from autopipe.passes import sharding
from autopipe.passes.graph import op_cost
from autopipe.passes.ir import Program
from autopipe.passes.layout import Split, live_across
from autopipe.passes.tensor_segments import (
    fixed_values,
    layer_ops,
    local_readers,
    sharding_segments,
)

OpParts = tuple[float, float, float, float]  # compute s, memory s, overhead s, whole bytes
Segment = tuple[list[int], dict[int, None], Any]  # operators, fixed values, signature


@dataclasses.dataclass(frozen=True, kw_only=True)
class SolvedKey:
    """Everything a solved segment depends on besides its structure (the signature)."""

    signature: Any
    tp: int
    lean: bool
    held: float  # bytes held per parameter byte (see `shard_layers`)
    hardware: Hardware
    link: Link | None  # the tensor axis's: the mesh matters to prices only through it
    tensor_axis: str | None
    backward: bool = False


@dataclasses.dataclass(kw_only=True)
class ShardingCache:
    """Reused by `shard_layers` calls on ONE program (create one per program)."""

    readers: dict[int, list[int]] | None = None  # local op → the ops reading its results
    live: list | None = None  # values live across each pipeline cut
    segments: list[Segment] | None = None
    parts: dict[Hardware, dict[int, OpParts]] = dataclasses.field(default_factory=dict)
    # (tp, hardware) → (op, strategy) → seconds
    priced: dict[tuple[int, Hardware], dict] = dataclasses.field(default_factory=dict)
    solved: dict[SolvedKey, Any] = dataclasses.field(default_factory=dict)
    placed: dict[tuple[SolvedKey, tuple[int, ...]], Any] = dataclasses.field(default_factory=dict)
    choices: dict[tuple, int] = dataclasses.field(default_factory=dict)  # a solution's choices → №
    sharded: dict[tuple, LayerShardings] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerShardings:
    """The tensor-parallel plan of every layer for one tensor-axis size ``tp``."""

    tp: int
    lean: bool  # priced parameter memory (see `shard_layers`)
    times: tuple[float, ...]  # per layer: seconds per microbatch (compute + collectives)
    cut_times: tuple[float, ...]  # per boundary between layers: all-gathers of split values
    cut_gathers: tuple[float, ...]  # per boundary: their bytes per device (shards)
    dims: Mapping[int, int | None]  # value id → dimension split over the tensor axis
    collectives: tuple[tuple[tuple[str, float], ...], ...]  # per layer: (kind, bytes/device)
    # training (``backward``): per layer, the backward pass's conjugate collectives
    backward_collectives: tuple[tuple[tuple[str, float], ...], ...] = ()
    strategies: tuple[tuple[str, ...], ...]  # per layer: strategy name per operator
    op_strategies: Mapping[int, sharding.Strategy]  # op index → its strategy (what emit runs)
    unruled: frozenset[str] = frozenset()  # primitives replicated for want of a strategy rule
    # values other segments (or the outputs) read whole: a split one is gathered where it is made
    whole: frozenset[int] = frozenset()

    def param_scale(self, values: Sequence[int]) -> dict[int, float]:
        return {v: 1.0 / self.tp for v in values if self.dims.get(v) is not None}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Pricing:
    """Per-operator and per-collective prices of one (program, hardware, mesh, tp) call."""

    program: Program
    cache: ShardingCache
    hw: Hardware
    mesh_axes: tuple[tuple[str, int], ...]
    tensor_axis: str | None
    tp: int
    held: float = 1.0
    pipeline: int = 1

    def spread(self, holders: int) -> float:
        """Pipeline devices allocating a leaf's bytes per device holding it: the parameter
        layout's slots are as large on every device, so a leaf only ``holders`` stages hold (an
        embedding only the first stage reads) pads the slot on the others."""
        return self.pipeline / min(self.pipeline, max(holders, 1))

    @functools.cached_property
    def _parts(self) -> dict[int, OpParts]:
        return self.cache.parts.setdefault(self.hw, {})

    @functools.cached_property
    def _priced(self) -> dict[tuple[int, sharding.Strategy], float]:
        return self.cache.priced.setdefault((self.tp, self.hw), {})

    def parts(self, i: int) -> OpParts:
        got = self._parts.get(i)
        if got is None:
            cost = op_cost(self.program, self.program.ops[i])
            c, m = compute_time(cost, self.hw), memory_time(cost, self.hw)
            whole = sharding.replicated(self.program.ops[i])
            got = self._parts[i] = (
                c,
                m,
                op_time(cost, self.hw) - max(c, m),
                sharding.local_bytes(self.program, i, whole, 1),
            )
        return got

    def time_of(self, i: int, strategy: sharding.Strategy) -> float:
        """Roofline of one device's share: its part of the arithmetic, and the bytes of the
        operands and results it holds (a replicated weight is read whole)."""
        got = self._priced.get((i, strategy))
        if got is None:
            c, m, overhead, nbytes = self.parts(i)
            local = (
                sharding.local_bytes(self.program, i, strategy, self.tp) / nbytes if nbytes else 1.0
            )
            got = self._priced[i, strategy] = overhead + max(
                c * strategy.compute_fraction, m * local
            )
        return got

    @functools.cached_property
    def link(self) -> Link | None:
        return self.hw.axis_link(self.mesh_axes, self.tensor_axis) if self.tp > 1 else None

    def comm_time(self, kind: str, nbytes: float) -> float:  # `sharding.solve` memoizes it
        return comm.collective_time(kind, nbytes, self.tensor_axis, self.mesh_axes, self.hw)

    def store_cost(self, v: int, dim: int | None) -> float:
        held = self.held * self.program.nbytes(v) / (1 if dim is None else self.tp)
        return held / self.link.bandwidth


def shard_layers(
    program: Program,
    split: Split,
    layers: Sequence[int],
    hw: Hardware,
    mesh_axes: Sequence[tuple[str, int]],
    tensor_axis: str | None,
    cache: ShardingCache | None = None,
    lean: bool = False,
    *,
    held: float = 1.0,
    pipeline: int = 1,
    free: frozenset[int] = frozenset(),
    pinned: Mapping[int, Any] | None = None,
    backward: bool = False,
) -> LayerShardings:
    """Every operator's sharding for the tensor axis of `mesh_axes` (tp = 1 without one), and
    the resulting per-layer costs. ``cache``: a `ShardingCache` shared by calls on the same
    program (operator costs, segments and solved segments are reused).

    The default minimises time alone: a weight may stay whole on every device when splitting it
    would cost more communication than compute it saves. ``lean`` adds a memory price: holding
    a byte of parameter on a device costs the time to send that byte over the tensor link, so
    a weight is split whenever the communication its split causes per microbatch is smaller
    than the weight itself (big matmul weights are, small norms and biases are not).
    ``held``: bytes a device holds per parameter byte it holds: 1 for a forward plan, in
    training the parameter, its gradient and the optimizer state (Adam: 4). ``pipeline``:
    devices on the pipeline axis, each with slots as large (`_Pricing.spread`).

    ``free``: batch inputs whose split the solver chooses, as for a parameter (a decode step's
    caches); ``pinned``: values held on a given Dim (value → Dim; a cache and its new value on
    one). Both enter the segments' fixed values, so a ``cache`` must not be shared with calls
    that pass others. ``backward``: a training step's shardings, priced with the backward
    pass's conjugate collectives (`passes.sharding.solve`)."""
    mesh_axes = tuple(mesh_axes)
    tp = dict(mesh_axes).get(tensor_axis, 1) if tensor_axis else 1
    cache = ShardingCache() if cache is None else cache
    price = _Pricing(
        program=program,
        cache=cache,
        hw=hw,
        mesh_axes=mesh_axes,
        tensor_axis=tensor_axis,
        tp=tp,
        held=held,
        pipeline=pipeline,
    )
    per_layer = layer_ops(program, split, layers, _readers(program, split, cache))
    if tp == 1:
        return _unsplit(price, per_layer, lean)
    for i in (i for ops in per_layer for i in ops):
        price.parts(i)  # operator costs in layer order, as the solver will read them
    segments = _segments(program, split, cache, free, pinned)
    segments = _with_shared(program, segments, _shared_dims(price, segments, lean, backward))
    copies = collections.Counter(sig for _, _, sig in segments)
    placed = [_solved(price, seg, lean, backward, copies[seg[2]]) for seg in segments]
    # prices that differ only where no choice does (one stage's embedding priced at pp 2 and
    # at pp 8, both split) give the same shardings
    key = (tuple(layers), tp, hw, price.link, tensor_axis, lean, backward, *(c for *_, c in placed))
    if key not in cache.sharded:
        cache.sharded[key] = _assembled(price, per_layer, layers, segments, placed, lean, backward)
    return cache.sharded[key]


def _assembled(
    price: _Pricing, per_layer, layers, segments, placed, lean: bool, backward: bool
) -> LayerShardings:
    """The per-layer shardings and costs of the ``placed`` solutions of ``segments``."""
    program, tp = price.program, price.tp
    dims, chosen, charged, back, unruled = _merged(program, segments, placed)
    whole = frozenset(v for _, fixed, _ in segments for v, d in fixed.items() if d is None)
    colls = _per_layer(charged, per_layer)
    times = tuple(
        sum(price.time_of(i, chosen[i]) for i in ops)
        + sum(price.comm_time(kind, nbytes) for kind, nbytes in layer_colls)
        for ops, layer_colls in zip(per_layer, colls, strict=True)
    )
    live = price.cache.live
    shards = [
        [program.nbytes(v) / tp for v in live[k] if dims.get(v) is not None] for k in layers[1:-1]
    ]
    return LayerShardings(
        tp=tp,
        lean=lean,
        times=times,
        cut_times=tuple(sum(price.comm_time("all_gather", b) for b in cut) for cut in shards),
        cut_gathers=tuple(float(sum(cut)) for cut in shards),
        dims=dims,
        collectives=colls,
        backward_collectives=_per_layer(back, per_layer) if backward else (),
        strategies=tuple(tuple(chosen[i].name for i in ops) for ops in per_layer),
        op_strategies=chosen,
        unruled=unruled,
        whole=whole,
    )


def _unsplit(price: _Pricing, per_layer: Sequence[Sequence[int]], lean: bool) -> LayerShardings:
    """Every layer whole (no tensor axis)."""
    return LayerShardings(
        tp=1,
        lean=lean,
        times=tuple(sum(time_of_whole(price.parts(i)) for i in ops) for ops in per_layer),
        cut_times=tuple(0.0 for _ in per_layer[1:]),
        cut_gathers=tuple(0.0 for _ in per_layer[1:]),
        dims={},
        collectives=tuple(() for _ in per_layer),
        strategies=tuple(tuple("replicated" for _ in ops) for ops in per_layer),
        op_strategies={},
    )


def _per_layer(table: Mapping[int, list], per_layer: Sequence[Sequence[int]]) -> tuple:
    """Per layer, its operators' entries of ``table`` (op → list) in operator order."""
    return tuple(tuple(c for i in ops for c in table.get(i, ())) for ops in per_layer)


def _readers(program: Program, split: Split, cache: ShardingCache) -> dict[int, list[int]]:
    if cache.readers is None:
        cache.readers = local_readers(program, split)
    return cache.readers


def _segments(
    program: Program, split: Split, cache: ShardingCache, free=frozenset(), pinned=None
) -> list[Segment]:
    if cache.live is None:
        cache.live = live_across(program, split)
    if cache.segments is None:
        bounds = sharding_segments(program, split, live=cache.live)
        per_seg = layer_ops(program, split, bounds, _readers(program, split, cache))
        cache.segments = [
            (ops, fixed, sharding.signature(program, ops, fixed))
            for ops, fixed in zip(
                per_seg, fixed_values(program, per_seg, free, pinned), strict=True
            )
        ]
    return cache.segments


def _shared_params(program: Program, segments: Sequence[Segment]) -> list[int]:
    """Parameters several segments read (a tied embedding: the lookup and the output head),
    which `fixed_values` holds whole."""
    made = {v for ops, _, _ in segments for i in ops for v in program.ops[i].outvars}
    reads = collections.Counter(
        v for _, fixed, _ in segments for v, d in fixed.items() if d is None
    )
    outs = set(program.outvars)
    return sorted(
        v
        for v, n in reads.items()
        if n > 1 and v not in made and v not in outs and v not in program.batch_dependent
    )


def _with_shared(
    program: Program, segments: Sequence[Segment], shared: Mapping[int, Any]
) -> list[Segment]:
    """``segments`` with each value of ``shared`` held on its Dim where they fix it."""
    out = []
    for ops, fixed, signature in segments:
        if any(v in fixed for v in shared):
            fixed = {**fixed, **{v: d for v, d in shared.items() if v in fixed}}
            signature = sharding.signature(program, ops, fixed)
        out.append((ops, fixed, signature))
    return out


def _shared_dims(
    price: _Pricing, segments: Sequence[Segment], lean: bool, backward: bool
) -> dict[int, Any]:
    """The Dim each shared parameter is held on, one parameter at a time: the one minimising the
    time of the segments that read it plus, ``lean``, the price of holding it. A tied
    embedding held split on its vocab dim is Megatron's vocab-parallel lookup and head."""
    program, chosen = price.program, {}
    for v in _shared_params(program, segments):
        best = None
        readers = sum(v in seg[1] for seg in segments)
        for d in sharding.value_dims(program, v, price.tp):
            trial = _with_shared(program, segments, {**chosen, v: d})
            copies = collections.Counter(sig for _, _, sig in trial)
            read = [seg for seg in trial if v in seg[1]]
            t = sum(_solved(price, s, lean, backward, copies[s[2]])[0].time for s in read)
            t += price.spread(readers) * price.store_cost(v, d) if lean else 0.0
            if best is None or t < best[0]:
                best = (t, d)
        if best[1] is not None:
            chosen[v] = best[1]
    return chosen


def _solved(
    price: _Pricing, segment: Segment, lean: bool, backward: bool, copies: int = 1
) -> tuple[sharding.Sharding, tuple[tuple[int, str, float], ...], int]:
    """One segment solved, each structure once (`ShardingCache.solved`): its solution, its
    backward conjugates when ``backward`` and the number of its choices (equal for solutions
    that choose alike); ``copies``: segments of its structure (`_Pricing.spread`)."""
    ops, fixed, signature = segment
    spread = price.spread(copies)
    key = SolvedKey(
        signature=signature,
        tp=price.tp,
        lean=lean,
        held=price.held * spread if lean else 0.0,
        hardware=price.hw,
        link=price.link,
        tensor_axis=price.tensor_axis,
        backward=backward,
    )
    if key not in price.cache.solved:
        price.cache.solved[key] = sharding.solve(
            price.program,
            ops,
            tp=price.tp,
            fixed=fixed,
            op_time=price.time_of,
            comm_time=price.comm_time,
            store_cost=(lambda v, d: spread * price.store_cost(v, d)) if lean else None,
            backward=backward,
        )
    placed = price.cache.placed.get((key, tuple(ops)))
    if placed is None:
        sol = price.cache.solved[key]
        sol = sol if tuple(sol.ops) == tuple(ops) else sharding.transfer(sol, price.program, ops)
        conj = tuple(_conjugates(price.program, sol)) if backward else ()
        choice = (*sorted(sol.dims.items()), *(sol.strategies[i] for i in ops), *sol.collectives)
        choice = price.cache.choices.setdefault(choice, len(price.cache.choices))
        placed = price.cache.placed[key, tuple(ops)] = (sol, conj, choice)
    return placed


def _merged(program: Program, segments: Sequence[Segment], placed):
    """(value → split dim, op → strategy, op → its collectives, op → its backward conjugate
    collectives, unruled primitives) over every sharding segment's ``placed`` solution."""
    dims: dict[int, int | None] = {}
    chosen: dict[int, sharding.Strategy] = {}
    charged: dict[int, list[tuple[str, float]]] = {}  # op → its collectives
    back: dict[int, list[tuple[str, float]]] = {}  # op → its backward conjugates
    unruled: set[str] = set()
    for (ops, _, _), (sol, conjugates, _) in zip(segments, placed, strict=True):
        dims.update(sol.dims)
        unruled |= sol.unruled
        chosen.update(sol.strategies)
        made = {v: i for i in ops for v in program.ops[i].outvars}
        for kind, v, nbytes in sol.collectives:
            i = made[v] if v in made else _first_reader(program, ops, v)
            charged.setdefault(i, []).append((kind, nbytes))
        for i, kind, nbytes in conjugates:
            back.setdefault(i, []).append((kind, nbytes))
    return dims, chosen, charged, back, frozenset(unruled)


def _conjugates(program: Program, sol: sharding.Sharding) -> list[tuple[int, str, float]]:
    """(op, kind, bytes per device) of the backward collectives `sharding.solve` prices for a
    training step: an all-gather's reduce-scatter, an all-to-all moved back, and the all-reduce
    of each replicated differentiated value that a varying strategy reads (at its first such
    reader); an all-reduce's cotangent needs none."""
    made = {v: i for i in sol.ops for v in program.ops[i].outvars}
    out = []
    for kind, v, _ in sol.collectives:
        conj = sharding.BACKWARD_CONJUGATE.get(kind)
        if conj is not None:
            i = made[v] if v in made else _first_reader(program, sol.ops, v)
            out.append((i, conj, sharding.collective_bytes(conj, program.nbytes(v), sol.tp)))
    summed = set()
    for i in sol.ops:
        if not sol.strategies[i].varies:
            continue
        for a in program.ops[i].invars:
            if not isinstance(a, int) or a in summed or sol.dims.get(a, 0) is not None:
                continue
            if a in program.differentiated:
                summed.add(a)
                out.append((i, "all_reduce", float(program.nbytes(a))))
    return out


def time_of_whole(parts: tuple[float, float, float, float]) -> float:
    c, m, overhead, _ = parts
    return overhead + max(c, m)


def _first_reader(program: Program, ops: Sequence[int], v: int) -> int:
    return next(i for i in ops if v in program.ops[i].invars)
