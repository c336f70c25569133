"""Cluster pass: group the ordered pipeline operators into layers for the stage DP.

Layers are contiguous runs of operators (the program order is a topological order). The pass
splits the operator sequence into windows of equal cost and, inside each window, cuts where
the fewest bytes cross (between transformer blocks only the residual stream crosses, so a
window that holds a block boundary cuts there). Layers are therefore balanced to within a
window and their boundaries are the cheapest cuts nearby; the stage DP then chooses among
them, pricing every cut it uses.

The number of layers follows the program and the pipeline: ``8 × stages`` (at least 64, at
most 256, never more than there are operators), enough freedom for the DP to balance stages
while keeping it fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def num_layers(num_ops: int, num_stages: int) -> int:
    return min(num_ops, max(num_stages, min(max(8 * num_stages, 64), 256)))


def cluster(op_times: Sequence[float], cut_bytes: Sequence[int], *, min_layers: int) -> tuple:
    """Layer boundaries 0 = c_0 < ... < c_L = n over n operators (see the module docstring).

    ``cut_bytes[k]`` is the bytes crossing a cut before operator k (entries 0 and n unused).
    """
    n = len(op_times)
    target = num_layers(n, min_layers)
    if target <= 1:
        return (0, n)
    cum = np.concatenate([[0.0], np.cumsum(np.asarray(op_times, dtype=np.float64))])
    unit = cum[-1] / target if cum[-1] > 0 else 0.0
    inner = np.arange(1, n)
    crossing = np.asarray(cut_bytes)
    cuts: list[int] = []
    for w in range(1, target):
        if unit > 0:
            window = inner[(cum[inner] > (w - 0.5) * unit) & (cum[inner] <= (w + 0.5) * unit)]
        else:
            window = inner[(inner * target >= (w - 0.5) * n) & (inner * target < (w + 0.5) * n)]
        window = window[window > (cuts[-1] if cuts else 0)]
        if window.size:
            ideal = w * unit if unit > 0 else w * n / target
            key = np.lexsort((np.abs(cum[window] - ideal), crossing[window]))
            cuts.append(int(window[key[0]]))
    if len(cuts) + 1 < min_layers:  # very unequal operators left windows empty: add cheap cuts
        spare = sorted(set(inner.tolist()) - set(cuts), key=lambda k: (cut_bytes[k], k))
        cuts = sorted(cuts + spare[: min_layers - 1 - len(cuts)])
    return (0, *cuts, n)
