"""The front end: argument checks, trace at microbatch size, IR, split, operator costs.

`make_front` is everything a plan of one function on one mesh needs before any search: the
mesh's axes, the hardware it is priced for, the traced program (at the rows of one microbatch
of one data-parallel replica), its split into pipeline and local operators
(`passes.layout.split_ops`) and the per-operator costs (`passes.costs.operator_costs`).
With a tensor axis the program's fused projections are cut apart first (`passes.split_fused`),
so that each piece can be split by heads; `with_tensor_axis` does the same for a search that
prices a tensor axis on a front traced without one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from autopipe.cost_models.hardware import Hardware, get_hardware
from autopipe.passes.costs import OperatorCosts, operator_costs
from autopipe.passes.graph import build_program
from autopipe.passes.inputs import check_inputs, input_leaves
from autopipe.passes.ir import Program
from autopipe.passes.layout import Split, split_ops
from autopipe.passes.split_fused import split_fused
from autopipe.passes.trace import Traced, batch_size_of, make_arg_spec, trace

REDUCTIONS = ("mean", "sum")


def mesh_axes(mesh: Any, axis: str) -> tuple[tuple[str, int], ...]:
    if isinstance(mesh, dict):
        axes = tuple((str(k), int(v)) for k, v in mesh.items())
    elif hasattr(mesh, "axis_names") and hasattr(mesh, "shape"):
        axes = tuple((str(n), int(mesh.shape[n])) for n in mesh.axis_names)
    else:
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('pp',))), an "
            f"AbstractMesh, or a dict of axis sizes for planning only; got {type(mesh).__name__}."
        )
    if axis not in dict(axes):
        names = tuple(n for n, _ in axes)
        raise ValueError(
            f"mesh axes {names} have no pipeline axis {axis!r}. Create the mesh with a "
            f"{axis!r} axis, e.g. jax.make_mesh((8,), ({axis!r},)), or name the pipeline axis "
            f"with pipeline_axis=... (one of {names})."
        )
    return axes


def is_concrete(mesh: Any) -> bool:
    return isinstance(mesh, jax.sharding.Mesh)


def resolve_hardware(hardware: Any, mesh: Any) -> Hardware:
    """``hardware=`` for a mesh: None picks the preset of the mesh's devices (cpu for a mesh
    of axis sizes), a `Calibration` gives its measured hardware."""
    platform, kind = "cpu", ""
    if is_concrete(mesh):
        device = mesh.devices.flat[0]
        platform, kind = device.platform, getattr(device, "device_kind", "")
    return get_hardware(hardware, platform=platform, device_kind=kind)


def check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction={reduction!r}; the loss must be a 'mean' over the batch's examples "
            "(scaled by 1/(microbatches × data replicas) when accumulated) or a 'sum' (not "
            "scaled). Pass reduction='mean' or reduction='sum'."
        )
    return reduction


def default_microbatches(batch: int, stages: int) -> int:
    """Largest divisor of the batch that is at most 2 × stages (at least 1)."""
    return max(d for d in range(1, min(batch, 2 * stages) + 1) if batch % d == 0)


def check_outputs(traced: Traced, program: Program) -> None:
    mb = traced.microbatch_size
    batch_in = set(program.invars) & program.batch_dependent
    for k, a in enumerate(program.outvars):
        ok = isinstance(a, int) and (a in program.batch_dependent or a in batch_in)
        shape = tuple(program.avals[a].shape) if isinstance(a, int) else ()
        if not ok or not shape or shape[0] != mb:
            raise ValueError(
                f"{traced.spec.fn_name}: output {k} (shape {shape}) does not carry the batch on "
                f"its leading axis (microbatch size {mb}). Pipelining splits the batch into "
                "microbatches and concatenates the outputs, so every output must be computed "
                "per example with the batch first; return batch-independent values separately."
            )


def check_loss(traced: Traced, program: Program) -> None:
    outs = program.outvars
    aval = program.avals[outs[0]] if len(outs) == 1 and isinstance(outs[0], int) else None
    if aval is None or aval.shape != () or not np.issubdtype(aval.dtype, np.floating):
        shapes = [
            tuple(getattr(program.avals[a], "shape", ())) if isinstance(a, int) else ()
            for a in outs
        ]
        raise ValueError(
            f"{traced.spec.fn_name}: a training loss function must return one float scalar "
            f"(the loss, a mean over the batch), but it returns {len(outs)} value(s) with "
            f"shapes {shapes}. Return only the loss."
        )
    if outs[0] not in program.batch_dependent:
        raise ValueError(f"{traced.spec.fn_name}: the loss does not depend on the batch.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Front:
    """What every plan of a function needs before the search: trace, IR, split, costs."""

    traced: Traced
    program: Program
    split: Split
    costs: OperatorCosts
    hardware: Hardware
    mesh_axes: tuple[tuple[str, int], ...]
    num_stages: int
    num_microbatches: int  # per data-parallel replica; the program is traced at one of them
    data_axis: str | None = None  # a mesh axis of size > 1 that splits every microbatch
    tensor_axis: str | None = None  # a mesh axis of size > 1 that splits operators
    training: bool = False
    virtual_stages: int = 1
    # the IR before `passes.split_fused` cut its fused projections apart (None: not cut)
    uncut: tuple[Program, Split, OperatorCosts] | None = None

    def axis_size(self, name: str | None) -> int:
        return dict(self.mesh_axes).get(name, 1) if name else 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrontOptions:
    """The arguments of `make_front` besides the function and its example arguments."""

    mesh: Any
    pipeline_axis: str = "pp"
    num_microbatches: int | None = None
    batch_argnums: Sequence[int] = (1,)
    num_stages: int | None = None
    hardware: Any = None
    training: bool = False
    virtual_stages: int = 1
    data_axis: str | None = None
    tensor_axis: str | None = None
    # with a tensor axis, cut fused projections apart (training: only for an optimizer that
    # treats a block of a leaf as it treats the leaf, `passes.optimizer_exact.shape_free`)
    split_fused: bool = True


def make_front(
    fn: Callable, args: Sequence[Any], opts: FrontOptions, reuse: Front | None = None
) -> Front:
    """``reuse``: a front of the same function and arguments; its trace, IR and costs are
    taken when it was traced at the same microbatch rows for the same hardware."""
    axes = mesh_axes(opts.mesh, opts.pipeline_axis)
    sizes = dict(axes)
    data_axis = opts.data_axis if sizes.get(opts.data_axis, 1) > 1 else None
    tensor_axis = opts.tensor_axis if sizes.get(opts.tensor_axis, 1) > 1 else None
    dp = sizes[data_axis] if data_axis else 1
    p = _num_stages(opts, sizes[opts.pipeline_axis] * opts.virtual_stages)
    spec = make_arg_spec(fn, args, opts.batch_argnums)
    m = _microbatches(spec, opts.num_microbatches, dp, p, data_axis)
    hw = resolve_hardware(opts.hardware, opts.mesh)
    key = (m * dp, hw, opts.training)
    if reuse is not None and (reuse.traced.num_microbatches, reuse.hardware, reuse.training) == key:
        traced = reuse.traced
        program, split, costs = reuse.uncut or (reuse.program, reuse.split, reuse.costs)
    else:
        traced = trace(fn, args, batch_argnums=opts.batch_argnums, num_microbatches=m * dp)
        flags = input_leaves(traced.spec, training=opts.training)
        program = build_program(traced.jaxpr, traced.spec.batch_leaves, flags)
        (check_loss if opts.training else check_outputs)(traced, program)
        check_inputs(traced.spec, program, training=opts.training)
        split = split_ops(program, training=opts.training)
        costs = operator_costs(program, split, hw)
    uncut = (program, split, costs)
    if tensor_axis and opts.split_fused:
        program, split, costs = _cut_fused(uncut, hw, opts.training)
    n_ops = len(split.pipeline)
    if n_ops < p:
        raise ValueError(
            f"{traced.spec.fn_name}: {p} stages requested but the function has only {n_ops} "
            f"batch-dependent operators, and every stage needs at least one. Use a pipeline "
            f"axis of at most {n_ops} devices."
        )
    return Front(
        traced=traced,
        program=program,
        split=split,
        costs=costs,
        hardware=hw,
        mesh_axes=axes,
        num_stages=p,
        num_microbatches=m,
        data_axis=data_axis,
        tensor_axis=tensor_axis,
        training=opts.training,
        virtual_stages=opts.virtual_stages,
        uncut=uncut if program is not uncut[0] else None,
    )


def _cut_fused(ir: tuple[Program, Split, OperatorCosts], hw: Hardware, training: bool):
    """(program, split, costs) with the fused projections cut apart (``ir`` if there are none)."""
    program = split_fused(ir[0])
    if program is ir[0]:
        return ir
    split = split_ops(program, training=training)
    return program, split, operator_costs(program, split, hw)


def with_tensor_axis(front: Front, tensor_axis: str | None, split_fused: bool = True) -> Front:
    """``front`` priced with ``tensor_axis`` (None: none), its IR cut as `make_front` would."""
    base = front.uncut or (front.program, front.split, front.costs)
    ir = _cut_fused(base, front.hardware, front.training) if tensor_axis and split_fused else base
    return dataclasses.replace(
        front,
        tensor_axis=tensor_axis,
        program=ir[0],
        split=ir[1],
        costs=ir[2],
        uncut=base if ir is not base else None,
    )


def _num_stages(opts: FrontOptions, p_axis: int) -> int:
    p = p_axis if opts.num_stages is None else opts.num_stages
    if p != p_axis:
        v = opts.virtual_stages
        raise ValueError(
            f"num_stages={opts.num_stages} but the pipeline axis {opts.pipeline_axis!r} has "
            f"{p_axis // v} devices × {v} virtual stages; use "
            f"num_stages=None (or {p_axis}), or a mesh whose {opts.pipeline_axis!r} axis has "
            f"{opts.num_stages // v} devices."
        )
    return p


def _microbatches(spec: Any, m: int | None, dp: int, p: int, data_axis: str | None) -> int:
    batch = batch_size_of(spec)
    if batch % dp:
        raise ValueError(
            f"{spec.fn_name}: the batch has {batch} rows, which the data axis {data_axis!r} of "
            f"{dp} devices cannot split evenly. Use a batch that is a multiple of {dp}, or a "
            "smaller data axis."
        )
    if m is None:
        return default_microbatches(batch // dp, p)
    if dp > 1 and (batch // dp) % m:
        raise ValueError(
            f"{spec.fn_name}: each of the {dp} data-parallel replicas gets {batch // dp} rows "
            f"of the {batch}-row batch, which num_microbatches={m} does not "
            f"divide. Use a divisor of {batch // dp}."
        )
    return m
