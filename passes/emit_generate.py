"""Emit pass for generation: stage layouts + cache slots → ONE ``jax.jit(jax.shard_map(...))``
program that runs prefill and decoding for a whole batch of prompts.

The batch is split into G request groups (per data-parallel replica), which rotate through the
p stages: with C = max(G, p), at tick t stage s works on group g = (t − s) mod C at step
i = (t − s) div C (idle when g ≥ G, i < 0 or i ≥ T, T = `Decoding.steps` per call). A row
at its own step j = base + i (``Rows.base``: 0 for a fresh request, more when a serving loop
carries it over from the call before) feeds one token at position j: its prompt's token j
while the prompt lasts (prefill, token by token), then the token the step before picked. The
last stage picks the next token from the logits (greedy, or sampled, see `pick_tokens`),
records it, and sends ``(next token, next position)`` back to
stage 0 on the ring (one ``ppermute`` (s → s+1 mod p) per tick, which also carries each
group's token and position forward to the stages after the first); stage 0 keeps the pairs of
the groups not yet due in a small pending buffer. Activations go to the next stage with one
``ppermute`` per boundary dtype, as in `passes.emit`. With G ≥ p every stage is busy every tick
in steady state; G = 1 is the naive pipeline (one group in flight, fill and drain per token).

Per device the program holds:
  - its stage's parameters in the slots of a `ParamLayout` (read whole, in place);
  - its stage's cache leaves in the slots of the cache layout (`passes.decode_state`), with a
    tensor axis split on the dim the plan splits (heads) or whole: slot k
    is ``(1, G, rows, ...)`` locally, the scan carry (donated). With p > 1 and no tensor axis,
    each stage's step is cut at its cache writes (`passes.decode_segments`: one ``switch`` per
    segment, the writes run in place on the carried slots between them, `passes.cache_writes`);
    otherwise the stage's branch reads the group's block of its slots (given whole and
    read-only: a conditional copies an operand it updates), runs the step on it and returns the
    new blocks, written back with ``dynamic_update_index_in_dim`` after the branch (at p = 1
    there is no branch and XLA updates the slots in place);
  - per group the rows' state (`Rows`: prompts, lengths, budgets, steps, output tokens,
    counts, done flags), updated by the last stage and returned with the caches.

A row stops when it has its budget of new tokens or picks ``end_token``; after that its
position stays where it was (the step keeps rewriting one cache entry of a finished row, which
nothing reads). Collectives never run inside a stage's branch (see `passes.emit`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autopipe.passes.cache_writes import SlotWrite, apply_write, slot_writes, write_operands
from autopipe.passes.decode_segments import cut, segmented_tick
from autopipe.passes.decode_state import DecodeState
from autopipe.passes.emit import auto_mesh
from autopipe.passes.ir import Program
from autopipe.passes.layout import StageLayout, buffer_sizes
from autopipe.passes.param_layout import (
    ParamLayout,
    pack_flat,
    param_layout,
    read_params,
    unpack_flat,
)
from autopipe.passes.tensor_local import TensorPlan, eval_stage, local_aval, made_dims
from autopipe.passes.trace import is_key_dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoding:
    """The static shape of one generation program."""

    groups: int  # G: request groups per data-parallel replica
    rows: int  # rows per group per replica (the traced step's batch)
    prompt_len: int  # L: width of the (right-padded) prompt array
    max_new_tokens: int  # N
    greedy: bool = True
    top_k: int | None = None
    key_impl: str = "threefry2x32"
    num_steps: int | None = None  # steps per call; None: L + N − 1 (a whole generation)

    @property
    def steps(self) -> int:
        """T: steps per group in one call; by default what a row of the longest prompt takes
        (its L prompt tokens, N − 1 more)."""
        if self.num_steps is not None:
            return self.num_steps
        return self.prompt_len + self.max_new_tokens - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmittedGeneration:
    run: Callable  # jitted (params, caches, rows, pending, key, temperature, end) -> (rows, caches)
    param_buffers: tuple[jax.ShapeDtypeStruct, ...]
    cache_buffers: tuple[jax.ShapeDtypeStruct, ...]
    params: ParamLayout
    caches: ParamLayout
    row_sharding: NamedSharding  # `Rows` leaves (G, rows · dp, ...): rows over the data axis
    pending_sharding: NamedSharding  # (G, 2, rows · dp)
    mesh: Any
    num_ticks: int


def pick_tokens(logits, key, rows, steps, temperature, *, greedy: bool, top_k: int | None):
    """The next token of each row. Greedy: ``argmax``. Sampled: row r at step i draws from
    ``softmax(logits / temperature)`` (only its ``top_k`` largest logits, if given) with the key
    ``fold_in(fold_in(key, r), i)``, r its id (its row in the prompt batch; in serving, the
    request's index), i the position of the token it was just fed."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def one(z, r, i):
        k = jax.random.fold_in(jax.random.fold_in(key, r), i)
        z = z.astype(jnp.float32) / temperature
        if top_k is not None:
            z = jnp.where(z < jax.lax.top_k(z, top_k)[0][-1], -jnp.inf, z)
        return jax.random.categorical(k, z).astype(jnp.int32)

    return jax.vmap(one)(logits, rows, steps)


def cache_spec(slot: Any, axis: str, data_axis: str | None, tensor_axis: str | None) -> P:
    """A cache slot's ``(p, G, rows · dp, ...)`` layout: stages, groups, rows over the data
    axis, and the dim the plan splits (heads) over the tensor axis."""
    rest = [tensor_axis if d == slot.dim else None for d in range(1, len(slot.shape))]
    return P(axis, None, data_axis, *rest)


def cache_avals(
    layout: ParamLayout,
    mesh: Any,
    axis: str,
    data_axis: str | None,
    groups: int,
    tensor_axis: str | None = None,
):
    """The cache slots as global ``(p, G, rows · dp, ...)`` arrays with their shardings."""
    dp = mesh.shape[data_axis] if data_axis else 1
    return tuple(
        jax.ShapeDtypeStruct(
            (layout.num_devices, groups, dp * s.shape[0], *s.shape[1:]),
            s.dtype,
            sharding=NamedSharding(mesh, cache_spec(s, axis, data_axis, tensor_axis)),
        )
        for s in layout.slots
    )


def emit_generate(
    program: Program,
    stages: Sequence[StageLayout],
    state: DecodeState,
    caches: ParamLayout,
    decoding: Decoding,
    *,
    mesh: Any,
    axis: str,
    data_axis: str | None = None,
    tensor: TensorPlan | None = None,
    dims: Mapping[int, int | None] | None = None,
) -> EmittedGeneration:
    """The generation program over ``mesh``, manual over ``axis``, ``data_axis`` and the
    tensor axis of ``tensor`` (each operator runs its planned strategy on this device's shards,
    parameters split as ``dims`` says, `passes.tensor_local`; a cache slot with a ``dim`` holds
    this device's shard, whole otherwise)."""
    mesh = auto_mesh(mesh)
    p = len(stages)
    tensor_axis = tensor.axis if tensor is not None else None
    params = param_layout(
        program,
        [st.params for st in stages],
        dims=dims if tensor else None,
        tp=tensor.tp if tensor else 1,
    )
    body = _body(program, stages, state, params, caches, decoding, axis, data_axis, tensor)
    stacked = P(axis, None, data_axis)
    per_row = P(None, data_axis)
    param_avals = params.avals(mesh, axis, tensor_axis)
    cache_specs = tuple(cache_spec(s, axis, data_axis, tensor_axis) for s in caches.slots)
    smap = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(
            tuple(a.sharding.spec for a in param_avals),
            cache_specs,
            Rows(**{f: per_row for f in Rows.__dataclass_fields__}),
            P(None, None, data_axis),  # pending (G, 2, b): each row's next token and position
            P(),
            P(),
            P(),
        ),
        out_specs=(
            Rows(**{f: stacked for f in Rows.__dataclass_fields__}),
            cache_specs,
        ),
        axis_names=set(mesh.axis_names),  # every axis manual, size-1 ones too (see passes.emit)
        check_vma=False,  # operators are bound from a jaxpr traced outside the shard_map
    )
    c = max(decoding.groups, p)
    return EmittedGeneration(
        run=jax.jit(smap, donate_argnums=(1,)),
        param_buffers=param_avals,
        cache_buffers=cache_avals(caches, mesh, axis, data_axis, decoding.groups, tensor_axis),
        params=params,
        caches=caches,
        row_sharding=NamedSharding(mesh, P(None, data_axis)),
        pending_sharding=NamedSharding(mesh, P(None, None, data_axis)),
        mesh=mesh,
        num_ticks=decoding.steps * c + p - 1,
    )


