"""``num_microbatches=None``: the count the planner picks against the measured fastest count.

`autopipe.calibrate()` first (its ``matmul_overhead`` is what makes small microbatches dearer
than their FLOPs), then, with that profile, the benchmark GPT (8 layers × d_model 256, seq 64,
batch 32; SGD for training) at pp = 2 on two simulated devices: ``autopipe.plan`` and
``autopipe.train(schedule="auto")`` with ``num_microbatches=None``. Every count the search
tried is compiled and timed (medians of interleaved runs, one process); a row per count with
its predicted and measured step, and a summary row per mode: the pick, the measured best, and
the pick's measured step over the best's (``pick_vs_best``; 1.0 = the right count).

On a CPU host, two simulated devices share the cores, so a device idle in the bubble lends
its core to the other: the bubble costs less than on independent devices (GPUs), which the
cost model assumes; expect the pick to be at or above the measured best count here.

``python bench/microbatches.py`` prints the table and writes bench/results/microbatches.json;
``bench/run.py microbatches`` runs it too.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

from _runtime import _interleaved_median


def _rows(mode: str, plans: dict, picked: int, measured: dict) -> list[dict]:
    best = min(measured, key=measured.get)
    rows = [
        {
            "mode": mode,
            "microbatches": m,
            "schedule": plans[m].schedule.kind,
            "predicted_ms": round(1e3 * plans[m].predicted.step_time, 1),
            "measured_ms": round(1e3 * measured[m], 1),
        }
        for m in sorted(plans)
    ]
    rows.append(
        {"mode": mode, "picked": picked, "measured_best": best,
         "pick_vs_best": round(measured[picked] / measured[best], 3)}
    )  # fmt: skip
    return rows


def run(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import optax

    import autopipe
    from autopipe import models

    quick = getattr(args, "quick", False)
    reps = 3 if quick else 7
    with tempfile.TemporaryDirectory() as tmp:
        cal = autopipe.calibrate(pathlib.Path(tmp) / "cpu.json", progress=None)
    hw = cal.hardware
    layers, batch_size = (2, 8) if quick else (8, 32)
    cfg = models.GPTConfig(vocab=512, seq=64, d_model=256, heads=4, layers=layers)
    model = models.LinenGPT(cfg)
    tokens = models.make_tokens(cfg, batch_size)
    batch = (tokens, jnp.roll(tokens, -1, axis=1))
    params = model.init(jax.random.key(0), tokens)

    def loss_fn(params, batch):
        logits = model.apply(params, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    mesh = jax.make_mesh((2,), ("pp",), devices=jax.devices()[:2])
    rows = [{"mode": "calibration", "matmul_overhead_us": round(hw.matmul_overhead * 1e6, 1),
             "flops_efficiency": round(hw.flops_efficiency, 3)}]  # fmt: skip

    fwd = autopipe.plan(model.apply, params, tokens, mesh=mesh, hardware=hw)
    counts = [f.num_microbatches for f in fwd.factorizations]
    plans = {m: autopipe.plan(model.apply, params, tokens, mesh=mesh, hardware=hw,
                              num_microbatches=m) for m in counts}  # fmt: skip
    measured = _interleaved_median(
        {m: (lambda p=p: p(params, tokens)) for m, p in plans.items()}, reps
    )
    rows += _rows("forward", plans, fwd.num_microbatches, measured)

    sgd = optax.sgd(1e-2)
    auto = autopipe.train(loss_fn, sgd, params, batch, mesh=mesh, schedule="auto", hardware=hw,
                          compile=False)  # fmt: skip
    counts = [f.num_microbatches for f in auto.factorizations]
    plans, steps = {}, {}
    for m in counts:
        plans[m] = autopipe.train(loss_fn, sgd, params, batch, mesh=mesh, schedule="auto",
                                  hardware=hw, num_microbatches=m)  # fmt: skip
        state = [plans[m].init(params)]

        def step(plan=plans[m], state=state):
            state[0], loss = plan.step(state[0], batch)
            return loss

        steps[m] = step
    rows += _rows("training", plans, auto.num_microbatches, _interleaved_median(steps, reps))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = run(args)
    for row in rows:
        print(row)
    out = pathlib.Path(__file__).resolve().parent / "results" / "microbatches.json"
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    import os

    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    main()
