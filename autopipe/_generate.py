"""Pipelined generation: `plan_generation` plans a decode step over a mesh, and its
``.generate(...)`` runs prefill and decoding for a batch of prompts in ONE jitted program
(`passes.emit_generate`); `generate` is the one-call form.

The decode step is ``step(params, cache, tokens, positions) -> (logits, cache)``: ``tokens``
and ``positions`` are ``(B,)`` int32, every leaf of ``cache`` has the batch first, ``logits``
is ``(B, vocab)``, and the step returns the cache with the same structure, shapes and dtypes
(a linen model with a ``cache`` collection: ``model.apply(..., mutable=["cache"])``, see
`autopipe.decoders.linen_step`). Planning traces the step at the rows of one request group,
cuts it into stages with the stage DP (`passes.partition`) under a memory model that adds
each stage's caches for all groups (`passes.decode_state.cache_layer_bytes`) and minimises
the bottleneck stage (the time of one tick in steady state), and assigns each cache leaf to
the stage that reads and updates it; that stage's devices alone hold it. On a mesh with a
tensor axis each stage's operators run the strategies of the forward plan's sharding pass
(`passes.tensor_parallel`, evaluated on local shards by `passes.tensor_local`); a cache leaf
whose reader the plan splits by heads is split on that dim like a split parameter (each device
holds, updates and reads its shard, never gathered), the others stay whole on every device of
the tensor axis (`GenerationPlan.cache_placement` says which).

Conventions (what single-device generation must do to give the same tokens):
  - prompts are right-padded: row r's prompt is ``prompts[r, :prompt_lengths[r]]``; its token
    at step i is fed at position i; prefill runs token by token through the step;
  - the token after position i is ``argmax(logits)`` (greedy, ``temperature=0``), or drawn
    with ``jax.random.categorical(fold_in(fold_in(key, r), i), logits / temperature)`` over
    the ``top_k`` largest logits (`passes.emit_generate.pick_tokens`), r the row in the batch;
  - a row stops after ``max_new_tokens`` tokens or the first ``end_token`` (kept); the rest of
    its output is ``-1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from autopipe._executable import place_buffers
from autopipe._front import Front, FrontOptions, is_concrete, make_front, mesh_axes
from autopipe._generate_checks import batch_of, cache_length_of, check_axes, groups
from autopipe._generate_search import GenerationStage, planning_front, search, stage_records
from autopipe._serve import check_sampling, raw_key, serve
from autopipe.passes.decode_state import (
    DecodeState,
    cache_layout,
    find_state,
    home_stages,
)
from autopipe.passes.emit_generate import (
    Decoding,
    EmittedGeneration,
    Rows,
    call_avals,
    emit_generate,
    fresh_rows,
)
from autopipe.passes.layout import StageLayout
from autopipe.passes.param_layout import ParamLayout, make_packers
from autopipe.passes.tensor_local import TensorPlan
from autopipe.passes.tensor_parallel import LayerShardings


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generation:
    """What `GenerationPlan.generate` returns (numpy): ``tokens[r, :lengths[r]]`` are row r's
    new tokens, the rest ``-1``."""

    tokens: np.ndarray  # (B, max_new_tokens) int32
    lengths: np.ndarray  # (B,) int32


@dataclasses.dataclass
class _Runtime:
    """Mutable call-time state behind a frozen plan: compiled programs per static shape."""

    compiled: dict = dataclasses.field(default_factory=dict)  # Decoding -> (emitted, compiled)
    packers: list | None = None


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class GenerationPlan:
    """A decode step planned for pipelined generation (see the module docstring)."""

    fn_name: str
    batch_size: int
    cache_length: int
    num_groups: int
    stages: tuple[GenerationStage, ...]
    predicted_tokens_per_second: float
    predicted_token_latency: float  # seconds between a row's tokens in steady state
    front: Front = dataclasses.field(repr=False)
    state: DecodeState = dataclasses.field(repr=False)
    layouts: tuple[StageLayout, ...] = dataclasses.field(repr=False)
    caches: ParamLayout = dataclasses.field(repr=False)
    mesh: Any = dataclasses.field(repr=False)
    pipeline_axis: str = "pp"
    data_axis: str | None = None
    tensor_axis: str | None = None  # a mesh axis of size > 1 that splits operators
    shardings: LayerShardings | None = dataclasses.field(default=None, repr=False)
    _runtime: _Runtime = dataclasses.field(default_factory=_Runtime, repr=False)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def tensor_degree(self) -> int:
        return self.shardings.tp if self.shardings is not None else 1

    @property
    def split_values(self) -> int:
        """How many values (parameters and activations) the plan splits over the tensor axis."""
        sh = self.shardings
        return 0 if sh is None else sum(d is not None for d in sh.dims.values())

    @property
    def split_caches(self) -> tuple[str, ...]:
        """Paths of the cache leaves split over the tensor axis (by heads, as the plan splits
        the attention that reads them)."""
        dims = {} if self.shardings is None else self.shardings.dims
        pairs = zip(self.state.cache_in, self.state.paths, strict=True)
        return tuple(p for v, p in pairs if dims.get(v) is not None)

    @property
    def cache_placement(self) -> str:
        """Where the caches live, in words."""
        where = "each cache leaf on its stage's devices only, rows split over the data axis"
        if self.tensor_degree == 1:
            return where
        n, tp, axis = len(self.state.cache_in), self.tensor_degree, self.tensor_axis
        split = len(self.split_caches)
        if split == n:
            return f"{where}, and split over the tensor axis {axis!r} ({tp} shards) by heads"
        return (
            f"{where}; {split} of {n} split over the tensor axis {axis!r} ({tp} shards) by "
            f"heads, the other {n - split} kept whole on each of its {tp} devices (the plan "
            "does not split the attention reading them)"
        )

    @property
    def rows(self) -> int:
        """Rows of one request group on one data replica (the traced step's batch)."""
        return self.front.traced.microbatch_size

    def summary(self) -> str:
        """Per stage: layers, parameter and cache MB (the stage's; per device of its tensor
        group when they differ), predicted tick."""
        tp = self.tensor_degree > 1
        head = f"{'stage':>5} {'layers':>9} {'param MB':>9} {'cache MB':>9}"
        rows = [head + (f" {'dev cache MB':>12}" if tp else "") + f" {'tick ms':>8}"]
        for s in self.stages:
            lo, hi = s.layers
            dev = f" {s.device_cache_bytes / 1e6:>12.3f}" if tp else ""
            rows.append(
                f"{s.index:>5} {f'{lo}-{hi}':>9} {s.param_bytes / 1e6:>9.3f} "
                f"{s.cache_bytes / 1e6:>9.3f}{dev} {s.time * 1e3:>8.3f}"
            )
        if self.tensor_degree > 1:
            rows.append(
                f"tensor axis {self.tensor_axis!r} × {self.tensor_degree}: "
                f"{self.split_values} values split; {self.cache_placement}"
            )
        rows.append(
            f"groups {self.num_groups}, predicted {self.predicted_tokens_per_second:.4g} "
            f"tokens/s, {self.predicted_token_latency * 1e3:.4g} ms per token"
        )
        return "\n".join(rows)

    def lower(self, decoding: Decoding) -> tuple[EmittedGeneration, Any]:
        """The emitted and compiled program for one static shape (cached)."""
        self._require_devices()
        rt = self._runtime
        if decoding not in rt.compiled:
            em = emit_generate(
                self.front.program,
                self.layouts,
                self.state,
                self.caches,
                decoding,
                mesh=self.mesh,
                axis=self.pipeline_axis,
                data_axis=self.data_axis,
                tensor=self._tensor_plan(),
                dims=self.shardings.dims if self.shardings is not None else None,
            )
            avals = call_avals(em, decoding, self.batch_size)
            rt.compiled[decoding] = (em, em.run.lower(*avals).compile())
        return rt.compiled[decoding]

    def _tensor_plan(self) -> TensorPlan | None:
        sh = self.shardings
        if self.tensor_axis is None or sh is None or sh.tp == 1:
            return None
        return TensorPlan(
            axis=self.tensor_axis, tp=sh.tp, strategies=dict(sh.op_strategies), whole=sh.whole
        )

    def _require_devices(self) -> None:
        if not is_concrete(self.mesh):
            raise RuntimeError(
                f"this generation plan for {self.fn_name} was made for mesh axes "
                f"{dict(self.front.mesh_axes)} without devices; plan again with a concrete "
                "jax.sharding.Mesh to generate."
            )

    def generate(
        self,
        params: Any,
        cache: Any,
        prompts: Any,
        prompt_lengths: Any = None,
        *,
        max_new_tokens: int,
        end_token: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        key: Any = None,
    ) -> Generation:
        """Generates up to ``max_new_tokens`` tokens after each prompt (see the conventions in
        the module docstring). ``cache`` is the initial cache (zeros), copied onto the stages
        (the given arrays are not changed)."""
        self._require_devices()
        prompts = np.asarray(prompts, np.int32)
        lengths = self._check_prompts(prompts, prompt_lengths, max_new_tokens)
        sampling = check_sampling(temperature, top_k, self._vocab)
        key_data, impl = raw_key(key)
        decoding = Decoding(
            groups=self.num_groups,
            rows=self.rows,
            prompt_len=prompts.shape[1],
            max_new_tokens=int(max_new_tokens),
            greedy=sampling is None,
            top_k=top_k,
            key_impl=impl,
        )
        param_leaves = self._leaves(params, 0, "params")
        cache_leaves = self._leaves(cache, 1, "cache")
        em, compiled = self.lower(decoding)
        rows, pending = fresh_rows(prompts, lengths, decoding.max_new_tokens)
        caches = self._place_cache(em, cache_leaves)
        params = self._place_params(em, param_leaves)
        rows, _ = self._call(
            em, compiled, params, caches, rows, pending, key_data, sampling, end_token
        )
        return Generation(tokens=rows.out, lengths=rows.count)

    def _call(self, em, compiled, params, caches, rows: Rows, pending, key_data, temperature, end):
        """One call of the program on host row state (``(B, ...)`` numpy); returns the new row
        state (numpy) and the caches (on the devices, for the next call)."""
        g = self.num_groups

        def grouped(x, sharding):
            return jax.device_put(np.asarray(x).reshape(g, -1, *np.shape(x)[1:]), sharding)

        placed = jax.tree.map(lambda x: grouped(x, em.row_sharding), rows)
        pend = np.asarray(pending).reshape(2, g, -1).transpose(1, 0, 2)
        out, caches = compiled(
            params,
            caches,
            placed,
            jax.device_put(pend, em.pending_sharding),
            key_data,
            jnp.float32(temperature or 1.0),
            jnp.int32(-1 if end is None else end),
        )
        last = self.num_stages - 1
        host = jax.tree.map(
            lambda x: np.asarray(x)[last].reshape(self.batch_size, *x.shape[3:]), out
        )
        return host, caches

    @property
    def _vocab(self) -> int:
        return int(self.front.program.avals[self.state.logits].shape[-1])

    def _check_prompts(self, prompts, prompt_lengths, max_new_tokens) -> np.ndarray:
        b = self.batch_size
        if prompts.ndim != 2 or prompts.shape[0] != b:
            raise ValueError(
                f"{self.fn_name}: prompts must be a (batch, length) int array with the "
                f"planned batch of {b} rows; got shape {prompts.shape}."
            )
        width = prompts.shape[1]
        lengths = np.full((b,), width, np.int32) if prompt_lengths is None else prompt_lengths
        lengths = np.asarray(lengths, np.int32)
        if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > width:
            raise ValueError(
                f"{self.fn_name}: prompt_lengths must be {b} lengths in [1, {width}] (the "
                f"prompts' width); got {lengths.tolist()}."
            )
        self._check_fits(int(lengths.max()), max_new_tokens, f"row {int(lengths.argmax())}")
        return lengths

    def _check_fits(self, length: int, max_new_tokens: int, where: str) -> None:
        """A prompt of ``length`` tokens and ``max_new_tokens`` fit the cache."""
        s, need = self.cache_length, length + max_new_tokens - 1
        if max_new_tokens < 1:
            raise ValueError(f"{self.fn_name}: max_new_tokens={max_new_tokens}; ask for ≥ 1.")
        if length > s:
            raise ValueError(
                f"{self.fn_name}: a prompt of {length} tokens ({where}) is longer than the cache "
                f"({s} positions). Plan with a cache of at least {need} positions, or shorten "
                "the prompt."
            )
        if need > s:
            raise ValueError(
                f"{self.fn_name}: a prompt of {length} tokens ({where}) plus max_new_tokens="
                f"{max_new_tokens} needs {need} cache positions (the last new token is not fed "
                f"back), but the cache has {s}. Use max_new_tokens ≤ {s - length + 1}, or plan "
                f"with a cache of {need}."
            )

    serve = serve  # continuous batching (`autopipe._serve.serve`), a method

    def _place_params(self, em: EmittedGeneration, leaves: list) -> tuple:
        prog, rt = self.front.program, self._runtime
        if rt.packers is None:
            rt.packers = make_packers(prog, self.front.split, em.params)
        raw = dict(zip(prog.param_invars, leaves, strict=True)) | dict(prog.consts)
        return place_buffers(rt.packers, em.param_buffers, raw, self.mesh, self.pipeline_axis)

    def _place_cache(self, em: EmittedGeneration, leaves: list) -> tuple:
        """Each cache leaf on its stage's devices, rows as ``(G, rows · dp)``."""
        by_value = dict(zip(self.state.cache_in, leaves, strict=True))
        out = []
        for slot, aval in zip(self.caches.slots, em.cache_buffers, strict=True):
            host = [None if v is None else np.asarray(by_value[v]) for v in slot.values]

            def block(index, host=host, aval=aval):
                s = index[0].start or 0
                shape = (1, *aval.shape[1:])
                if host[s] is None:
                    return np.zeros(shape, aval.dtype)[(slice(None), *index[1:])]
                return host[s].reshape(shape)[(slice(None), *index[1:])]

            out.append(jax.make_array_from_callback(aval.shape, aval.sharding, block))
        return tuple(out)

    def _leaves(self, tree: Any, arg: int, name: str) -> list:
        spec = self.front.traced.spec
        index = spec.arg_leaves()[arg]
        leaves, treedef = jax.tree.flatten(tree)
        want = jax.tree.structure(jax.tree.unflatten(spec.in_tree, range(len(spec.in_avals)))[arg])
        if treedef != want:
            raise ValueError(
                f"{self.fn_name}: the {name} has structure {treedef}, but the plan was made for "
                f"{want}. Pass the {name} the plan was made with (or plan again)."
            )
        for i, x in zip(index, leaves, strict=True):
            a = spec.in_avals[i]
            got = (tuple(x.shape), np.dtype(x.dtype))
            if got != (tuple(a.shape), np.dtype(a.dtype)):
                path = spec.in_paths[i].replace(f"args[{arg}]", name, 1)
                raise ValueError(
                    f"{self.fn_name}: {path} has shape {got[0]} {got[1]}, but the plan was made "
                    f"for {tuple(a.shape)} {a.dtype} (batch {self.batch_size}, cache length "
                    f"{self.cache_length}). Pass a {name} of the planned shapes, or plan again "
                    "with this one."
                )
        return leaves


# --- planning ---------------------------------------------------------------------------------


def plan_generation(
    step: Callable,
    params: Any,
    cache: Any,
    *,
    mesh: Any,
    num_groups: int | None = None,
    cache_length: int | None = None,
    pipeline_axis: str = "pp",
    data_axis: str = "dp",
    tensor_axis: str = "tp",
    hardware: Any = None,
    memory_limit: float | None = None,
) -> GenerationPlan:
    """Plans ``step(params, cache, tokens, positions) -> (logits, cache)`` for pipelined
    generation over ``mesh`` (a ``jax.sharding.Mesh`` with a pipeline axis and optionally a
    data axis, each data replica generating its rows, and a tensor axis, over which each
    stage's operators run the tensor strategies the sharding pass picks, as in a forward plan;
    caches split by heads where the plan splits their attention). The batch is ``cache``'s
    leading axis.

    Args:
      num_groups: request groups in flight per data replica; None = one per stage (the least
        that keeps every stage busy). 1 is the naive pipeline (one group, fill and drain).
      cache_length: positions the cache holds; None = the axis 1 every cache leaf shares.
      memory_limit: bytes per device (parameters + caches + buffers); None = the hardware's.
    """
    axes = dict(mesh_axes(mesh, pipeline_axis))
    fn_name = getattr(step, "__qualname__", repr(step))
    check_axes(axes, pipeline_axis, data_axis, tensor_axis, fn_name)
    cache_leaves = jax.tree.leaves(cache)
    batch = batch_of(cache_leaves, fn_name)
    dp = axes.get(data_axis, 1)
    g = groups(num_groups, batch, dp, axes[pipeline_axis], fn_name)
    length = cache_length_of(cache_leaves, cache_length, fn_name)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    opts = FrontOptions(
        mesh=mesh,
        pipeline_axis=pipeline_axis,
        num_microbatches=g,
        batch_argnums=(1, 2, 3),
        hardware=hardware,
        data_axis=data_axis,
        tensor_axis=tensor_axis,
    )
    front = make_front(step, (params, cache, rows, rows), opts)
    spec = front.traced.spec
    state = find_state(spec, front.traced.out_tree, front.program, spec.fn_name)
    front = planning_front(front, state)
    layouts, bounds, times, shardings = search(front, state, g, memory_limit)
    homes = home_stages(front.program, layouts, state, spec.fn_name)
    caches = cache_layout(front.program, state, homes, front.num_stages, shardings.dims)
    stages = stage_records(front, state, layouts, homes, bounds, times, g, shardings)
    tick, c = max(times), max(g, front.num_stages)
    return GenerationPlan(
        fn_name=spec.fn_name,
        batch_size=batch,
        cache_length=length,
        num_groups=g,
        stages=stages,
        predicted_tokens_per_second=batch / (c * tick) if tick > 0 else 0.0,
        predicted_token_latency=c * tick,
        front=front,
        state=state,
        layouts=layouts,
        caches=caches,
        mesh=mesh,
        pipeline_axis=pipeline_axis,
        data_axis=front.data_axis,
        tensor_axis=front.tensor_axis,
        shardings=shardings,
    )


def generate(
    step: Callable,
    params: Any,
    cache: Any,
    prompts: Any,
    prompt_lengths: Any = None,
    *,
    mesh: Any,
    max_new_tokens: int,
    end_token: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: Any = None,
    num_groups: int | None = None,
    cache_length: int | None = None,
    hardware: Any = None,
) -> Generation:
    """``plan_generation(step, params, cache, mesh=mesh).generate(params, cache, prompts, ...)``."""
    plan = plan_generation(
        step,
        params,
        cache,
        mesh=mesh,
        num_groups=num_groups,
        cache_length=cache_length,
        hardware=hardware,
    )
    return plan.generate(
        params,
        cache,
        prompts,
        prompt_lengths,
        max_new_tokens=max_new_tokens,
        end_token=end_token,
        temperature=temperature,
        top_k=top_k,
        key=key,
    )