def _stage_fn(
    program, layout: StageLayout, state, params, caches, device, *, last, sizes, tensor, writes
):
    """Stage ``layout`` on ``device``: ``run(param_bufs, cache_slots, g, recv, tok, pos) ->
    (send, new group blocks, logits)``. The slots come in whole and read-only (a conditional
    copies operands it updates); the stage reads group g's block of its own slots and returns
    their new blocks, zeros for the slots it holds nothing in (padding on this device); for a
    slot in ``writes`` (`passes.cache_writes`) it returns its write's indices and updates and
    whether it wrote, for the write to run in place after the branch. With a
    tensor axis (``tensor``) every operator runs on this device's shards under its planned
    strategy; activations arrive and leave whole, a split cache leaf as this device's shard
    (its new value made on the same dim: pinned by the plan, `_generate_search`)."""
    key_consts = {v: c for v, c in program.consts if is_key_dtype(program.avals[v].dtype)}
    out_of = state.out_of()
    mine = caches.on(device)
    logits_aval = program.avals[state.logits]
    split = params.split | caches.split

    def run(bufs, slots, g, recv, tok, pos):
        env: dict = dict(key_consts)
        unpack_flat(env, layout.recv, recv)
        env[state.tokens], env[state.positions] = tok, pos
        env.update(
            (v, jax.lax.dynamic_index_in_dim(slots[k], g, 0, keepdims=False)) for k, v in mine
        )
        env.update(read_params(program, params, device, bufs))
        get = eval_stage(program, layout.ops, env, tensor, split)
        new = [_nothing(writes.get(k), x, g, block=False) for k, x in enumerate(slots)]
        for k, v in mine:  # a split cache leaf's new value stays on this device's shard
            if k in writes:
                new[k] = (*write_operands(program, writes[k], device, get), jnp.bool_(True))
            else:
                new[k] = get(out_of[v], split.get(v) if tensor is not None else None)
        logits = get(state.logits) if last else jnp.zeros(logits_aval.shape, logits_aval.dtype)
        sent = {v: get(v) for v in layout.send.values()}
        return pack_flat(sent, layout.send, sizes), tuple(new), logits

    return run


