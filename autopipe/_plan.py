"""`Plan`: the single source of truth for one compilation, and its runtime.

A plan records what was decided (stages as ranges of the program's pipeline operators, the
schedule, microbatches), what it is predicted to cost, the hardware it was priced for, and —
when compiled for a concrete mesh — the executable. It prints, serialises to JSON, reloads
without searching again, and is called like the function it parallelizes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from autopipe import _distributed
from autopipe.cost_models.hardware import Hardware
from autopipe.passes.ir import Program
from autopipe.passes.layout import Split, StageLayout
from autopipe.passes.schedule import Schedule
from autopipe.passes.trace import Traced, _split_nnx

JSON_VERSION = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One pipeline stage: which operators it runs, what it holds, what it is predicted to cost."""

    index: int
    layers: tuple[int, int]  # [first, last) layer
    operators: tuple[int, int]  # [first, last) pipeline operator
    primitives: tuple[str, ...]  # the primitives it runs, in program order
    param_bytes: int
    send_bytes: int  # per microbatch, to the next stage
    time: float  # predicted seconds per microbatch (compute + send)
    memory: float  # predicted bytes per device
    device_param_bytes: int = -1  # parameter bytes one device holds (its tensor shards)
    collectives: tuple[tuple[str, float], ...] = ()  # tensor axis, per microbatch: kind, bytes
    strategies: tuple[tuple[str, int], ...] = ()  # tensor sharding: operators per strategy


@dataclasses.dataclass(frozen=True, kw_only=True)
class Predicted:
    step_time: float  # seconds for the whole batch
    bubble_fraction: float  # idle share of device time
    memory_per_device: tuple[float, ...]
    bytes_moved: float  # between stages, whole batch
    unruled_primitives: tuple[str, ...]  # priced by memory traffic only (no cost rule)


