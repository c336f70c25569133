"""The plans whose `to_json()` is pinned in tests/golden/ (behaviour kept across refactors).

Every zoo model and test model: forward plans at a few meshes, a training plan per schedule
(with and without remat), 3D plans, the memory-lean fallback and the 175B plan on a laptop.
Meshes are dicts (planning only), which price exactly like a concrete CPU mesh.

Regenerate after an intended change of the planner's decisions:
``python tests/golden_cases.py`` (writes tests/golden/*.json).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

import autopipe
from autopipe import models

GOLDEN = pathlib.Path(__file__).parent / "golden"
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1")


def _forward(cases) -> dict:
    out = {}
    for name, (fn, args) in cases.items():
        for pp in (1, 2, 4):
            out[f"fwd-{name}-pp{pp}"] = lambda fn=fn, args=args, pp=pp: autopipe.plan(
                fn, *args, mesh={"pp": pp}, num_microbatches=2
            )
    for name in ("linen_mlp", "linen_gpt", "cnn"):
        fn, args = cases[name]
        out[f"3d-{name}-h100"] = lambda fn=fn, args=args: autopipe.plan(
            fn, *args, mesh={"pp": 2, "dp": 2, "tp": 2}, num_microbatches=2, hardware="h100"
        )
    cfg = models.GPTConfig(vocab=4096, seq=256, d_model=2048, heads=16, layers=4, mlp_ratio=4)
    big, tokens = models.LinenGPT(cfg), jax.ShapeDtypeStruct((8, 256), jnp.int32)
    big_args = (models.abstract_linen(big, tokens), tokens)
    out["3d-big_gpt-lean"] = lambda: autopipe.plan(
        big.apply,
        *big_args,
        mesh={"pp": 2, "dp": 1, "tp": 2},
        num_microbatches=2,
        hardware="h100",
        memory_limit=_lean_limit(big.apply, big_args),
    )
    fn, args = cases["linen_gpt"]
    out["fwd-linen_gpt-default-m"] = lambda: autopipe.plan(fn, *args, mesh={"pp": 4})
    return out


def _lean_limit(fn, args) -> float:
    fast = autopipe.plan(
        fn, *args, mesh={"pp": 2, "dp": 1, "tp": 2}, num_microbatches=2, hardware="h100"
    )
    return 0.99 * max(fast.predicted.memory_per_device)


def _training(cases) -> dict:
    from conftest import BATCH, GPT, fill

    model = models.LinenMLP(features=(32, 32, 32, 32, 8))
    x = jnp.ones((BATCH, 16), jnp.float32)
    y = jnp.ones((BATCH, 8), jnp.float32)

    def mlp_loss(params, batch):
        return jnp.mean((model.apply(params, batch[0]) - batch[1]) ** 2)

    gpt = models.LinenGPT(GPT)
    tokens = models.make_tokens(GPT, BATCH)

    def gpt_loss(params, batch):
        logits = gpt.apply(params, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    tasks = {
        "mlp": (mlp_loss, fill(models.abstract_linen(model, x)), (x, y)),
        "gpt": (gpt_loss, fill(models.abstract_linen(gpt, tokens)), (tokens, tokens)),
    }
    opt = optax.adamw(1e-2)
    out = {}
    for name, (loss, params, batch) in tasks.items():
        for sched in SCHEDULES:
            for remat in (False, True):
                out[f"train-{name}-{sched}-remat{int(remat)}"] = (
                    lambda loss=loss, params=params, batch=batch, sched=sched, remat=remat: (
                        autopipe.train(
                            loss,
                            opt,
                            params,
                            batch,
                            mesh={"pp": 2},
                            schedule=sched,
                            num_microbatches=4,
                            remat=remat,
                        )
                    )
                )
    loss, params, batch = tasks["gpt"]
    out["train-gpt-1f1b-dp2-pp4"] = lambda: autopipe.train(
        loss, opt, params, batch, mesh={"pp": 4, "dp": 2}, num_microbatches=2
    )
    return out


def _large() -> dict:
    cfg = dataclasses.replace(models.gpt3_175b(), dtype=jnp.bfloat16)
    model = models.LinenGPT(cfg)
    tokens = jax.ShapeDtypeStruct((64, cfg.seq), jnp.int32)
    variables = models.abstract_linen(model, tokens)
    return {
        "fwd-gpt3_175b-pp16-h100": lambda: autopipe.plan(
            model.apply,
            variables,
            tokens,
            mesh={"pp": 16},
            num_microbatches=8,
            hardware="h100",
        )
    }


def golden_plans() -> dict:
    """name → a function making that plan (planning only)."""
    from conftest import _cases

    cases = _cases()
    return {**_forward(cases), **_training(cases), **_large()}


def write() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, make in golden_plans().items():
        (GOLDEN / f"{name}.json").write_text(make().to_json() + "\n")
        print(name)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import golden_cases  # function names in the plans carry the module name, not __main__

    golden_cases.write()
