"""One-call accelerator check: ``python bench/gpu_check.py [--out DIR] [--cpu]``.

Prepared for the first session with a GPU (≤ 4 minutes on one GPU; smaller sizes on CPU, where
it is tested). On whatever devices JAX sees it

1. checks a forward plan (pp = 1, and pp = 2 where there are 2 devices) and a training plan
   against ``jax.jit`` / a microbatch-ordered single-device reference (max abs errors);
2. reads XLA's temp bytes of the plan and of jit: does the backend copy the parameters out of
   their buffers? (temp ≥ the parameter bytes means it does; autopipe's slots should read them
   in place, as on XLA:CPU);
3. times the pp = 1 plan against jit (median of interleaved runs: the pipeline's overhead) on the
   standard weight-heavy model (8 residual MLP blocks, D 512, hidden 2048, batch 256);
4. times one pipelined GPT training step against the same step under plain ``jax.jit``
   (value_and_grad + adamw) and reports both MFU figures (6·N·tokens / time / peak FLOP/s of the
   `cost_models.hardware` preset for the device, bf16 on GPU);
5. profiles that GPT's pp = 1 step over 8 microbatches (16 ticks, one while loop per action
   per tick): the fixed cost per tick, each action's cost, and the step against jit of the
   same microbatches accumulated (does the backend pay per loop?);
6. runs `autopipe.calibrate()` and reports the fitted figures beside the device's preset —
   above all ``matmul_overhead`` (presets hold 0): what ``num_microbatches=None`` weighs
   against the bubble (then ``python bench/microbatches.py`` measures the pick there).

Writes ``gpu_check.json`` into ``--out`` (default ``$OUT`` when set, else bench/results) and
prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def _args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results"
    parser.add_argument("--out", type=pathlib.Path, default=default)
    parser.add_argument("--cpu", action="store_true", help="small sizes on 2 simulated CPUs")
    parser.add_argument("--reps", type=int, default=0, help="timed runs (0: 20 GPU, 5 CPU)")
    return parser.parse_args(argv)


def _median_pair(f, g, reps: int) -> tuple[float, float]:
    """Medians of f() and g(), interleaved, after one warm-up each (results blocked on)."""
    import jax

    jax.block_until_ready(f())
    jax.block_until_ready(g())
    tf, tg = [], []
    for _ in range(reps):
        for fn, acc in ((f, tf), (g, tg)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            acc.append(time.perf_counter() - t0)
    return statistics.median(tf), statistics.median(tg)


def weight_heavy(d=512, hidden=2048, n=8, batch=256):
    """The standard weight-heavy case: n residual MLP blocks x → x + gelu(x·W1)·W2."""
    import jax

    def fn(params, x):
        for w1, w2 in params:
            x = x + jax.nn.gelu(x @ w1) @ w2
        return x

    keys = jax.random.split(jax.random.key(0), 2 * n + 1)
    params = [
        (
            jax.random.normal(keys[2 * i], (d, hidden)) * 0.02,
            jax.random.normal(keys[2 * i + 1], (hidden, d)) * 0.02,
        )
        for i in range(n)
    ]
    return fn, params, jax.random.normal(keys[-1], (batch, d))


def forward_checks(small: bool, reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import autopipe

    fn, params, x = weight_heavy(*((128, 512, 4, 64) if small else (512, 2048, 8, 256)))
    param_bytes = sum(w.nbytes for w in jax.tree.leaves(params))
    jitted = jax.jit(fn)
    jit_temp = jitted.lower(params, x).compile().memory_analysis().temp_size_in_bytes
    want = jitted(params, x)
    rows = []
    for pp in (1, 2):
        if pp > len(jax.devices()):
            continue
        mesh = jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp])
        plan = autopipe.plan(fn, params, x, mesh=mesh, num_microbatches=8 if pp > 1 else 1)
        ma = plan.compiled.memory_analysis()
        row = {
            "check": f"forward pp={pp}",
            "max_abs_err": float(jnp.max(jnp.abs(plan(params, x) - want))),
            "temp_MB": ma.temp_size_in_bytes / 1e6,
            "jit_temp_MB": jit_temp / 1e6,
            "param_MB": param_bytes / 1e6,
            "params_copied": ma.temp_size_in_bytes >= 0.5 * param_bytes / pp,
        }
        if pp == 1:
            t_plan, t_jit = _median_pair(
                lambda p=plan: p(params, x), lambda: jitted(params, x), reps
            )
            row |= {"plan_s": t_plan, "jit_s": t_jit, "plan_over_jit": t_plan / t_jit}
        rows.append(row)
    return rows


def training_check(small: bool) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import autopipe

    fn, params, x = weight_heavy(*((64, 256, 4, 32) if small else (256, 1024, 4, 64)))
    y = jnp.roll(x, 1, axis=1)
    opt, m = optax.adamw(1e-3, weight_decay=0.1), 4
    pp = min(2, len(jax.devices()))

    def loss_fn(p, batch):
        xb, yb = batch
        return jnp.mean((fn(p, xb) - yb) ** 2)

    mesh = jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp])
    plan = autopipe.train(loss_fn, opt, params, (x, y), mesh=mesh, num_microbatches=m)
    state = plan.init(params)
    for _ in range(3):
        state, loss = plan.step(state, (x, y))
    got = plan.unplace(state)
    ref, st, grad = params, opt.init(params), jax.jit(jax.grad(loss_fn))
    rows = x.shape[0] // m
    for _ in range(3):  # microbatch gradients accumulated in order, as the pipeline does
        g = None
        for j in range(m):
            gj = grad(ref, (x[j * rows : (j + 1) * rows], y[j * rows : (j + 1) * rows]))
            gj = jax.tree.map(lambda a: a / m, gj)
            g = gj if g is None else jax.tree.map(jnp.add, g, gj)
        upd, st = opt.update(g, st, ref)
        ref = optax.apply_updates(ref, upd)
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
    err = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    ma = plan.compiled.memory_analysis()
    return {
        "check": f"training pp={pp} 1f1b m={m}",
        "max_abs_err": err,
        "temp_MB": ma.temp_size_in_bytes / 1e6,
        "param_MB": sum(w.nbytes for w in jax.tree.leaves(params)) / 1e6,
        "optimizer_mode": plan._runtime.emitted.optimizer_mode,
    }


def _gpt(small: bool):
    """(config, params, (tokens, labels), next-token loss) of the checks' GPT (bf16 on GPU)."""
    import jax
    import jax.numpy as jnp
    import optax

    from autopipe import models

    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    cfg = (
        models.GPTConfig(vocab=256, seq=64, d_model=128, heads=4, layers=4, dtype=dtype)
        if small
        else models.GPTConfig(vocab=8192, seq=1024, d_model=1024, heads=16, layers=8, dtype=dtype)
    )
    model = models.LinenGPT(cfg)
    tokens = models.make_tokens(cfg, 8 if small else 16)
    params = model.init(jax.random.key(0), tokens)

    def loss_fn(p, b):
        logits = model.apply(p, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    return cfg, params, (tokens, jnp.roll(tokens, -1, axis=1)), loss_fn


def gpt_mfu(small: bool, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import autopipe
    from autopipe.cost_models.hardware import PRESETS

    cfg, params, (tokens, labels), loss_fn = _gpt(small)
    batch, dtype = tokens.shape[0], cfg.dtype
    opt = optax.adamw(1e-4)

    @jax.jit
    def jit_step(p, s, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    mesh = jax.make_mesh((1,), ("pp",), devices=jax.devices()[:1])
    plan = autopipe.train(loss_fn, opt, params, (tokens, labels), mesh=mesh, num_microbatches=1)
    box = {"state": plan.init(params), "jit": (params, opt.init(params))}

    def run_plan():
        box["state"], loss = plan.step(box["state"], (tokens, labels))
        return loss

    def run_jit():
        p, s, loss = jit_step(*box["jit"], (tokens, labels))
        box["jit"] = (p, s)
        return loss

    t_plan, t_jit = _median_pair(run_plan, run_jit, reps)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    flops = 6 * n_params * batch * cfg.seq
    kind = str(jax.devices()[0].device_kind).lower()
    hw = next((h for name, h in PRESETS.items() if name.split("_")[0] in kind), None)
    peak = dict(hw.flops_by_dtype).get(jnp.dtype(dtype).name, hw.peak_flops) if hw else None
    return {
        "check": "gpt train step pp=1",
        "params_M": n_params / 1e6,
        "plan_s": t_plan,
        "jit_s": t_jit,
        "plan_over_jit": t_plan / t_jit,
        "mfu_plan": flops / t_plan / peak if peak else None,
        "mfu_jit": flops / t_jit / peak if peak else None,
        "peak_flops": peak,
    }


def accumulated_step(loss_fn, opt):
    """``jit((params, batch, m) -> (params, loss))`` on one device: the gradients of the
    batch's ``m`` microbatches (static) summed in order in a scan, then ``opt``'s update from a
    fresh state (stateless optimizers: SGD) — what a pipeline's step computes, run plainly."""
    import jax
    import optax

    def accumulate(params, batch, m):
        parts = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)

        def one(acc, mb):
            loss, g = jax.value_and_grad(loss_fn)(params, mb)
            return jax.tree.map(lambda a, x: a + x / m, acc, g), loss / m

        zero = jax.tree.map(jax.numpy.zeros_like, params)
        grads, losses = jax.lax.scan(one, zero, parts)
        updates, _ = opt.update(grads, opt.init(params), params)
        return optax.apply_updates(params, updates), losses.sum()

    return jax.jit(accumulate, static_argnums=2)


def per_tick_check(small: bool, reps: int, m: int = 8) -> dict:
    """The executor's fixed cost per tick, where a backend may pay for every data-dependent
    loop (one per action kind and stage per tick; XLA:GPU may read each loop's predicate on
    the host): the GPT's pp = 1 training step over ``m`` microbatches (2m ticks) profiled by
    `Plan.profile` (its step with every cell idle is the fixed cost), against jit of the same
    microbatches' gradients accumulated in a scan, then the same SGD update."""
    import jax
    import optax

    import autopipe

    _, params, batch, loss_fn = _gpt(small)
    opt = optax.sgd(1e-4)

    accumulate = accumulated_step(loss_fn, opt)
    mesh = jax.make_mesh((1,), ("pp",), devices=jax.devices()[:1])
    plan = autopipe.train(loss_fn, opt, params, batch, mesh=mesh, num_microbatches=m)
    box = {"state": plan.init(params)}

    def run_plan():
        box["state"], loss = plan.step(box["state"], batch)
        return loss

    t_plan, t_jit = _median_pair(run_plan, lambda: accumulate(params, batch, m), reps)
    prof = plan.profile(box["state"], batch, repeats=max(reps // 2, 3))
    return {
        "check": f"gpt train step pp=1 m={m}: per-tick cost",
        "ticks": prof.ticks,
        "fixed_s": prof.fixed,
        "fixed_per_tick_s": prof.fixed / prof.ticks,
        "action_s": {f"{a.kind}{a.virtual}": a.together for a in prof.actions},
        "profile_predicted_s": prof.predicted,
        "profile_measured_s": prof.measured,
        "plan_s": t_plan,
        "jit_accumulated_s": t_jit,
        "plan_over_jit": t_plan / t_jit,
    }


def calibration_check(small: bool) -> dict:
    import jax

    import autopipe
    from autopipe.cost_models.hardware import get_hardware

    dev = jax.devices()[0]
    dtypes = ("float32",) if small else ("float32", "bfloat16")
    cal = autopipe.calibrate(dtypes=dtypes, comm=not small, progress=None)
    preset = get_hardware(None, platform=dev.platform, device_kind=dev.device_kind)
    fields = ("peak_flops", "flops_efficiency", "matmul_overhead", "memory_bandwidth",
              "bandwidth_efficiency", "op_overhead", "link_bandwidth", "link_latency")  # fmt: skip
    return {
        "check": "calibration",
        "seconds": round(cal.seconds, 1),
        "preset": preset.name,
        "fitted": {k: getattr(cal.hardware, k) for k in fields},
        "preset_values": {k: getattr(preset, k) for k in fields},
        "flops_by_dtype": dict(cal.hardware.flops_by_dtype),
    }


def main(argv=None) -> dict:
    args = _args(argv)
    import jax

    if args.cpu:
        jax.config.update("jax_num_cpu_devices", 2)
    small = args.cpu or jax.default_backend() == "cpu"
    reps = args.reps or (5 if small else 20)
    started = time.perf_counter()
    rows = [*forward_checks(small, reps), training_check(small), gpt_mfu(small, reps)]
    rows.append(per_tick_check(small, reps))
    rows.append(calibration_check(small))
    result = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": len(jax.devices()),
        "jax": jax.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    json.dump(result, sys.stdout, indent=1)
    print()
    return result


if __name__ == "__main__":
    main()
