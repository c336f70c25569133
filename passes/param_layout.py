"""Parameter layout: every placed parameter value its own array, aligned across devices.

A pipeline program is one SPMD program, so every device receives arrays of the same shapes;
device d must hold only the values of its stage(s). `param_layout` groups each device's values
into classes — equal dtype and size (``by="size"``: a bitcast reshape turns one into the other,
e.g. a ``(V, D)`` embedding and a ``(D, V)`` head) or equal shape (``by="shape"``) — and aligns
the k-th value of a class on every device into slot k: one ``(p, *shape)`` array sharded over
the pipeline axis, row d holding device d's value (zeros where d has fewer of that class).
A tensor-split value's slot is also sharded over the tensor axis: on its split dimension where
the slot's values agree in shape and dimension, else (``by="size"``: e.g. an embedding's
``(V, D/tp)`` shard and an untied head's ``(D, V/tp)``) as ``(tp, size/tp)``, row t holding
shard t flattened. Inside the program a device reads ``slot[0]`` whole (reshaped: a bitcast);
XLA feeds that to a GEMM in place, where a slice of a larger buffer (a flat buffer per stage, a
stacked ``(layers, ...)`` array indexed per layer) is copied on every read.

A value several devices hold (a tied embedding read by the first and the last stage) is one
row on each; with ``align_shared`` its rows sit in the same slot (`ParamLayout.shared`), which is
what training needs to sum the copies' gradients and keep them equal (`passes.shared_params`).

Per-device bytes are ``sum over classes of (largest count on a device) × value bytes``: exactly
the largest stage's for identical blocks, plus whatever values one device has and another lacks.
Where that padding would exceed ``budget`` × the largest device's own bytes (stages that share
few shapes, e.g. a CNN's convolutions of growing width), the slots held by the fewest devices
move, most wasteful first, into a *rest* buffer per dtype packed end to end per device (the old
flat layout): no padding, but a value sliced out of it is copied when a GEMM reads it, so only
values that align badly pay for it. Training asks for no rest (`budget=None`): optimizers must
see every leaf as its own array — by size where the optimizer reads no shapes, else by shape.

Placement (`make_packers`, `pack_traced`) evaluates the hoisted ops (slices of stacked layer
weights, casts) per device and writes each value into its slot; `gather_values` reads them back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autopipe._compat import key_impl_of
from autopipe.passes.ir import Program, eval_ops
from autopipe.passes.layout import FlatLayout, Split, buffer_sizes, flat_layout, placed_sources
from autopipe.passes.tensor_local import local_shape


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParamSlot:
    dtype: str
    shape: tuple[int, ...]  # of one device's block (whole, before any tensor split)
    dim: int | None  # the dimension of `shape` split over the tensor axis, or None
    values: tuple[int | None, ...]  # per device: the value held in this slot (None: zeros)
    exact: bool = True  # every value held has the slot's shape and split (else it is flat)

    @property
    def flat_shards(self) -> bool:
        """A flat tensor-split slot: ``(tp, size / tp)``, row t holding shard t flattened."""
        return not self.exact and self.dim is not None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def spec(self, axis: str, tensor_axis: str | None) -> P:
        split = tensor_axis if self.dim is not None else None
        return P(axis, *[split if d == self.dim else None for d in range(len(self.shape))])


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParamLayout:
    slots: tuple[ParamSlot, ...]
    num_devices: int
    rest: tuple[FlatLayout, ...] = ()  # per device: values packed into the rest buffers
    tp: int = 1  # devices of the tensor axis
    dims: tuple[tuple[int, int], ...] = ()  # (value, its dimension split over the tensor axis)

    @functools.cached_property
    def split(self) -> dict[int, int]:
        """Value -> its dimension split over the tensor axis, for every tensor-split value."""
        return dict(self.dims)

    def shard_shape(self, program: Program, v: int) -> tuple[int, ...]:
        """The shape of value ``v`` on one device (this device's shard where it is split)."""
        return local_shape(program.avals[v].shape, self.split.get(v), self.tp)

    @property
    def rest_sizes(self) -> dict[str, int]:
        """Elements per device of the rest buffer of each dtype (buffers after the slots)."""
        used = {dt for lay in self.rest for dt, slots in lay.slots if slots}
        return {dt: n for dt, n in buffer_sizes(self.rest).items() if dt in used}

    def on(self, device: int) -> tuple[tuple[int, int], ...]:
        """(slot index, value) of every value device ``device`` holds."""
        return tuple(
            (k, s.values[device]) for k, s in enumerate(self.slots) if s.values[device] is not None
        )

    def device_bytes(self, tp: int = 1) -> int:
        """Parameter bytes one device holds (a 1/tp shard of the tensor-split slots)."""
        rest = sum(n * np.dtype(dt).itemsize for dt, n in self.rest_sizes.items())
        return rest + sum(s.nbytes // (tp if s.dim is not None else 1) for s in self.slots)

    def padding(self, tp: int = 1) -> list[int]:
        """Per device, the bytes of its slots that hold zeros (a value only others have)."""
        return [
            sum(
                s.nbytes // (tp if s.dim is not None else 1)
                for s in self.slots
                if s.values[d] is None
            )
            for d in range(self.num_devices)
        ]

    def avals(self, mesh: Any, axis: str, tensor_axis: str | None) -> tuple:
        """The slots as global ``(p, *shape)`` arrays with their shardings, then the rest
        buffers as ``(p, n)``."""
        p = self.num_devices
        slots = tuple(
            jax.ShapeDtypeStruct(
                (p, *s.shape), s.dtype, sharding=NamedSharding(mesh, s.spec(axis, tensor_axis))
            )
            for s in self.slots
        )
        rest = NamedSharding(mesh, P(axis))
        return slots + tuple(
            jax.ShapeDtypeStruct((p, n), dt, sharding=rest) for dt, n in self.rest_sizes.items()
        )

    def held(self, device: int) -> list[int]:
        """Every value device ``device`` holds."""
        rest = self.rest[device].values() if self.rest else ()
        return [*(v for _, v in self.on(device)), *rest]

    @property
    def shared(self) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
        """(slot, value, the devices holding it) of every value held by several devices,
        e.g. a tied embedding (laid out with ``align_shared``: one slot on all its holders)."""
        out = []
        for k, s in enumerate(self.slots):
            for v in sorted({v for v in s.values if v is not None}):
                devices = tuple(d for d, u in enumerate(s.values) if u == v)
                if len(devices) > 1:
                    out.append((k, v, devices))
        return tuple(out)

    @property
    def exact_shapes(self) -> bool:
        """Every value has its slot's shape (so ``slot[0]`` is the value itself)."""
        return all(s.exact for s in self.slots)


def param_layout(
    program: Program,
    groups: Sequence[Sequence[int]],
    *,
    dims: Mapping[int, int | None] | None = None,
    tp: int = 1,
    by: Literal["size", "shape"] = "size",
    budget: float | None = 1.05,
    align_shared: bool = False,
) -> ParamLayout:
    """Slots for ``groups[d]``, the values device d holds (see the module docstring), the
    values of ``dims`` split on that dimension over ``tp`` devices. With ``by="size"`` values of
    equal size but different shapes (or split dimensions) share a slot, shaped like its values
    when they agree and flat otherwise; ``by="shape"`` keeps every value in a slot of its own
    shape (what per-leaf optimizers need). ``budget``: see the module docstring (None: slots
    only). ``align_shared``: a value held by several devices (a tied parameter) sits in the
    same slot on all of them (`ParamLayout.shared`), so their copies' rows line up."""
    dims = {v: d for v, d in (dims or {}).items() if d is not None}
    form = lambda v: (tuple(program.avals[v].shape), dims.get(v, -1))  # noqa: E731
    classes: dict[tuple, list[list[int]]] = {}
    for d, values in enumerate(groups):
        for v in sorted(set(values), key=lambda v: (form(v), v)):
            classes.setdefault(_class(program, v, dims, by), [[] for _ in groups])[d].append(v)
    slots = []
    for (dtype, split, size, *_), per_device in sorted(classes.items(), key=lambda kv: str(kv[0])):
        for values in _align(per_device, shared_first=align_shared):
            forms = {form(v) for v in values if v is not None}
            if len(forms) == 1:
                ((shape, dim),) = forms
                slot = ParamSlot(
                    dtype=dtype, shape=shape, dim=None if dim < 0 else dim, values=values
                )
            else:  # flat: row t of a split slot holds shard t
                assert tp > 1 or not split, "a flat tensor-split slot needs tp"
                shape, dim = ((tp, size // tp), 0) if split else ((size,), None)
                slot = ParamSlot(dtype=dtype, shape=shape, dim=dim, values=values, exact=False)
            slots.append(slot)
    placed = {v for g in groups for v in g}
    layout = ParamLayout(
        slots=tuple(slots),
        num_devices=len(groups),
        tp=tp,
        dims=tuple(sorted((v, d) for v, d in dims.items() if v in placed)),
    )
    return layout if budget is None else _within(program, layout, groups, budget)


def _align(per_device: Sequence[Sequence[int]], *, shared_first: bool) -> list[tuple]:
    """The slots of one class, as the value each device holds in it (None: zeros): device d's
    k-th value in slot k; with ``shared_first`` each value held by several devices first takes
    the lowest slot free on all its holders, and the others fill the free slots in order."""
    n = len(per_device)
    rows: list[list] = []
    holders: dict[int, list[int]] = {}
    for d, vs in enumerate(per_device):
        for v in vs:
            holders.setdefault(v, []).append(d)
    shared = sorted(v for v, ds in holders.items() if len(ds) > 1) if shared_first else []
    once = set(shared)

    def free(devices):
        k = next((k for k, r in enumerate(rows) if all(r[d] is None for d in devices)), len(rows))
        if k == len(rows):
            rows.append([None] * n)
        return rows[k]

    for v in shared:  # each in the lowest slot free on every holder
        r = free(holders[v])
        for d in holders[v]:
            r[d] = v
    for d, vs in enumerate(per_device):
        for v in vs:
            if v not in once:
                free([d])[d] = v
    return [tuple(r) for r in rows]


def layout_extra_bytes(
    program: Program, stages: Sequence[Any], *, dims=None, tp: int = 1
) -> list[int]:
    """Per stage, bytes its device holds beyond the stage's own parameters in the forward
    layout: the slots' padding, plus a copy of each value in the rest buffers (a GEMM or
    convolution reading a slice of a buffer gets a copy on XLA:CPU; counted for every rest value,
    an upper bound)."""
    layout = param_layout(
        program, [st.params for st in stages], dims=dims if tp > 1 else None, tp=tp
    )
    held = layout.device_bytes(tp)
    out = []
    for s, st in enumerate(stages):
        copies = sum(program.nbytes(v) for v in layout.rest[s].values()) if layout.rest else 0
        out.append(held - st.device_param_bytes + copies)
    return out


def _within(program: Program, layout: ParamLayout, groups, budget: float) -> ParamLayout:
    """`layout` with its worst-padded slots moved to the rest buffers until a device holds at
    most ``budget`` × the largest group's bytes."""
    largest = max((sum(program.nbytes(v) for v in set(g)) for g in groups), default=0)
    slots = layout.slots
    partial = [k for k, s in enumerate(slots) if s.dim is None and None in s.values]
    partial.sort(key=lambda k: (-slots[k].nbytes * slots[k].values.count(None), k))
    moved: list[int] = []
    current = layout
    while current.device_bytes() > budget * largest and len(moved) < len(partial):
        moved.append(partial[len(moved)])
        kept = tuple(s for k, s in enumerate(slots) if k not in moved)
        rest = tuple(
            flat_layout(program, [v for k in moved if (v := slots[k].values[d]) is not None])
            for d in range(layout.num_devices)
        )
        current = dataclasses.replace(layout, slots=kept, rest=rest)
    return current


def _class(program: Program, v: int, dims: Mapping[int, int], by: str) -> tuple:
    """(dtype, split over the tensor axis, size), and by shape also (shape, split dim)."""
    aval = program.avals[v]
    key = (str(np.dtype(aval.dtype)), v in dims, int(np.prod(aval.shape, dtype=np.int64)))
    return (*key, tuple(aval.shape), dims.get(v, -1)) if by == "shape" else key


# --- reading and writing slots ----------------------------------------------------------------


def read_params(
    program: Program, layout: ParamLayout, device: int, local: Sequence[Any], wanted=None
) -> dict[int, Any]:
    """The values device ``device`` holds (those in ``wanted``, if given) from its local blocks
    of the buffers (`ParamLayout.avals` order)."""
    n = len(layout.slots)
    # a bitcast of the local block, no copy; of a tensor-split slot: this device's shard
    env = {v: local[k][0].reshape(layout.shard_shape(program, v)) for k, v in layout.on(device)}
    if layout.rest:
        rest = {dt: b[0] for dt, b in zip(layout.rest_sizes, local[n:], strict=True)}
        unpack_flat(env, layout.rest[device], rest)
    return env if wanted is None else {v: x for v, x in env.items() if v in wanted}


def unpack_flat(env: dict, layout: FlatLayout, bufs: Mapping[str, Any]) -> None:
    """Values packed by `pack_flat`, sliced out of flat per-dtype buffers."""
    for dt, slots in layout.slots:
        for s in slots:
            part = jax.lax.slice(bufs[dt], (s.offset,), (s.offset + s.size,))
            if s.key is not None:  # a typed PRNG key travels as its key data
                data = part.reshape(*s.shape, s.size // max(1, int(np.prod(s.shape))))
                env[s.value] = jax.random.wrap_key_data(data, impl=key_impl_of(s.key))
                continue
            env[s.value] = part.reshape(s.shape)


def pack_flat(env: Mapping[int, Any], layout: FlatLayout, sizes: Mapping[str, int]) -> tuple:
    """One flat buffer per dtype of ``sizes``: the values of `layout`, then zeros."""
    slots = dict(layout.slots)
    out = []
    for dt, n in sizes.items():
        parts = [_data(env[s.value], s.key).reshape(-1) for s in slots.get(dt, ())]
        used = sum(s.size for s in slots.get(dt, ()))
        if used < n:
            parts.append(jnp.zeros((n - used,), dt))
        out.append(jnp.concatenate(parts) if len(parts) > 1 else parts[0])
    return tuple(out)


def _data(x: Any, key: Any) -> Any:
    return jax.random.key_data(x) if key is not None else jnp.asarray(x)


def blocks(
    layout: ParamLayout, device: int, env: Mapping[int, Any], *, lead: bool = True
) -> tuple[Any, ...]:
    """Device ``device``'s block of every buffer from the values in ``env`` (zeros where it
    holds nothing); ``lead``: with the leading axis of length 1."""
    out = []
    for s in layout.slots:
        v = s.values[device]
        if v is None:
            x = jnp.zeros(s.shape, s.dtype)
        elif not s.flat_shards:
            x = jnp.asarray(env[v]).reshape(s.shape)
        else:
            shards = jnp.split(jnp.asarray(env[v]), layout.tp, axis=layout.split[v])
            x = jnp.stack(shards).reshape(s.shape)
        out.append(x[None] if lead else x)
    if layout.rest:
        rest = pack_flat(env, layout.rest[device], layout.rest_sizes)
        out.extend(x[None] if lead else x for x in rest)
    return tuple(out)


def hoist_closure(program: Program, values: Sequence[int]) -> tuple[list, list]:
    """Hoisted ops (program order) and raw inputs needed to compute `values`."""
    producer = program.producers()
    ops, raw, stack, seen = set(), set(), list(values), set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        i = producer.get(v)
        if i is None:
            raw.add(v)
            continue
        ops.add(i)
        stack.extend(a for a in program.ops[i].invars if isinstance(a, int))
    return sorted(ops), sorted(raw)


def make_packers(
    program: Program, split: Split, layout: ParamLayout, *, training: bool = False
) -> list[tuple[Callable, list[int]]]:
    """Per device: (jitted pack(raw values) -> its ``(1, *shape)`` block of every slot, the raw
    parameter ids it reads). Run on the device's own stage, so no device ever computes or holds
    another stage's parameters."""
    sources = placed_sources(program, split, training=training)
    packers = []
    for d in range(layout.num_devices):
        values = layout.held(d)
        assert set(values) <= sources, "placed values must be computable before the pipeline"
        ops, raw = hoist_closure(program, values)

        def pack(*raw_vals, ops=ops, raw=raw, d=d):
            env = dict(zip(raw, raw_vals, strict=True))
            eval_ops(program, ops, env)
            return blocks(layout, d, env)

        packers.append((jax.jit(pack), raw))
    return packers


def pack_traced(
    program: Program, layout: ParamLayout, params: Sequence[Any], buffers: Sequence[Any]
) -> tuple[Any, ...]:
    """Traceable (differentiable) placement of the parameter leaves into the slots, laid out as
    ``buffers`` (their avals)."""
    raw = dict(zip(program.param_invars, params, strict=True)) | dict(program.consts)
    rows = []
    for d in range(layout.num_devices):
        ops, needed = hoist_closure(program, layout.held(d))
        env = {v: raw[v] for v in needed}
        eval_ops(program, ops, env)
        rows.append(blocks(layout, d, env, lead=False))
    stacked = [jnp.stack(col) for col in zip(*rows, strict=True)]
    return tuple(jax.device_put(b, a.sharding) for b, a in zip(stacked, buffers, strict=True))


def gather_values(
    program: Program, layout: ParamLayout, rows: Callable[[int], dict[int, np.ndarray]]
) -> dict[int, np.ndarray]:
    """Every placed value, read from ``rows(k)`` (device -> its block of buffer k, as numpy) at
    its first holder."""
    out: dict[int, np.ndarray] = {}
    for k, s in enumerate(layout.slots):
        held = rows(k)
        for d, v in enumerate(s.values):
            if v is None or v in out:
                continue
            block = np.asarray(held[d])
            if s.flat_shards:
                shard = layout.shard_shape(program, v)
                block = np.concatenate([r.reshape(shard) for r in block], layout.split[v])
            out[v] = block.reshape(program.avals[v].shape)
    for i, dt in enumerate(layout.rest_sizes):
        held = rows(len(layout.slots) + i)
        for d, lay in enumerate(layout.rest):
            for sl in dict(lay.slots).get(dt, ()):
                flat = np.asarray(held[d])[sl.offset : sl.offset + sl.size]
                out.setdefault(sl.value, flat.reshape(sl.shape))
    return out
