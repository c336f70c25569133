"""Communication model: alpha-beta times of collectives on one mesh axis.

Every collective is priced on the link its mesh axis crosses (`Hardware.axis_link`: within a
node — NVLink / ICI — or across nodes — InfiniBand / DCN) with the classic bandwidth-optimal
algorithms, per device, where ``b`` is the payload (bytes of the operand on one device), ``n``
the axis size, ``α`` the link latency and ``β`` its one-direction bandwidth:

================ ============================== ===========================================
collective       algorithm                       seconds
================ ============================== ===========================================
ppermute         one send to a neighbour         α + b/β
all_reduce       ring reduce-scatter + gather    2(n−1)·α + 2(n−1)/n · b/β
all_gather       ring, b = input shard           (n−1)·α + (n−1) · b/β
reduce_scatter   ring, b = full input            (n−1)·α + (n−1)/n · b/β
all_to_all       pairwise exchange               (n−1)·α + (n−1)/n · b/β
================ ============================== ===========================================

An axis of size 1 costs nothing. An axis the caller did not describe (``mesh_axes`` missing it)
is priced as one send on the intra-node link.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from autopipe.cost_models.hardware import Hardware, Link

Collective = Literal["ppermute", "all_reduce", "all_gather", "reduce_scatter", "all_to_all"]
REDUCING = frozenset({"all_reduce", "reduce_scatter"})

# (latency steps, bandwidth factor on b) as functions of the axis size n
_ALGORITHMS = {
    "ppermute": lambda n: (1.0, 1.0),
    "all_reduce": lambda n: (2.0 * (n - 1), 2.0 * (n - 1) / n),
    "all_gather": lambda n: (n - 1.0, n - 1.0),
    "reduce_scatter": lambda n: (n - 1.0, (n - 1.0) / n),
    "all_to_all": lambda n: (n - 1.0, (n - 1.0) / n),
}


def link_time(kind: str, nbytes: float, n: int, link: Link) -> float:
    """Seconds for one `kind` collective of `nbytes` per device over `n` devices on `link`."""
    if kind not in _ALGORITHMS:
        raise ValueError(f"unknown collective {kind!r}; one of {sorted(_ALGORITHMS)}.")
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps, factor = _ALGORITHMS[kind](n)
    return steps * link.latency + factor * nbytes / link.bandwidth


def collective_time(
    kind: str, nbytes: float, axis: str, mesh_axes: Sequence[tuple[str, int]], hw: Hardware
) -> float:
    """Seconds for one collective over mesh `axis` (see the module table)."""
    sizes = dict(mesh_axes)
    if axis not in sizes:
        return link_time("ppermute", nbytes, 2, hw.intra_node)
    return link_time(kind, nbytes, sizes[axis], hw.axis_link(mesh_axes, axis))


def ppermute_time(nbytes: float, axis: str, mesh_axes: Sequence[tuple[str, int]], hw: Hardware):
    return collective_time("ppermute", nbytes, axis, mesh_axes, hw)


def all_reduce_time(nbytes: float, axis: str, mesh_axes: Sequence[tuple[str, int]], hw: Hardware):
    return collective_time("all_reduce", nbytes, axis, mesh_axes, hw)


def all_gather_time(nbytes: float, axis: str, mesh_axes: Sequence[tuple[str, int]], hw: Hardware):
    return collective_time("all_gather", nbytes, axis, mesh_axes, hw)


def reduce_scatter_time(
    nbytes: float, axis: str, mesh_axes: Sequence[tuple[str, int]], hw: Hardware
) -> float:
    return collective_time("reduce_scatter", nbytes, axis, mesh_axes, hw)


def all_to_all_time(nbytes: float, axis: str, mesh_axes: Sequence[tuple[str, int]], hw: Hardware):
    return collective_time("all_to_all", nbytes, axis, mesh_axes, hw)
