"""Sharding segments: where the tensor search (`passes.tensor_parallel`) cuts the program into
exact sharding problems, the operators of each pipeline layer, and the values a segment must
see replicated or on a given Dim."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from autopipe.passes.ir import Program
from autopipe.passes.layout import Split, live_across

SEGMENT_OPS = 96  # fewest pipeline operators per sharding segment (more = freer, slower solve)


def local_readers(program: Program, split: Split) -> dict[int, list[int]]:
    """Local op → the ops reading its results."""
    readers: dict[int, list[int]] = {}
    made = {v: i for i in split.local for v in program.ops[i].outvars}
    for j, op in enumerate(program.ops):
        for a in op.invars:
            if isinstance(a, int) and a in made:
                readers.setdefault(made[a], []).append(j)
    return readers


def layer_ops(
    program: Program, split: Split, layers: Sequence[int], readers: Mapping[int, list[int]]
) -> list[list[int]]:
    """Operator indices per layer: its pipeline ops plus the local parameter ops whose first
    pipeline consumer it holds (each local op belongs to one layer, as in the cost pass);
    ``readers``: `local_readers`."""
    owner = {
        i: k for k, (a, b) in enumerate(itertools.pairwise(layers)) for i in split.pipeline[a:b]
    }
    out: list[set[int]] = [set(split.pipeline[a:b]) for a, b in itertools.pairwise(layers)]
    for i in sorted(split.local, reverse=True):  # readers of a local op come after it
        firsts = [owner[j] for j in readers.get(i, ()) if j in owner]
        if firsts:
            owner[i] = min(firsts)
            out[owner[i]].add(i)
    return [sorted(ops) for ops in out]


def sharding_segments(
    program: Program, split: Split, min_ops: int = SEGMENT_OPS, live=None
) -> list[int]:
    """Boundaries (pipeline op positions) of the sharding segments: cuts where one value is
    live, the first such cut at least `min_ops` after the previous boundary."""
    live = live_across(program, split) if live is None else live
    n = len(split.pipeline)
    bounds = [0]
    for k in range(1, n):
        if len(live[k]) == 1 and k - bounds[-1] >= min_ops and n - k >= min_ops // 2:
            bounds.append(k)
    return [*bounds, n]


def fixed_values(
    program: Program,
    per_segment: Sequence[Sequence[int]],
    free: frozenset[int] = frozenset(),
    pinned: Mapping[int, Any] | None = None,
) -> list[dict[int, Any]]:
    """Per segment, the values it must see replicated: everything it shares with another
    segment, batch inputs (but those in ``free``, whose split the solver chooses as for a
    parameter) and program outputs; and the values of ``pinned`` on their given Dim."""
    made: dict[int, int] = {}
    used: dict[int, set[int]] = {}
    for k, ops in enumerate(per_segment):
        for i in ops:
            made.update((v, k) for v in program.ops[i].outvars)
            for a in program.ops[i].invars:
                if isinstance(a, int):
                    used.setdefault(a, set()).add(k)
    fixed: list[dict[int, Any]] = [{} for _ in per_segment]
    for v, segs in used.items():
        home = made.get(v)
        touching = segs | ({home} if home is not None else set())
        batch_input = v in program.batch_dependent and home is None and v not in free
        if len(touching) > 1 or batch_input:
            for k in touching:
                fixed[k][v] = None
    for a in program.outvars:
        if isinstance(a, int) and a in made:
            fixed[made[a]][a] = None
    for v, dim in (pinned or {}).items():
        for k in used.get(v, set()) | ({made[v]} if v in made else set()):
            fixed[k][v] = dim
    return fixed