def _nothing(write: SlotWrite | None, slot, g, *, block: bool):
    """What a branch returns for a slot it does not write: no write (a lifted slot), else
    zeros or (``block``) group g's block as it is."""
    if write is not None:
        return (*write.no_write(), jnp.bool_(False))
    if block:
        return jax.lax.dynamic_index_in_dim(slot, g, 0, keepdims=False)
    return jnp.zeros(slot.shape[1:], slot.dtype)


def _branches(program, stages, state, params, caches, tensor, writes) -> tuple[list, dict]:
    """One branch per stage, then the idle branch (sends zeros, returns the blocks as they
    are, writes nothing)."""
    p = len(stages)
    sizes = buffer_sizes([s.send for s in stages])
    kw = dict(sizes=sizes, tensor=tensor, writes=writes)
    runs = [
        _stage_fn(program, st, state, params, caches, s, last=s == p - 1, **kw)
        for s, st in enumerate(stages)
    ]
    aval = program.avals[state.logits]

    def idle(bufs, slots, g, recv, tok, pos):
        zeros = tuple(jnp.zeros((n,), dt) for dt, n in sizes.items())
        new = tuple(_nothing(writes.get(k), x, g, block=True) for k, x in enumerate(slots))
        return zeros, new, jnp.zeros(aval.shape, aval.dtype)

    return [*runs, idle], sizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Tick:
    """Where a device is at one tick: its group, step and whether it works."""

    group: Any  # clamped to [0, G)
    step: Any
    active: Any