@dataclasses.dataclass
class _Runtime:
    """Mutable call-time state behind a frozen plan: the compiled step and placed params."""

    emitted: Any  # passes.emit.Emitted or passes.emit_train.EmittedTrain
    compiled: Any
    packers: list
    init_opt: Any = None  # training: jitted optimizer.init laid out like the step expects
    unplace: Any = None  # training: jitted gather of parameters back to their leaves
    differentiable: Any = None  # the step behind Plan.apply, built on first use
    placed_key: tuple = ()
    placed: tuple = ()
    processes_checked: bool = False  # multi-process: mesh and plan hash checked (_distributed)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Plan:
    fn_name: str
    fingerprint: str
    mesh_axes: tuple[tuple[str, int], ...]
    pipeline_axis: str
    num_microbatches: int
    layer_boundaries: tuple[int, ...]  # over pipeline operators
    stage_boundaries: tuple[int, ...]  # over layers
    stages: tuple[Stage, ...]
    schedule: Schedule
    predicted: Predicted
    hardware: Hardware
    planning_seconds: float = dataclasses.field(compare=False)
    traced: Traced = dataclasses.field(repr=False)
    program: Program = dataclasses.field(repr=False)
    split: Split = dataclasses.field(repr=False)
    layouts: tuple[StageLayout, ...] = dataclasses.field(repr=False)
    mesh: Any = dataclasses.field(repr=False)
    _runtime: _Runtime = dataclasses.field(repr=False)
    remat: tuple[bool, ...] = ()  # training, per stage: recompute the forward in the backward
    data_axis: str | None = None  # mesh axis splitting every microbatch (None: no data split)
    tensor_axis: str | None = None  # mesh axis splitting operators (None: no tensor split)
    dims: Any = dataclasses.field(default=None, repr=False)  # value → dim split over tensor_axis
    lean_sharding: bool = False  # tensor shardings chosen with parameter memory priced
    factorizations: tuple = ()  # mesh=None / N devices: every (pp, dp, tp) priced, best first

    # --- inspection ------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_devices(self) -> int:
        """Devices along the pipeline axis (stages / virtual stages per device)."""
        return dict(self.mesh_axes)[self.pipeline_axis]

    @property
    def training(self) -> bool:
        return self.schedule.training

    @property
    def num_layers(self) -> int:
        return len(self.layer_boundaries) - 1

    @property
    def compiled(self) -> Any:
        """The `jax.stages.Compiled` executable (None for a planning-only plan)."""
        return self._runtime.compiled

    def as_text(self) -> str:
        """The compiled HLO text."""
        return self._require_compiled().as_text()

    def summary(self) -> str:
        tensor = self.tensor_axis is not None
        rows = [
            (
                "stage",
                "layers",
                "ops",
                "first → last op",
                "params",
                *(("params/device", "tensor split", "collectives/mb") if tensor else ()),
                "time/mb",
                "memory",
            ),
            *[
                (
                    str(s.index),
                    f"{s.layers[0]}–{s.layers[1] - 1}",
                    str(s.operators[1] - s.operators[0]),
                    f"{s.primitives[0]} → {s.primitives[-1]}" if s.primitives else "-",
                    _fmt_bytes(s.param_bytes),
                    *(
                        (_fmt_bytes(s.device_param_bytes), _split_text(s), _comm_text(s))
                        if tensor
                        else ()
                    ),
                    _fmt_time(s.time),
                    _fmt_bytes(s.memory),
                )
                for s in self.stages
            ],
        ]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        p = self.predicted
        mesh = " × ".join(f"{n}={k}" for n, k in self.mesh_axes)
        head = (
            f"autopipe plan for {self.fn_name}: {self.num_stages} stages over mesh ({mesh}), "
            f"{self.num_microbatches} microbatches, schedule {self.schedule.kind}, "
            f"hardware {self.hardware.name}, {self.num_layers} layers"
        )
        foot = (
            f"predicted step {_fmt_time(p.step_time)}, bubble {p.bubble_fraction:.1%}, "
            f"peak memory/device {_fmt_bytes(max(p.memory_per_device))}, "
            f"moved between stages {_fmt_bytes(p.bytes_moved)}; "
            f"planned in {self.planning_seconds:.2f} s"
        )
        if p.unruled_primitives:
            foot += f"\nno cost rule (priced by bytes only): {', '.join(p.unruled_primitives)}"
        return "\n".join([head, *lines, foot])

    def __repr__(self) -> str:
        return self.summary()

    def profile(self, *args: Any, repeats: int = 7) -> tuple:
        """Compiles and times each stage alone on the current backend (median of `repeats`);
        returns one `StageProfile` (measured vs predicted seconds per microbatch) per stage."""
        from autopipe._profile import profile_stages

        return profile_stages(self, *args, repeats=repeats)

    # --- pictures (autopipe._viz) ----------------------------------------------------------

    def plot_schedule(self, path=None, *, timing="event"):
        """Timeline of the schedule from predicted times (device × time, boxes per action,
        grey = bubble); saved to `path` when given. Returns the matplotlib Figure.
        ``timing="lockstep"`` shows what one SPMD program runs (each tick = slowest device)."""
        from autopipe import _viz

        return _viz.plot_schedule(self.schedule, _viz.plan_durations(self), path, timing=timing)

    def plot_stages(self, path=None):
        """Layers coloured by stage, and predicted time and memory per stage (a Figure)."""
        from autopipe import _viz

        return _viz.plot_stages(self, path)

    def save_chrome_trace(self, path, *, timing="event") -> dict:
        """Writes the predicted schedule as Chrome trace-event JSON (chrome://tracing)."""
        from autopipe import _viz

        return _viz.save_chrome_trace(
            self.schedule, _viz.plan_durations(self), path, timing=timing, name=self.fn_name
        )

    # --- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "version": JSON_VERSION,
            "function": self.fn_name,
            "fingerprint": self.fingerprint,
            "mesh_axes": [list(a) for a in self.mesh_axes],
            "pipeline_axis": self.pipeline_axis,
            "data_axis": self.data_axis,
            "tensor_axis": self.tensor_axis,
            "lean_sharding": self.lean_sharding,
            "num_microbatches": self.num_microbatches,
            "schedule": self.schedule.kind,
            "layer_boundaries": list(self.layer_boundaries),
            "stage_boundaries": list(self.stage_boundaries),
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "predicted": dataclasses.asdict(self.predicted),
            "hardware": self.hardware.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, fn, *example_args, mesh, **options) -> Plan:
        """Rebuilds the saved plan for `fn` without searching again (see `autopipe.plan`)."""
        from autopipe._api import plan_from_dict

        return plan_from_dict(json.loads(text), fn, example_args, mesh=mesh, **options)

    # --- running ---------------------------------------------------------------------------

    def _require_compiled(self) -> Any:
        if self._runtime.compiled is None:
            raise RuntimeError(
                f"this plan for {self.fn_name} was made without compiling (abstract mesh or "
                "compile=False); plan again with a concrete jax Mesh to run it."
            )
        return self._runtime.compiled

    def __call__(self, *args: Any) -> Any:
        compiled = self._require_compiled()
        leaves = self._check_args(args)
        self._check_processes()
        params, batch = self._split_leaves(leaves)
        bufs = self._place_params(params)
        sharding = self._runtime.emitted.batch_sharding
        outs = compiled(bufs, tuple(jax.device_put(x, sharding) for x in batch))
        last = _stage_devices(self.mesh, self.pipeline_axis, self.num_stages - 1)
        if not _distributed.owns_any(last):
            return None  # multi-process: outputs live in the processes holding the last stage
        return jax.tree.unflatten(self.traced.out_tree, [self._last_stage_block(o) for o in outs])

    def _check_processes(self) -> None:
        rt = self._runtime
        if not rt.processes_checked:
            _distributed.check_plan(self)
            rt.processes_checked = True

    def apply(self, *args: Any) -> Any:
        """``fn(*args)`` as a traceable, differentiable function of the arguments: use it under
        ``jax.grad``/``jax.jit`` (the gradient of the forward pipeline is GPipe by autodiff).
        Unlike calling the plan it packs parameters on every call and replicates outputs."""
        from autopipe.passes.emit import emit, pack_traced

        self._require_compiled()
        rt = self._runtime
        if rt.differentiable is None:
            rt.differentiable = emit(
                self.program,
                self.layouts,
                self.schedule,
                mesh=self.mesh,
                axis=self.pipeline_axis,
                batch_size=self.traced.batch_size,
                data_axis=self.data_axis,
                tensor_axis=self.tensor_axis,
                dims=self.dims,
                replicate_outputs=True,
            ).step
        params, batch = self._split_leaves(self._check_args(args))
        bufs = pack_traced(self.program, self.layouts, params, rt.emitted.buffers)
        outs = rt.differentiable(bufs, tuple(batch))
        return jax.tree.unflatten(self.traced.out_tree, list(outs))

    def _check_args(self, args: Sequence[Any]) -> list[Any]:
        spec = self.traced.spec
        if len(args) != spec.num_args:
            raise TypeError(
                f"plan for {spec.fn_name} takes {spec.num_args} arguments, got {len(args)}."
            )
        treedef, leaves = spec.flatten(args)
        if treedef != spec.in_tree:
            raise ValueError(
                f"plan for {spec.fn_name} was made for arguments with structure {spec.in_tree}, "
                f"but was called with {treedef}. Call it with arguments shaped like the "
                "example arguments, or make a new plan."
            )
        for path, want, x in zip(spec.in_paths, spec.in_avals, leaves, strict=True):
            _check_leaf(spec.fn_name, path, want, x)
        return leaves

    def _split_leaves(self, leaves: Sequence[Any]) -> tuple[list[Any], list[Any]]:
        """(parameter leaves, batch leaves) of a call's flat arguments."""
        batch = self.traced.spec.batch_leaves
        return (
            [x for x, b in zip(leaves, batch, strict=True) if not b],
            [x for x, b in zip(leaves, batch, strict=True) if b],
        )

    def _place_params(self, params: list[Any]) -> tuple[Any, ...]:
        rt = self._runtime
        cacheable = all(isinstance(x, jax.Array) for x in params)
        if cacheable and len(rt.placed_key) == len(params):
            if all(a is b for a, b in zip(rt.placed_key, params, strict=True)):
                return rt.placed
        placed = self.place_params(params)
        rt.placed_key, rt.placed = (tuple(params) if cacheable else ()), placed
        return placed

    def place_params(self, params: Sequence[Any]) -> tuple[Any, ...]:
        """Packs flat parameter leaves into the per-stage buffers, each stage on its devices
        (and each tensor-parallel device holding only its shard)."""
        rt = self._runtime
        prog = self.program
        param_ids = [v for v in prog.invars if v not in prog.batch_dependent]
        raw = dict(zip(param_ids, params, strict=True)) | dict(prog.consts)
        per_stage = {}
        for s, (pack, ids) in enumerate(rt.packers):
            # only stages with a device in this process (all of them in a single process)
            local = _distributed.local_devices(_stage_devices(self.mesh, self.pipeline_axis, s))
            if local:
                per_stage[s] = pack(*[jax.device_put(raw[v], local[0]) for v in ids])
        out = []
        for k, buf in enumerate(rt.emitted.buffers):
            arrays = [
                jax.device_put(per_stage[idx[0].start or 0][k][(slice(None), *idx[1:])], d)
                for d, idx in buf.sharding.addressable_devices_indices_map(buf.shape).items()
            ]
            out.append(jax.make_array_from_single_device_arrays(buf.shape, buf.sharding, arrays))
        return tuple(out)

    # --- training ---------------------------------------------------------------------------

    def init(self, *params: Any) -> Any:
        """Places the parameter arguments on their stages and initialises the optimizer."""
        rt = self._require_training()
        self._check_processes()
        bufs = self.place_params(self._part(params, batch=False))
        return TrainState(params=bufs, opt_state=rt.init_opt(bufs))

    def step(self, state: Any, *batch: Any) -> tuple[Any, jax.Array]:
        """One optimizer step on the batch arguments; returns (new state, loss). Donates
        `state`: use only the returned one afterwards."""
        rt = self._require_training()
        sharding = rt.emitted.batch_sharding
        leaves = tuple(jax.device_put(x, sharding) for x in self._part(batch, batch=True))
        params, opt_state, loss = rt.compiled(state.params, state.opt_state, leaves)
        return TrainState(params=params, opt_state=opt_state), loss

    def unplace(self, state: Any) -> Any:
        """The parameter arguments (same pytrees as given to `init`) from a training state."""
        rt = self._require_training()
        spec = self.traced.spec
        it = iter(rt.unplace(state.params))
        leaves = [None if b else next(it) for b in spec.batch_leaves]
        args = jax.tree.unflatten(spec.in_tree, leaves)
        out = [
            a if g is None else nnx_merge(g, a)
            for a, g in zip(args, spec.nnx_graphdefs, strict=True)
        ]
        params = [a for i, a in enumerate(out) if i not in spec.batch_args]
        return params[0] if len(params) == 1 else tuple(params)

    def _require_training(self) -> _Runtime:
        self._require_compiled()
        if not self.training:
            raise RuntimeError("init/step/unplace belong to training plans (autopipe.train).")
        return self._runtime

    def _part(self, args: Sequence[Any], *, batch: bool) -> list[Any]:
        """Flat leaves of the parameter (or batch) arguments, checked against the plan."""
        spec = self.traced.spec
        n = sum((i in spec.batch_args) == batch for i in range(spec.num_args))
        kind = "batch" if batch else "parameter"
        if len(args) != n:
            raise TypeError(
                f"plan for {spec.fn_name} takes {n} {kind} argument(s), got {len(args)}."
            )
        leaves = [x for a in args for x in jax.tree.leaves(_split_nnx(a)[1])]
        want = [
            (p, a)
            for p, a, b in zip(spec.in_paths, spec.in_avals, spec.batch_leaves, strict=True)
            if b == batch
        ]
        if len(leaves) != len(want):
            raise ValueError(
                f"plan for {spec.fn_name}: the {kind} arguments have {len(leaves)} "
                f"leaves, but the plan was made for {len(want)}."
            )
        for (path, aval), x in zip(want, leaves, strict=True):
            _check_leaf(spec.fn_name, path, aval, x)
        return leaves

    @property
    def batch_sharding(self) -> Any:
        """Where the program reads batch arguments: split over the data axis (if any),
        replicated otherwise. With several processes, build each batch leaf from the rows of
        the data-parallel replicas a process holds:
        ``jax.make_array_from_process_local_data(plan.batch_sharding, local_rows)``."""
        return self._runtime.emitted.batch_sharding

    def _last_stage_block(self, out: jax.Array) -> jax.Array:
        """The last stage's rows of a ``(p·B, ...)`` output: one device's array, or with a data
        axis an array split over the last stage's data-parallel devices (with several processes
        each holds its replicas' rows)."""
        rows = out.shape[0] // self.num_stages
        start = rows * (self.num_stages - 1)
        if self.data_axis is None:
            for shard in out.addressable_shards:
                if (shard.index[0].start or 0) == start:
                    return shard.data
            raise RuntimeError(
                "the last pipeline stage's output is not addressable from this process"
            )
        names = self.mesh.axis_names
        stage = np.take(
            self.mesh.devices, self.num_stages - 1, axis=names.index(self.pipeline_axis)
        )
        rest = [n for n in names if n != self.pipeline_axis]
        dp_pos = rest.index(self.data_axis)
        replicas = np.moveaxis(stage, dp_pos, 0).reshape(stage.shape[dp_pos], -1)[:, 0]
        sharding = NamedSharding(Mesh(replicas, (self.data_axis,)), P(self.data_axis))
        mine = {d: None for d in replicas}
        for shard in out.addressable_shards:
            lo = shard.index[0].start or 0
            if shard.device in mine and start <= lo < start + rows:
                mine[shard.device] = shard.data
        arrays = [a for a in mine.values() if a is not None]
        return jax.make_array_from_single_device_arrays((rows, *out.shape[1:]), sharding, arrays)


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Placed parameters and optimizer state: flat per-dtype buffers sharded over stages."""

    params: tuple[jax.Array, ...]
    opt_state: Any


def _check_leaf(fn_name: str, path: str, want: Any, x: Any) -> None:
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    got = (tuple(np.shape(x)), dtype)  # dtypes compare as is: PRNG keys have no numpy dtype
    if got != (tuple(want.shape), want.dtype):
        raise ValueError(
            f"plan for {fn_name}: argument {path} has shape {got[0]} and dtype {got[1]}, but "
            f"the plan was made for {tuple(want.shape)} {want.dtype}. Make a new plan for "
            "these shapes (the decorator does this automatically)."
        )


def nnx_merge(graphdef: Any, state: Any) -> Any:
    from flax import nnx

    return nnx.merge(graphdef, state)


def _stage_devices(mesh: Any, axis: str, stage: int) -> list[Any]:
    pos = mesh.axis_names.index(axis)
    return list(np.asarray(np.take(mesh.devices, stage, axis=pos)).reshape(-1))


_SPLITS = ("column", "row", "batch", "gather", "lhs")  # the strategies worth listing


def _split_text(stage: Stage) -> str:
    counts = dict(stage.strategies)
    return ", ".join(f"{k} {counts[k]}" for k in _SPLITS if k in counts) or "none"


def _comm_text(stage: Stage) -> str:
    return ", ".join(f"{k} {_fmt_bytes(b)}" for k, b in stage.collectives) or "-"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def _fmt_time(t: float) -> str:
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} µs"
