"""autopipe benchmarks: ``python bench/run.py [name ...]``.

Each benchmark returns rows (dicts); the runner prints a markdown table per benchmark, each
metric beside its target or ideal, and writes ``bench/results/<name>.json``. Timing ratios are
measured within one run, interleaving the things compared, because this machine is noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

RESULTS = pathlib.Path(__file__).parent / "results"
BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {}


def benchmark(fn: Callable[[argparse.Namespace], list[dict]]):
    BENCHMARKS[fn.__name__] = fn
    return fn


def _gpt175b(dtype):
    import jax
    import jax.numpy as jnp

    from autopipe import models

    cfg = dataclasses.replace(models.gpt3_175b(), dtype=dtype or jnp.bfloat16)
    model = models.LinenGPT(cfg)
    tokens = jax.ShapeDtypeStruct((8, cfg.seq), jnp.int32)
    return model, models.abstract_linen(model, tokens), tokens


@benchmark
def planning_time(args) -> list[dict]:
    """Planning time (trace + graph + cluster + DP, no compile) for GPT-3 175B shapes."""
    import autopipe

    model, variables, tokens = _gpt175b(None)
    rows = []
    for pp in (8, 64):
        started = time.perf_counter()
        plan = autopipe.plan(
            model.apply, variables, tokens, mesh={"pp": pp}, num_microbatches=8, hardware="h100"
        )
        rows.append(
            {
                "model": "gpt3-175b bf16",
                "stages": pp,
                "layers": plan.num_layers,
                "planning_s": round(time.perf_counter() - started, 2),
                "predicted_step_s": round(plan.predicted.step_time, 3),
                "peak_mem_GiB": round(max(plan.predicted.memory_per_device) / 2**30, 1),
                "target": "seconds, on a laptop",
            }
        )
    return rows


@benchmark
def param_bytes(args) -> list[dict]:
    """Per-device parameter bytes (XLA memory_analysis) vs the largest stage's own bytes."""
    import jax

    import autopipe
    from autopipe import models

    cfg = models.GPTConfig(vocab=512, seq=32, d_model=128, heads=4, layers=8)
    model = models.LinenGPT(cfg)
    tokens = models.make_tokens(cfg, 8)
    variables = models.init_linen(model, tokens)
    rows = []
    for pp in (4, 8):
        mesh = jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp])
        plan = autopipe.plan(model.apply, variables, tokens, mesh=mesh, num_microbatches=4)
        per_device = plan.compiled.memory_analysis().argument_size_in_bytes
        largest = max(s.param_bytes for s in plan.stages)
        rows.append(
            {
                "model": "gpt 8x128",
                "pp": pp,
                "per_device_arg_bytes": per_device,
                "largest_stage_param_bytes": largest,
                "ratio": round(per_device / largest, 4),
                "target": "<= 1.10",
            }
        )
    return rows


def _interleaved_median(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    import jax

    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm up
        jax.block_until_ready(f())
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


@benchmark
def runtime_overhead(args) -> list[dict]:
    """A pp = 1 plan vs jax.jit(fn) on the same inputs (ratio of medians, one run)."""
    import jax

    import autopipe
    from autopipe import models

    cfg = models.GPTConfig(vocab=1024, seq=128, d_model=256, heads=4, layers=4)
    model = models.LinenGPT(cfg)
    tokens = models.make_tokens(cfg, 16)
    variables = models.init_linen(model, tokens)
    mesh = jax.make_mesh((1,), ("pp",), devices=jax.devices()[:1])
    plain = jax.jit(model.apply)
    rows = []
    for m in (1, 2):
        plan = autopipe.plan(model.apply, variables, tokens, mesh=mesh, num_microbatches=m)
        med = _interleaved_median(
            {
                "jit": lambda: plain(variables, tokens),
                "plan": lambda plan=plan: plan(variables, tokens),
            },
            reps=args.reps,
        )
        rows.append(
            {
                "model": "gpt 4x256, batch 16",
                "microbatches": m,
                "jit_ms": round(med["jit"] * 1e3, 3),
                "plan_ms": round(med["plan"] * 1e3, 3),
                "ratio": round(med["plan"] / med["jit"], 3),
                "target": "<= 1.05 (m = 1)",
            }
        )
    return rows


def _markdown(name: str, rows: list[dict]) -> str:
    if not rows:
        return f"### {name}\n\n(no rows)\n"
    cols = list(rows[0])
    lines = [f"### {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default all: {list(BENCHMARKS)})"
    )
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per measurement")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tables = []
    for name in args.names or list(BENCHMARKS):
        rows = BENCHMARKS[name](args)
        meta = {"jax": jax.__version__, "machine": platform.machine(), "date": time.strftime("%F")}
        (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        tables.append(_markdown(name, rows))
        print(tables[-1], flush=True)
    (RESULTS / "summary.md").write_text("\n".join(tables))


if __name__ == "__main__":
    main()
