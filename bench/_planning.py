"""Planner benchmarks (no execution): planning time, DP optimality, plan quality, schedules.

Each function takes the runner's argparse namespace and returns rows (dicts) for one table.
They use the staged API (`autopipe.trace(...).lower(...)`: its costs and stage problem) on
purpose: the baselines are priced by exactly the cost model the planner optimises.
"""

from __future__ import annotations

import itertools
import math
import re
import time

GPT3 = {  # (layers, d_model, heads) -- GPT-3 paper shapes, heads adjusted to divide d_model
    "125m": (12, 768, 12),
    "1.3b": (24, 2048, 16),
    "13b": (40, 5120, 40),
    "175b": (96, 12288, 96),
}


def gpt(size: str, batch: int):
    """(model, abstract variables, abstract tokens, number of parameters) of a bf16 GPT-3."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from autopipe import models

    layers, d, heads = GPT3[size]
    cfg = models.GPTConfig(
        vocab=50257, seq=2048, d_model=d, heads=heads, layers=layers, dtype=jnp.bfloat16
    )
    model = models.LinenGPT(cfg)
    tokens = jax.ShapeDtypeStruct((batch, cfg.seq), jnp.int32)
    variables = models.abstract_linen(model, tokens)
    n = int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables)))
    return model, variables, tokens, n


# --- planning time --------------------------------------------------------------------------


def planning_time(args) -> list[dict]:
    """Planning time (trace + graph + cluster + DP, nothing compiled) vs model size and devices.

    Stages = min(devices, transformer blocks): one block per stage is the finest useful split;
    the remaining devices would be data-parallel replicas. A last row plans 175B as a
    1024-stage pipeline, as a stress test of the DP.
    """
    import autopipe

    sizes = ("125m", "175b") if args.quick else tuple(GPT3)
    devices = (8, 64) if args.quick else (8, 64, 1024)
    cases = [(s, d, min(d, GPT3[s][0])) for s in sizes for d in devices]
    if not args.quick:
        cases.append(("175b", 1024, 1024))
    rows = []
    for size, n_dev, pp in cases:
        model, variables, tokens, n = gpt(size, 8)
        started = time.perf_counter()
        try:
            plan = autopipe.plan(
                model.apply, variables, tokens, mesh={"pp": pp}, num_microbatches=8,
                hardware="h100",
            )  # fmt: skip
        except autopipe.PlanInfeasible as e:  # does not fit: still a planning time
            rows.append(
                {
                    "model": f"gpt3-{size} bf16",
                    "devices": n_dev,
                    "stages": pp,
                    "planning_s": round(time.perf_counter() - started, 2),
                    "error": str(e)[:80],
                }
            )
            continue
        rows.append(
            {
                "model": f"gpt3-{size} bf16",
                "params_B": round(n / 1e9, 2),
                "devices": n_dev,
                "stages": pp,
                "operators": len(plan.split.pipeline),
                "layers": plan.num_layers,
                "planning_s": round(time.perf_counter() - started, 2),
                "predicted_step_s": round(plan.predicted.step_time, 3),
                "peak_mem_GiB": round(max(plan.predicted.memory_per_device) / 2**30, 1),
                "target": "< 60 s on a laptop",
            }
        )
    return rows


# --- DP optimality --------------------------------------------------------------------------


def _brute_force(problem) -> tuple[float, tuple[int, ...]]:
    from autopipe.passes.partition import step_time

    n, p = len(problem.layer_time), problem.num_stages
    mem = problem.segment_memory
    best = (math.inf, ())
    prefix = [0.0, *itertools.accumulate(problem.layer_time)]
    for inner in itertools.combinations(range(1, n), p - 1):
        b = (0, *inner, n)
        pairs = list(itertools.pairwise(b))
        if any(mem[i][j] > problem.memory_limit for i, j in pairs):
            continue
        times = [
            prefix[j] - prefix[i] + (problem.cut_time[j - 1] if j < n else 0.0) for i, j in pairs
        ]
        best = min(best, (step_time(times, problem.num_microbatches), b))
    return best


def _random_problem(rng):
    import numpy as np

    from autopipe.passes.partition import StageProblem, additive_segment_memory

    n = int(rng.integers(2, 13))
    p = int(rng.integers(1, min(n, 5) + 1))
    layer_bytes = rng.random(n) * 10
    limit = math.inf if rng.random() < 0.3 else float(rng.uniform(0.3, 1.0) * layer_bytes.sum())
    return StageProblem(
        layer_time=tuple(float(x) for x in rng.random(n)),
        cut_time=tuple(float(x) for x in rng.random(n - 1) * rng.choice([0.0, 0.1, 1.0])),
        segment_memory=additive_segment_memory(layer_bytes, stage_overhead=1.0),
        memory_limit=max(limit, float(np.max(layer_bytes)) + 1.0),
        num_stages=p,
        num_microbatches=int(rng.integers(1, 17)),
    )


def _model_problem(size: str, pp: int, m: int):
    """The planner's own stage problem for a GPT-3 shape (its layers, costs, memory table)."""
    import autopipe

    model, variables, tokens, _ = gpt(size, m)
    lowered = autopipe.trace(model.apply, variables, tokens).lower(
        {"pp": pp}, num_microbatches=m, hardware="h100"
    )
    layers = lowered.layers
    return lowered, layers, lowered.stage_problem(layers=layers)


