"""Pipeline × data × tensor planning, priced by autopipe's own cost model (h100 preset, bf16).

Four tables (nothing is compiled or run; every number is a prediction of the cost model):

1. *A cluster you do not have*: GPT-3 175B planned for 1024 H100s (nodes of 8) with
   ``autopipe.plan(..., mesh=1024)``: the factorization it picks, memory, predicted step time,
   throughput, and how long planning took (wall and CPU: the machine may be shared).
2. *Joint vs hand-enumerated*: the joint plan against every (pp, dp, tp) factorization with a
   uniform split (equal transformer blocks per stage, embedding with the first stage and head
   with the last), each priced at its factorization, for GPT-3 13B and 1.3B (which fit on one
   device, so the forward-only cost model, where data parallelism needs no communication,
   picks pp = 1) and 175B (whose memory forces a pipeline), all on 64 devices.
3. *Large vocabulary*: a GPT whose embedding and head are each about ten blocks: the joint plan
   against an equal-blocks and a parameter-balanced split, at the mesh the planner picks, at
   each method's own best mesh, and at the best mesh of each pipeline depth.
4. *Training a cluster you do not have*: GPT-3 175B trained (AdamW, 1F1B) on 1024 H100s and
   1024 A100s with ``autopipe.train(..., mesh=1024, compile=False)``: the layout and
   microbatch count it picks, memory, the estimate that ranked the layouts and the exact
   lock-step step time, model TFLOP/s per device (6 · parameters · tokens / step, recompute
   not counted) and planning time; the reference point is Megatron-LM's measured 175B run
   (Narayanan et al. 2021, arXiv 2104.04473, Table 1: 1024 A100, tp 8 × pp 16, batch 1536,
   153 TFLOP/s per GPU).

Pricing: `autopipe.search_factorizations` prices every factorization from ONE trace of the
whole batch (microbatch rows scaled by 1/(dp·m)); the baselines here are priced by exactly that
function (same trace, same tensor shardings, same memory limit, same microbatch rule), so
``baseline / joint`` compares stage splits and factorizations, not two cost models. The exact
re-plan of the chosen mesh (``plan.predicted.step_time``) is reported beside it.
"""

from __future__ import annotations

import dataclasses
import math
import time

from _planning import (
    _block_units,
    _min_max_partition,
    _units_to_bounds,
    at_block_boundaries,
    gpt,
)

GiB = 2**30


# --- pricing a given split at a given factorization ------------------------------------------


