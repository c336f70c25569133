"""Cluster pass: group the ordered pipeline operators into layers for the stage DP.

Layers are contiguous runs of operators (the program order is a topological order). Cuts are
placed where few bytes cross: a position is a *natural* cut when the batch values alive across
it weigh no more than ``factor`` × the cheapest cut of the program — between transformer blocks
only the residual stream crosses, so block boundaries are natural cuts. ``factor`` starts at 1
and grows until there are enough layers for the DP to choose from (``min_layers``); when there
are more natural layers than ``max_layers``, neighbours are merged by cumulative cost so layers
stay balanced. The number of layers is therefore chosen from the program's own structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_FACTORS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 64.0, float("inf"))


def natural_cuts(cut_bytes: Sequence[int], want: int) -> list[int]:
    """Cut positions k in 1..n-1 (k = before op k), cheapest first in preference."""
    n = len(cut_bytes) - 1
    inner = np.asarray(cut_bytes[1:n], dtype=np.float64)
    if inner.size == 0:
        return []
    floor = inner.min()
    for factor in _FACTORS:
        limit = floor * factor if np.isfinite(factor) else np.inf
        cuts = [k + 1 for k in np.flatnonzero(inner <= limit * (1 + 1e-9))]
        if len(cuts) + 1 >= want:
            return cuts
    return list(range(1, n))


def merge_balanced(op_times: Sequence[float], cuts: Sequence[int], max_layers: int) -> list[int]:
    """Keeps a cut only when the cumulative cost enters a new 1/max_layers share of the total."""
    if len(cuts) + 1 <= max_layers:
        return list(cuts)
    cum = np.concatenate([[0.0], np.cumsum(op_times)])
    unit = cum[-1] / max_layers if cum[-1] > 0 else 1.0
    kept, last_bucket = [], 0
    for k in cuts:
        bucket = int(cum[k] // unit) if cum[-1] > 0 else len(kept) + 1
        if bucket > last_bucket and len(kept) + 1 < max_layers:
            kept.append(k)
            last_bucket = bucket
    return kept


def cluster(
    op_times: Sequence[float],
    cut_bytes: Sequence[int],
    *,
    min_layers: int,
    max_layers: int = 256,
) -> tuple[int, ...]:
    """Layer boundaries 0 = c_0 < ... < c_L = n over n operators (see the module docstring).

    ``cut_bytes[k]`` is the bytes crossing a cut before operator k (entries 0 and n unused).
    """
    n = len(op_times)
    if n == 0:
        return (0,)
    want = min(n, max(min_layers, 2 * min_layers, 8))
    cuts = merge_balanced(op_times, natural_cuts(cut_bytes, want), max(max_layers, min_layers))
    if len(cuts) + 1 < min_layers:  # balance-merging may not drop below what the DP needs
        cuts = natural_cuts(cut_bytes, min_layers)[: max(0, n - 1)]
    return (0, *cuts, n)
