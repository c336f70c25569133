"""Is the optimizer, run on the pipeline's parameter slots, exactly the user's optimizer?

The training step runs ``optimizer.update`` on slots (see `passes/optimizer.py`), not on the
user's parameter pytree: the leaves are the slot rows, in a tuple, and a row may be one layer of
a stacked ``nn.scan`` leaf. A transform that decides by a leaf's path (``optax.multi_transform``
labels, ``mask=`` functions reading names), or computes a statistic over a whole leaf that the
layout cut into layers (lamb's trust ratio on a stacked kernel), or by a leaf's ndim where the
row has one dimension less, would silently compute something else on the slots.

`check_exact` compares, for every slot row, the computation the update does on that row with
the computation it does on the user's leaf the row holds, both read off jaxprs: the
*leaf-local* equations (those whose outputs depend on that leaf and no other), each described by
its primitive, its parameters, literal operands and where its operands come from. Equal
descriptions mean the same function of the leaf's gradient, parameter and state (shared scalars
such as the step count and global statistics enter as operands from outside). Where a row is
only part of its leaf (a layer of a stacked leaf), shapes are left out of the comparison and
the leaf's computation must be element by element: no reduction may read it. Anything else is
refused with an error naming the leaf, never run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from autopipe._compat import Literal as JaxLiteral
from autopipe.passes.ir import source_of
from autopipe.passes.optimizer import call_body, choose_mode, update_jaxpr

# parameters that carry shapes (left out where a row is part of its leaf)
_SHAPE_PARAMS = frozenset(
    {
        "shape",
        "sizes",
        "new_sizes",
        "broadcast_dimensions",
        "dimensions",
        "start_indices",
        "limit_indices",
        "strides",
        "axes",
        "slice_sizes",
        "sharding",
    }
)
_REDUCTIONS = frozenset(
    {
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_prod",
        "argmax",
        "argmin",
        "dot_general",
        "reduce_and",
        "reduce_or",
        "cumsum",
        "cumprod",
        "cummax",
        "cumlogsumexp",
        "sort",
        "reduce_precision_sum",
    }
)


def _flatten_eqns(jaxpr, env: dict) -> list[tuple]:
    """(primitive name, params, invars, outvars) of every equation, call-like ones inlined;
    ``env`` renames inner variables to the outer ones they stand for."""
    out = []
    for eqn in jaxpr.eqns:
        ins = [a if isinstance(a, JaxLiteral) else env.get(a, a) for a in eqn.invars]
        sub = call_body(eqn)
        if sub is not None:
            inner = dict(zip(sub.invars, ins, strict=True))
            out += _flatten_eqns(sub, inner)
            for o, r in zip(eqn.outvars, sub.outvars, strict=True):
                env[o] = r if isinstance(r, JaxLiteral) else inner.get(r, r)
            continue
        out.append((eqn.primitive.name, eqn.params, ins, list(eqn.outvars)))
    return out


def _text(value: Any, erase: bool) -> str:
    text = str(value)
    return re.sub(r"\[[0-9,]*\]|\([0-9, ]*\)", "[]", text) if erase else text


def _describe(params: Mapping[str, Any], erase: bool) -> tuple:
    return tuple(
        (k, _text(v, erase))
        for k, v in sorted(params.items())
        if not (erase and k in _SHAPE_PARAMS)
    )


def leaf_signatures(jaxpr, n: int, erase: Sequence[bool]) -> list[tuple[tuple, bool]]:
    """Per leaf i (inputs i and n + i: its gradient and parameter): the description of its
    leaf-local equations, and whether one of them reduces over the leaf's elements."""
    owner: dict[Any, frozenset] = {}  # var -> the leaves it depends on
    made: dict[Any, str] = {}  # var -> its tag (own values, and values computed from no leaf)
    for k, v in enumerate(jaxpr.invars):
        if k < 2 * n:
            owner[v], made[v] = frozenset({k % n}), ("grad", "param")[k // n]
        else:  # optimizer state: tagged by type only (its order differs between the trees)
            owner[v], made[v] = frozenset(), f"state:{v.aval}"
    sigs: list[list] = [[] for _ in range(n)]
    reduces = [False] * n

    def tag(a, leaf: int | None) -> str:
        if isinstance(a, JaxLiteral):
            return f"lit:{np.asarray(a.val).tolist()}"
        deps = owner.get(a, frozenset())
        erased = leaf is not None and erase[leaf]
        if a in made and (not deps or deps == {leaf}):
            return _text(made[a], erased) if not deps else made[a]
        return f"{'global' if deps else 'outside'}:{_text(getattr(a, 'aval', None), erased)}"

    for name, params, ins, outs in _flatten_eqns(jaxpr, {}):
        live = [a for a in ins if not isinstance(a, JaxLiteral)]
        if name in ("add", "add_any") and len(live) == 1 and _is_zero(ins):
            # x + 0 is x: the first term of a sum over leaves (a global norm) starts from 0,
            # and which leaf comes first differs between the user's tree and the slots
            (x,) = live
            owner[outs[0]] = owner.get(x, frozenset())
            if x in made:
                made[outs[0]] = made[x]
            continue
        deps = frozenset().union(*(owner.get(a, frozenset()) for a in live))
        leaf = next(iter(deps)) if len(deps) == 1 else None
        desc = (name, _describe(params, leaf is not None and erase[leaf]))
        desc += (tuple(tag(a, leaf) for a in ins),)
        for o in outs:
            owner[o] = deps
        if not deps:  # shared values (step counts, schedules): tagged by how they are made,
            # shapes left out (a scalar broadcast to a leaf's shape is the same value per element)
            shared = (name, _describe(params, True), tuple(_text(tag(a, None), True) for a in ins))
            for j, o in enumerate(outs):
                made[o] = f"made:{hash((shared, j))}"
            continue
        if leaf is None:
            continue
        sigs[leaf].append(desc)
        if name in _REDUCTIONS or "branches" in params or "body_jaxpr" in params:
            reduces[leaf] |= any(getattr(getattr(a, "aval", None), "ndim", 0) for a in live)
        for j, o in enumerate(outs):
            made[o] = f"own:{len(sigs[leaf])}.{j}"
    return [(tuple(s), r) for s, r in zip(sigs, reduces, strict=True)]


def _is_zero(ins) -> bool:
    return any(isinstance(a, JaxLiteral) and np.all(np.asarray(a.val) == 0) for a in ins)


def check_exact(
    optimizer: optax.GradientTransformation,
    tree: Any,
    rows: Sequence[jax.ShapeDtypeStruct],
    held: Sequence[tuple[int, int, bool]],
    paths: Sequence[str],
    *,
    check_reductions: bool = True,
) -> None:
    """Raise unless the update on ``rows`` (a tuple, one per slot row) computes, for every
    ``(row, leaf, whole)`` in ``held``, what the update on the user's ``tree`` computes for that
    leaf. ``whole``: the row is the leaf itself (else a part of it, e.g. one layer, or a slot
    holding several leaves). ``check_reductions=False`` where statistics over slots are checked
    elsewhere (`passes.optimizer.choose_mode` for the global mode)."""
    leaves = jax.tree.leaves(tree)
    whole = [True] * len(leaves)
    for _, leaf, w in held:
        whole[leaf] &= w
    parts = {row for row, leaf, w in held if not w}
    mine = leaf_signatures(update_jaxpr(optimizer, tree), len(leaves), [not w for w in whole])
    theirs = leaf_signatures(
        update_jaxpr(optimizer, tuple(rows)), len(rows), [r in parts for r in range(len(rows))]
    )
    for row, leaf, w in held:
        (want, reduces), (got, _) = mine[leaf], theirs[row]
        if check_reductions and not w and reduces:
            raise ValueError(
                _message(
                    paths[leaf],
                    "computes a statistic over the whole leaf "
                    "(a norm, as optax.lamb's trust ratio or adafactor's moments do), but the "
                    "pipeline holds this leaf in parts (the layers of a stacked nn.scan/nnx.scan "
                    "leaf live on different stages)",
                )
            )
        if want != got:
            raise ValueError(
                _message(
                    paths[leaf],
                    "treats this leaf differently from the "
                    "pipeline's copy of it: it decides by the leaf's path or name (multi_transform "
                    "labels, a mask= that reads names) or by its shape or ndim where the pipeline "
                    "holds a part of the leaf, and the pipeline's update sees a tuple of arrays "
                    "without your paths",
                )
            )


def shape_free(
    optimizer: optax.GradientTransformation, avals: Sequence[jax.ShapeDtypeStruct]
) -> bool:
    """Whether the update does the same to a leaf held flat (or reshaped to another leaf's
    shape of equal size) as to the leaf: element by element, or with only global statistics
    (a global norm sums every element whatever the shapes). Then training may align
    parameters by size (`passes.param_layout`, ``by="size"``: an embedding ``(V, D)`` and an
    untied head ``(D, V)`` share a slot) instead of by shape, which pads."""
    leaves = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals)
    flat = [jax.ShapeDtypeStruct((int(np.prod(a.shape)),), a.dtype) for a in leaves]
    held = [(i, i, False) for i in range(len(leaves))]  # every row a reshaped leaf
    paths = [str(i) for i in range(len(leaves))]
    for check_reductions in (True, False):
        try:
            stacked = [jax.ShapeDtypeStruct((1, *a.shape), a.dtype) for a in leaves]
            if not check_reductions and choose_mode(optimizer, stacked) != "global":
                return False  # a per-leaf statistic: whole leaves only
            check_exact(optimizer, leaves, flat, held, paths, check_reductions=check_reductions)
            return True
        except ValueError:
            continue
    return False


