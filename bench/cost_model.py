"""Cost-model fidelity on this machine: calibrate, then predicted vs measured stage times.

1. ``autopipe.calibrate()`` (timed; the issue's limit is 2 minutes).
2. Candidate stages of several kinds and sizes — MLP stacks, GPT blocks (attention + MLP),
   embedding- and head-heavy GPTs, CNNs — made by planning each model for 2 and 4 stages with
   the calibrated profile; every stage is timed alone with ``Plan.profile`` and compared with
   its predicted compute time: Spearman rank correlation and median |pred − meas| / meas.
3. FLOPs of dot_general / conv rules against XLA's ``cost_analysis()``.
4. Memory model against XLA's ``memory_analysis()`` (argument + temp) for forward-only plans of
   the test models at 1, 2 and 4 stages and 1 and 4 microbatches (needs 8 devices; skipped with
   fewer). ``program`` is the model's prediction for the emitted SPMD program
   (`memory.spmd_program_bytes`: every device pads to the largest stage); ``stage`` the largest
   single stage (`memory.forward_program_bytes`, what the stage DP prices), with and without
   the parameters copied out of the flat buffer for GEMMs/convolutions; ``planner`` what
   ``plan.predicted.memory_per_device`` says.

``run(args) -> list[dict]`` (rows); ``python bench/cost_model.py`` prints markdown tables and
writes ``bench/results/cost_model.json``; ``--memory-only`` runs part 4 alone (about a minute).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import jax

if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import autopipe  # noqa: E402
from autopipe import models  # noqa: E402
from autopipe.cost_models import memory  # noqa: E402
from autopipe.cost_models.rules import eqn_cost  # noqa: E402
from autopipe.passes.costs import working_set  # noqa: E402
from autopipe.passes.param_layout import param_layout  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _rand(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _linen(model, x):
    return model.apply, (models.init_linen(model, x), x)


def candidate_models() -> dict:
    """name → (fn, example args): MLP, GPT (attention), embedding-heavy, CNN, of several sizes."""
    gpt = {
        "gpt_d128": models.GPTConfig(vocab=256, seq=64, d_model=128, heads=4, layers=4),
        "gpt_d256": models.GPTConfig(vocab=256, seq=128, d_model=256, heads=4, layers=4),
        "gpt_d64_long": models.GPTConfig(vocab=128, seq=256, d_model=64, heads=2, layers=4),
        "gpt_vocab8k": models.GPTConfig(vocab=8192, seq=32, d_model=128, heads=4, layers=2),
    }
    batches = {"gpt_d128": 16, "gpt_d256": 8, "gpt_d64_long": 8, "gpt_vocab8k": 16}
    out = {
        "mlp_w256": _linen(models.LinenMLP(features=(256,) * 6), _rand((256, 256))),
        "mlp_w1024": _linen(models.LinenMLP(features=(1024, 1024, 1024, 64)), _rand((128, 512))),
        "mlp_w64": _linen(models.LinenMLP(features=(64,) * 8), _rand((64, 64))),
        "cnn_small": _linen(models.LinenCNN(widths=(16, 32)), _rand((32, 32, 32, 3))),
        "cnn_wide": _linen(models.LinenCNN(widths=(32, 64)), _rand((16, 16, 16, 8))),
    }
    for name, cfg in gpt.items():
        out[name] = _linen(models.LinenGPT(cfg), models.make_tokens(cfg, batches[name]))
    return out


def stage_rows(hardware, *, stages=(2, 4), repeats=7) -> list[dict]:
    rows = []
    for name, (fn, args) in candidate_models().items():
        for p in stages:
            plan = autopipe.plan(
                fn, *args, mesh={"pp": p}, num_microbatches=2, hardware=hardware, compile=False
            )
            for prof in plan.profile(*args, repeats=repeats):
                prims = plan.stages[prof.stage].primitives
                rows.append(
                    {
                        "bench": "stage_time",
                        "model": name,
                        "stages": p,
                        "stage": prof.stage,
                        "operators": prof.operators,
                        "dots": sum(q in ("dot_general", "conv_general_dilated") for q in prims),
                        "predicted_s": prof.predicted,
                        "measured_s": prof.measured,
                        "rel_error": prof.relative_error,
                    }
                )
                print(
                    f"  {name:13s} p={p} stage {prof.stage}: pred {prof.predicted * 1e6:8.1f} µs"
                    f"  meas {prof.measured * 1e6:8.1f} µs  ({prof.relative_error:+.0%})",
                    flush=True,
                )
    return rows


def flop_rows() -> list[dict]:
    """dot_general and conv FLOPs of the cost rules vs XLA cost_analysis (one op per program)."""
    cases = {
        "dot 64x128x256": (jnp.matmul, [(64, 128), (128, 256)]),
        "dot batched 4x32x64x16": (
            lambda a, b: jnp.einsum("bik,bkj->bij", a, b),
            [(4, 32, 64), (4, 64, 16)],
        ),
        "dot attention 2x4x16x8": (
            lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k),
            [(2, 4, 16, 8), (2, 4, 16, 8)],
        ),
        "conv 3x3 SAME": (
            lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME"),
            [(2, 3, 16, 16), (8, 3, 3, 3)],
        ),
        "conv 5x5 VALID s2": (
            lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "VALID"),
            [(2, 4, 17, 17), (6, 4, 5, 5)],
        ),
        "conv grouped": (
            lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=2),
            [(1, 4, 8, 8), (6, 2, 3, 3)],
        ),
    }
    rows = []
    for label, (fn, shapes) in cases.items():
        args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
        eqn = next(
            e for e in jaxpr.eqns if e.primitive.name in ("dot_general", "conv_general_dilated")
        )
        ours = eqn_cost(
            eqn.primitive.name,
            [v.aval for v in eqn.invars],
            [v.aval for v in eqn.outvars],
            eqn.params,
        ).flops
        xla = jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
        rows.append(
            {"bench": "flops", "case": label, "ours": ours, "xla": xla, "rel": ours / xla - 1}
        )
    return rows


def program_working_set(plan) -> memory.WorkingSet:
    """`memory.working_set` over the plan's pipeline operators, as the planner computes it."""
    return working_set(plan.program, plan.split)


