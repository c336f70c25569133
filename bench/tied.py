"""Tied embeddings in training: what the copies cost in memory and in step time.

GPT-2-style decoder (`autopipe.library_models.LinenGPT2`, head tied to the token embedding;
dropout off) trained with AdamW at pp = 2 and 4 (1F1B, m = 4). Per device:

- ``measured_params_opt``: XLA's argument bytes of the compiled step (`memory_analysis()`)
  minus the batch: the parameter slots and the optimizer state, tied copies included;
- ``predicted_params_opt``: the plan's memory model for the same, its stages' parameter bytes
  (each stage counts every leaf it reads, so a tied leaf once per holder) × (1 + optimizer
  state bytes per parameter byte); ``predicted_params_grads_opt`` adds the gradient
  accumulator (one more parameter's worth, a temporary of the step: XLA's ``temp`` bytes hold
  it with the residuals, so it is not separable in `memory_analysis`);
- ``step_ms``: median of interleaved steps of the tied model and the same model untied
  (``tie_word_embeddings=False``: a separate ``lm_head`` of the same size), one process; their
  ratio is not only the cost of summing the copies' gradients: the untied model's head
  ``(d_model, vocab)`` and embedding ``(vocab, d_model)`` differ in shape, so the training
  layout (slots by shape) pads each on the other stage's device, and its optimizer runs on
  those zeros too. ``tied_vs_no_sum_step`` isolates the sum (one ``ppermute`` of the
  embedding's gradient between its two holders per step): the same tied plan compiled with
  the sum left out (wrong training, timed only).

``python bench/tied.py`` prints the table and writes bench/results/tied.json; ``bench/run.py
tied`` runs it too.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time


def _task(tied: bool, quick: bool):
    import jax.numpy as jnp
    import numpy as np
    import optax

    from autopipe import library_models as lm
    from autopipe import models

    cfg = lm.DecoderConfig(vocab=512 if quick else 4096, seq=32, layers=4, d_model=128, d_ff=512)
    model = lm.LinenGPT2(cfg, tie_word_embeddings=tied)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (16, cfg.seq)), jnp.int32)
    batch = (tokens, jnp.roll(tokens, -1, axis=1))
    params = models.init_linen(model, tokens)

    def loss_fn(params, batch):
        logits = model.apply(params, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return loss_fn, params, batch


def _nbytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _memory_row(plan, pp, model, params, batch, opt) -> dict:
    import jax

    factor = _nbytes(jax.eval_shape(opt.init, params)) / _nbytes(params)
    per_device = [sum(s.param_bytes for s in plan.stages[d::pp]) for d in range(pp)]
    mem = plan.compiled.memory_analysis()
    measured = mem.argument_size_in_bytes - _nbytes(batch)  # the batch is on every device
    predicted = max(per_device) * (1 + factor)
    return {
        "pp": pp,
        "model": model,
        "shared": ", ".join(p for p, _ in plan.shared_params) or "-",
        "measured_params_opt_MiB": round(measured / 2**20, 3),
        "predicted_params_opt_MiB": round(predicted / 2**20, 3),
        "measured_vs_predicted": round(measured / predicted, 4),
        "predicted_params_grads_opt_MiB": round(max(per_device) * (2 + factor) / 2**20, 3),
        "temp_MiB": round(mem.temp_size_in_bytes / 2**20, 3),
    }


def run(args) -> list[dict]:
    import jax
    import optax

    import autopipe

    quick = getattr(args, "quick", False)
    reps = 5 if quick else getattr(args, "reps", 20)
    opt = optax.adamw(1e-3)
    rows = []
    for pp in (2,) if quick else (2, 4):
        mesh = jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp])
        runs = {}
        for variant in VARIANTS:
            loss_fn, params, batch = _task(variant != "untied", quick)
            with _summing(variant != "tied, gradient sum skipped"):
                plan = autopipe.train(
                    loss_fn, opt, params, batch, mesh=mesh, schedule="1f1b", num_microbatches=4
                )
            if variant != "tied, gradient sum skipped":
                rows.append(_memory_row(plan, pp, variant, params, batch, opt))
            runs[variant] = [plan, plan.init(params), batch]
        med = _median_steps(runs, reps)
        for row in rows[-2:]:
            row["step_ms"] = round(1e3 * med[row["model"]], 2)
            row["tied_vs_untied_step"] = round(med["tied"] / med["untied"], 3)
            row["tied_vs_no_sum_step"] = round(med["tied"] / med[VARIANTS[2]], 3)
    return rows


# the third: the tied model with the copies' gradient sum left out (wrong training, timing
# only): the ratio to it is the cost of the sum itself
VARIANTS = ("tied", "untied", "tied, gradient sum skipped")


def _summing(enabled: bool):
    import contextlib
    from unittest import mock

    if enabled:
        return contextlib.nullcontext()
    return mock.patch("autopipe.passes.emit_train.sum_copies", lambda g, *a: tuple(g))


def _median_steps(runs: dict, reps: int) -> dict[str, float]:
    """Median step seconds per variant, steps interleaved round by round."""
    import jax

    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps + 1):  # the first round warms up
        for name, r in runs.items():
            t = time.perf_counter()
            r[1], loss = r[0].step(r[1], r[2])
            jax.block_until_ready((r[1].params, loss))
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main() -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    rows = run(parser.parse_args())
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    out = pathlib.Path(__file__).parent / "results" / "tied.json"
    out.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
