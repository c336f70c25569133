"""Parameters read by stages on several devices (tied embeddings): copies kept equal in training.

A value several devices read — GPT-2's token embedding, read by the first stage's lookup and the
last stage's output head — is one row on each of its holders, in the same slot of the
`ParamLayout` (``align_shared``; `ParamLayout.shared` lists them). Each copy's gradient is only
its own stages' contribution; the parameter's gradient is their sum. So every step:

1. `sum_copies` (inside the pipeline's shard_map, after the tick scan, outside any switch
   branch: a collective in a branch deadlocks) gives every holder the sum of all copies'
   gradients. Holders exchange their rows with ``ppermute`` among themselves only (n − 1 ring
   shifts for n holders) and each adds the n contributions in the same order (holder 0 first),
   so the sums are bit-identical on every holder.
2. The optimizer then sees equal gradients, parameters and state on every copy:
   - in the ``"local"`` mode (per device, per leaf, `passes.optimizer`) each copy is a leaf of
     its own whose update depends on that leaf only, so every copy gets the identical update;
   - in the ``"global"`` mode (whole slots: global norms) a copy counted on each holder would
     count the leaf n times in ``clip_by_global_norm``. `only_first_copy` zeroes the other
     holders' rows of gradients and parameters before the update — they become exactly like
     the zero padding rows the global mode already adds nothing for — and `copy_first` writes
     the first holder's updated row back into the others (``ppermute``, again outside any
     branch).

Both keep the copies bit-identical after every step (tested by reading the raw slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

Shared = Sequence[tuple[int, int, tuple[int, ...]]]  # (slot, value, holders): ParamLayout.shared


def check_aligned(layout: Any) -> Shared:
    """`layout.shared` (a `ParamLayout`), checked to hold every value held by several devices
    with all its holders: a copy outside it would train on its own stages' gradient alone."""
    holders: dict[int, set[int]] = {}
    for d in range(layout.num_devices):
        for v in layout.held(d):
            holders.setdefault(v, set()).add(d)
    listed = {v: set(ds) for _, v, ds in layout.shared}
    assert len(listed) == len(layout.shared), "a shared value in two slots: align_shared"
    assert listed == {v: ds for v, ds in holders.items() if len(ds) > 1}, (listed, holders)
    return layout.shared


def sum_copies(grads: Sequence[Any], shared: Shared, axis: str, num_devices: int) -> tuple:
    """Inside a shard_map manual over ``axis``: this device's gradient rows (one per slot, no
    leading axis) with every shared slot's row replaced, on its holders, by the sum of all
    holders' rows, added in holder order."""
    out = list(grads)
    dev = jax.lax.axis_index(axis)
    for k, _, holders in shared:
        n, g = len(holders), out[k]
        got = [g]  # got[r]: the row of the holder r places before this one on the ring
        for r in range(1, n):
            perm = [(h, holders[(i + r) % n]) for i, h in enumerate(holders)]
            got.append(jax.lax.ppermute(g, axis, perm))
        pos_table = np.array([holders.index(d) if d in holders else 0 for d in range(num_devices)])
        pos = jnp.asarray(pos_table, jnp.int32)[dev]
        total = None
        for j in range(n):  # holder j's row arrived at shift (pos - j) mod n
            term = jax.lax.select_n((pos - j) % n, *got) if n > 1 else g
            total = term if total is None else total + term
        held = jnp.asarray(np.isin(np.arange(num_devices), holders))[dev]
        out[k] = jnp.where(held, total, g)
    return tuple(out)


def only_first_copy(slots: Sequence[Any], shared: Shared) -> tuple:
    """Global ``(p, *shape)`` slots with every shared value's rows zeroed except its first
    holder's: the optimizer sees each shared leaf once."""
    out = list(slots)
    for k, _, holders in shared:
        keep = np.ones(out[k].shape[0], bool)
        keep[list(holders[1:])] = False
        mask = jnp.asarray(keep).reshape(-1, *([1] * (out[k].ndim - 1)))
        out[k] = jnp.where(mask, out[k], jnp.zeros((), out[k].dtype))
    return tuple(out)


def copy_first(slots: Sequence[Any], shared: Shared, *, mesh: Any, axis: str) -> tuple:
    """Global ``(p, *shape)`` slots with every shared value's first holder's row written into
    its other holders' rows (one ``ppermute`` per other holder, in a shard_map)."""
    if not shared:
        return tuple(slots)
    ks = sorted({k for k, _, _ in shared})

    def body(*rows):
        dev = jax.lax.axis_index(axis)
        out = dict(zip(ks, rows, strict=True))
        for k, _, holders in shared:
            x = out[k]
            for h in holders[1:]:
                got = jax.lax.ppermute(x, axis, [(holders[0], h)])
                x = jnp.where(dev == h, got, x)
            out[k] = x
        return tuple(out[k] for k in ks)

    smap = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(P(axis) for _ in ks),
        out_specs=tuple(P(axis) for _ in ks),
        axis_names={axis},
        check_vma=False,
    )
    new = dict(zip(ks, smap(*(slots[k] for k in ks)), strict=True))
    return tuple(new.get(k, x) for k, x in enumerate(slots))
