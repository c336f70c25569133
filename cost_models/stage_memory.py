"""The stage search's memory model: per-device bytes of every candidate stage [i, j) of layers.

One model for the forward planner, the training planner, the pictures and bench: both tables
below start from the same `segment_bytes` (parameters a candidate stage holds, its live peak,
the bytes it makes and receives). The forward table prices the program autopipe emits
(`memory.forward_program_bytes`: parameters, batch, the materialised working set, boundary and
output buffers); the training table adds gradients and optimizer state per parameter byte and
the residuals its schedule keeps in flight (or only the stage inputs under remat).

Tables are indexed ``mem[i, j]`` for a stage of layers ``[i, j)``; entries with ``j <= i`` are
``inf`` (no such stage). The operator facts come from `passes.costs.OperatorCosts`; this module
reads them by field so that cost models do not depend on the passes.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from autopipe.cost_models import memory


class OperatorFacts(Protocol):
    """What this model reads of `passes.costs.OperatorCosts`."""

    cut_bytes: tuple[int, ...]
    reads: tuple[frozenset[int], ...]
    act_bytes: tuple[int, ...]
    saved_bytes: tuple[float, ...]
    stashed: tuple[tuple[int, ...], ...]
    working: memory.WorkingSet


@dataclasses.dataclass(frozen=True, kw_only=True)
class SegmentBytes:
    """Per candidate stage [i, j) of layers (arrays indexed [i, j], i < j): parameter bytes,
    the largest live-values footprint inside it, the residual bytes its backward reads and
    the bytes it receives."""

    params: np.ndarray
    peak: np.ndarray
    inputs: np.ndarray  # bytes received at its first layer
    saved: np.ndarray  # residual bytes its backward reads (`memory.saved_bytes`)
    stashed: np.ndarray  # bytes a deferred W keeps besides cotangents (`OperatorFacts.stashed`)


def segment_bytes(
    costs: OperatorFacts,
    layers: Sequence[int],
    nbytes: Callable[[int], float],
    param_scale: Mapping[int, float] | None = None,
) -> SegmentBytes:
    """``param_scale[v]``: the share of parameter value v one device holds (tensor shards)."""
    scale = param_scale or {}
    n = len(layers) - 1
    pairs = list(itertools.pairwise(layers))
    readers: dict[int, list[int]] = {}  # parameter value → layers reading it
    for k, (a, b) in enumerate(pairs):
        for v in frozenset().union(*costs.reads[a:b]):
            readers.setdefault(v, []).append(k)
    rows, cols = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    upper = (cols > rows).astype(float)
    single, params = np.zeros(n), np.zeros((n + 1, n + 1))
    for v, ks in readers.items():
        size = nbytes(v) * scale.get(v, 1.0)
        if len(ks) == 1:
            single[ks[0]] += size
            continue
        first = np.full(n + 1, n + 1)  # first reader at or after layer i
        for k in sorted(ks, reverse=True):
            first[: k + 1] = k
        params += size * (cols > first[:, None])  # [i, j) holds v iff that reader is < j
    total = np.concatenate([[0.0], np.cumsum(single)])
    params = (params + total[None, :] - total[:, None]) * upper
    layer_peak = np.array(
        [max(costs.cut_bytes[k] + costs.act_bytes[k] for k in range(a, b)) for a, b in pairs]
    )
    peak = np.zeros((n + 1, n + 1))
    for i in range(n):
        peak[i, i + 1 :] = np.maximum.accumulate(layer_peak[i:])

    def per_segment(per_op: Sequence[float]) -> np.ndarray:
        total = np.concatenate([[0.0], np.cumsum([sum(per_op[a:b]) for a, b in pairs])])
        return (total[None, :] - total[:, None]) * upper

    saved = per_segment(costs.saved_bytes)
    stashed = per_segment([sum(map(nbytes, vs)) for vs in costs.stashed])
    cut_in = np.array([0.0, *(costs.cut_bytes[layers[i]] for i in range(1, n + 1))])
    inputs = cut_in[:, None] * upper
    return SegmentBytes(params=params, peak=peak, inputs=inputs, saved=saved, stashed=stashed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForwardProgram:
    """What the forward table needs of the program besides the operator facts."""

    nbytes: Callable[[int], float]  # bytes of a value of the program
    batch_input_bytes: float  # batch arguments of one microbatch
    output_bytes: float  # program outputs of one microbatch
    copies_library_operands: bool  # the backend copies GEMM/conv weights out of the buffer


def forward_segment_memory(
    prog: ForwardProgram,
    costs: OperatorFacts,
    layers: Sequence[int],
    m: int,
    p: int = 1,
    param_scale: Mapping[int, float] | None = None,
    rows_scale: float = 1.0,
) -> np.ndarray:
    """mem[i, j] = per-device bytes of the forward-only program for a stage of layers [i, j)
    (`memory.forward_program_bytes`): its parameters, the batch, its working set
    (materialised values only), the receive and send buffers and the output buffer.
    ``rows_scale``: microbatch rows relative to the traced program's (activations scale).
    Parameters the backend copies out of the flat buffer for GEMM and convolution calls are
    added where `Hardware.copies_library_operands` says so (XLA:CPU does).
    """
    r, scale = rows_scale, param_scale or {}
    seg = segment_bytes(costs, layers, prog.nbytes, param_scale)
    peak, unpacked = memory.segment_working_bytes(
        costs.working, lambda v: prog.nbytes(v) * scale.get(v, 1.0), layers, num_microbatches=m
    )
    send = np.array([0, *(costs.cut_bytes[k] for k in layers[1:-1]), 0], dtype=float)
    mem = memory.forward_program_bytes(
        param_bytes=seg.params,
        batch_input_bytes=prog.batch_input_bytes * m * r,
        live_peak_bytes=peak * r,
        output_bytes=prog.output_bytes * r,
        num_microbatches=m,
        num_stages=p,
        boundary_bytes=r * np.maximum(seg.inputs, send[None, :]),
        unpacked_param_bytes=unpacked if prog.copies_library_operands else 0.0,
    ).total
    return _only_stages(mem)


def training_segment_memory(
    seg: SegmentBytes,
    *,
    optimizer_factor: float,
    in_flight: float,
    remat: bool,
    rows_scale: float = 1.0,
    deferred: float = 0.0,
) -> np.ndarray:
    """mem[i, j] = per-device bytes of a training stage of layers [i, j) from its
    `segment_bytes`: parameters × (1 + gradient + ``optimizer_factor`` optimizer-state bytes
    per parameter byte), the residuals of the ``in_flight`` microbatches its schedule keeps
    (the stage input and its matmul/convolution results, `memory.saved_bytes`; under remat
    only their stage inputs, and those results of the one microbatch being recomputed), and twice
    the live peak (forward and backward working sets). Tensor shards enter through the
    segments' ``param_scale`` (gradients and optimizer state are split alike).
    ``rows_scale``: microbatch rows relative to the traced program's (activations scale,
    parameters do not). ``deferred``: microbatches whose W waits (`Schedule.deferred`), each
    keeping the cotangents of its tapped matmul results (counted as its matmul results) and
    those matmuls' activation inputs."""
    kept = seg.inputs if remat else seg.inputs + seg.saved
    stored = deferred * (seg.saved + seg.stashed)
    residuals = kept * in_flight + (seg.saved if remat else 0.0) + stored
    acts = rows_scale * (residuals + 2 * seg.peak)
    return _only_stages(seg.params * (2 + optimizer_factor) + acts)


def _only_stages(mem: Any) -> np.ndarray:
    return np.where(np.triu(np.ones_like(mem), 1) > 0, mem, np.inf)
