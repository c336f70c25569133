"""Training schedules: bubble, peak memory and CPU step time vs single-device training.

Peak memory is XLA's temporary bytes per device (`memory_analysis()`), also as a fraction of
GPipe's at the same p: the acceptance bar is 1F1B ≤ 0.6 × GPipe at p = 4, m = 8.

``python bench/training.py`` prints a markdown table and writes bench/results/training.json;
``bench/run.py`` registers `run`. Step times are medians of interleaved repetitions of the
pipelined step and a jitted single-device step on the same batch (one run, ratios only).
On this machine all simulated devices share 2 cores, so a pipeline cannot be faster than one
device here; the ratio shows the per-tick overhead of the SPMD schedule executor.

``--tensor`` (`tensor_axis`): the same GPT trained with 1F1B at pp 2, pp 2 × tp 2 and
pp 2 × dp 2 × tp 2 (m = 4, planned with the h100 preset less its latencies so that the tensor
axis splits every block): XLA's argument and temp bytes per device, the all-reduces in the
compiled step, and the step time against pp 2 alone (medians of interleaved repetitions; on 2
shared cores a wider mesh only adds work, so the ratio is the tensor axis's overhead here).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

SCHEDULES = ("gpipe", "1f1b", "1f1b_paired", "interleaved_1f1b", "zb_h1", "zb_paired")


def _task():
    import jax.numpy as jnp
    import optax

    from autopipe import models

    cfg = models.GPTConfig(vocab=128, seq=32, d_model=64, heads=4, layers=8, mlp_ratio=4)
    model = models.LinenGPT(cfg)
    tokens = models.make_tokens(cfg, 16)
    labels = jnp.roll(tokens, -1, axis=1)
    params = models.init_linen(model, tokens)

    def loss_fn(params, batch):
        t, lab = batch
        logits = model.apply(params, t)
        return optax.softmax_cross_entropy_with_integer_labels(logits, lab).mean()

    return loss_fn, params, (tokens, labels)


def run(args) -> list[dict]:
    import jax
    import optax

    import autopipe

    loss_fn, params, batch = _task()
    opt = optax.adamw(1e-3)

    @jax.jit
    def single(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    reps = getattr(args, "reps", 10)
    rows = []
    gpipe_temp: dict[int, int] = {}
    for pp in (2, 4):
        mesh = jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp])
        for kind in SCHEDULES:
            started = time.perf_counter()
            plan = autopipe.train(
                loss_fn, opt, params, batch, mesh=mesh, schedule=kind, num_microbatches=8
            )
            compile_s = time.perf_counter() - started
            state = plan.init(params)
            s_params, s_state = params, opt.init(params)
            state, _ = plan.step(state, batch)  # warm up both
            jax.block_until_ready(single(s_params, s_state, batch))
            t_pipe, t_single = [], []
            for _ in range(reps):
                t = time.perf_counter()
                state, loss = plan.step(state, batch)
                jax.block_until_ready(loss)
                t_pipe.append(time.perf_counter() - t)
                t = time.perf_counter()
                jax.block_until_ready(single(s_params, s_state, batch))
                t_single.append(time.perf_counter() - t)
            mem = plan.compiled.memory_analysis()
            gpipe_temp.setdefault(pp, mem.temp_size_in_bytes)  # GPipe runs first
            rows.append(
                {
                    "pp": pp,
                    "m": 8,
                    "schedule": kind,
                    "bubble_table": round(plan.schedule.bubble_fraction(), 3),
                    "bubble_predicted": round(plan.predicted.bubble_fraction, 3),
                    "formula_gpipe_1f1b": round((pp - 1) / (8 + pp - 1), 3),
                    "in_flight": max(plan.schedule.in_flight()),
                    "temp_MiB": round(mem.temp_size_in_bytes / 2**20, 2),
                    "temp_vs_gpipe": round(mem.temp_size_in_bytes / gpipe_temp[pp], 3),
                    "step_ms": round(1e3 * statistics.median(t_pipe), 1),
                    "single_ms": round(1e3 * statistics.median(t_single), 1),
                    "ratio_vs_single": round(
                        statistics.median(t_pipe) / statistics.median(t_single), 2
                    ),
                    "compile_s": round(compile_s, 1),
                }
            )
    return rows


def tensor_axis(args) -> list[dict]:
    import dataclasses
    import re

    import jax
    import optax

    import autopipe
    from autopipe.cost_models.hardware import get_hardware

    loss_fn, params, batch = _task()
    opt = optax.adamw(1e-3)
    hw = dataclasses.replace(get_hardware("h100"), op_overhead=0.0, link_latency=0.0)
    plans = {}
    for shape in ((2, 1, 1), (2, 1, 2), (2, 2, 2)):
        n = shape[0] * shape[1] * shape[2]
        mesh = jax.make_mesh(shape, ("pp", "dp", "tp"), devices=jax.devices()[:n])
        plan = autopipe.train(
            loss_fn, opt, params, batch, mesh=mesh, num_microbatches=4, hardware=hw
        )
        plans[shape] = plan, [plan.init(params)]
    times: dict = {s: [] for s in plans}
    for _ in range(getattr(args, "reps", 10) + 1):  # the first round warms up
        for shape, (plan, state) in plans.items():
            t = time.perf_counter()
            state[0], loss = plan.step(state[0], batch)
            jax.block_until_ready(loss)
            times[shape].append(time.perf_counter() - t)
    base = statistics.median(times[(2, 1, 1)][1:])
    rows = []
    for shape, (plan, _) in plans.items():
        mem = plan.compiled.memory_analysis()
        hlo = plan.compiled.as_text()
        step = statistics.median(times[shape][1:])
        rows.append(
            {
                "pp×dp×tp": "×".join(map(str, shape)),
                "args_MiB_per_dev": round(mem.argument_size_in_bytes / 2**20, 3),
                "temp_MiB_per_dev": round(mem.temp_size_in_bytes / 2**20, 3),
                "all_reduces_in_hlo": len(re.findall(r"= \S+ all-reduce(?:-start)?\(", hlo)),
                "step_ms": round(1e3 * step, 1),
                "vs_pp2": round(step / base, 2),
            }
        )
    return rows


def main() -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tensor", action="store_true", help="the tensor-axis table only")
    args = parser.parse_args()
    rows = tensor_axis(args) if args.tensor else run(args)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    name = "training_tensor.json" if args.tensor else "training.json"
    out = pathlib.Path(__file__).parent / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
