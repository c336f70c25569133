"""The plan record: what one planning run decided, frozen and serialisable.

A `PlanRecord` holds the decisions (stages as ranges of the program's pipeline operators and
of its layers, the schedule, microbatches, remat, which mesh axes split data and operators),
what they are predicted to cost and the hardware they were priced for — and nothing compiled.
It prints, writes JSON and reads it back (`PlanRecord.from_json`), and is what the pictures
draw. The staged API (`autopipe.trace(...).lower(...).plan()`) returns one with the program it
belongs to attached; `compile()` of that gives the executable `autopipe.Plan`.
"""

from __future__ import annotations

import dataclasses
import json

from autopipe.cost_models.hardware import Hardware
from autopipe.passes import schedule as schedules
from autopipe.passes.schedule import Schedule

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
    # predicted seconds per microbatch: forward + send (forward-only plans), or forward +
    # backward (+ a recomputed forward under remat) for training (`cost_models.durations`)
    time: float
    memory: float  # predicted bytes per device
    device_param_bytes: int = -1  # parameter bytes one device holds (its tensor shards)
    collectives: tuple[tuple[str, float], ...] = ()  # tensor axis, per microbatch: kind, bytes
    strategies: tuple[tuple[str, int], ...] = ()  # tensor sharding: operators per strategy
    # training with a split backward: seconds per microbatch a B spends storing what its W,
    # run in another tick, reads back (`cost_models.durations`); 0 otherwise
    store_time: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Predicted:
    step_time: float  # seconds for the whole batch
    bubble_fraction: float  # idle share of device time
    memory_per_device: tuple[float, ...]
    bytes_moved: float  # between stages, whole batch
    unruled_primitives: tuple[str, ...]  # priced by memory traffic only (no cost rule)
    # replicated over the tensor axis for want of a strategy rule: their operands are gathered
    # whole with planned, priced all-gathers (`passes.sharding`)
    unsharded_primitives: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Factorization:
    """One way to lay the devices out as pipeline × data × tensor, priced by the cost model."""

    pp: int
    dp: int
    tp: int
    num_microbatches: int
    step_time: float  # predicted seconds per batch; inf if no stage split fits in memory
    memory: float  # largest predicted bytes per device (inf if it does not fit)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanRecord:
    """The decisions of one plan and their predicted costs (no program, no executable)."""

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
    planning_seconds: float = dataclasses.field(default=0.0, compare=False)
    remat: tuple[bool, ...] = ()  # training, per stage: recompute the forward in the backward
    data_axis: str | None = None  # mesh axis splitting every microbatch (None: no data split)
    tensor_axis: str | None = None  # mesh axis splitting operators (None: no tensor split)
    lean_sharding: bool = False  # tensor shardings chosen with parameter memory priced
    factorizations: tuple = ()  # mesh=None / N devices: every (pp, dp, tp) priced, best first
    # training: (leaf path, stages reading it) of each parameter read by stages on several
    # devices (a tied embedding): each holds a copy, their gradients are summed every step
    shared_params: tuple[tuple[str, tuple[int, ...]], ...] = ()
    zero_stage: int = 0  # training: 1 splits the optimizer state over the data axis (ZeRO-1)
    reduction: str = "mean"  # training: the loss is a mean (or a sum) over the examples
    # training: the optimizer state the memory search priced, in bytes per parameter byte
    # (adam: 2; None: not recorded)
    optimizer_state: float | None = None

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
        if self.zero_stage:
            foot += (
                f"\noptimizer state split over the data axis {self.data_axis!r} "
                f"(ZeRO-{self.zero_stage}: 1/{dict(self.mesh_axes)[self.data_axis]} per replica)"
            )
        if p.unsharded_primitives:
            names = ", ".join(p.unsharded_primitives)
            foot += f"\nno sharding rule (replicated over the tensor axis): {names}"
        if self.shared_params:
            foot += "\nshared parameters (a copy per device, gradients summed every step): "
            foot += "; ".join(
                f"{path} (stages {', '.join(map(str, st))} on devices "
                f"{', '.join(str(d) for d in sorted({s % self.num_devices for s in st}))})"
                for path, st in self.shared_params
            )
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
            "data_axis": self.data_axis,
            "tensor_axis": self.tensor_axis,
            "lean_sharding": self.lean_sharding,
            "num_microbatches": self.num_microbatches,
            "schedule": self.schedule.kind,
            "layer_boundaries": list(self.layer_boundaries),
            "stage_boundaries": list(self.stage_boundaries),
            "stages": [_stage_dict(s) for s in self.stages],
            "predicted": _predicted_dict(self.predicted),
            "hardware": self.hardware.to_dict(),
        } | ({"shared_params": [[a, list(b)] for a, b in self.shared_params]}
             if self.shared_params else {}) | (
            {"zero_stage": self.zero_stage} if self.zero_stage else {}) | (
            {"remat": list(self.remat), "reduction": self.reduction,
             "optimizer_state": self.optimizer_state}
            if self.training else {})  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PlanRecord:
        """The record saved by `to_json` (its decisions only; to run it, replay it for the
        function: ``autopipe.Plan.from_json(text, fn, *example_args, mesh=mesh)``)."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, saved: dict) -> PlanRecord:
        if saved.get("version") != JSON_VERSION:
            raise ValueError(
                f"saved plan has version {saved.get('version')!r}; this autopipe reads version "
                f"{JSON_VERSION}. Plan again with autopipe.plan."
            )
        axes = tuple((str(n), int(k)) for n, k in saved["mesh_axes"])
        stages = tuple(_stage_from_dict(d) for d in saved["stages"])
        p, m, kind = len(stages), saved["num_microbatches"], saved["schedule"]
        if kind == "inference":
            sched = schedules.inference(p, m)
        else:
            v = p // dict(axes)[saved["pipeline_axis"]]
            sched = schedules.make(kind, p // v, m, v)
        predicted = dict(saved["predicted"])
        for key in ("memory_per_device", "unruled_primitives", "unsharded_primitives"):
            predicted[key] = tuple(predicted.get(key, ()))
        return cls(
            fn_name=saved["function"],
            fingerprint=saved["fingerprint"],
            mesh_axes=axes,
            pipeline_axis=saved["pipeline_axis"],
            num_microbatches=m,
            layer_boundaries=tuple(saved["layer_boundaries"]),
            stage_boundaries=tuple(saved["stage_boundaries"]),
            stages=stages,
            schedule=sched,
            predicted=Predicted(**predicted),
            hardware=Hardware(**saved["hardware"]),
            data_axis=saved.get("data_axis"),
            tensor_axis=saved.get("tensor_axis"),
            lean_sharding=saved.get("lean_sharding", False),
            shared_params=tuple((a, tuple(b)) for a, b in saved.get("shared_params", ())),
            zero_stage=saved.get("zero_stage", 0),
            remat=tuple(saved.get("remat", ())),
            reduction=saved.get("reduction", "mean"),
            optimizer_state=saved.get("optimizer_state"),
        )


def _predicted_dict(predicted: Predicted) -> dict:
    """The predicted costs; ``unsharded_primitives`` only when some are (plans without a
    tensor axis, and the saved plans before it existed, have none)."""
    out = dataclasses.asdict(predicted)
    if not out["unsharded_primitives"]:
        del out["unsharded_primitives"]
    return out


def _stage_dict(stage: Stage) -> dict:
    """The stage's fields; ``store_time`` only when a split backward stores (forward plans,
    and the saved plans before it existed, have none)."""
    out = dataclasses.asdict(stage)
    if not out["store_time"]:
        del out["store_time"]
    return out


def _stage_from_dict(d: dict) -> Stage:
    d = dict(d)
    for key in ("layers", "operators", "primitives"):
        d[key] = tuple(d[key])
    d["collectives"] = tuple((k, b) for k, b in d["collectives"])
    d["strategies"] = tuple((k, n) for k, n in d["strategies"])
    return Stage(**d)


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
