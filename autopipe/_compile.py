"""Compilation: a plan's decisions → the emitted program (`passes.emit` / `passes.emit_train`)
lowered and compiled by XLA for a concrete mesh, with what the runtime needs to place
parameters (`autopipe._executable`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from autopipe._compat import gather_global
from autopipe._executable import _Runtime
from autopipe.passes.emit import emit
from autopipe.passes.emit_train import emit_train
from autopipe.passes.ir import assembler
from autopipe.passes.optimizer_exact import check_optimizer
from autopipe.passes.param_layout import gather_values, make_packers

if TYPE_CHECKING:
    from autopipe._front import Front as _Front


def _compile(front: _Front, layouts, sched, mesh, axis, dims, tensor) -> _Runtime:
    """``tensor``: (op → strategy, values handed over whole) of the tensor-parallel plan."""
    traced, program = front.traced, front.program
    emitted = emit(
        program,
        layouts,
        sched,
        mesh=mesh,
        axis=axis,
        batch_size=traced.batch_size,
        data_axis=front.data_axis,
        tensor_axis=front.tensor_axis,
        dims=dims,
        strategies=tensor[0],
        whole=tensor[1],
    )
    param_avals = emitted.buffers
    batch_avals = tuple(
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=emitted.batch_sharding)
        for a, b in zip(traced.spec.in_avals, traced.spec.batch_leaves, strict=True)
        if b
    )
    compiled = emitted.step.lower(
        param_avals, batch_avals, input_avals(front, emitted.input_sharding)
    ).compile()
    _check_branch_collectives(compiled.as_text(), front.traced.spec.fn_name)
    return _Runtime(
        emitted=emitted,
        compiled=compiled,
        packers=make_packers(program, front.split, emitted.params),
    )


def input_avals(front: _Front, sharding) -> tuple:
    """The inputs (`passes.inputs`) as the step takes them: replicated on every device."""
    prog = front.program
    return tuple(
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
        for v, a in zip(prog.invars, front.traced.spec.in_avals, strict=True)
        if v in prog.inputs
    )


def _check_branch_collectives(hlo: str, fn_name: str) -> None:
    """A collective-permute inside a stage's branch runs on that stage's devices only, while
    its rendezvous waits for every device: it would deadlock. An internal assertion: the
    emitter is manual over every axis and emits its tensor-axis collectives itself
    (`passes.tensor_local`), so XLA has nothing to reshard (tests/test_tp_models.py)."""
    bad = [
        line for line in hlo.splitlines() if " collective-permute(" in line and "/branch_" in line
    ]
    if bad:
        raise RuntimeError(
            f"{fn_name}: internal error: a collective-permute was compiled inside a pipeline "
            f"stage ({len(bad)} of them), which would deadlock when stages run different "
            "branches. Please report the model; planning without the tensor axis avoids it. "
            f"First one: {bad[0].strip()[:300]}"
        )


def _compile_train(
    front, layouts, sched, mesh, axis, optimizer, remat, loss_scale, *, zero_stage: int, tensor
) -> _Runtime:
    """``tensor``: (value → split dim, op → strategy, values handed over whole)."""
    traced, program = front.traced, front.program
    emitted = emit_train(
        program,
        layouts,
        sched,
        mesh=mesh,
        axis=axis,
        batch_size=traced.batch_size,
        optimizer=optimizer,
        remat=remat,
        loss_scale=loss_scale,
        data_axis=front.data_axis,
        zero_stage=zero_stage,
        tensor_axis=front.tensor_axis,
        dims=tensor[0],
        strategies=tensor[1],
        whole=tensor[2],
    )
    check_optimizer(optimizer, program, traced.spec, emitted.params, emitted.optimizer_mode)
    batch_avals = tuple(
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=emitted.batch_sharding)
        for a, b in zip(traced.spec.in_avals, traced.spec.batch_leaves, strict=True)
        if b
    )
    ins = input_avals(front, emitted.input_sharding)
    tables = emitted.place_tables(emitted.tables)
    args = (emitted.buffers, emitted.opt_avals, batch_avals, ins, tables)
    compiled = emitted.step.lower(*args).compile()
    packers = make_packers(program, front.split, emitted.params, training=True)
    init_opt = emitted.init_opt
    return _Runtime(
        emitted=emitted,
        compiled=compiled,
        packers=packers,
        init_opt=init_opt,
        unplace=_unplace_fn(program, emitted),
        tables=tables,
    )


def _unplace_fn(program, emitted) -> Callable:
    """Gather: parameter slots → the parameter leaves in input order (on the host device),
    reading each device's own rows."""
    params = program.param_invars

    def gather(bufs):
        def held(k):
            buf = bufs[k]
            split = k < len(emitted.params.slots) and emitted.params.slots[k].dim is not None
            if split or not buf.is_fully_addressable:  # tensor shards, or other processes
                return dict(enumerate(np.asarray(gather_global(buf))))
            return {
                shard.index[0].start or 0: np.asarray(shard.data)[0]
                for shard in buf.addressable_shards
            }

        value = assembler(program, gather_values(program, emitted.params, held))
        return [jnp.asarray(value(r)) for r in params]  # rows stacked, blocks concatenated

    return gather
