"""A training stage as functions of its values (`passes.train_actions` runs them): the stage
under ``jax.vjp`` as F and B differentiate it (with W split off, around `passes.split_backward`'s
identities), W's function of the parameters and the activation inputs B stored, and the
structure of the residuals F keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from autopipe.passes.ir import Program
from autopipe.passes.layout import StageLayout
from autopipe.passes.residuals import saving
from autopipe.passes.split_backward import Hook, Recorder, WeightUses, is_float, weight_uses
from autopipe.passes.tensor_local import TensorPlan, as_one_device, eval_stage, input_dim


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageIO:
    """The differentiable interface of one stage. Integer and boolean values (masks, indices,
    counts) cross stages forward like any other, but carry no cotangent: they enter as
    ``fixed`` and leave as ``aux``, outside the differentiated function."""

    params: tuple[int, ...]  # float parameter values (differentiated)
    recv: tuple[int, ...]  # float values received (differentiated)
    fixed: tuple[int, ...]  # int/bool parameter or received values (not differentiated)
    fixed_recv: tuple[int, ...]  # the received ones among ``fixed``
    outputs: tuple[int, ...]  # float values sent on, or the loss (differentiated)
    aux: tuple[int, ...]  # int/bool values sent on (no cotangent)


def stage_io(program: Program, layout: StageLayout, last: bool) -> StageIO:
    params = layout.params
    recv = layout.recv.values()
    floats = lambda vs: tuple(v for v in vs if is_float(program.avals[v]))  # noqa: E731
    others = lambda vs: tuple(v for v in vs if not is_float(program.avals[v]))  # noqa: E731
    sent = tuple(program.outvars) if last else layout.send.values()
    return StageIO(
        params=floats(params),
        recv=floats(recv),
        fixed=others((*params, *recv)),
        fixed_recv=others(recv),
        outputs=floats(sent) if not last else sent,
        aux=others(sent) if not last else (),
    )


def _apply_fn(
    program: Program,
    layout: StageLayout,
    io: StageIO,
    consts: dict,
    tensor: TensorPlan | None = None,
    split: Mapping[int, int] | None = None,
    uses: WeightUses | None = None,
    stash_of: Mapping[tuple[int, int], int] | None = None,
) -> Callable:
    """``apply(params, recv, fixed, xs, probes) -> (outputs, aux)``: the stage,
    differentiable in its first two arguments and ``probes`` (`jax.vjp` with ``has_aux``).
    With a tensor axis (``tensor``, conjugate) every operator runs its planned strategy on
    this device's shards (`passes.tensor_local`): parameters in ``split`` (value → dim) arrive
    as shards, everything else whole, and the values leaving the stage are made whole.
    With ``uses`` B leaves the tapped operators' weight gradients to W
    (`passes.split_backward.Hook`): ``probes`` are one zero per tapped result and one per
    stored activation input (``stash_of``); None: those follow the outputs (as this device
    holds them), to learn their shapes."""
    batch_in = batch_values(program)
    split = split or {}

    def apply(param_vals, recv_vals, fixed_vals, xs, probes=()):
        env = dict(consts)
        env.update(zip(io.params, param_vals, strict=True))
        env.update(zip(io.recv, recv_vals, strict=True))
        env.update(zip(io.fixed, fixed_vals, strict=True))
        env.update(zip(batch_in, xs, strict=True))
        hook = None if uses is None else Hook(uses=uses, stash_of=stash_of, probes=probes)
        whole = eval_stage(program, layout.ops, env, tensor, split, hook)
        outs = tuple(whole(v) for v in io.outputs)
        if hook is not None and probes is None:
            outs += ((tuple(hook.taps), tuple(hook.stash[k] for k in range(len(hook.stash)))),)
        return outs, tuple(whole(v) for v in io.aux)

    return apply


def _weight_fn(
    program: Program,
    io: StageIO,
    consts: dict,
    tensor: TensorPlan | None,
    split: Mapping[int, int],
    uses: WeightUses,
    keys: Sequence[tuple[int, Any]],
) -> Callable:
    """W's function ``(params, fixed, stash) -> tapped results``: the stage's operators that
    depend on no activation and its tapped operators, these reading the activation inputs B
    stored (``stash``: one per (value, Dim) of ``keys``) — differentiated in ``params`` with
    the stored cotangents of the results it gives x^T g and nothing else of the stage."""
    ops = sorted({*uses.static, *uses.tapped})

    def apply(param_vals, fixed_vals, stash):
        env = dict(consts)
        env.update(zip(io.params, param_vals, strict=True))
        env.update((v, x) for v, x in zip(io.fixed, fixed_vals, strict=True) if x is not None)
        hook = Recorder(uses=uses)
        eval_stage(program, ops, env, tensor, split, hook, dict(zip(keys, stash, strict=True)))
        return tuple(hook.taps)

    return apply


def stash_keys(program, tensor, uses: WeightUses) -> tuple[tuple, dict]:
    """The activation inputs B stores for W, one per (value, Dim) the tapped operators read,
    and (tapped op, input position) → its index."""
    keys: dict[tuple[int, Any], int] = {}
    of = {}
    for i, j in uses.stashed:
        key = (program.ops[i].invars[j], input_dim(program, tensor, i, j))
        of[i, j] = keys.setdefault(key, len(keys))
    return tuple(keys), of


@dataclasses.dataclass(frozen=True, kw_only=True)
class Residuals:
    """How a stage's VJP residuals are stored: which leaves are its own parameters (not
    stored), and the avals of the rest."""

    treedef: Any
    param_index: tuple[int, ...]  # per leaf: index into param_vals, or -1 when stored
    stored: tuple[jax.ShapeDtypeStruct, ...]  # the stored leaves, in order


def batch_values(program: Program) -> list[int]:
    """The values a stage reads per microbatch: batch leaves, then the inputs as this
    microbatch sees them (`passes.inputs`)."""
    return [*(v for v in program.invars if v in program.batch_dependent), *program.input_invars]


def residual_spec(
    fn: Callable, args: tuple, remat: bool, n_fixed_recv: int, mesh: Any = None
) -> Residuals:
    """Traces ``jax.vjp`` of a stage abstractly to learn its residual structure (under remat:
    the stage input, i.e. the received values, the last ``n_fixed_recv`` of ``fixed``
    included). ``mesh``: traced inside a shard_map manual over its axes (the stage binds
    collectives), ``args`` being one device's local shapes."""
    found = {}

    def probe(param_vals, recv_vals, fixed_vals, xs, probes):
        if remat:  # the stage input: its float values and the received int/bool ones
            got = (*recv_vals, *fixed_vals[len(fixed_vals) - n_fixed_recv :])
            leaves, treedef = jax.tree.flatten(got)
            found["spec"] = (treedef, [-1] * len(leaves))
            return leaves
        f = saving(fn, fixed_vals, xs)
        _, vjp_fn, _ = jax.vjp(f, param_vals, recv_vals, probes, has_aux=True)
        leaves, treedef = jax.tree.flatten(vjp_fn)
        index = [next((i for i, q in enumerate(param_vals) if q is x), -1) for x in leaves]
        found["spec"] = (treedef, index)
        return [x for x, i in zip(leaves, index, strict=True) if i < 0]

    stored = jax.eval_shape(as_one_device(probe, mesh), *args)
    treedef, index = found["spec"]
    return Residuals(treedef=treedef, param_index=tuple(index), stored=tuple(stored))


def stage_fns(program, stages, ios, tensor, split, uses) -> tuple[tuple, tuple]:
    """Every stage's `_apply_fn`, and (with W split off) its `_weight_fn`."""
    consts = dict(program.consts)
    fns, fns_w = [], []
    for st, io, u in zip(stages, ios, uses, strict=True):
        keys, of = stash_keys(program, tensor, u) if u is not None else ((), None)
        fns.append(_apply_fn(program, st, io, consts, tensor, split, u, of))
        fns_w.append(_weight_fn(program, io, consts, tensor, split, u, keys) if u else None)
    return tuple(fns), tuple(fns_w)


def stage_weight_uses(program: Program, layout: StageLayout, io: StageIO) -> WeightUses:
    acts = (*io.recv, *io.fixed_recv, *batch_values(program))
    return weight_uses(program, layout.ops, io.params, acts, (*io.outputs, *io.aux))
