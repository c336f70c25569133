"""Pipeline concurrency across processes, and plan + compile time per process.

    python bench/multihost.py [--reps 20] [--out bench/results/multihost.json]

1. The 8-block MLP (d = 512, batch 256, float32): 2 stages in 2 processes (one CPU device
   each, process i pinned to core i, as ``taskset -c i`` would) for m = 8 and 32, against one
   process pinned to core 0 running the whole model (``jax.jit`` on the whole batch, and the
   one-stage autopipe plan with the same m microbatches). Speedup vs the ideal 2m/(m+1).
2. Plan + compile seconds in every process for the multi-process test models (small MLP and
   GPT of tests/test_multihost.py) at 2 processes × 4 devices and 4 × 2.

The script is its own worker: ``--worker KIND`` runs one process of a measurement and prints
one ``RESULT {json}`` line. Timings are medians; this machine is shared, so the load average
is recorded next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _worker import _median  # bench/ is sys.path[0] when this script runs

D, BLOCKS, BATCH = 512, 8, 256


def _mlp():
    import jax.numpy as jnp
    import numpy as np

    from autopipe import models

    model = models.LinenMLP(features=(D,) * BLOCKS)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, D)), jnp.float32)
    return model.apply, models.init_linen(model, x), x


def _test_model(name: str):
    import jax.numpy as jnp
    import numpy as np

    from autopipe import models

    if name == "mlp":
        model = models.LinenMLP(features=(32,) * 7 + (8,))
        x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16)), jnp.float32)
    else:
        cfg = models.GPTConfig(vocab=64, seq=8, d_model=32, heads=2, layers=4, mlp_ratio=2)
        model, x = models.LinenGPT(cfg), models.make_tokens(cfg, 8)
    return model.apply, models.init_linen(model, x), x


def _worker_single(m: int, reps: int) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", 1)
    import autopipe

    fn, variables, x = _mlp()
    jitted = jax.jit(fn)
    plan = autopipe.plan(fn, variables, x, mesh=jax.make_mesh((1,), ("pp",)), num_microbatches=m)
    return {
        "jit_s": _median(lambda: jitted(variables, x), reps),
        "microbatched_s": _median(lambda: plan(variables, x), reps),
    }


def _worker_inprocess(m: int, reps: int) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import autopipe

    fn, variables, x = _mlp()
    plan = autopipe.plan(fn, variables, x, mesh=jax.make_mesh((2,), ("pp",)), num_microbatches=m)
    return {"inprocess_s": _median(lambda: plan(variables, x), reps)}


def _worker_pipeline(m: int, reps: int) -> dict:
    import jax
    import numpy as np

    import autopipe

    autopipe.initialize()
    fn, variables, x = _mlp()
    started = time.perf_counter()
    plan = autopipe.plan(fn, variables, x, mesh=jax.make_mesh((2,), ("pp",)), num_microbatches=m)
    planned = time.perf_counter() - started
    out = plan(variables, x)
    err = (
        None if out is None else float(np.max(np.abs(np.asarray(out) - jax.jit(fn)(variables, x))))
    )
    # Only the last stage's process gets outputs to wait on; each call needs both processes,
    # so its timing is the pipeline's. The first process just dispatches the same calls.
    if out is None:
        for _ in range(reps + 1):
            plan(variables, x)
        return {"plan_compile_s": planned}
    step = _median(lambda: plan(variables, x), reps)
    return {"plan_compile_s": planned, "pipeline_s": step, "max_err": err}


def _worker_plan_time(name: str) -> dict:
    import jax

    import autopipe

    autopipe.initialize()
    fn, variables, x = _test_model(name)
    started = time.perf_counter()
    plan = autopipe.plan(fn, variables, x, mesh=jax.make_mesh((jax.device_count(),), ("pp",)))
    planned = time.perf_counter() - started
    plan(variables, x)
    return {"process": jax.process_index(), "plan_compile_s": planned}


def _result(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"worker printed no result:\n{stdout[-2000:]}")
    return json.loads(lines[-1][7:])


def _single(m: int, reps: int, *, kind: str = "single", cores: str = "0") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = ["taskset", "-c", cores, sys.executable, __file__, "--worker", kind]
    cmd += ["--m", str(m), "--reps", str(reps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)
    return _result(done.stdout)


def _launched(args: list[str], processes: int, devices: int, *, pin: bool) -> list[dict]:
    from autopipe.launch import launch

    results = launch(
        [sys.executable, os.path.abspath(__file__), *args],
        num_processes=processes,
        devices=devices,
        timeout=60,
        job_timeout=600,
        pin=pin,
    )
    for r in results:
        if r.returncode != 0:
            raise RuntimeError(f"process {r.process_id} failed:\n{r.stderr[-3000:]}")
    return [_result(r.stdout) for r in results]


def _concurrency(m: int, reps: int) -> dict:
    single = _single(m, reps)
    inproc = _single(m, reps, kind="inprocess", cores="0,1")
    procs = _launched(["--worker", "pipeline", "--m", str(m), "--reps", str(reps)], 2, 1, pin=True)
    pipe = procs[-1]
    return {
        "m": m,
        "jit_1_core_s": single["jit_s"],
        "microbatched_1_core_s": single["microbatched_s"],
        "pipeline_2_processes_s": pipe["pipeline_s"],
        "pipeline_1_process_2_devices_s": inproc["inprocess_s"],
        "speedup_vs_jit": single["jit_s"] / pipe["pipeline_s"],
        "speedup_vs_microbatched": single["microbatched_s"] / pipe["pipeline_s"],
        "inprocess_speedup_vs_microbatched": single["microbatched_s"] / inproc["inprocess_s"],
        "ideal": 2 * m / (m + 1),
        "max_err": pipe["max_err"],
        "plan_compile_s_per_process": [p["plan_compile_s"] for p in procs],
        "load_average": os.getloadavg()[0],
    }


def _plan_times() -> list[dict]:
    rows = []
    for name in ("mlp", "gpt"):
        for processes, devices in ((2, 4), (4, 2)):
            procs = _launched(
                ["--worker", "plan_time", "--model", name], processes, devices, pin=False
            )
            rows.append(
                {
                    "model": name,
                    "processes": processes,
                    "devices_per_process": devices,
                    "plan_compile_s_per_process": [p["plan_compile_s"] for p in procs],
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "multihost.json"))
    parser.add_argument("--worker", choices=("single", "inprocess", "pipeline", "plan_time"))
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--model", default="mlp")
    ns = parser.parse_args()
    if ns.worker == "single":
        print("RESULT " + json.dumps(_worker_single(ns.m, ns.reps)), flush=True)
        return
    if ns.worker == "inprocess":
        print("RESULT " + json.dumps(_worker_inprocess(ns.m, ns.reps)), flush=True)
        return
    if ns.worker == "pipeline":
        print("RESULT " + json.dumps(_worker_pipeline(ns.m, ns.reps)), flush=True)
        return
    if ns.worker == "plan_time":
        print("RESULT " + json.dumps(_worker_plan_time(ns.model)), flush=True)
        return
    rows = [_concurrency(m, ns.reps) for m in (8, 32)]
    report = {
        "model": f"MLP {BLOCKS} × {D}, batch {BATCH}, float32",
        "cores": len(os.sched_getaffinity(0)),
        "concurrency": rows,
        "plan_compile": _plan_times(),
    }
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(report, indent=1) + "\n")
    print(
        "| m | jit, 1 core | m microbatches, 1 core | 2 stages, 2 processes | vs jit | "
        "vs microbatched | 2 devices, 1 process: vs microbatched | ideal |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['m']} | {r['jit_1_core_s'] * 1e3:.1f} ms | "
            f"{r['microbatched_1_core_s'] * 1e3:.1f} ms | "
            f"{r['pipeline_2_processes_s'] * 1e3:.1f} ms | {r['speedup_vs_jit']:.2f} | "
            f"{r['speedup_vs_microbatched']:.2f} | "
            f"{r['pipeline_1_process_2_devices_s'] * 1e3:.1f} ms: "
            f"{r['inprocess_speedup_vs_microbatched']:.2f} | {r['ideal']:.2f} |"
        )
    for r in report["plan_compile"]:
        times = ", ".join(f"{t:.2f}" for t in r["plan_compile_s_per_process"])
        print(f"plan+compile {r['model']} {r['processes']}×{r['devices_per_process']}: {times} s")


if __name__ == "__main__":
    main()
