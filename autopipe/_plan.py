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

from autopipe.cost_models.hardware import Hardware
from autopipe.passes.emit import Emitted
from autopipe.passes.ir import Program
from autopipe.passes.layout import Split, StageLayout
from autopipe.passes.schedule import Schedule
from autopipe.passes.trace import Traced

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

    emitted: Emitted | None
    compiled: Any
    packers: list
    placed_key: tuple = ()
    placed: tuple = ()


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

    # --- inspection ------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.stages)

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
        rows = [
            ("stage", "layers", "ops", "first → last op", "params", "time/mb", "memory"),
            *[
                (
                    str(s.index),
                    f"{s.layers[0]}–{s.layers[1] - 1}",
                    str(s.operators[1] - s.operators[0]),
                    f"{s.primitives[0]} → {s.primitives[-1]}" if s.primitives else "-",
                    _fmt_bytes(s.param_bytes),
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

    # --- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "version": JSON_VERSION,
            "function": self.fn_name,
            "fingerprint": self.fingerprint,
            "mesh_axes": [list(a) for a in self.mesh_axes],
            "pipeline_axis": self.pipeline_axis,
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
        params = [x for x, b in zip(leaves, self.traced.spec.batch_leaves, strict=True) if not b]
        batch = [x for x, b in zip(leaves, self.traced.spec.batch_leaves, strict=True) if b]
        bufs = self._place_params(params)
        sharding = self._runtime.emitted.batch_sharding
        outs = compiled(bufs, tuple(jax.device_put(x, sharding) for x in batch))
        return jax.tree.unflatten(self.traced.out_tree, [self._last_stage_block(o) for o in outs])

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
            got = (tuple(np.shape(x)), np.dtype(getattr(x, "dtype", np.asarray(x).dtype)))
            if got != (tuple(want.shape), np.dtype(want.dtype)):
                raise ValueError(
                    f"plan for {spec.fn_name}: argument {path} has shape {got[0]} and dtype "
                    f"{got[1]}, but the plan was made for {tuple(want.shape)} {want.dtype}. "
                    "Make a new plan for these shapes (the decorator does this automatically)."
                )
        return leaves

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
        """Packs flat parameter leaves into the per-stage buffers, each stage on its devices."""
        rt = self._runtime
        prog = self.program
        param_ids = [v for v in prog.invars if v not in prog.batch_dependent]
        raw = dict(zip(param_ids, params, strict=True)) | dict(prog.consts)
        sharding = rt.emitted.param_sharding
        shape_of = {
            dt: (self.num_stages, n)
            for dt, n in zip(rt.emitted.param_dtypes, rt.emitted.param_sizes, strict=True)
        }
        per_stage = {}
        for s, (pack, ids) in enumerate(rt.packers):
            home = _stage_devices(self.mesh, self.pipeline_axis, s)[0]
            per_stage[s] = pack(*[jax.device_put(raw[v], home) for v in ids])
        out = []
        for k, dt in enumerate(rt.emitted.param_dtypes):
            index_map = sharding.addressable_devices_indices_map(shape_of[dt])
            arrays = [
                jax.device_put(per_stage[idx[0].start or 0][k], d) for d, idx in index_map.items()
            ]
            out.append(jax.make_array_from_single_device_arrays(shape_of[dt], sharding, arrays))
        return tuple(out)

    def _last_stage_block(self, out: jax.Array) -> jax.Array:
        rows = out.shape[0] // self.num_stages
        start = rows * (self.num_stages - 1)
        for shard in out.addressable_shards:
            if (shard.index[0].start or 0) == start:
                return shard.data
        raise RuntimeError("the last pipeline stage's output is not addressable from this process")


def _stage_devices(mesh: Any, axis: str, stage: int) -> list[Any]:
    pos = mesh.axis_names.index(axis)
    return list(np.asarray(np.take(mesh.devices, stage, axis=pos)).reshape(-1))


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