def predicted_memory(plan) -> dict:
    """Per-stage terms, per-stage totals (`memory.forward_program_bytes`) and the SPMD program's
    bytes (`memory.spmd_program_bytes`) of a forward-only plan. Parameters as the emitted layout
    holds them (`passes.param_layout`): slots read in place, plus copies of the values packed
    into its rest buffers (XLA:CPU copies a slice a GEMM reads)."""
    program, m = plan.program, plan.num_microbatches
    layout = param_layout(program, [st.params for st in plan.layouts])
    rest = {v for lay in layout.rest for v in lay.values()}
    ws = program_working_set(plan)
    peak, _ = memory.segment_working_bytes(
        ws, program.nbytes, plan.layer_boundaries, num_microbatches=m
    )
    _, unpacked = memory.segment_working_bytes(
        ws,
        lambda v: program.nbytes(v) if v in rest else 0,
        plan.layer_boundaries,
        num_microbatches=m,
    )
    batch = m * sum(program.nbytes(v) for v in program.invars if v in program.batch_dependent)
    out = sum(program.nbytes(a) for a in program.outvars if isinstance(a, int))
    terms = []
    for s, (i, j) in enumerate(itertools.pairwise(plan.stage_boundaries)):
        lay = plan.layouts[s]
        boundary = max(
            sum(program.nbytes(v) for v in lay.recv.values()),
            sum(program.nbytes(v) for v in lay.send.values()),
        )
        terms.append(
            {
                "params": plan.stages[s].param_bytes,
                "peak": peak[i, j],
                "unpacked": unpacked[i, j],
                "boundary": boundary,
            }
        )
    common = {"batch_input_bytes": batch, "output_bytes": out, "num_microbatches": m}
    stage = [
        memory.forward_program_bytes(
            num_stages=len(terms),
            param_bytes=t["params"],
            live_peak_bytes=t["peak"],
            boundary_bytes=t["boundary"],
            unpacked_param_bytes=t["unpacked"],
            **common,
        ).total
        for t in terms
    ]
    program_bytes = memory.spmd_program_bytes(
        param_bytes=[layout.device_bytes()] * len(terms),
        boundary_bytes=[t["boundary"] for t in terms],
        working_bytes=[t["peak"] + t["unpacked"] for t in terms],
        **common,
    )
    return {"terms": terms, "stage": stage, "program": program_bytes}


