"""Continuous batching: the rows of a generation plan's batch are *slots*; a finished request's
slot is refilled with a waiting one between calls of the program, without recompiling.

One compiled program (`passes.emit_generate`, ``num_steps=steps_per_call``) runs every slot
``steps_per_call`` steps and returns the slots' state (`Rows`) and the caches, which stay on
their stages for the next call. Between calls the host collects finished requests, writes new
ones into free slots (prompt, length, budget, step 0) and computes each slot's next input
(`_pending`). A new request starts at position 0 and overwrites the stale cache entries of its
slot as it goes; it never attends past its own position, so it never sees them. Each request
therefore computes exactly what it would alone in a batch row: greedy completions equal
generating each request alone, and sampled ones too when that request has row id = its index
(the key convention of `autopipe.plan_generation`, with r the request's index here).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from autopipe.passes.emit_generate import Decoding, Rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class Completion:
    index: int  # the request's position in the input
    tokens: np.ndarray  # its new tokens (int32), ending with end_token if it picked it


def serve(
    plan: Any,
    params: Any,
    cache: Any,
    requests: Iterable[tuple[Any, int]],
    *,
    steps_per_call: int = 8,
    end_token: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: Any = None,
    progress: bool = False,
) -> Iterator[Completion]:
    """Continuous batching over ``plan``'s batch rows as slots (`GenerationPlan.serve`): yields
    a `Completion` per ``(prompt, max_new_tokens)`` request as it finishes, refilling its slot
    between calls of one compiled program; ``progress``: a status line on stderr."""

    s, b = plan.cache_length, plan.batch_size
    sampling = check_sampling(temperature, top_k, plan._vocab)
    key_data, impl = raw_key(key)
    decoding = Decoding(
        groups=plan.num_groups,
        rows=plan.rows,
        prompt_len=s,
        max_new_tokens=s,
        greedy=sampling is None,
        top_k=top_k,
        key_impl=impl,
        num_steps=int(steps_per_call),
    )
    em, compiled = plan.lower(decoding)
    placed = plan._place_params(em, plan._leaves(params, 0, "params"))
    caches = plan._place_cache(em, plan._leaves(cache, 1, "cache"))
    rows, slot_of = _empty(b, s), [-1] * b
    queue = iter(enumerate(requests))
    finished = 0
    while True:
        for r in range(b):
            if rows.done[r] and slot_of[r] >= 0:
                yield Completion(index=slot_of[r], tokens=rows.out[r, : rows.count[r]].copy())
                slot_of[r], finished = -1, finished + 1
            if rows.done[r]:
                nxt = next(queue, None)
                if nxt is not None:
                    _fill(plan, rows, r, *nxt)
                    slot_of[r] = nxt[0]
        if progress:
            busy = sum(i >= 0 for i in slot_of)
            print(f"\r{finished} done, {busy} in slots", end="", file=sys.stderr, flush=True)
        if all(i < 0 for i in slot_of):
            break
        out, caches = plan._call(
            em, compiled, placed, caches, rows, _pending(rows), key_data, sampling, end_token
        )
        rows = _carry(out, steps_per_call)
    if progress:
        print(file=sys.stderr)


def _empty(b: int, s: int) -> Rows:
    """Host state of ``b`` free slots (done: they run, record nothing, and are refilled)."""
    return Rows(
        ids=np.zeros((b,), np.int32),
        prompts=np.zeros((b, s), np.int32),
        lengths=np.ones((b,), np.int32),
        budget=np.ones((b,), np.int32),
        base=np.zeros((b,), np.int32),
        out=np.full((b, s), -1, np.int32),
        count=np.zeros((b,), np.int32),
        done=np.ones((b,), bool),
    )


def _fill(plan: Any, rows: Rows, r: int, index: int, request: tuple[Any, int]) -> None:
    """Writes request ``index`` into slot r of the host state (in place)."""
    prompt, new = np.asarray(request[0], np.int32).reshape(-1), int(request[1])
    plan._check_fits(len(prompt), new, f"request {index}")
    rows.ids[r], rows.lengths[r], rows.budget[r] = index, len(prompt), new
    rows.prompts[r] = 0
    rows.prompts[r, : len(prompt)] = prompt
    rows.base[r], rows.count[r], rows.done[r] = 0, 0, False
    rows.out[r] = -1


def _pending(rows: Rows) -> np.ndarray:
    """(2, B): each slot's next token (its prompt's, else its last new one) and position."""
    b = len(rows.base)
    last = rows.out[np.arange(b), np.maximum(rows.count - 1, 0)]
    in_prompt = rows.base < rows.lengths
    from_prompt = rows.prompts[np.arange(b), np.minimum(rows.base, rows.prompts.shape[1] - 1)]
    tok = np.where(in_prompt, from_prompt, last)
    return np.stack([np.where(rows.done, 0, tok), np.where(rows.done, 0, rows.base)])


def _carry(out: Rows, steps: int) -> Rows:
    """The host state after a call: writable copies, running slots ``steps`` further on."""
    rows = Rows(**{f.name: np.array(getattr(out, f.name)) for f in dataclasses.fields(Rows)})
    rows.base[~rows.done] += steps
    return rows


def check_sampling(temperature: float, top_k: int | None, vocab: int) -> float | None:
    """The temperature to sample at, or None for greedy."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}; use 0 (greedy) or a positive number.")
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k}; use None or an integer in [1, {vocab}] (the vocab).")
    if top_k is not None and temperature == 0:
        raise ValueError("top_k needs sampling: pass a temperature > 0 (temperature=0 is greedy).")
    return None if temperature == 0 else float(temperature)


def raw_key(key: Any) -> tuple[Any, str]:
    """(raw key data, implementation name) of a typed or raw PRNG key (None: key 0)."""
    if key is None:
        key = jax.random.key(0)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), str(jax.random.key_impl(key))
    return jnp.asarray(key, jnp.uint32), "threefry2x32"
