"""Cost-model fidelity on this machine: calibrate, then predicted vs measured stage times.

1. ``autopipe.calibrate()`` (timed; the issue's limit is 2 minutes).
2. Candidate stages of several kinds and sizes — MLP stacks, GPT blocks (attention + MLP),
   embedding- and head-heavy GPTs, CNNs — made by planning each model for 2 and 4 stages with
   the calibrated profile; every stage is timed alone with ``Plan.profile`` and compared with
   its predicted compute time: Spearman rank correlation and median |pred − meas| / meas.
3. FLOPs of dot_general / conv rules against XLA's ``cost_analysis()``.
4. Memory model against XLA's ``memory_analysis()`` (argument + temp) for forward-only plans of
   the test models (needs 8 devices; skipped with fewer).

``run(args) -> list[dict]`` (rows); ``python bench/cost_model.py`` prints markdown tables and
writes ``bench/results/cost_model.json``.
"""

from __future__ import annotations

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
from autopipe.cost_models.rules import eqn_cost  # noqa: E402

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


def memory_rows() -> list[dict]:
    if len(jax.devices()) < 4:
        return []
    sys.path.insert(0, os.path.join(os.path.dirname(RESULTS), "..", "tests"))
    import conftest  # the test models, with fixed values

    rows = []
    for name, (fn, args) in conftest._cases().items():
        for pp in (1, 2, 4):
            plan = autopipe.plan(fn, *args, mesh=conftest.mesh(pp), num_microbatches=4)
            ma = plan.compiled.memory_analysis()
            meas = ma.argument_size_in_bytes + ma.temp_size_in_bytes
            planner = max(plan.predicted.memory_per_device)
            # + the unpacked-parameter copy XLA makes today (memory.forward_program_bytes)
            pred = max(s.memory + s.param_bytes for s in plan.stages)
            rows.append(
                {
                    "bench": "memory",
                    "model": name,
                    "stages": pp,
                    "m": 4,
                    "predicted": pred,
                    "planner": planner,
                    "measured": meas,
                    "rel": pred / meas - 1,
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
        lines += [
            "",
            "| memory: model | stages | predicted B | measured B | rel |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['stages']} | {r['predicted']:.0f} | {r['measured']} "
            f"| {r['rel']:+.1%} |"
            for r in mem
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    result = run()
    print(_markdown(result))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cost_model.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
