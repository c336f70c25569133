"""Demo: plan a GPT-style model over 8 simulated CPU devices, print the plan, run it, check it.

Run with ``python -m autopipe.demo``.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices (pp size)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=8)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    import jax.numpy as jnp

    import autopipe
    from autopipe import models

    config = models.GPTConfig(vocab=512, seq=64, d_model=args.d_model, heads=4, layers=args.layers)
    model = models.LinenGPT(config)
    tokens = models.make_tokens(config, args.batch)
    variables = models.init_linen(model, tokens)
    mesh = jax.make_mesh((args.devices,), ("pp",))

    started = time.perf_counter()
    plan = autopipe.plan(
        model.apply, variables, tokens, mesh=mesh, num_microbatches=args.microbatches
    )
    print(plan.summary())
    print(f"plan + compile: {time.perf_counter() - started:.2f} s")

    logits = plan(variables, tokens)
    reference = jax.jit(model.apply)(variables, tokens)
    print(
        f"logits {tuple(logits.shape)}; max |pipelined - plain| = "
        f"{float(jnp.max(jnp.abs(logits - reference))):.3g}"
    )


if __name__ == "__main__":
    main()