def layout_by(
    optimizer: optax.GradientTransformation, avals: Sequence[jax.ShapeDtypeStruct]
) -> str:
    """How a training layout aligns parameters (`passes.param_layout`): by size where
    `shape_free`, else by shape. Checked on one leaf of each shape and dtype (what the check
    asks holds leaf by leaf, and a global statistic shows on any set of leaves): GPT-3 175B's
    1,542 leaves are 9 kinds, checked in 0.1 s instead of 9."""
    kinds = {(tuple(a.shape), np.dtype(a.dtype)): a for a in avals}
    return "size" if shape_free(optimizer, list(kinds.values())) else "shape"


def _message(path: str, why: str) -> str:
    return (
        f"optimizer: for parameter {path} the optax transformation {why}. Running it would "
        "give parameters different from single-device training, so autopipe refuses it. Use a "
        "transformation that treats every leaf alike by its values and shape (sgd, adam, "
        "adamw without mask, lion, ...), a mask= by ndim on unstacked models, or fewer stages."
    )


def check_optimizer(
    optimizer: optax.GradientTransformation, program: Any, spec: Any, layout: Any, mode: str
) -> None:
    """`check_exact` for a training step: the user's parameter tree (the non-batch arguments of
    `spec`, one or a tuple) against the slots of ``layout`` (a `ParamLayout`) as the step runs
    them in ``mode`` ("local": each device's rows; "global": the whole ``(p, *shape)`` slots)."""
    params = list(program.param_invars)  # inputs (keys, counters) are not trained
    index = {v: i for i, v in enumerate(params)}
    held = []
    for k, slot in enumerate(layout.slots):
        for v in {v for v in slot.values if v is not None}:
            raw, _ = source_of(program, v)  # a parameter, or a row or block of one
            same = tuple(slot.shape) == tuple(program.avals[v].shape)  # else a by-size slot
            held.append((k, index[raw], v in index and mode == "local" and same))
    trained = [v in index for v in program.invars]
    leaves = [a if t else None for a, t in zip(spec.in_avals, trained, strict=True)]
    args = jax.tree.unflatten(spec.in_tree, leaves)
    skip = {*spec.batch_args, *spec.input_args}
    trees = [a for i, a in enumerate(args) if i not in skip]
    tree = trees[0] if len(trees) == 1 else tuple(trees)
    paths = [p for p, t in zip(spec.in_paths, trained, strict=True) if t]
    if mode == "local":
        rows = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in layout.slots]
    else:
        p = layout.num_devices
        rows = [jax.ShapeDtypeStruct((p, *s.shape), s.dtype) for s in layout.slots]
    check_exact(optimizer, tree, rows, held, paths, check_reductions=mode == "local")
