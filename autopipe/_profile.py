"""`Plan.profile(*args)`: time every stage alone on this backend and compare with the prediction.

Each stage becomes a stand-alone jitted function of the values it holds and receives (its
parameters as placed, the boundary values from the previous stage, the batch inputs of one
microbatch) that returns what it sends on (and, for the last stage, the outputs). The boundary
values are computed once by evaluating the program on the first microbatch. Timings are medians
over several repeats, less the backend's dispatch floor; predictions are the plan's per-stage
compute times (stage time without its send).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from autopipe._calibrate import _dispatch_floor, time_call
from autopipe.cost_models.rules import transfer_time
from autopipe.passes.ir import eval_ops, read_atom


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageProfile:
    """Measured against predicted seconds per microbatch for one stage (compute only)."""

    stage: int
    operators: int
    predicted: float
    measured: float

    @property
    def relative_error(self) -> float:
        return (self.predicted - self.measured) / self.measured


def _microbatch_env(plan: Any, args: Sequence[Any]) -> dict[int, Any]:
    """Every value of the program on the first microbatch (concrete arrays)."""
    program, spec = plan.program, plan.traced.spec
    _, leaves = spec.flatten(args)
    mb = plan.traced.microbatch_size
    env = {
        v: (x[:mb] if is_batch else x)
        for v, x, is_batch in zip(program.invars, leaves, spec.batch_leaves, strict=True)
    }
    env.update(dict(program.consts))
    return eval_ops(program, range(len(program.ops)), env)


def stage_function(plan: Any, s: int) -> tuple[Callable, tuple[int, ...]]:
    """(fn, input value ids) for stage `s`: fn(*inputs) runs the stage's operators alone."""
    program, layout = plan.program, plan.layouts[s]
    batch_in = [v for v in program.invars if v in program.batch_dependent]
    consts = {v for v, _ in program.consts}  # key constants are read, not placed
    reads = {a for i in layout.ops for a in program.ops[i].invars if isinstance(a, int)} & consts
    given = [*layout.params, *layout.inputs, *layout.recv.values(), *batch_in, *sorted(reads)]
    inputs = tuple(dict.fromkeys(given))
    sends = list(layout.send.values())
    last = s == plan.num_stages - 1

    def run(*vals: Any) -> list[Any]:
        env = dict(zip(inputs, vals, strict=True))
        eval_ops(program, layout.ops, env)
        outs = [env[v] for v in sends]
        if last:
            outs += [read_atom(env, a) for a in program.outvars]
        return outs

    return run, inputs


def profile_stages(plan: Any, *args: Any, repeats: int = 7) -> tuple[StageProfile, ...]:
    """Compiles and times each stage of `plan` alone (see the module docstring)."""
    env = _microbatch_env(plan, args)
    device = jax.devices()[0]
    floor = _dispatch_floor()
    out = []
    for s, stage in enumerate(plan.stages):
        fn, inputs = stage_function(plan, s)
        vals = [jax.device_put(env[v], device) for v in inputs]
        measured = max(time_call(jax.jit(fn), *vals, repeats=repeats) - floor, 1e-8)
        predicted = stage.time - transfer_time(stage.send_bytes, plan.hardware)
        out.append(
            StageProfile(
                stage=s,
                operators=stage.operators[1] - stage.operators[0],
                predicted=predicted,
                measured=measured,
            )
        )
    return tuple(out)
