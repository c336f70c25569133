"""The staged API: ``autopipe.trace(fn, *args).lower(mesh).plan().compile()``.

Each stage is a frozen object a user can hold and inspect before paying for the next:

- `Traced` (`autopipe.trace`): the function, its argument structure and parameter/batch split,
  and (on first look) its jaxpr and IR for the whole batch.
- `Lowered` (``.lower(mesh, hardware=...)``): the program traced at the rows of one microbatch,
  its operator costs on that hardware, the layers and the stage / tensor-sharding problems.
- `Planned` (``.plan(...)``): the decisions (frozen, JSON, drawable), no compiled code.
- `Plan` (``.compile()``): the executable.

`autopipe.plan`, `autopipe.train` and `@autopipe.parallelize` are compositions of these.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import optax

from autopipe._front import Front, FrontOptions, make_front
from autopipe._plan import PlanRecord
from autopipe._planned import (
    Planned,
    forward_planned,
    replay_record,
    replay_training_record,
    require_optimizer,
    training_front,
    training_planned,
)
from autopipe._stage_search import Assembled, assemble, layer_problem, layers_for, shard, solve
from autopipe._train import TRAINING_SCHEDULES, check_schedule, cuts_fused, search_training
from autopipe.cost_models.hardware import Hardware
from autopipe.passes.costs import OperatorCosts
from autopipe.passes.graph import build_program
from autopipe.passes.ir import Program
from autopipe.passes.partition import PlanInfeasible, StageProblem, refit
from autopipe.passes.tensor_parallel import LayerShardings, ShardingCache
from autopipe.passes.trace import ArgSpec, make_arg_spec
from autopipe.passes.trace import Traced as TracedProgram
from autopipe.passes.trace import trace as trace_pass


def trace(fn: Callable, *example_args: Any, batch_argnums: Sequence[int] = (1,)) -> Traced:
    """Stage 1: ``fn`` with example arguments (arrays or ``jax.ShapeDtypeStruct``; nothing is
    allocated) and which of them carry the batch on their leading axis."""
    argnums = tuple(batch_argnums)
    spec = make_arg_spec(fn, example_args, argnums)
    return Traced(fn=fn, example_args=tuple(example_args), batch_argnums=argnums, spec=spec)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Traced:
    """A function and its example arguments: argument structure, parameter/batch split, and
    (computed on first access) the jaxpr and IR of the whole batch."""

    fn: Callable
    example_args: tuple
    batch_argnums: tuple[int, ...]
    spec: ArgSpec

    @functools.cached_property
    def traced(self) -> TracedProgram:
        return trace_pass(
            self.fn, self.example_args, batch_argnums=self.batch_argnums, num_microbatches=1
        )

    @property
    def jaxpr(self) -> Any:
        return self.traced.jaxpr

    @functools.cached_property
    def program(self) -> Program:
        """The IR of the whole batch (`passes.graph.build_program`)."""
        return build_program(self.traced.jaxpr, self.spec.batch_leaves)

    @property
    def param_avals(self) -> tuple:
        return tuple(a for a, b in self._pairs() if not b)

    @property
    def batch_avals(self) -> tuple:
        return tuple(a for a, b in self._pairs() if b)

    def _pairs(self):
        return zip(self.spec.in_avals, self.spec.batch_leaves, strict=True)

    def as_text(self) -> str:
        return str(self.jaxpr)

    def lower(
        self,
        mesh: Any,
        *,
        hardware: str | Hardware | Any | None = None,
        num_microbatches: int | None = None,
        num_stages: int | None = None,
        pipeline_axis: str = "pp",
        data_axis: str = "dp",
        tensor_axis: str = "tp",
        training: bool = False,
        virtual_stages: int = 1,
    ) -> Lowered:
        """Stage 2: the program on ``mesh`` (a Mesh, AbstractMesh or dict of axis sizes) priced
        for ``hardware``, traced at one microbatch's rows (``num_microbatches``: None = the
        largest divisor of the batch ≤ 2·stages; `autopipe.plan` and `autopipe.train` search the
        count instead, `autopipe._microbatches`). ``training``: a loss function to train."""
        opts = FrontOptions(
            mesh=mesh,
            pipeline_axis=pipeline_axis,
            num_microbatches=num_microbatches,
            batch_argnums=self.batch_argnums,
            num_stages=num_stages,
            hardware=hardware,
            training=training,
            virtual_stages=virtual_stages,
            data_axis=data_axis,
            tensor_axis=tensor_axis,
        )
        return self._lower(opts)

    def _lower(
        self, opts: FrontOptions, started: float | None = None, reuse: Front | None = None
    ) -> Lowered:
        started = time.perf_counter() if started is None else started
        front = make_front(self.fn, self.example_args, opts, reuse)
        return Lowered(traced=self, options=opts, front=front, started=started)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Lowered:
    """The program on a mesh: operator costs, layers, stage and sharding problems."""

    traced: Traced
    options: FrontOptions
    front: Front
    started: float = dataclasses.field(default=0.0, repr=False)

    @property
    def hardware(self) -> Hardware:
        return self.front.hardware

    @property
    def costs(self) -> OperatorCosts:
        """Per pipeline operator: seconds, bytes live across each cut, output bytes, ..."""
        return self.front.costs

    @property
    def program(self) -> Program:
        """The IR at one microbatch's rows."""
        return self.front.program

    @property
    def primitives(self) -> tuple[str, ...]:
        """The primitive of each pipeline operator, in program order (as `costs` indexes)."""
        ops = self.front.program.ops
        return tuple(ops[i].primitive for i in self.front.split.pipeline)

    @property
    def layers(self) -> tuple[int, ...]:
        """Layer boundaries over pipeline operators, as the stage search sees them."""
        return layers_for(self.front, self.front.num_stages)

    def shardings(
        self,
        layers: Sequence[int] | None = None,
        *,
        lean: bool = False,
        mesh_axes: Sequence[tuple[str, int]] | None = None,
        tensor_axis: str | None = None,
        cache: ShardingCache | None = None,
    ) -> LayerShardings:
        """The tensor-sharding search's choice per layer (tp = 1 without a tensor axis);
        ``mesh_axes``/``tensor_axis`` price another mesh than the lowered one."""
        front = self.front
        if tensor_axis is not None:
            front = dataclasses.replace(front, tensor_axis=tensor_axis)
        layers = self.layers if layers is None else layers
        return shard(front, layers, lean=lean, mesh_axes=mesh_axes, cache=cache)

    def stage_problem(
        self,
        memory_limit: float | None = None,
        *,
        layers: Sequence[int] | None = None,
        shardings: LayerShardings | None = None,
        lean: bool = False,
        rows_scale: float = 1.0,
        num_stages: int | None = None,
        num_microbatches: int | None = None,
    ) -> StageProblem:
        """The forward stage search's problem (`passes.partition.StageProblem`) over
        ``layers`` (default: `layers`); the keywords price other (stages, microbatches,
        microbatch rows) than the lowered ones, as the factorization search does."""
        limit = self.hardware.memory_bytes if memory_limit is None else memory_limit
        layers = self.layers if layers is None else layers
        sh = self.shardings(layers, lean=lean) if shardings is None else shardings
        return layer_problem(
            self.front,
            layers,
            limit,
            sh,
            rows_scale=rows_scale,
            num_stages=num_stages,
            num_microbatches=num_microbatches,
        )

    def as_text(self) -> str:
        """One line per pipeline operator: primitive, predicted seconds, bytes crossing."""
        c = self.costs
        rows = [f"{'op':>5}  {'primitive':<24} {'seconds':>10} {'cut bytes':>12}"]
        for k, prim in enumerate(self.primitives):
            rows.append(f"{k:>5}  {prim:<24} {c.op_times[k]:>10.3g} {c.cut_bytes[k]:>12}")
        return "\n".join(rows)

    def plan(
        self,
        *,
        num_microbatches: int | None = None,
        schedule: str | None = None,
        memory_limit: float | None = None,
        optimizer: optax.GradientTransformation | None = None,
        remat: bool | None = None,
        reduction: str = "mean",
        virtual_stages: int | None = None,
        zero_stage: int = 0,
    ) -> Planned:
        """Stage 3: the decisions. Forward plans search stages (and tensor shardings) under
        ``memory_limit`` (None: the hardware's memory); training plans (``optimizer`` given, the
        lowered function a loss) also pick the ``schedule`` and remat per stage;
        ``schedule="auto"`` plans every training schedule and keeps the fastest predicted step
        (ties: the order of `TRAINING_SCHEDULES`; one that does not fit is skipped). A
        ``num_microbatches`` other than the lowered one lowers again at that microbatch size."""
        if optimizer is None and self.options.training:
            raise ValueError(
                "this Lowered is of a training loss (lower(..., training=True)); pass "
                "optimizer=... (an optax GradientTransformation) to plan its training step."
            )
        if optimizer is None:
            if schedule not in (None, "inference"):
                raise ValueError(
                    f"schedule={schedule!r} is a training schedule; forward plans run the "
                    "'inference' schedule. Lower with training=True and pass optimizer=...."
                )
            return self._at(num_microbatches=num_microbatches)._plan_forward(memory_limit)
        kw = dict(num_microbatches=num_microbatches, memory_limit=memory_limit, remat=remat)
        kw |= dict(reduction=reduction, virtual_stages=virtual_stages, zero_stage=zero_stage)
        # whether the optimizer lets fused projections be cut: traced once for every schedule
        kw["split_fused"] = cuts_fused(optimizer, self.front) if self.front.tensor_axis else None
        if schedule == "auto":
            return self._fastest_schedule(optimizer, kw)
        return self._plan_schedule(optimizer, schedule or "1f1b", kw)

    def _plan_schedule(self, optimizer, schedule: str, options: dict) -> Planned:
        """The training plan of one schedule (``options``: `plan`'s, ``split_fused`` decided)."""
        o = options
        v = check_schedule(schedule, o["virtual_stages"])
        lowered = self._at(
            num_microbatches=o["num_microbatches"],
            training=True,
            virtual_stages=v,
            split_fused=o["split_fused"],
        )
        return lowered._plan_training(
            optimizer, schedule, o["memory_limit"], o["remat"], o["reduction"], o["zero_stage"]
        )

    def _fastest_schedule(self, optimizer, options: dict) -> Planned:
        planned, refusals = [], []
        for schedule in TRAINING_SCHEDULES:
            try:
                planned.append(self._plan_schedule(optimizer, schedule, options))
            except ValueError as e:  # PlanInfeasible included
                refusals.append(f"  {schedule}: {str(e).splitlines()[0]}")
        if not planned:
            raise PlanInfeasible(
                "schedule='auto': no training schedule can be planned here:\n" + "\n".join(refusals)
            )
        return min(planned, key=lambda p: p.predicted.step_time)

    def replay(
        self, record: PlanRecord, *, optimizer: optax.GradientTransformation | None = None
    ) -> Planned:
        """A saved plan's decisions on this program, without searching; a training plan's on
        a loss lowered with ``training=True``, with the ``optimizer`` it was made with (its
        state's size priced the tensor strategies, which are searched again)."""
        if not record.training:
            return replay_record(self.front, self.options.mesh, record, self.started)
        require_optimizer(record, optimizer, training=self.options.training)
        t = self.traced
        front = training_front(t.fn, t.example_args, self.options, record, optimizer, self.front)
        return replay_training_record(front, self.options.mesh, record, self.started, optimizer)

    def _at(self, **changes: Any) -> Lowered:
        """This program lowered with some options changed (self when none changes)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes.get("num_microbatches") == self.front.num_microbatches:
            del changes["num_microbatches"]
        if all(getattr(self.options, k) == v for k, v in changes.items()):
            return self
        opts = dataclasses.replace(self.options, **changes)
        return self.traced._lower(opts, self.started, reuse=self.front)

    def _plan_forward(self, memory_limit: float | None) -> Planned:
        front = self.front
        limit = front.hardware.memory_bytes if memory_limit is None else memory_limit
        layers = self.layers
        done = refit(  # the layout's padding and rest-buffer copies counted
            lambda lim: assemble(front, layers, solve(front, layers, lim)),
            Assembled.memory,
            limit,
        )
        return forward_planned(
            front,
            done,
            mesh=self.options.mesh,
            pipeline_axis=self.options.pipeline_axis,
            started=self.started,
        )

    def _plan_training(
        self, optimizer, schedule, memory_limit, remat, reduction, zero_stage
    ) -> Planned:
        done = search_training(
            self.front,
            optimizer,
            schedule=schedule,
            memory_limit=memory_limit,
            remat=remat,
            zero_stage=zero_stage,
        )
        return training_planned(
            self.front,
            done,
            mesh=self.options.mesh,
            pipeline_axis=self.options.pipeline_axis,
            started=self.started,
            optimizer=optimizer,
            reduction=reduction,
            zero_stage=zero_stage,
        )
