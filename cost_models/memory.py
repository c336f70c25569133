"""Memory model: per-device peak bytes of a pipeline stage, used by the stage DP as a hard limit.

A stage's device holds

- its parameters (and, when training, their gradients and the optimizer state — read off the
  optax optimizer's own ``init`` with `jax.eval_shape`, so Adam counts 2× the parameters in
  float32 and SGD 0×),
- the activations the schedule keeps in flight: ``A`` bytes per microbatch times the
  table's peak (`passes.schedule.Schedule.in_flight`, or `peak_in_flight` without building
  the table: GPipe m, 1F1B min(p, m), 1F1B-paired min(m, 2p − 1); forward-only 1), which the
  training memory model (`stage_memory.training_segment_memory`) multiplies in,
- temporaries (the receive/send buffers, the working set of the largest operator).

The working set is counted the way XLA allocates it, not value by value: elementwise and layout
operators fuse into their neighbours and never get a buffer of their own, so only values that
*materialise* hold memory (`working_set`): results of operators that run their own kernel
(dot, convolution, reductions, gather, …) and operands a library call reads whole (a GEMM or a
convolution cannot read a fused expression). Whether an operator fuses is read off its cost
rule (`rules.Cost.kernels`), so a new primitive needs one rule, not two; a primitive without
a rule is logged by the cost rules and counted as a kernel. Calls are inlined (as XLA does);
scan, while and cond keep their results as buffers and add their body's working set.
Parameters a library call reads are copied out of the stage's flat parameter buffer
(``unpacked`` bytes), because XLA:CPU cannot hand a GEMM a slice of another buffer.

`forward_program_bytes` prices one stage of the forward-only program autopipe emits;
`spmd_program_bytes` combines the stages the way that single SPMD program pads them (every
device allocates the largest stage's buffers). Both were checked against XLA's
`memory_analysis()` (argument + temp) on the test models: within ±11 % at 1, 2 and 4 stages
and 1 and 4 microbatches (``python bench/cost_model.py --memory-only``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from autopipe.cost_models.rules import eqn_cost, nbytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageMemory:
    """Bytes per device of one stage, by what holds them."""

    params: float
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    temporaries: float = 0.0

    @property
    def total(self) -> float:
        return self.params + self.gradients + self.optimizer + self.activations + self.temporaries


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
    leaves = jax.tree.leaves(tree)
    return int(sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in leaves))


def optimizer_state_bytes(optimizer: Any, params: Any) -> int:
    """Bytes of ``optimizer.init(params)`` (an optax GradientTransformation), without allocating.

    Adam's state is two moments of the parameters' shapes plus a step counter ≈ 2× params.
    """
    init: Callable = optimizer.init if hasattr(optimizer, "init") else optimizer
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    return tree_bytes(jax.eval_shape(init, abstract))


def output_rows(num_microbatches: int, num_stages: int) -> int:
    """Microbatch rows of the emitted program's output buffer: m + 1 (one spare row that
    non-final actions write), or none when the program is a single tick (one stage, one
    microbatch): XLA drops the one-trip loop and writes the result in place."""
    return 0 if num_microbatches == num_stages == 1 else num_microbatches + 1


def forward_program_bytes(
    *,
    param_bytes: Any,
    batch_input_bytes: Any,
    live_peak_bytes: Any,
    output_bytes: Any,
    num_microbatches: int,
    num_stages: int,
    boundary_bytes: Any = 0.0,
    unpacked_param_bytes: Any = 0.0,
) -> StageMemory:
    """Per-device bytes of autopipe's emitted forward-only program for one stage (numbers or
    arrays of them, e.g. a [i, j] table over candidate stages).

    - ``params``: the stage's packed parameter buffer — its argument;
    - ``activations``: the whole batch's inputs (every device receives them) and the stage's
      working set ``live_peak_bytes`` (`segment_working_bytes`: materialised values only);
    - ``temporaries``: the receive and send buffers (2 × ``boundary_bytes``, the larger of the
      bytes received and sent per microbatch), the output buffer (`output_rows` microbatch
      outputs, which every device of the SPMD program allocates), and the parameters copied
      out of the flat buffer for library calls (``unpacked_param_bytes``,
      `segment_working_bytes`).

    The copies are real on XLA:CPU today (a GEMM or convolution cannot read a slice of the
    packed buffer in place); they come from how the program packs parameters, so the stage DP
    counts them only for hardware that makes them (`Hardware.copies_library_operands`).
    """
    return StageMemory(
        params=param_bytes,
        activations=batch_input_bytes + live_peak_bytes,
        temporaries=2 * boundary_bytes
        + output_rows(num_microbatches, num_stages) * output_bytes
        + unpacked_param_bytes,
    )


def spmd_program_bytes(
    *,
    param_bytes: Sequence[float],
    boundary_bytes: Sequence[float],
    working_bytes: Sequence[float],
    batch_input_bytes: float,
    output_bytes: float,
    num_microbatches: int,
) -> float:
    """Per-device bytes of the one SPMD program that runs all the stages (`passes.emit`), one
    entry per stage in each sequence.

    Every device allocates the same buffers, each sized for the largest stage: the parameter
    buffer (max of ``param_bytes``), the receive and send buffers (2 × max of
    ``boundary_bytes``) and the stage branch's working set (max of ``working_bytes``: live peak
    + unpacked parameters); plus the batch inputs and the output buffer. This is ≥ the largest
    `forward_program_bytes` of any stage, which is what an MPMD program would need; the stage
    DP prices stages one by one, so this is what the comparison with XLA's
    ``memory_analysis()`` uses.
    """
    rows = output_rows(num_microbatches, len(param_bytes))
    return float(
        max(param_bytes)
        + batch_input_bytes
        + 2 * max(boundary_bytes)
        + max(working_bytes)
        + rows * output_bytes
    )


# --- working set: which values materialise ------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpBuffers:
    """One operator as the memory model sees it (values are ids: program value numbers or
    jaxpr variables).

    ``buffers``: the results that get a buffer of their own (an operator that runs its own
    kernel); the others fuse into their readers. ``whole``: operands it reads as whole buffers
    (a library call's inputs). ``inner``: bytes that live only inside it (a body's values).
    """

    ins: tuple[Hashable, ...]
    outs: tuple[Hashable, ...]
    buffers: frozenset[Hashable] = frozenset()
    whole: frozenset[Hashable] = frozenset()
    inner: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkingSet:
    """Per operator k of a sequence: ``live[k]`` bytes of materialised values while k runs
    (those made before k and read at or after k, k's own results and its inner working set);
    ``sliced[k]`` the part of them that are microbatch slices of the batch argument, which
    exist only with more than one microbatch (`at`); ``unpacked[k]`` the placed values
    (parameters) k reads whole, copied out of their buffer."""

    live: np.ndarray
    sliced: np.ndarray
    unpacked: tuple[frozenset[Hashable], ...]

    def at(self, num_microbatches: int) -> np.ndarray:
        """Bytes live at each operator with `num_microbatches` microbatches. A stage reads its
        microbatch of a batch input by a dynamic slice of the whole batch: a copy when a library
        call reads it; with one microbatch the slice is the argument itself (XLA drops it)."""
        return self.live + (self.sliced if num_microbatches > 1 else 0.0)

    def peak(self) -> int:
        return int(self.at(2).max(initial=0))


# Operators of autopipe's IR that are not primitives (`passes.ir`): a row of a stacked value
# (a slice) and the stacking of per-iteration results (a concatenate) fuse; one iteration of a
# split scan is its body, evaluated inline.
_IR_FUSED = {"index", "stack"}
_IR_INLINE = {"scan_step"}
# Primitives whose body XLA keeps as a loop or a conditional: their results are buffers (loop
# state, stacked outputs, branch results). Every other primitive with a body is a call, which
# XLA inlines, so its values fuse with the caller's as if written out.
_LOOPS = {"scan", "while", "cond"}


def _is_value(a: Any) -> bool:
    return not hasattr(a, "val")  # jaxpr Literal and ir.Lit carry their value; values do not


def _sub_jaxprs(params: dict) -> list[Any]:
    """The open jaxprs an equation runs forward (call, scan, while, cond branches)."""
    found = []
    for key, value in params.items():
        if key.startswith(("jvp", "fwd", "bwd")):  # differentiation rules: not run forward
            continue
        for item in value if isinstance(value, tuple | list) else (value,):
            jaxpr = getattr(item, "jaxpr", item)
            if hasattr(jaxpr, "eqns") and hasattr(jaxpr, "invars"):
                found.append(jaxpr)
    return found


# The outputs a training stage's VJP keeps per microbatch: the stage runs under
# `jax.checkpoint_policies.dots_saveable` (`passes.train_actions`), so matmul and convolution
# results are residuals and everything else is recomputed in the backward.
SAVED_PRIMITIVES = frozenset({"dot_general", "conv_general_dilated", "scaled_matmul_wrapper"})


def saved_bytes(primitive: str, params: dict, avals_out: Sequence[Any]) -> float:
    """Residual bytes one operator leaves for its backward (`SAVED_PRIMITIVES`' outputs),
    through calls, a scan's iterations (× length) and a cond's largest branch."""
    if primitive in SAVED_PRIMITIVES:
        return float(sum(nbytes(a) for a in avals_out))
    per = [
        sum(saved_bytes(e.primitive.name, e.params, [v.aval for v in e.outvars]) for e in j.eqns)
        for j in _sub_jaxprs(params)
    ]
    if primitive == "cond":
        return max(per, default=0.0)
    return sum(per) * (params["length"] if primitive == "scan" else 1)


@dataclasses.dataclass(frozen=True)
class _Body:
    whole: frozenset[int]  # positions of the inputs that a library call inside reads whole
    buffers: frozenset[int]  # positions of the outputs that materialise inside
    inner: int  # working set inside, excluding the body's inputs and outputs


@functools.lru_cache(maxsize=512)
def _body(jaxpr: Any) -> _Body:
    ops = [eqn_buffers(e) for e in jaxpr.eqns]
    outs = [v for v in jaxpr.outvars if _is_value(v)]
    boundary = frozenset(jaxpr.invars) | frozenset(jaxpr.constvars) | frozenset(outs)
    ws = working_set(ops, lambda v: nbytes(v.aval), placed=boundary, exclude=boundary)
    whole = frozenset().union(*(op.whole for op in ops))
    made = frozenset().union(*(op.buffers for op in ops)) | whole
    return _Body(
        whole=frozenset(k for k, v in enumerate(jaxpr.invars) if v in whole),
        buffers=frozenset(k for k, v in enumerate(jaxpr.outvars) if _is_value(v) and v in made),
        inner=ws.peak(),
    )


def eqn_buffers(eqn: Any) -> OpBuffers:
    """`op_buffers` of one jaxpr equation."""
    return op_buffers(
        eqn.primitive.name,
        eqn.params,
        eqn.invars,
        eqn.outvars,
        [v.aval for v in eqn.invars],
        [v.aval for v in eqn.outvars],
    )


def _body_buffers(primitive: str, params: dict, invars, outvars) -> OpBuffers:
    whole: set[Hashable] = set()
    buffers: set[Hashable] = set(outvars) if primitive in _LOOPS else set()
    inner = 0
    for jaxpr in _sub_jaxprs(params):
        body = _body(jaxpr)
        shift = len(invars) - len(jaxpr.invars)  # cond: the branch index comes first
        if shift in (0, 1):
            whole |= {invars[shift + k] for k in body.whole if _is_value(invars[shift + k])}
        if len(outvars) == len(jaxpr.outvars):
            buffers |= {outvars[k] for k in body.buffers}
        inner = max(inner, body.inner)
    ins = tuple(a for a in invars if _is_value(a))
    return OpBuffers(
        ins=ins,
        outs=tuple(outvars),
        buffers=frozenset(buffers),
        whole=frozenset(whole),
        inner=inner,
    )


def op_buffers(
    primitive: str,
    params: dict,
    invars: Sequence[Any],
    outvars: Sequence[Hashable],
    avals_in: Sequence[Any],
    avals_out: Sequence[Any],
) -> OpBuffers:
    """How one operator holds memory. Whether it fuses is read off its cost rule: a rule with
    no ``kernels`` is elementwise or layout work that fuses; a kernel (reduction, gather, …)
    or a primitive without a rule gets buffers for its results; a library call (a rule with
    ``dot_flops``: GEMM, convolution) also reads its operands whole. An operator with a body
    (call, scan, while, cond) is priced from the body. ``primitive`` may be an IR operator
    kind (``index``, ``stack``, ``scan_step``); ``invars`` may hold literals (skipped);
    ``avals_in`` are the avals of its values (literals left out, as the cost rules take them).
    """
    ins = tuple(a for a in invars if _is_value(a))
    if primitive in _IR_FUSED:
        return OpBuffers(ins=ins, outs=tuple(outvars))
    if primitive in _IR_INLINE or _sub_jaxprs(params):
        return _body_buffers(primitive, params, invars, outvars)
    cost = eqn_cost(primitive, list(avals_in), list(avals_out), params)
    kernel = bool(cost.kernels or cost.comm)
    return OpBuffers(
        ins=ins,
        outs=tuple(outvars),
        buffers=frozenset(outvars) if kernel else frozenset(),
        whole=frozenset(ins) if cost.dot_flops else frozenset(),
    )


def working_set(
    ops: Sequence[OpBuffers],
    value_bytes: Callable[[Hashable], float],
    *,
    placed: Iterable[Hashable] = (),
    sliced: Iterable[Hashable] = (),
    live_out: Iterable[Hashable] = (),
    exclude: Iterable[Hashable] = (),
) -> WorkingSet:
    """Materialised bytes live at each operator of `ops` (program order).

    A value materialises if it is one of its maker's ``buffers`` or a library call reads it
    whole; it lives from its maker (or the start, for an input) to its last reader (the
    end, for ``live_out``). ``placed`` values (parameters) read whole are reported as
    ``unpacked``, not live; ``sliced`` inputs (the batch inputs) are reported apart (see
    `WorkingSet.at`); ``exclude`` values are never counted (a body's inputs and outputs, which
    its caller counts).
    """
    placed, sliced, exclude = frozenset(placed), frozenset(sliced), frozenset(exclude)
    n = len(ops)
    made: dict[Hashable, int] = {}
    last: dict[Hashable, int] = {}
    for k, op in enumerate(ops):
        for a in op.ins:
            last[a] = k
        for v in op.outs:
            made[v] = k
    for v in live_out:
        last[v] = n
    held: dict[Hashable, int] = {}  # materialised value -> where it starts (-1: an input)
    for k, op in enumerate(ops):
        held.update((v, k) for v in op.buffers)
        held.update((a, made.get(a, -1)) for a in op.whole if a not in placed)
    # Σ bytes of held values with start ≤ k ≤ last use, as difference arrays
    delta = {False: np.zeros(n + 1), True: np.zeros(n + 1)}  # by: is it a sliced input
    for v, start in held.items():
        end = min(last.get(v, start), n - 1)
        if v not in exclude and end >= max(start, 0):
            delta[v in sliced][max(start, 0)] += value_bytes(v)
            delta[v in sliced][end + 1] -= value_bytes(v)
    inner = np.array([op.inner for op in ops], dtype=float)
    return WorkingSet(
        live=np.cumsum(delta[False])[:n] + inner,
        sliced=np.cumsum(delta[True])[:n],
        unpacked=tuple(frozenset(a for a in op.whole if a in placed) for op in ops),
    )


def segment_working_bytes(
    ws: WorkingSet,
    value_bytes: Callable[[Hashable], float],
    layers: Sequence[int],
    *,
    num_microbatches: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(peak[i, j], unpacked[i, j]) for a stage of layers [i, j), i < j (0 elsewhere), where
    layer l is operators [layers[l], layers[l + 1]) of `ws`: the largest working set of its
    operators (`WorkingSet.at` `num_microbatches`), and the bytes of the parameters its library
    calls read whole, each value once (``value_bytes`` may scale them, e.g. tensor shards)."""
    n = len(layers) - 1
    pairs = list(itertools.pairwise(layers))
    live = ws.at(num_microbatches)
    layer_peak = np.array([live[a:b].max(initial=0) for a, b in pairs])
    peak = np.zeros((n + 1, n + 1))
    for i in range(n):
        peak[i, i + 1 :] = np.maximum.accumulate(layer_peak[i:])
    readers: dict[Hashable, list[int]] = {}  # unpacked value → layers reading it
    for k, (a, b) in enumerate(pairs):
        for v in frozenset().union(*ws.unpacked[a:b]):
            readers.setdefault(v, []).append(k)
    cols = np.arange(n + 1)[None, :]
    upper = (cols > np.arange(n + 1)[:, None]).astype(float)
    single, unpacked = np.zeros(n), np.zeros((n + 1, n + 1))
    for v, ks in readers.items():
        if len(ks) == 1:  # read by one layer: a prefix sum below
            single[ks[0]] += value_bytes(v)
            continue
        first = np.full(n + 1, n + 1)  # first reader at or after layer i
        for k in sorted(ks, reverse=True):
            first[: k + 1] = k
        unpacked += value_bytes(v) * (cols > first[:, None])  # [i, j) reads v iff that is < j
    total = np.concatenate([[0.0], np.cumsum(single)])
    return peak, (unpacked + total[None, :] - total[:, None]) * upper
