"""The one-line entry points: `plan` (forward pipeline) and `train` (training step).

Both are compositions of the staged API (`autopipe._staged`):
``trace(fn, *args).lower(mesh, ...).plan(...)`` then ``.compile()`` for a concrete mesh. A mesh
given as a device count (or None: this process's devices) is chosen first by the
factorization search (`autopipe._factorize`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import optax

from autopipe._factorize import plan_on_devices
from autopipe._front import check_reduction
from autopipe._microbatches import fastest_count
from autopipe._planned import Plan
from autopipe._staged import trace
from autopipe._train import check_schedule
from autopipe._train_factorize import train_on_devices
from autopipe.cost_models.hardware import Hardware


def plan(
    fn: Callable,
    *example_args: Any,
    mesh: Any,
    num_microbatches: int | None = None,
    batch_argnums: Sequence[int] = (1,),
    num_stages: int | None = None,
    pipeline_axis: str = "pp",
    data_axis: str = "dp",
    tensor_axis: str = "tp",
    hardware: str | Hardware | Any | None = None,
    memory_limit: float | None = None,
    compile: bool = True,  # noqa: A002 - the natural name for the switch
) -> Plan:
    """Plans and compiles a pipeline-parallel version of ``fn(*example_args)``.

    Args:
      fn: a JAX function; e.g. a Flax linen ``model.apply`` or ``lambda model, x: model(x)``
        for an NNX module.
      example_args: arrays or ``jax.ShapeDtypeStruct`` (planning never allocates them).
      mesh: a ``jax.sharding.Mesh`` with a pipeline axis and optionally a data and a tensor
        axis (compiled plan), or an ``AbstractMesh`` / ``{"pp": 8, "dp": 16, "tp": 8}`` dict
        (planning only: nothing is compiled). Other axes replicate the whole pipeline.
      num_microbatches: microbatches per batch; None = the count whose plan predicts the
        fastest step (`autopipe._microbatches`; ``plan.factorizations`` lists those tried).
      batch_argnums: arguments whose leading axis is the batch; the rest are parameters,
        except inputs (`autopipe.passes.inputs`): arguments without float leaves and typed PRNG
        keys, sent to every stage unplaced; microbatch j sees a key as
        ``jax.random.fold_in(key, j)`` (`autopipe.microbatch_reference` is that loop).
      num_stages: None = one stage per device of the pipeline axis.
      data_axis: the mesh axis over which every microbatch's rows are split (if the mesh has
        it): each replica runs the pipeline on its rows, parameters are replicated over it.
      tensor_axis: the mesh axis over which operators are split (if the mesh has it): the
        planner picks each operator's sharding (column/row-parallel matmuls, heads, ...) and
        each device holds only its shard of the split parameters.
      hardware: a preset name ("h100", "v100", "tpu_v5e", "cpu"), a ``Hardware``, or what
        ``autopipe.calibrate()`` returns; None = the preset for the mesh's devices.
      memory_limit: bytes per device for the stage search; None = the hardware's memory.
      compile: False plans without compiling even for a concrete mesh.
    """
    started = time.perf_counter()
    if mesh is None or isinstance(mesh, int):
        return plan_on_devices(
            fn,
            example_args,
            devices=mesh,
            num_microbatches=num_microbatches,
            batch_argnums=batch_argnums,
            pipeline_axis=pipeline_axis,
            data_axis=data_axis,
            tensor_axis=tensor_axis,
            hardware=hardware,
            memory_limit=memory_limit,
            compile_=compile,
            started=started,
        )
    lowered = trace(fn, *example_args, batch_argnums=batch_argnums).lower(
        mesh,
        hardware=hardware,
        num_microbatches=num_microbatches,
        num_stages=num_stages,
        pipeline_axis=pipeline_axis,
        data_axis=data_axis,
        tensor_axis=tensor_axis,
    )
    if num_microbatches is None:
        at = lambda m: lowered.plan(num_microbatches=m, memory_limit=memory_limit)  # noqa: E731
        return fastest_count(lowered, at, multiple=1).finish(compile=compile)
    return lowered.plan(memory_limit=memory_limit).finish(compile=compile)


def train(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *example_args: Any,
    mesh: Any,
    schedule: Literal[
        "auto", "gpipe", "1f1b", "1f1b_paired", "interleaved_1f1b", "zb_h1", "zb_paired"
    ] = "1f1b",
    num_microbatches: int | None = None,
    virtual_stages: int | None = None,
    batch_argnums: Sequence[int] = (1,),
    pipeline_axis: str = "pp",
    data_axis: str = "dp",
    tensor_axis: str = "tp",
    hardware: str | Hardware | Any | None = None,
    memory_limit: float | None = None,
    remat: bool | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    zero_stage: Literal[0, 1] = 0,
    compile: bool = True,  # noqa: A002
) -> Plan:
    """Plans and compiles a pipelined training step of ``loss_fn`` with ``optimizer``.

    ``loss_fn(*args)`` returns a float scalar: the mean (``reduction="mean"``) or sum over the
    examples of the batch arguments (``batch_argnums``); the others are the parameters the
    optimizer trains, except *inputs*: arguments without float leaves (a PRNG key, a step
    counter), not trained, given anew to every step. Use the returned plan as
    ``state = plan.init(*params)``, ``state, loss = plan.step(state, *batch_and_inputs)`` (the
    arguments that are not parameters, in order; state is donated), and
    ``params = plan.unplace(state)``. Dropout: pass a fresh key per step; microbatch j (global
    index r·m + j over data replicas) draws from ``jax.random.fold_in(key, j)``, as
    `autopipe.microbatch_reference` does on one device. A non-float leaf of a parameter
    argument that the loss reads is refused (the optimizer would be given it).
    ``remat=None`` recomputes a stage's forward in its backward only where keeping residuals
    would not fit ``memory_limit``. The optimizer sees
    every leaf with its own shape (`autopipe.passes.optimizer`); one it cannot run exactly on
    the per-stage slots is refused with an error.
    A mesh axis named ``data_axis`` splits every microbatch's rows over data-parallel
    replicas, whose gradients are summed before the update (the batch must divide by
    replicas × microbatches); other non-pipeline axes replicate the step. ``zero_stage=1``
    (ZeRO-1) splits the optimizer state over the data replicas: each keeps 1/dp of it (of every
    state leaf along its first dimension that dp divides), gradients are reduce-scattered and
    the updated parameters all-gathered; the memory model counts the split.
    A mesh axis named ``tensor_axis`` splits operators as the forward planner does (Megatron's
    column/row-parallel matmuls, heads, ...): every stage's forward and backward run their
    planned strategies on shards with Megatron's conjugate collectives; split parameters, their
    gradients and optimizer state stay split; ``unplace`` returns whole leaves. ``mesh=N`` or
    ``mesh=None`` (this process's devices) plans every pipeline × data × tensor layout of the
    devices with the training planner and compiles the fastest (``plan.factorizations``).
    ``schedule="auto"`` plans every schedule and compiles the one whose predicted step (its
    table run lock-step with the duration model) is fastest under the memory limit.
    ``num_microbatches=None`` does the same over microbatch counts (`autopipe._microbatches`).
    """
    v = check_schedule(schedule, virtual_stages)
    check_reduction(reduction)
    axes = dict(pipeline_axis=pipeline_axis, data_axis=data_axis, tensor_axis=tensor_axis)
    lower = dict(hardware=hardware, num_microbatches=num_microbatches, virtual_stages=v, **axes)
    options = dict(schedule=schedule, memory_limit=memory_limit, remat=remat, reduction=reduction)
    options |= dict(
        zero_stage=zero_stage, virtual_stages=virtual_stages if schedule == "auto" else v
    )
    if mesh is None or isinstance(mesh, int):
        return train_on_devices(
            loss_fn,
            optimizer,
            example_args,
            devices=mesh,
            names=(pipeline_axis, data_axis, tensor_axis),
            lower=dict(batch_argnums=batch_argnums, **lower),
            plan=options,
            compile_=compile,
            started=time.perf_counter(),
        )
    traced = trace(loss_fn, *example_args, batch_argnums=batch_argnums)
    lowered = traced.lower(mesh, training=True, **lower)
    if num_microbatches is None:
        at = lambda m: lowered.plan(optimizer=optimizer, num_microbatches=m, **options)  # noqa: E731
        multiple = lowered.front.num_stages // v if schedule == "interleaved_1f1b" else 1
        return fastest_count(lowered, at, multiple).finish(compile=compile)
    return lowered.plan(optimizer=optimizer, **options).finish(compile=compile)