def _where_at(t, dev, d: Decoding, c: int) -> _Tick:
    rel = t - dev
    g, i = jnp.remainder(rel, c), jnp.floor_divide(rel, c)
    active = (rel >= 0) & (i < d.steps) & (g < d.groups)
    return _Tick(group=jnp.minimum(g, d.groups - 1), step=i, active=active)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rows:
    """Per-row state of one group (or, stacked, of all groups): what the program reads and
    returns, so that a serving loop can carry it from one call to the next."""

    ids: Any  # (b,) int32: the row's id in the sampling key convention (`pick_tokens`)
    prompts: Any  # (b, L) int32, right-padded
    lengths: Any  # (b,) prompt lengths
    budget: Any  # (b,) new tokens the row may make (≤ N)
    base: Any  # (b,) the row's step at the call's first step (0: a fresh request)
    out: Any  # (b, N) its new tokens so far (-1 after them)
    count: Any  # (b,) how many
    done: Any  # (b,) bool


jax.tree_util.register_dataclass(Rows, data_fields=list(Rows.__dataclass_fields__), meta_fields=[])


def _advance(rows: Rows, logits, key, step, pos, temperature, end, d: Decoding, live):
    """The last stage's work on one group's step: record the picked tokens of the rows whose
    prompt is consumed, stop rows, and the next (token, position) of every row."""
    at = rows.base + step  # each row's own step (= the position it was just fed at)
    picked = pick_tokens(logits, key, rows.ids, at, temperature, greedy=d.greedy, top_k=d.top_k)
    emit = live & (at >= rows.lengths - 1) & ~rows.done
    hit = emit[:, None] & (jnp.arange(d.max_new_tokens)[None, :] == rows.count[:, None])
    count = rows.count + emit.astype(jnp.int32)
    done = rows.done | (emit & ((picked == end) | (count >= rows.budget)))
    nxt = at + 1
    idx = jnp.minimum(nxt, d.prompt_len - 1)[:, None]
    from_prompt = jnp.take_along_axis(rows.prompts, idx, axis=1)[:, 0]
    next_tok = jnp.where(nxt < rows.lengths, from_prompt, picked)
    changed = dataclasses.replace(
        rows, out=jnp.where(hit, picked[:, None], rows.out), count=count, done=done
    )
    return changed, jnp.stack([next_tok, jnp.where(done, pos, nxt)])


def _group(rows: Rows, g) -> Rows:
    return jax.tree.map(lambda x: x[g], rows)


def _set_group(rows: Rows, g, new: Rows) -> Rows:
    return jax.tree.map(lambda x, y: x.at[g].set(y), rows, new)


def _body(program, stages, state, params, caches, d: Decoding, axis, data_axis, tensor) -> Callable:
    p, b = len(stages), d.rows
    c = max(d.groups, p)
    # one stage updates its caches in place without help (no conditional)
    writes = slot_writes(program, stages, state, caches, tensor) if p > 1 else {}
    branches, sizes = _branches(program, stages, state, params, caches, tensor, writes)
    segmented = _segmented(program, stages, state, params, caches, writes, sizes, tensor)

    def one_branch(pslots, cache, g, recv, tok, pos, which):
        """The tick as one branch per stage (``which``: this device's, or p: idle); blocks
        written back, lifted writes in place."""
        args = (pslots, cache, g, recv, tok, pos)
        if p == 1:  # one stage, busy every tick: no conditional (it would copy the blocks)
            send, new, logits = branches[0](*args)
        else:
            send, new, logits = jax.lax.switch(which, branches, *args)
        cache = tuple(
            apply_write(x, g, y[-1], writes[k], y[:-1])
            if k in writes
            else jax.lax.dynamic_update_index_in_dim(x, y, g, 0)
            for k, (x, y) in enumerate(zip(cache, new, strict=True))
        )
        return send, cache, logits

    forward = [(s, s + 1) for s in range(p - 1)]
    ring = [(s, (s + 1) % p) for s in range(p)]
    num_ticks = d.steps * c + p - 1

    def body(pslots, cslots, rows, pending, key_data, temperature, end):
        dev = jax.lax.axis_index(axis)
        key = jax.random.wrap_key_data(key_data, impl=d.key_impl)
        is_first, is_last = dev == 0, dev == p - 1
        pending = jnp.concatenate([pending, jnp.zeros((c - d.groups, 2, b), jnp.int32)])
        recv0 = tuple(jnp.zeros((n,), dt) for dt, n in sizes.items())
        init = (tuple(x[0] for x in cslots), recv0, jnp.zeros((2, b), jnp.int32), pending, rows)

        def tick(carry, t):
            cache, recv, ring_in, pending, rows = carry
            here = _where_at(t, dev, d, c)
            came = _where_at(t - 1, p - 1, d, c)  # what the last stage worked on last tick
            g = here.group
            got = jax.lax.dynamic_update_index_in_dim(pending, ring_in, came.group, 0)
            pending = jnp.where(is_first & came.active, got, pending)
            inp = jnp.where(is_first, pending[g], ring_in)
            recv_d = dict(zip(sizes, recv, strict=True))
            args = (pslots, cache, g, recv_d, inp[0], inp[1])
            run = one_branch if segmented is None else segmented
            send, cache, logits = run(*args, jnp.where(here.active, dev, p))
            live = here.active & is_last
            mine, nxt = _advance(
                _group(rows, g), logits, key, here.step, inp[1], temperature, end, d, live
            )
            rows = _set_group(rows, g, mine)
            ring_out = jnp.where(is_last, nxt, inp)
            recv = tuple(jax.lax.ppermute(x, axis, forward) for x in send)
            ring_in = jax.lax.ppermute(ring_out, axis, ring)
            return (cache, recv, ring_in, pending, rows), None

        final, _ = jax.lax.scan(tick, init, jnp.arange(num_ticks))
        cache, rows = final[0], final[4]
        return jax.tree.map(lambda x: x[None], rows), tuple(x[None] for x in cache)

    return body