def dp_optimality(args) -> list[dict]:
    """The stage DP against brute force over every partition: random tables and real models."""
    import numpy as np

    import autopipe
    from autopipe.passes.partition import solve_stages

    rng = np.random.default_rng(0)
    cases = [("random tables", _random_problem(rng)) for _ in range(60 if args.quick else 300)]
    real = [("125m", 3, 8)] if args.quick else [("125m", 3, 8), ("1.3b", 4, 8), ("175b", 3, 8)]
    for size, pp, m in real:
        cases.append((f"gpt3-{size} pp={pp} (planner's layers)", _model_problem(size, pp, m)[2]))
    rows: dict[str, dict] = {}
    for name, problem in cases:
        t0 = time.perf_counter()
        try:
            dp = solve_stages(problem).step_time
        except autopipe.PlanInfeasible:
            dp = math.inf
        t1 = time.perf_counter()
        best, _ = _brute_force(problem)
        t2 = time.perf_counter()
        gap = 0.0 if dp == best else abs(dp - best) / max(best, 1e-30)
        row = rows.setdefault(
            name,
            {
                "case": name,
                "problems": 0,
                "layers": 0,
                "stages": 0,
                "max_rel_gap": 0.0,
                "dp_ms": 0.0,
                "brute_force_ms": 0.0,
            },
        )
        row["problems"] += 1
        row["layers"] = max(row["layers"], len(problem.layer_time))
        row["stages"] = max(row["stages"], problem.num_stages)
        row["max_rel_gap"] = max(row["max_rel_gap"], gap)
        row["dp_ms"] += (t1 - t0) * 1e3
        row["brute_force_ms"] += (t2 - t1) * 1e3
    for row in rows.values():
        row["dp_ms"] = round(row["dp_ms"], 1)
        row["brute_force_ms"] = round(row["brute_force_ms"], 1)
        row["max_rel_gap"] = float(f"{row['max_rel_gap']:.2g}")
        row["target"] = "gap 0 (exact)"
    return list(rows.values())


# --- plan quality ---------------------------------------------------------------------------


def _block_units(front) -> list[int]:
    """Per pipeline operator: 0 = embedding, 1 + b = transformer block b, last = head.

    An operator belongs to the unit whose parameters it reads (traced back through hoisted
    parameter ops); one that reads none belongs to the unit of the operator before it.
    """
    prog, spec = front.program, front.traced.spec
    path = dict(zip(prog.invars, spec.in_paths, strict=True))
    producer = prog.producers()
    n_blocks = sum(1 for p in spec.in_paths if p.endswith("['ln1']['scale']"))

    def unit_of(v: int) -> int | None:
        while v not in path:
            i = producer.get(v)
            ints = [a for a in prog.ops[i].invars if isinstance(a, int)] if i is not None else []
            if not ints:
                return None
            v = ints[0]
        match = re.search(r"\['block_(\d+)'\]", path[v])
        if match:
            return 1 + int(match.group(1))
        return 0 if re.search(r"\['(wte|wpe)'\]", path[v]) else n_blocks + 1

    units, current = [], 0
    for reads in front.costs.reads:
        found = [u for u in (unit_of(v) for v in reads) if u is not None]
        current = max(found) if found else current
        units.append(current)
    return units


