"""A timing worker for bench/run.py: one process, a fixed number of simulated CPU devices.

    [taskset -c 0] python bench/_worker.py --devices N '<model config json>'

It reads one JSON request per line on stdin and answers one JSON line on stdout, so the runner
can keep a pinned single-device process and a two-device process alive side by side and
interleave their measurements (this machine is shared and noisy). Requests:

  {"what": "jit", "reps": R}                         jax.jit(model.apply) on the whole batch
  {"what": "plan", "pp": P, "m": M, "reps": R}       the autopipe plan (compiled once, cached)
  {"what": "stages", "pp": P, "m": M, "reps": R}     each stage alone on one microbatch
  {"what": "parts", "pp": P, "m": M, "reps": R}      per-tick ingredients of the emitted scan
  {"what": "train", "pp": P, "m": M, "schedule": S, "reps": R}
                                                     an autopipe.train step (SGD), state carried
  {"what": "train_profile", "pp": P, "m": M, "schedule": S, "reps": R}
                                                     that plan's `Plan.profile`: the step its
                                                     measured actions predict and the step
                                                     measured in the same rounds (seconds)
  {"what": "train_auto", "pp": P, "m": M}           the schedule ``schedule="auto"`` picks
  {"what": "accumulate", "m": M, "reps": R}          one device: the same m microbatches'
                                                     gradients summed in order, then the update
  {"what": "train_jit", "reps": R}                   one device: the whole batch's step
  {"what": "quit"}

Answers carry medians in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable


def _median(fn: Callable[[], object], reps: int) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Worker:
    def __init__(self, devices: int, config: dict) -> None:
        import jax

        jax.config.update("jax_num_cpu_devices", devices)
        from autopipe import models

        self.plans: dict = {}
        if config.get("model") == "mlp":  # the standard weight-heavy case (forward only)
            from gpu_check import weight_heavy

            self.apply, self.variables, self.tokens = weight_heavy()
            self.training = None
        else:
            self.cfg = models.GPTConfig(**config["gpt"])
            model = models.LinenGPT(self.cfg)
            self.apply = model.apply
            self.tokens = models.make_tokens(self.cfg, config["batch"])
            self.variables = models.init_linen(model, self.tokens)
            self.training = _Training(model, self.variables, self.tokens)
        self.jitted = jax.jit(self.apply)

    def plan(self, pp: int, m: int):
        import jax

        import autopipe

        if (pp, m) not in self.plans:
            mesh = jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp])
            self.plans[pp, m] = autopipe.plan(
                self.apply, self.variables, self.tokens, mesh=mesh, num_microbatches=m
            )
        return self.plans[pp, m]

    def handle(self, req: dict) -> dict:
        reps = int(req.get("reps", 5))
        what = req["what"]
        if what in ("train", "train_profile", "train_auto", "accumulate", "train_jit"):
            return self.training.handle(req, reps)
        if what == "jit":
            return {"median": _median(lambda: self.jitted(self.variables, self.tokens), reps)}
        plan = self.plan(int(req["pp"]), int(req["m"]))
        if what == "plan":
            out = {"median": _median(lambda: plan(self.variables, self.tokens), reps)}
            out["ticks"] = plan.schedule.num_ticks
            out["predicted"] = plan.predicted.step_time
            return out
        if what == "stages":
            return {"medians": self._stage_times(plan, reps)}
        if what == "parts":
            return {"medians": self._parts(plan, reps)}
        raise ValueError(f"unknown request {what!r}")

    # --- attribution ------------------------------------------------------------------------

    def _stage_inputs(self, plan):
        """Per stage: (jitted run on one microbatch, its arguments), each on its own device.

        Uses the emitter's own per-stage function (autopipe.passes.emit._stage_fn), so the
        measured compute is exactly what one tick's branch runs, minus switch/scan/ppermute.
        """
        import jax
        import jax.numpy as jnp

        from autopipe.passes import emit as emit_pass
        from autopipe.passes.layout import buffer_sizes

        program, layouts = plan.program, plan.layouts
        sizes = buffer_sizes([st.send for st in layouts])
        leaves = jax.tree.leaves((self.variables, self.tokens))
        batch_flags = plan.traced.spec.batch_leaves
        params = [x for x, b in zip(leaves, batch_flags, strict=True) if not b]
        batch = [x for x, b in zip(leaves, batch_flags, strict=True) if b]
        bufs = plan.place_params(params)
        mb = plan.traced.microbatch_size
        slots = plan.emitted.params
        out = []
        for s, lay in enumerate(layouts):
            dev = jax.devices()[s]
            run = emit_pass._stage_fn(
                program,
                lay,
                slots,
                s,
                last=s == len(layouts) - 1,
                sizes=sizes,
                tensor=None,  # pipeline only: every operator whole
            )
            own = tuple(_row(b, s, dev) for b in bufs)
            recv = {dt: jax.device_put(jnp.zeros((n,), dt), dev) for dt, n in sizes.items()}
            xs = [jax.device_put(x[:mb], dev) for x in batch]
            out.append((jax.jit(run), (own, recv, xs)))
        return out

    def _stage_times(self, plan, reps: int) -> list[float]:
        return [_median(lambda f=f, a=a: f(*a), reps) for f, a in self._stage_inputs(plan)]

    def _parts(self, plan, reps: int) -> dict[str, float]:
        """Per-tick cost of each ingredient of the emitted tick loop, alone, on the plan's mesh:
        a shard_map'd scan over the plan's ticks doing only that ingredient (minus an empty
        scan), divided by the number of ticks."""
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P

        from autopipe.passes.layout import buffer_sizes

        p, ticks = plan.num_stages, plan.schedule.num_ticks
        mesh = plan.mesh
        sizes = buffer_sizes([st.send for st in plan.layouts])
        outs = [plan.program.avals[a] for a in plan.program.outvars]
        perm = [(d, d + 1) for d in range(p - 1)]
        mb = plan.traced.microbatch_size
        m = plan.num_microbatches
        batch = self.tokens.reshape(m, mb, *self.tokens.shape[1:])

        def loop(tick_fn, init, with_ys=False):
            def body(x):
                carry, ys = jax.lax.scan(tick_fn, init(), jnp.arange(ticks))
                return (ys if with_ys else carry)[0][None]

            f = jax.shard_map(
                body,
                mesh=mesh,
                in_specs=P(),
                out_specs=P("pp"),
                axis_names={"pp"},
                check_vma=False,  # as the emitter does
            )
            return jax.jit(f)

        def zeros_send():
            return tuple(jnp.zeros((n,), dt) for dt, n in sizes.items())

        def zeros_out():
            return tuple(jnp.zeros(a.shape, a.dtype) for a in outs)

        variants = {
            "empty": loop(lambda c, t: (c, None), lambda: (jnp.zeros(()),)),
            "ppermute": loop(
                lambda c, t: (tuple(jax.lax.ppermute(x + 1, "pp", perm) for x in c), None),
                zeros_send,
            ),
            "outputs": loop(
                lambda c, t: (c, tuple(o + t.astype(o.dtype) for o in zeros_out())),
                lambda: (jnp.zeros(()),),
                with_ys=True,
            ),
            "switch_idle": loop(
                lambda c, t: (
                    jax.lax.switch(
                        t % (p + 1),
                        [lambda c: tuple(x + 1 for x in c)] * (p + 1),
                        c,
                    ),
                    None,
                ),
                zeros_send,
            ),
            "batch_index": loop(
                lambda c, t: (
                    (c[0] + jax.lax.dynamic_index_in_dim(batch, t % m, 0, False).sum(),),
                    None,
                ),
                lambda: (jnp.zeros((), batch.dtype),),
            ),
        }
        raw = {k: _median(lambda f=f: f(batch), reps) for k, f in variants.items()}
        base = raw.pop("empty")
        per_tick = {k: max(0.0, v - base) / ticks for k, v in raw.items()}
        per_tick["empty_scan_total"] = base
        return per_tick


class _Training:
    """Training steps of the GPT's next-token loss with SGD (no optimizer state to hide)."""

    def __init__(self, model, variables, tokens) -> None:
        import jax
        import jax.numpy as jnp
        import optax
        from gpu_check import accumulated_step

        self.variables, self.batch = variables, (tokens, jnp.roll(tokens, -1, axis=1))
        self.opt = optax.sgd(1e-3)

        def loss_fn(params, batch):
            t, lab = batch
            logits = model.apply(params, t)
            return optax.softmax_cross_entropy_with_integer_labels(logits, lab).mean()

        def step(params, grads):
            updates, _ = self.opt.update(grads, self.opt.init(params), params)
            return optax.apply_updates(params, updates)

        def whole(params, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            return step(params, grads), loss

        self.loss_fn = loss_fn
        self.whole = jax.jit(whole)
        self.accumulate = accumulated_step(loss_fn, self.opt)
        self.plans: dict = {}

    def handle(self, req: dict, reps: int) -> dict:
        import jax

        import autopipe

        what, v, b = req["what"], self.variables, self.batch
        if what == "train_jit":
            return {"median": _median(lambda: self.whole(v, b), reps)}
        m = int(req["m"])
        if what == "accumulate":
            return {"median": _median(lambda: self.accumulate(v, b, m), reps)}
        pp = int(req["pp"])
        mesh = jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp])
        if what == "train_auto":
            plan = autopipe.train(
                self.loss_fn, self.opt, v, b, mesh=mesh, schedule="auto", num_microbatches=m,
                compile=False,
            )  # fmt: skip
            return {"schedule": plan.schedule.kind}
        key = (pp, m, req["schedule"])
        if key not in self.plans:
            plan = autopipe.train(
                self.loss_fn, self.opt, v, b, mesh=mesh, schedule=key[2], num_microbatches=m
            )
            self.plans[key] = plan, [plan.init(v)]
        plan, state = self.plans[key]
        if what == "train_profile":
            prof = plan.profile(state[0], b, repeats=reps)
            return {"predicted": prof.predicted, "measured": prof.measured}

        def run():
            state[0], loss = plan.step(state[0], b)
            return loss

        return {"median": _median(run, reps), "predicted": plan.predicted.step_time}


def _row(buf, stage: int, device):
    """Row `stage` (kept as a leading axis of 1) of a (stages, ...) slot sharded over the
    pipeline axis, on `device`."""
    import jax

    for shard in buf.addressable_shards:
        if (shard.index[0].start or 0) == stage:
            return jax.device_put(shard.data, device)
    raise RuntimeError(f"stage {stage}'s parameter row is not addressable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("config", help="JSON: {'gpt': GPTConfig kwargs, 'batch': int}")
    args = parser.parse_args()
    worker = Worker(args.devices, json.loads(args.config))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("what") == "quit":
            break
        try:
            answer = worker.handle(req)
        except Exception as e:  # report to the runner instead of dying mid-benchmark
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