@dataclasses.dataclass
class _Pricer:
    """One trace of the whole batch and what pricing a split at any factorization needs."""

    front: object  # an autopipe.Lowered traced at one microbatch, pp = 1
    units: list[int]  # per pipeline operator: 0 = embedding, 1 + b = block b, last = head
    unit_params: list[float]  # parameter bytes per unit
    cache: object  # a ShardingCache shared by every pricing (solved sharding segments)

    @property
    def num_blocks(self) -> int:
        return len(self.unit_params) - 2

    def step(self, f, bounds: tuple[int, ...]) -> float:
        """Predicted step time of the stages ``bounds`` (pipeline operator positions) at the
        factorization ``f`` (an `autopipe.Factorization`); inf if a stage does not fit."""
        import autopipe
        from autopipe.passes.partition import solve_stages

        base = self.front
        axes = (("pp", f.pp), ("dp", f.dp), ("tp", f.tp))
        shard = base.shardings(bounds, mesh_axes=axes, tensor_axis="tp", cache=self.cache)
        problem = base.stage_problem(
            layers=bounds,
            shardings=shard,
            rows_scale=1.0 / (f.dp * f.num_microbatches),
            num_stages=f.pp,
            num_microbatches=f.num_microbatches,
        )  # one layer per stage: the "search" has one candidate, the split itself
        try:
            return solve_stages(problem).step_time
        except autopipe.PlanInfeasible:  # a stage does not fit in the device's memory
            return math.inf

    def equal_blocks(self, pp: int) -> tuple[int, ...] | None:
        """Megatron/DeepSpeed "uniform": blocks b·pp // blocks per stage, embedding with the
        first stage, head with the last (None when there are fewer blocks than stages)."""
        n = self.num_blocks
        if pp > n:
            return None
        stage_of_unit = [0] + [b * pp // n for b in range(n)] + [pp - 1]
        return self._at_block_boundaries(_units_to_bounds(self.units, stage_of_unit))

    def param_balanced(self, pp: int) -> tuple[int, ...] | None:
        """DeepSpeed "parameters": contiguous units minimising the largest parameter bytes."""
        if pp > len(self.unit_params):
            return None
        split = _units_to_bounds(self.units, _min_max_partition(self.unit_params, pp))
        return self._at_block_boundaries(split)

    def _at_block_boundaries(self, bounds: tuple[int, ...]) -> tuple[int, ...]:
        return at_block_boundaries(self.front, bounds)


def _pricer(model, variables, tokens) -> _Pricer:
    import autopipe
    from autopipe.passes.tensor_parallel import ShardingCache

    front = autopipe.trace(model.apply, variables, tokens).lower(
        {"pp": 1}, num_microbatches=1, hardware="h100"
    )
    units = _block_units(front)
    unit_params = [0.0] * (max(units) + 1)
    seen: set[int] = set()
    for reads, u in zip(front.costs.reads, units, strict=True):
        unit_params[u] += sum(front.program.nbytes(v) for v in reads - seen)
        seen |= reads
    return _Pricer(front=front, units=units, unit_params=unit_params, cache=ShardingCache())


def _best(pricer: _Pricer, factorizations, split) -> tuple[float, object]:
    """(step time, factorization) of the best factorization for the split rule ``split``."""
    best = (math.inf, None)
    for f in factorizations:
        bounds = split(f.pp)
        if bounds is not None:
            best = min(best, (pricer.step(f, bounds), f), key=lambda x: x[0])
    return best


def _mesh(f) -> str:
    return "-" if f is None else f"{f.pp}×{f.dp}×{f.tp}"


def _gpt(*, layers: int, d_model: int, heads: int, vocab: int, batch: int, seq: int = 2048):
    """(model, abstract variables, abstract tokens, parameters) of a bf16 GPT of any shape."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from autopipe import models

    cfg = models.GPTConfig(
        vocab=vocab, seq=seq, d_model=d_model, heads=heads, layers=layers, dtype=jnp.bfloat16
    )
    model = models.LinenGPT(cfg)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    variables = models.abstract_linen(model, tokens)
    return model, variables, tokens, int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables)))


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


@dataclasses.dataclass(frozen=True)
class _Planned:
    """A GPT-3 shape, its joint plan for ``devices`` devices, and the planning wall/CPU time."""

    size: str
    batch: int
    devices: int
    model: object
    variables: object
    tokens: object
    params: int
    plan: object  # autopipe.Plan
    wall_s: float
    cpu_s: float


def _planned(size: str, batch: int, devices: int, plans: dict) -> _Planned:
    """``plans`` memoises per (size, batch, devices): two tables may share one (slow) plan."""
    import autopipe

    key = (size, batch, devices)
    if key not in plans:
        model, variables, tokens, n = gpt(size, batch)
        wall, cpu = time.perf_counter(), time.process_time()
        plan = autopipe.plan(
            model.apply, variables, tokens, mesh=devices, hardware="h100", compile=False
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        plans[key] = _Planned(
            size=size,
            batch=batch,
            devices=devices,
            model=model,
            variables=variables,
            tokens=tokens,
            params=n,
            plan=plan,
            wall_s=wall,
            cpu_s=cpu,
        )
    return plans[key]


# --- 1. a cluster you do not have ------------------------------------------------------------

CLUSTER = ("175b", 1536, 1024)
CLUSTER_QUICK = ("175b", 256, 64)


def cluster_plan(args, plans: dict | None = None) -> list[dict]:
    """GPT-3 175B planned for 1024 H100s (64 and a smaller batch in --quick), nodes of 8:
    the factorization picked, per-device memory, step time, throughput and planning time.
    Model FLOPs are the forward pass's 2 · parameters · tokens (the plan is forward-only)."""
    p = _planned(*(CLUSTER_QUICK if args.quick else CLUSTER), {} if plans is None else plans)
    plan, hw = p.plan, p.plan.hardware
    axes = dict(plan.mesh_axes)
    step = plan.predicted.step_time
    tokens_per_s = p.batch * p.tokens.shape[1] / step
    flops = 2 * p.params * tokens_per_s / p.devices
    return [
        {
            "model": f"gpt3-{p.size} bf16, batch {p.batch}×{p.tokens.shape[1]}",
            "devices": p.devices,
            "pp×dp×tp": f"{axes['pp']}×{axes['dp']}×{axes['tp']}",
            "factorizations": len(plan.factorizations),
            "stages": plan.num_stages,
            "microbatches": plan.num_microbatches,
            "mem_GiB_max": round(max(plan.predicted.memory_per_device) / GiB, 1),
            "mem_limit_GiB": round(hw.memory_bytes / GiB, 1),
            "step_s": _sig(step, 4),
            "bubble": round(plan.predicted.bubble_fraction, 3),
            "tokens_per_s": round(tokens_per_s),
            "fwd_TFLOPs_per_dev (2·N·tokens)": round(flops / 1e12, 1),
            "fwd_MFU": round(flops / hw.peak_flops, 3),
            "planning_s": round(p.wall_s, 1),
            "planning_cpu_s": round(p.cpu_s, 1),
            "target": "planning ≤ 10 s",
        }
    ]


# --- 2. joint vs hand-enumerated -------------------------------------------------------------


def joint_vs_hand(args, plans: dict | None = None) -> list[dict]:
    """The joint plan vs every (pp, dp, tp) with a uniform split (equal blocks per stage,
    embedding first, head last), each priced at its factorization. ``best_hand/joint`` must be
    ≥ 1; ``worst_mesh_uniform/dp`` compares the two splits at every factorization on its own
    (the planner's stage DP is exact over its clustered layers, not over every operator)."""
    plans = {} if plans is None else plans
    cases = [CLUSTER_QUICK] if args.quick else [("13b", 256, 64), ("1.3b", 256, 64), CLUSTER_QUICK]
    rows = []
    for case in cases:
        p = _planned(*case, plans)
        pricer = _pricer(p.model, p.variables, p.tokens)
        found = p.plan.factorizations
        joint = found[0]
        uniform = {
            f: pricer.step(f, pricer.equal_blocks(f.pp))
            for f in found
            if pricer.equal_blocks(f.pp) is not None
        }
        hand_f = min(uniform, key=uniform.get)
        per_mesh = {f: u / f.step_time for f, u in uniform.items() if math.isfinite(f.step_time)}
        worst = min(per_mesh, key=per_mesh.get)
        rows.append(
            {
                "model": f"gpt3-{p.size} bf16, batch {p.batch}",
                "devices": p.devices,
                "joint pp×dp×tp": _mesh(joint),
                "joint_s": _sig(joint.step_time),
                "joint_exact_s": _sig(p.plan.predicted.step_time),
                "uniform_at_joint_s": _sig(uniform.get(joint, math.inf)),
                "hand_meshes": len(uniform),
                "best_hand pp×dp×tp": _mesh(hand_f),
                "best_hand_s": _sig(uniform[hand_f]),
                "best_hand/joint": round(uniform[hand_f] / joint.step_time, 6),
                "worst_mesh": _mesh(worst),
                "worst_mesh_uniform/dp": round(per_mesh[worst], 6),
                "target": "≥ 1 (both ratios)",
            }
        )
    return rows


# --- 3. large vocabulary ---------------------------------------------------------------------


def _vocab_row(model: str, case: str, joint, equal, params) -> dict:
    """One comparison: ``joint``, ``equal`` and ``params`` are (step time, factorization)."""
    return {
        "model": model,
        "case": case,
        "joint pp×dp×tp": _mesh(joint[1]),
        "joint_s": _sig(joint[0]),
        "equal pp×dp×tp": _mesh(equal[1]),
        "equal_blocks_s": _sig(equal[0]),
        "params pp×dp×tp": _mesh(params[1]),
        "param_balanced_s": _sig(params[0]),
        "equal/joint": round(equal[0] / joint[0], 6),
        "params/joint": round(params[0] / joint[0], 6),
        "target": "≥ 1.3 (both)",
    }


def large_vocab(args) -> list[dict]:
    """Embedding and head ≈ ten blocks each: the joint plan vs an equal-blocks and a
    parameter-balanced split, at the mesh the planner picks, at each method's best mesh, and
    at the best mesh of each pipeline depth (when a pipeline is wanted or needed)."""
    import autopipe

    if args.quick:
        shape, batch, devices = dict(layers=8, d_model=512, heads=8, vocab=64_000), 8, 8
    else:
        shape, batch, devices = dict(layers=16, d_model=2048, heads=16, vocab=256_000), 16, 16
    model, variables, tokens, n = _gpt(**shape, batch=batch)
    found = autopipe.search_factorizations(
        model.apply, variables, tokens, devices=devices, hardware="h100"
    )
    pricer = _pricer(model, variables, tokens)
    block = pricer.unit_params[1]
    name = (
        f"d{shape['d_model']}×{shape['layers']} vocab {shape['vocab'] // 1000}k "
        f"({n / 1e9:.2f}B; emb {pricer.unit_params[0] / block:.1f}, head "
        f"{pricer.unit_params[-1] / block:.1f} blocks), batch {batch}, {devices} dev"
    )

    def at(f, split) -> tuple[float, object]:
        bounds = split(f.pp)
        return (math.inf if bounds is None else pricer.step(f, bounds), f)

    chosen = found[0]
    rows = [
        _vocab_row(
            name,
            "mesh the planner picks",
            (chosen.step_time, chosen),
            at(chosen, pricer.equal_blocks),
            at(chosen, pricer.param_balanced),
        ),
        _vocab_row(
            name,
            "each method's best mesh",
            (chosen.step_time, chosen),
            _best(pricer, found, pricer.equal_blocks),
            _best(pricer, found, pricer.param_balanced),
        ),
    ]
    for pp in sorted({f.pp for f in found} - {1}):
        f = min((f for f in found if f.pp == pp), key=lambda f: f.step_time)
        rows.append(
            _vocab_row(
                name,
                f"best mesh with pp = {pp}",
                (f.step_time, f),
                at(f, pricer.equal_blocks),
                at(f, pricer.param_balanced),
            )
        )
    return rows


# --- 4. training a cluster you do not have ---------------------------------------------------


def training_cluster(args) -> list[dict]:
    """GPT-3 175B training planned for 1024 devices (64 and batch 256 in --quick), H100 and
    A100 presets: the layout picked, memory, estimated and exact step, TFLOP/s per device."""
    import jax.numpy as jnp
    import optax

    import autopipe

    size, batch, devices = CLUSTER_QUICK if args.quick else CLUSTER
    model, variables, tokens, n = gpt(size, batch)

    def loss(v, t, y):
        logits = model.apply(v, t).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    rows = []
    for hw in ("h100", "a100"):
        wall, cpu = time.perf_counter(), time.process_time()
        plan = autopipe.train(
            loss,
            optax.adamw(1e-4),
            variables,
            tokens,
            tokens,
            mesh=devices,
            hardware=hw,
            batch_argnums=(1, 2),
            compile=False,
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        axes, step = dict(plan.mesh_axes), plan.predicted.step_time
        est = next(
            f
            for f in plan.factorizations
            if (f.pp, f.dp, f.tp) == (axes["pp"], axes["dp"], axes["tp"])
        )
        flops = 6 * n * batch * tokens.shape[1] / step / devices
        rows.append(
            {
                "model": f"gpt3-{size} bf16 AdamW 1f1b, batch {batch}×{tokens.shape[1]}",
                "hardware": hw,
                "devices": devices,
                "pp×dp×tp": f"{axes['pp']}×{axes['dp']}×{axes['tp']}",
                "microbatches": plan.num_microbatches,
                "remat_stages": sum(plan.remat),
                "mem_GiB_max": round(max(plan.predicted.memory_per_device) / GiB, 1),
                "mem_limit_GiB": round(plan.hardware.memory_bytes / GiB, 1),
                "estimate_s": _sig(est.step_time, 4),
                "step_s": _sig(step, 4),
                "TFLOPs_per_dev (6·N·tokens)": round(flops / 1e12, 1),
                "MFU": round(flops / plan.hardware.peak_flops, 3),
                "planning_s": round(wall, 1),
                "planning_cpu_s": round(cpu, 1),
                "target": "planning ≤ 20 s; Megatron 175B/1024 A100: 153 TFLOP/s",
            }
        )
    return rows


def run(args) -> list[dict]:
    plans: dict = {}  # the --quick 175B plan serves tables 1 and 2
    tables = [*cluster_plan(args, plans), *joint_vs_hand(args, plans), *large_vocab(args)]
    return [*tables, *training_cluster(args)]