def _units_to_bounds(units: list[int], stage_of_unit: list[int]) -> tuple[int, ...]:
    stages = [stage_of_unit[u] for u in units]
    p = max(stage_of_unit) + 1
    return (0, *[stages.index(s) for s in range(1, p)], len(units))


def at_block_boundaries(front, bounds: tuple[int, ...]) -> tuple[int, ...]:
    """Each cut moved back to the residual stream before it: a block's layer-norm statistics
    read no parameters, so `_block_units` counts them to the previous block."""
    narrow = front.costs.narrow_cuts
    inner = [max((k for k in narrow if k <= b), default=b) for b in bounds[1:-1]]
    return (bounds[0], *inner, bounds[-1])


def _min_max_partition(weights: list[float], p: int) -> list[int]:
    """Contiguous split of units into p parts minimising the largest sum (stage of each unit)."""
    n = len(weights)
    prefix = [0.0, *itertools.accumulate(weights)]
    # f[k][i] = best largest part splitting units [0, i) into k parts
    f = [[math.inf] * (n + 1) for _ in range(p + 1)]
    arg = [[0] * (n + 1) for _ in range(p + 1)]
    f[0][0] = 0.0
    for k in range(1, p + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(f[k - 1][j], prefix[i] - prefix[j])
                if v < f[k][i]:
                    f[k][i], arg[k][i] = v, j
    cuts, i = [], n
    for k in range(p, 0, -1):
        cuts.append(arg[k][i])
        i = arg[k][i]
    cuts = sorted(cuts)[1:] + [n]
    out, s = [], 0
    for u in range(n):
        while u >= cuts[s]:
            s += 1
        out.append(s)
    return out


def _op_step(front, bounds: tuple[int, ...], m: int) -> float:
    from autopipe.cost_models.rules import transfer_time
    from autopipe.passes.partition import step_time

    c, n = front.costs, len(front.costs.op_times)
    times = [
        sum(c.op_times[a:b]) + (transfer_time(c.cut_bytes[b], front.hardware) if b < n else 0.0)
        for a, b in itertools.pairwise(bounds)
    ]
    return step_time(times, m)


def plan_quality(args) -> list[dict]:
    """Predicted step time of the DP plan vs an equal-blocks split (embedding with the first
    stage, head with the last; Megatron/DeepSpeed "uniform") and a parameter-balanced split
    (DeepSpeed "parameters"), all priced by the same cost model; lower is better."""
    import numpy as np

    from autopipe.passes.partition import solve_stages

    cases = [("1.3b", 4, 16)] if args.quick else [
        ("1.3b", 4, 16),
        ("1.3b", 8, 16),
        ("13b", 8, 16),
        ("175b", 8, 16),
        ("175b", 32, 64),
    ]  # fmt: skip
    rows = []
    for size, pp, m in cases:
        front, layers, problem = _model_problem(size, pp, m)
        dp = solve_stages(problem)
        units = _block_units(front)
        n_blocks = max(units) - 1
        uniform = [0] + [b * pp // n_blocks for b in range(n_blocks)] + [pp - 1]
        unit_params = np.zeros(n_blocks + 2)
        prog = front.program
        seen: set[int] = set()
        for reads, u in zip(front.costs.reads, units, strict=True):
            unit_params[u] += sum(prog.nbytes(v) for v in reads - seen)
            seen |= reads
        by_params = _min_max_partition(list(unit_params), pp)
        equal = _op_step(front, at_block_boundaries(front, _units_to_bounds(units, uniform)), m)
        balanced = _op_step(
            front, at_block_boundaries(front, _units_to_bounds(units, by_params)), m
        )
        rows.append(
            {
                "model": f"gpt3-{size}",
                "stages": pp,
                "microbatches": m,
                "dp_step_s": round(dp.step_time, 4),
                "equal_blocks_s": round(equal, 4),
                "param_balanced_s": round(balanced, 4),
                "equal/dp": round(equal / dp.step_time, 3),
                "params/dp": round(balanced / dp.step_time, 3),
                "target": "dp <= both (ratios >= 1)",
            }
        )
    return rows


# --- schedules ------------------------------------------------------------------------------


def _formula_bubble(kind: str, p: int, m: int, v: int) -> str:
    if kind in ("inference", "gpipe", "1f1b", "1f1b_paired"):
        return f"{(p - 1) / (m + p - 1):.3f}"
    if kind == "interleaved_1f1b":
        return f"{(p - 1) / (v * m + p - 1):.3f}"
    return "< 1f1b"


def _formula_in_flight(kind: str, p: int, m: int, v: int) -> str:
    return {
        "inference": "1",
        "gpipe": str(m),
        "1f1b": str(min(p, m)),
        "interleaved_1f1b": f"{p + (p - 1) / v:.2f}",
        "zb_h1": str(min(p, m)),
        "1f1b_paired": str(min(m, 2 * p - 1)),
        "zb_paired": str(min(m, 2 * p - 1)),
    }[kind]


def _idle_share(sched, times, makespan: float) -> float:
    """Idle share of the ``devices × makespan`` device-seconds of a timeline."""
    busy = sum(end - start for start, end in times.values())
    return 1.0 - busy / (sched.num_devices * makespan) if makespan > 0 else 0.0


def schedules(args) -> list[dict]:
    """Bubble (event-driven, F = 1, B = 2, ZB: B = W = 1, interleaved stages 1/v as long) and
    peak activations in flight on device 0, in units of one stage's activations A, vs the
    literature's formulas (DESIGN.md)."""
    import autopipe
    from autopipe.passes import schedule as S

    rows = []
    for p, m in ((4, 8), (4, 32)) if not args.quick else ((4, 8),):
        for kind in S.SCHEDULES:
            v = 2 if kind == "interleaved_1f1b" else 1
            sched = S.make(kind, p, m, v)
            split = sched.split_backward

            def cost(a, v=v, split=split):
                return {"F": 1.0, "B": 1.0 if split else 2.0, "W": 1.0}[a.kind] / v

            times, makespan = autopipe.timeline(sched, cost)
            lock_times, lock = autopipe.timeline(sched, cost, timing="lockstep")
            rows.append(
                {
                    "schedule": kind,
                    "p": p,
                    "m": m,
                    "v": v,
                    "ticks": sched.num_ticks,
                    "bubble": round(_idle_share(sched, times, makespan), 3),
                    "bubble_formula": _formula_bubble(kind, p, m, v),
                    "lockstep_bubble": round(_idle_share(sched, lock_times, lock), 3),
                    # forward-only frees each activation after its tick: one in flight
                    "in_flight_dev0_A": round(sched.in_flight()[0] / v, 2) if sched.training else 1,
                    "in_flight_formula": _formula_in_flight(kind, p, m, v),
                }
            )
    return rows


# --- pictures -------------------------------------------------------------------------------


def pictures(args) -> list[dict]:
    """The README's pictures: GPT-3 175B on 8 H100 stages (stages, schedule) and the training
    schedules compared on unit times (F = 1, B = 2; ZB: B = W = 1; interleaved 1/v)."""
    import autopipe
    from autopipe.passes import schedule as S

    model, variables, tokens, _ = gpt("175b", 16)
    plan = autopipe.plan(
        model.apply, variables, tokens, mesh={"pp": 8}, num_microbatches=16, hardware="h100"
    )
    written = []
    for name, draw in (
        ("gpt3_175b_stages.png", plan.plot_stages),
        ("gpt3_175b_schedule.png", plan.plot_schedule),
    ):
        draw(args.out / name)
        written.append(name)
    kinds = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")
    tables = [S.make(k, 4, 8, 2 if k == "interleaved_1f1b" else 1) for k in kinds]

    def unit(t):
        return lambda a: (
            {"F": 1.0, "B": 1.0 if t.split_backward else 2.0, "W": 1.0}[a.kind] / (t.virtual_stages)
        )

    autopipe.compare_schedules(tables, [unit(t) for t in tables], args.out / "schedules.png")
    written.append("schedules.png")
    return [{"file": f"bench/results/{name}"} for name in written]
