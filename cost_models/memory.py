"""Memory model: per-device peak bytes of a pipeline stage, used by the stage DP as a hard limit.

A stage's device holds

- its parameters (and, when training, their gradients and the optimizer state — read off the
  optax optimizer's own ``init`` with `jax.eval_shape`, so Adam counts 2× the parameters in
  float32 and SGD 0×),
- the activations the schedule keeps in flight: ``A`` bytes per microbatch times
  `in_flight_microbatches` (GPipe m·A; 1F1B min(p − r, m)·A on rank r; interleaved 1F1B rank r
  ≈ (p − r + (p − 1 − r)/v)·A, (p + (p−1)/v)·A on rank 0; forward-only 1·A),
- temporaries (the receive/send buffers, the working set of the largest operator).

`forward_program_bytes` prices the forward-only program autopipe emits today; it was checked
against XLA's `memory_analysis()` (argument + temp) on the test models (bench/cost_model.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import numpy as np

ScheduleKind = Literal["inference", "gpipe", "1f1b", "interleaved", "zb_h1"]


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


def in_flight_microbatches(
    schedule: ScheduleKind, *, num_stages: int, num_microbatches: int, rank: int, virtual: int = 1
) -> float:
    """How many microbatches' activations rank `rank` holds at its peak under `schedule`."""
    p, m, r = num_stages, num_microbatches, rank
    if not 0 <= r < p:
        raise ValueError(f"rank={r} is not a stage of a {p}-stage pipeline.")
    if schedule == "inference":
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule in ("1f1b", "zb_h1"):
        return float(min(p - r, m))
    if schedule == "interleaved":
        return float(min(p - r + (p - 1 - r) / virtual, m * 1.0))
    raise ValueError(
        f"unknown schedule {schedule!r}; one of inference, gpipe, 1f1b, interleaved, zb_h1."
    )


def stage_memory(
    *,
    param_bytes: float,
    activation_bytes: float,
    schedule: ScheduleKind = "inference",
    rank: int = 0,
    num_stages: int = 1,
    num_microbatches: int = 1,
    training: bool = False,
    optimizer_bytes: float = 0.0,
    temporaries: float = 0.0,
    virtual: int = 1,
) -> StageMemory:
    """Peak bytes on the device of stage `rank`: params (+ grads + optimizer state when
    training) + `activation_bytes` (one microbatch, A) × in-flight count + temporaries."""
    held = in_flight_microbatches(
        schedule,
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        rank=rank,
        virtual=virtual,
    )
    return StageMemory(
        params=param_bytes,
        gradients=param_bytes if training else 0.0,
        optimizer=optimizer_bytes if training else 0.0,
        activations=activation_bytes * held,
        temporaries=temporaries,
    )


def forward_program_bytes(
    *,
    param_bytes: float,
    batch_input_bytes: float,
    live_peak_bytes: float,
    output_bytes: float,
    num_microbatches: int,
    num_stages: int,
    param_copies: float = 1.0,
) -> StageMemory:
    """Per-device bytes of autopipe's emitted forward-only program for one stage.

    - ``params``: the stage's packed parameter buffer — its argument;
    - ``activations``: the whole batch's inputs (every device receives them) and the largest
      set of values live inside the stage, twice (receive and send buffers / working set);
    - ``temporaries``: ``param_copies`` × the parameters unpacked from the flat buffer and the
      output buffer, ``m + 1`` microbatch outputs (one spare row), which every device of the
      SPMD program allocates. Measured on jax 0.10.2 / XLA CPU: XLA hoists the unpacking slices out
      of the tick loop and keeps every unpacked parameter alive for the whole loop (temp ≈
      params, even for 16 layers), hence the default of one full copy.
    """
    del num_stages  # the output buffer no longer grows with the pipeline depth
    return StageMemory(
        params=param_bytes,
        activations=batch_input_bytes + live_peak_bytes,
        temporaries=param_copies * param_bytes + (num_microbatches + 1) * output_bytes,
    )