def memory_rows(models_=None, stages=(1, 2, 4), microbatches=(1, 4)) -> list[dict]:
    if len(jax.devices()) < max(stages):
        return []
    sys.path.insert(0, os.path.join(os.path.dirname(RESULTS), "..", "tests"))
    import conftest  # the test models, with fixed values

    rows = []
    for name, (fn, args) in conftest._cases().items():
        if models_ is not None and name not in models_:
            continue
        for m, pp in itertools.product(microbatches, stages):
            plan = autopipe.plan(fn, *args, mesh=conftest.mesh(pp), num_microbatches=m)
            ma = plan.compiled.memory_analysis()
            meas = ma.argument_size_in_bytes + ma.temp_size_in_bytes
            pred = predicted_memory(plan)
            stage = max(pred["stage"])
            copies = [t["unpacked"] for t in pred["terms"]]
            no_copies = max(s - c for s, c in zip(pred["stage"], copies, strict=True))
            planner = max(plan.predicted.memory_per_device)
            rows.append(
                {
                    "bench": "memory",
                    "model": name,
                    "stages": pp,
                    "m": m,
                    "argument": ma.argument_size_in_bytes,
                    "temp": ma.temp_size_in_bytes,
                    "measured": meas,
                    "program": pred["program"],
                    "rel": pred["program"] / meas - 1,
                    "stage": stage,
                    "rel_stage": stage / meas - 1,
                    "rel_stage_no_copies": no_copies / meas - 1,
                    "planner": planner,
                    "rel_planner": planner / meas - 1,
                }
            )
    return rows


def run(args=None) -> list[dict]:
    started = time.perf_counter()
    cal = autopipe.calibrate()
    rows: list[dict] = [{"bench": "calibrate", "seconds": cal.seconds, **cal.hardware.to_dict()}]
    stage = stage_rows(cal.hardware)
    rows += stage
    pred = [r["predicted_s"] for r in stage]
    meas = [r["measured_s"] for r in stage]
    errs = [abs(r["rel_error"]) for r in stage]
    rows.append(
        {
            "bench": "stage_time_summary",
            "candidates": len(stage),
            "spearman": _spearman(pred, meas),
            "median_abs_rel_error": float(np.median(errs)),
            "p90_abs_rel_error": float(np.percentile(errs, 90)),
        }
    )
    rows += flop_rows()
    rows += memory_rows()
    rows.append({"bench": "total", "seconds": time.perf_counter() - started})
    return rows


def _memory_markdown(mem: list[dict]) -> str:
    lines = [
        "| memory: model | stages | m | argument + temp B | program B | rel | largest stage "
        "| w/o copies | planner |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['stages']} | {r['m']} | {r['argument']} + {r['temp']} "
        f"| {r['program']:.0f} | {r['rel']:+.1%} | {r['rel_stage']:+.1%} "
        f"| {r['rel_stage_no_copies']:+.1%} | {r['rel_planner']:+.1%} |"
        for r in mem
    ]
    worst = max(mem, key=lambda r: abs(r["rel"]))
    lines += [
        "",
        f"worst program error: {worst['rel']:+.1%} ({worst['model']}, "
        f"{worst['stages']} stages, m = {worst['m']})",
    ]
    return "\n".join(lines)


def _markdown(rows: list[dict]) -> str:
    lines = []
    cal = next(r for r in rows if r["bench"] == "calibrate")
    summ = next(r for r in rows if r["bench"] == "stage_time_summary")
    lines += [
        f"calibration: {cal['seconds']:.1f} s",
        "",
        "| candidates | Spearman | median abs rel error | p90 abs rel error |",
        "|---|---|---|---|",
        f"| {summ['candidates']} | {summ['spearman']:.3f} | {summ['median_abs_rel_error']:.1%} "
        f"| {summ['p90_abs_rel_error']:.1%} |",
        "",
        "| FLOPs case | ours | XLA | rel |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['ours']:.0f} | {r['xla']:.0f} | {r['rel']:+.2%} |"
        for r in rows
        if r["bench"] == "flops"
    ]
    mem = [r for r in rows if r["bench"] == "memory"]
    if mem:
        lines += ["", _memory_markdown(mem)]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--memory-only", action="store_true", help="only the memory model against XLA (part 4)"
    )
    if parser.parse_args().memory_only:
        print(_memory_markdown(memory_rows()))
        sys.exit(0)
    result = run()
    print(_markdown(result))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cost_model.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
