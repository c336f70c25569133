"""Residuals: which values a training stage keeps for its backward (`saving`), and how the
VJP residuals of every stage share one set of slot buffers: residual slots are split into
chunks (`plan_chunks`) so that a residual leaf is written and read as a whole row (see
`ResidualChunks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class Piece:
    """Elements ``[start, start + size)`` of one stored residual leaf of a stage (flattened)
    live in ``chunk[offset : offset + size]``. A leaf is one piece unless it had to be split
    over the free room of several chunks."""

    leaf: int  # index among the stage's stored leaves
    start: int
    chunk: int
    offset: int
    size: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualChunks:
    """Residual slots as one ``(slots, size)`` buffer per chunk, and per stage where each
    stored leaf goes.

    A chunk that holds exactly one leaf of its size is written as one row update of that leaf
    and read back as one row: no packing copy and no offsets. (One flat vector per dtype needs
    either a concatenation, a copy of the whole residual set at the forward's peak, or one 2-D
    update per leaf, which XLA compiled 1.5× slower for the same memory.) Chunks are sized by
    the widest stage; other stages reuse them leaf for leaf where sizes match and pack or split
    the rest into the free room (copies of those leaves only), so the chunks add up to the
    widest stage's residuals in the common cases (identical blocks, a few extra leaves)."""

    chunks: tuple[tuple[str, int], ...]  # (dtype, elements) per chunk
    pieces: tuple[tuple[Piece, ...], ...]  # per stage

    def sizes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dt, n in self.chunks:
            out[dt] = out.get(dt, 0) + n
        return out


PACKED_SHARE = 1 / 32  # per stage and dtype, the smallest leaves up to this share are packed


@dataclasses.dataclass(kw_only=True)
class _Chunk:
    dtype: str
    size: int
    rest: bool  # the dtype's chunk for packed leaves: grows to what the neediest stage packs


def plan_chunks(stored: Sequence[Sequence[Any]]) -> ResidualChunks:
    """Chunks for every stage's stored residual leaves (anything with shape and dtype).

    Stages go widest first, so its leaves define the chunks; each later stage puts a leaf into
    an unused chunk of exactly its size, else into the free room that fits it most tightly, else
    into a new chunk. A stage's smallest leaves (up to `PACKED_SHARE` of its bytes) are packed
    into one growable rest chunk per dtype instead of getting a chunk each."""
    chunks: list[_Chunk] = []
    placed: dict[int, tuple[Piece, ...]] = {}
    for s in sorted(range(len(stored)), key=lambda s: (-_nbytes(stored[s]), s)):
        placed[s] = _place_stage(chunks, stored[s])
    return ResidualChunks(
        chunks=tuple((c.dtype, c.size) for c in chunks),
        pieces=tuple(placed[s] for s in range(len(stored))),
    )


def _dtype(x: Any) -> str:
    return jnp.dtype(x.dtype).name


def _size(x: Any) -> int:
    return int(np.prod(x.shape, dtype=np.int64))


def _nbytes(leaves: Sequence[Any]) -> int:
    return sum(_size(x) * jnp.dtype(x.dtype).itemsize for x in leaves)


def _packed_leaves(leaves: Sequence[Any]) -> set[int]:
    """Per dtype, the smallest leaves whose sizes add up to at most `PACKED_SHARE` of it."""
    packed = set()
    for dt in {_dtype(x) for x in leaves}:
        by_size = sorted((_size(x), k) for k, x in enumerate(leaves) if _dtype(x) == dt)
        budget = PACKED_SHARE * sum(n for n, _ in by_size)
        for n, k in by_size:
            if n > budget:
                break
            packed.add(k)
            budget -= n
    return packed


def _place_stage(chunks: list[_Chunk], leaves: Sequence[Any]) -> tuple[Piece, ...]:
    """Places one stage's leaves, largest first, adding or growing chunks where needed."""
    fill = [0] * len(chunks)  # elements of each chunk this stage uses
    packed = _packed_leaves(leaves)
    pieces = []
    for k in sorted(range(len(leaves)), key=lambda k: (-_size(leaves[k]), k)):
        start = 0
        for c, n in _room_for(chunks, fill, _dtype(leaves[k]), _size(leaves[k]), k in packed):
            pieces.append(Piece(leaf=k, start=start, chunk=c, offset=fill[c], size=n))
            start, fill[c] = start + n, fill[c] + n
            chunks[c].size = max(chunks[c].size, fill[c])
    return tuple(sorted(pieces, key=lambda q: (q.leaf, q.start)))


def _room_for(
    chunks: list[_Chunk], fill: list[int], dt: str, n: int, packed: bool
) -> list[tuple[int, int]]:
    """Where a leaf of ``n`` elements goes, as (chunk, elements) parts: an unused chunk of
    exactly its size, else the tightest free room it fits whole, else (packed leaves) the rest
    chunk, else split over the largest free rooms, else a new chunk."""
    mine = [c for c, chunk in enumerate(chunks) if chunk.dtype == dt]
    free = {c: chunks[c].size - fill[c] for c in mine}
    if not packed:
        exact = [c for c in mine if chunks[c].size == n and not chunks[c].rest and not fill[c]]
        if exact:
            return [(exact[0], n)]
    room = [(k, c) for c, k in free.items() if k >= n]
    if room:
        return [(min(room)[1], n)]
    rest = [c for c in mine if chunks[c].rest]
    if packed and rest:
        return [(rest[0], n)]
    if not packed and sum(free.values()) >= n:
        parts = []
        for k, c in sorted(((k, c) for c, k in free.items() if k), reverse=True):
            parts.append((c, min(k, n - sum(m for _, m in parts))))
            if sum(m for _, m in parts) == n:
                return parts
    chunks.append(_Chunk(dtype=dt, size=0 if packed else n, rest=packed))
    fill.append(0)
    return [(len(chunks) - 1, n)]


def saving(fn: Callable, fixed: Sequence[Any], xs: Sequence[Any]) -> Callable:
    """``(pv, rv, probes) -> fn(pv, rv, fixed, xs, probes)`` whose VJP keeps only its matmul
    and convolution results (and its inputs) as residuals and recomputes the rest in the backward
    (`memory.SAVED_PRIMITIVES`): on a GPT block a quarter of what plain ``jax.vjp`` keeps,
    which every F writes into the residual slots and every B reads back. A PRNG key among
    ``fixed`` or ``xs`` (a dropout key the recomputation needs) is kept as its raw data."""
    raw = [tuple(map(_key_data, vals)) for vals in (fixed, xs)]

    def f(pv, rv, probes):
        return fn(pv, rv, *(tuple(_typed(*k) for k in vals) for vals in raw), probes)

    return jax.checkpoint(f, policy=jax.checkpoint_policies.dots_saveable)


def _key_data(x: Any) -> tuple[Any, Any]:
    """(x, None), or (its raw data, its PRNG implementation) for a typed key array."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x), jax.random.key_impl(x)
    return x, None


def _typed(x: Any, impl: Any) -> Any:
    return x if impl is None else jax.random.wrap_key_data(x, impl=impl)
