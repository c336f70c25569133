"""A plan with its program attached (`Planned`), and the executable `Plan` it compiles to.

`Planned` is what the staged API's ``.plan()`` returns: the frozen decisions (`PlanRecord`:
printable, JSON, drawable) plus the front they were made for (trace, IR, costs) and the stage
layouts, so that ``.compile()`` can emit and compile it without searching again. `Plan` adds
the runtime (`_executable.Executable`: call, place, train); it is what `autopipe.plan` and
`autopipe.train` return, and ``Plan.from_json(text, fn, *args, mesh=...)`` replays a saved plan.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import optax

from autopipe import _viz
from autopipe._compile import _compile, _compile_train
from autopipe._executable import Executable, _Runtime
from autopipe._front import Front, FrontOptions, check_reduction, is_concrete, make_front
from autopipe._plan import PlanRecord
from autopipe._stage_search import Assembled, assemble, replay
from autopipe._train import TrainingSearch, cuts_fused, replay_training
from autopipe.passes.ir import Program
from autopipe.passes.layout import Split, StageLayout
from autopipe.passes.trace import Traced


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Planned(PlanRecord):
    """The decisions of a plan (see `PlanRecord`) and the program they were made for."""

    front: Front = dataclasses.field(repr=False)
    layouts: tuple[StageLayout, ...] = dataclasses.field(repr=False)
    mesh: Any = dataclasses.field(repr=False)
    dims: Any = dataclasses.field(default=None, repr=False)  # value → dim split over tensor_axis
    op_strategies: Any = dataclasses.field(default=None, repr=False)  # op → its tensor Strategy
    whole_values: Any = dataclasses.field(default=frozenset(), repr=False)  # handed over whole
    optimizer: optax.GradientTransformation | None = dataclasses.field(default=None, repr=False)

    __hash__ = object.__hash__  # compared and hashed by identity (it holds a program)

    @property
    def traced(self) -> Traced:
        return self.front.traced

    @property
    def program(self) -> Program:
        return self.front.program

    @property
    def split(self) -> Split:
        return self.front.split

    @property
    def record(self) -> PlanRecord:
        """The decisions alone (no program): what `to_json` writes."""
        names = [f.name for f in dataclasses.fields(PlanRecord)]
        return PlanRecord(**{n: getattr(self, n) for n in names})

    @property
    def layer_times(self) -> tuple[float, ...]:
        """Predicted forward seconds per layer, as the stage search priced them."""
        t, b = self.front.costs.op_times, self.layer_boundaries
        return tuple(float(sum(t[lo:hi])) for lo, hi in zip(b[:-1], b[1:], strict=True))

    def compile(self) -> Plan:
        """Emits and compiles the plan for its concrete mesh (no search)."""
        if not is_concrete(self.mesh):
            raise RuntimeError(
                f"this plan for {self.fn_name} was made for mesh axes {dict(self.mesh_axes)} "
                "without devices; lower it with a concrete jax.sharding.Mesh to compile it."
            )
        return self._with_runtime(self._compile())

    def _compile(self) -> _Runtime:
        f = self.front
        if not self.training:
            return _compile(
                f,
                self.layouts,
                self.schedule,
                self.mesh,
                self.pipeline_axis,
                self.dims,
                (self.op_strategies, self.whole_values),
            )
        m, dp = self.num_microbatches, f.axis_size(f.data_axis)
        scale = 1.0 / (m * dp) if self.reduction == "mean" else 1.0
        args = (self.mesh, self.pipeline_axis, self.optimizer, self.remat, scale)
        tensor = (self.dims, self.op_strategies, self.whole_values)
        return _compile_train(
            f, self.layouts, self.schedule, *args, zero_stage=self.zero_stage, tensor=tensor
        )

    def finish(self, *, compile: bool = True) -> Plan:  # noqa: A002
        """The executable for a concrete mesh (``compile=True``), else a planning-only `Plan`."""
        if compile and is_concrete(self.mesh):
            return self.compile()
        return self._with_runtime(_Runtime(emitted=None, compiled=None, packers=[]))

    def _with_runtime(self, runtime: _Runtime) -> Plan:
        names = [f.name for f in dataclasses.fields(Planned)]
        return Plan(**{n: getattr(self, n) for n in names}, _runtime=runtime)

    # --- pictures (autopipe._viz) ----------------------------------------------------------

    def plot_schedule(self, path=None, *, timing="event"):
        """Timeline of the schedule from predicted times (device × time, boxes per action,
        grey = bubble); saved to `path` when given. Returns the matplotlib Figure.
        ``timing="lockstep"`` shows what one SPMD program runs (each tick = slowest device)."""
        return _viz.plot_schedule(self.schedule, _viz.plan_durations(self), path, timing=timing)

    def plot_stages(self, path=None):
        """Layers coloured by stage, and predicted time and memory per stage (a Figure)."""
        return _viz.plot_stages(self, self.layer_times, path)

    def save_chrome_trace(self, path, *, timing="event") -> dict:
        """Writes the predicted schedule as Chrome trace-event JSON (chrome://tracing)."""
        return _viz.save_chrome_trace(
            self.schedule, _viz.plan_durations(self), path, timing=timing, name=self.fn_name
        )


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Plan(Planned, Executable):
    """A compiled plan: call it like the function (forward plans) or train with it
    (``init``/``step``/``unplace``). Planning-only plans (abstract mesh, ``compile=False``)
    have no executable."""

    _runtime: _Runtime = dataclasses.field(
        default_factory=lambda: _Runtime(emitted=None, compiled=None, packers=[]), repr=False
    )

    @property
    def compiled(self) -> Any:
        """The `jax.stages.Compiled` executable (None for a planning-only plan)."""
        return self._runtime.compiled

    @property
    def emitted(self) -> Any:
        """What the emit pass made (`passes.emit.Emitted` / `passes.emit_train.EmittedTrain`:
        the jitted step, buffer avals and shardings); None for a planning-only plan."""
        return self._runtime.emitted

    def as_text(self) -> str:
        """The compiled HLO text."""
        return self._require_compiled().as_text()

    def profile(self, *args: Any, repeats: int = 7) -> Any:
        """Times the plan on the current backend (medians of `repeats`).

        A forward plan, given its arguments: compiles and times each stage alone; returns one
        `StageProfile` (measured vs predicted seconds per microbatch) per stage. A training
        plan, given a state and the step's arguments (``plan.profile(state, *batch)``): times
        every action kind inside the compiled step and returns a `TrainProfile` (the step the
        measured actions predict, the step measured, the cost model's prediction)."""
        if self.training:
            from autopipe._train_profile import profile_training

            return profile_training(self, *args, repeats=repeats)
        from autopipe._profile import profile_stages

        return profile_stages(self, *args, repeats=repeats)

    @classmethod
    def from_json(
        cls,
        text: str,
        fn: Callable,
        *example_args: Any,
        mesh: Any,
        batch_argnums: Sequence[int] = (1,),
        optimizer: optax.GradientTransformation | None = None,
        compile: bool = True,  # noqa: A002
    ) -> Plan:
        """Rebuilds the saved plan for `fn` without searching again (see `autopipe.plan`); a
        training plan's (`autopipe.train`) with the ``optimizer`` it was made with."""
        started = time.perf_counter()
        saved = PlanRecord.from_dict(json.loads(text))
        opts = FrontOptions(
            mesh=mesh,
            pipeline_axis=saved.pipeline_axis,
            num_microbatches=saved.num_microbatches,
            batch_argnums=tuple(batch_argnums),
            num_stages=None if saved.training else saved.num_stages,
            hardware=saved.hardware,
            data_axis=saved.data_axis,
            tensor_axis=saved.tensor_axis,
        )
        if not saved.training:
            planned = replay_record(make_front(fn, example_args, opts), mesh, saved, started)
            return planned.finish(compile=compile)
        require_optimizer(saved, optimizer, training=True)
        front = training_front(fn, example_args, opts, saved, optimizer)
        planned = replay_training_record(front, mesh, saved, started, optimizer)
        return planned.finish(compile=compile)


def training_front(
    fn: Callable, args: Sequence[Any], opts: FrontOptions, saved: PlanRecord, optimizer, reuse=None
) -> Front:
    """``fn`` lowered as `autopipe.train` lowers it for the saved training plan: for training
    at its virtual stages, fused projections cut only where ``optimizer`` allows it
    (`_train.cuts_fused`). ``reuse``: a front of the same function and arguments."""
    opts = dataclasses.replace(opts, training=True, virtual_stages=saved.schedule.virtual_stages)
    front = make_front(fn, args, opts, reuse)
    if front.tensor_axis and not cuts_fused(optimizer, front):
        front = make_front(fn, args, dataclasses.replace(opts, split_fused=False), reuse=front)
    return front


def require_optimizer(saved: PlanRecord, optimizer, *, training: bool) -> None:
    """A training record replays only on a training lowering (``training``), given the
    optimizer (optax transformations are not saved)."""
    if optimizer is None or not training:
        raise ValueError(
            f"the saved plan for {saved.fn_name} is a training plan: replay it on a loss "
            "lowered with training=True and pass optimizer=... (the optax "
            "GradientTransformation it was made with): Plan.from_json(text, loss_fn, "
            "*args, mesh=mesh, optimizer=optimizer)."
        )


def forward_planned(front: Front, done: Assembled, *, mesh: Any, pipeline_axis: str, started):
    sh = done.search.shardings
    return Planned(
        **_record_fields(front, pipeline_axis, started),
        layer_boundaries=done.layers,
        stage_boundaries=done.search.boundaries,
        stages=done.stages,
        schedule=done.schedule,
        predicted=done.predicted,
        lean_sharding=sh.lean,
        front=front,
        layouts=done.layouts,
        mesh=mesh,
        dims=sh.dims,
        op_strategies=sh.op_strategies,
        whole_values=sh.whole,
    )


def training_planned(
    front: Front,
    done: TrainingSearch,
    *,
    mesh,
    pipeline_axis,
    started,
    optimizer,
    reduction,
    zero_stage,
):
    return Planned(
        **_record_fields(front, pipeline_axis, started),
        layer_boundaries=done.layers,
        stage_boundaries=done.boundaries,
        stages=done.stages,
        schedule=done.schedule,
        predicted=done.predicted,
        remat=done.remat,
        shared_params=done.shared,
        optimizer_state=done.optimizer_state,
        front=front,
        layouts=done.layouts,
        mesh=mesh,
        optimizer=optimizer,
        reduction=check_reduction(reduction),
        zero_stage=zero_stage,
        dims=done.shardings.dims,
        op_strategies=done.shardings.op_strategies,
        whole_values=done.shardings.whole,
    )


def check_fingerprint(front: Front, saved: PlanRecord) -> None:
    """Refuses to replay ``saved`` for another program than it was made for."""
    if front.traced.fingerprint() != saved.fingerprint:
        again = "autopipe.train" if saved.training else "autopipe.plan"
        raise ValueError(
            f"the saved plan was made for a different program than {front.traced.spec.fn_name} "
            f"traced with these arguments (fingerprint {saved.fingerprint} vs "
            f"{front.traced.fingerprint()}); plan it again with {again}."
        )


def replay_record(front: Front, mesh: Any, saved: PlanRecord, started: float) -> Planned:
    """The saved forward plan's decisions on this front, without searching."""
    check_fingerprint(front, saved)
    layers = saved.layer_boundaries
    done = assemble(
        front, layers, replay(front, layers, saved.stage_boundaries, saved.lean_sharding)
    )
    return forward_planned(
        front, done, mesh=mesh, pipeline_axis=saved.pipeline_axis, started=started
    )


def replay_training_record(
    front: Front, mesh: Any, saved: PlanRecord, started: float, optimizer
) -> Planned:
    """The saved training plan's decisions on ``front`` (lowered for training at the record's
    virtual stages, fused projections cut where ``optimizer`` allows), without searching."""
    check_fingerprint(front, saved)
    return training_planned(
        front,
        replay_training(front, optimizer, saved),
        mesh=mesh,
        pipeline_axis=saved.pipeline_axis,
        started=started,
        optimizer=optimizer,
        reduction=saved.reduction,
        zero_stage=saved.zero_stage,
    )


def _record_fields(front: Front, pipeline_axis: str, started: float) -> dict:
    return dict(
        fn_name=front.traced.spec.fn_name,
        fingerprint=front.traced.fingerprint(),
        mesh_axes=front.mesh_axes,
        pipeline_axis=pipeline_axis,
        num_microbatches=front.num_microbatches,
        hardware=front.hardware,
        planning_seconds=time.perf_counter() - started,
        data_axis=front.data_axis,
        tensor_axis=front.tensor_axis,
    )