def _segmented(program, stages, state, params, caches, writes, sizes, tensor) -> Callable | None:
    """The segmented tick (`passes.decode_segments`) when every cache slot's write is lifted
    and every stage can be cut at its writes; None otherwise (one branch per stage). On a
    tensor axis values cross between segments as this device's shards."""
    if not writes or len(writes) != len(caches.slots):
        return None
    p, made = len(stages), made_dims(program, tensor)

    def local(v):  # a value crossing between segments: this device's shard
        return local_aval(program.avals[v], made.get(v), tensor.tp)

    aval = local if tensor is not None else None
    cuts = [
        cut(program, st, state, writes, d, last=d == p - 1, aval=aval)
        for d, st in enumerate(stages)
    ]
    if any(c is None for c in cuts):
        return None
    split = params.split | caches.split
    return segmented_tick(program, stages, state, params, writes, cuts, sizes, tensor, split, made)


def fresh_rows(prompts: np.ndarray, lengths: np.ndarray, n: int) -> tuple[Rows, np.ndarray]:
    """Host row state of a new batch of prompts (row r has id r), and each row's first input
    (its first prompt token at position 0) as ``(2, B)``."""
    b = len(lengths)
    rows = Rows(
        ids=np.arange(b, dtype=np.int32),
        prompts=prompts,
        lengths=lengths,
        budget=np.full((b,), n, np.int32),
        base=np.zeros((b,), np.int32),
        out=np.full((b, n), -1, np.int32),
        count=np.zeros((b,), np.int32),
        done=np.zeros((b,), bool),
    )
    return rows, np.stack([prompts[:, 0], np.zeros((b,), np.int32)])


def call_avals(em: EmittedGeneration, d: Decoding, batch: int) -> tuple:
    """The avals, with their shardings, of one call of ``em.run`` for ``batch`` rows."""
    g, n = d.groups, d.max_new_tokens

    def rows(*shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((g, batch // g, *shape), dtype, sharding=em.row_sharding)

    state = Rows(
        ids=rows(),
        prompts=rows(d.prompt_len),
        lengths=rows(),
        budget=rows(),
        base=rows(),
        out=rows(n),
        count=rows(),
        done=rows(dtype=bool),
    )
    pending = jax.ShapeDtypeStruct((g, 2, batch // g), jnp.int32, sharding=em.pending_sharding)
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=d.key_impl)))
    scalar = NamedSharding(em.mesh, P())
    return (
        em.param_buffers,
        em.cache_buffers,
        state,
        pending,
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=scalar),
        jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar),
    )
