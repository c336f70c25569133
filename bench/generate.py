"""Pipelined generation (`autopipe.plan_generation`) against one device, on simulated CPU devices.

    python bench/generate.py [--quick]

Runs three worker processes (each sets its own device count before importing jax) and
interleaves their measurements (the machine is shared and noisy):

- ``single``: one simulated device pinned to one core: a ``jax.jit`` of a ``lax.scan`` over
  the decode steps for the whole batch (greedy), and autopipe at pp = 1 on the same core;
- ``pp2``: two simulated devices on two cores: autopipe with 2 stages and 2 request groups in
  flight, and the naive pipeline (``num_groups=1``: one group, fill and drain every token).

Decode tokens/s = batch × 32 / (t(33 new tokens) − t(1 new token)), so the token-by-token
prefill of the prompts cancels; time to first token = t(1 new token) (prefill + one token).
Also reported: the HLO's all-gathers (there should be none) and the per-device argument bytes
from ``memory_analysis()`` against the stage's own parameters + caches. Writes
bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).parent
CONFIG = dict(vocab=512, d_model=512, heads=8, kv_heads=8, layers=8, max_len=64, init_scale=0.05)
BATCH, PROMPT, DECODE = 64, 8, 32


def _median_call(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        args = fn.prepare()
        t = time.perf_counter()
        fn.run(args)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class _Plain:
    """``jax.jit`` of a scan over the decode steps of the whole batch on one device."""

    def __init__(self, n: int):
        import jax
        import jax.numpy as jnp

        from autopipe import decoders as dec

        cfg = dec.DecoderConfig(**CONFIG)
        self.params, cache = dec.init_gpt(cfg, BATCH)
        self.cache = cache
        step = dec.gpt_step(cfg)
        prompts = jnp.asarray(_prompts())

        def loop(params, cache):
            def body(carry, i):
                cache, tok = carry
                logits, cache = step(params, cache, tok, jnp.full((BATCH,), i, jnp.int32))
                nxt = jnp.where(i + 1 < PROMPT, prompts[:, jnp.minimum(i + 1, PROMPT - 1)],
                                jnp.argmax(logits, -1).astype(jnp.int32))  # fmt: skip
                return (cache, nxt), nxt

            _, toks = jax.lax.scan(body, (cache, prompts[:, 0]), jnp.arange(PROMPT + n - 1))
            return toks

        self.fn = jax.jit(loop, donate_argnums=(1,))
        self.fn(self.params, self.prepare()).block_until_ready()

    def prepare(self):
        import jax

        return jax.tree.map(lambda x: x.copy(), self.cache)

    def run(self, cache):
        self.fn(self.params, cache).block_until_ready()


class _Autopipe:
    """The compiled generation program, called with freshly placed caches."""

    def __init__(self, pp: int, groups: int | None, n: int):
        import jax

        import autopipe
        from autopipe import decoders as dec
        from autopipe.passes.emit_generate import Decoding

        cfg = dec.DecoderConfig(**CONFIG)
        params, self.cache = dec.init_gpt(cfg, BATCH)
        mesh = jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp])
        plan = autopipe.plan_generation(dec.gpt_step(cfg), params, self.cache, mesh=mesh,
                                        num_groups=groups)  # fmt: skip
        self.plan = plan
        d = Decoding(groups=plan.num_groups, rows=plan.rows, prompt_len=PROMPT, max_new_tokens=n)
        self.em, self.compiled = plan.lower(d)
        self.params = plan._place_params(self.em, plan._leaves(params, 0, "params"))
        import numpy as np

        from autopipe.passes.emit_generate import fresh_rows

        self.rows = fresh_rows(_prompts(), np.full(BATCH, PROMPT, np.int32), n)
        self.key = jax.random.key_data(jax.random.key(0))
        self.run(self.prepare())

    def prepare(self):
        return self.plan._place_cache(self.em, self.plan._leaves(self.cache, 1, "cache"))

    def run(self, caches):
        rows, pending = self.rows
        self.plan._call(self.em, self.compiled, self.params, caches, rows, pending, self.key, None,
                        None)  # fmt: skip

    def facts(self) -> dict:
        hlo = self.compiled.as_text()
        mem = self.compiled.memory_analysis()
        own = max(s.param_bytes + s.cache_bytes for s in self.plan.stages)
        return {
            "all_gathers": sum(" all-gather(" in line for line in hlo.splitlines()),
            "collective_permutes": sum(" collective-permute(" in ln for ln in hlo.splitlines()),
            "argument_bytes": mem.argument_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes,
            "stage_params_plus_caches": own,
            "cache_bytes_per_stage": [s.cache_bytes for s in self.plan.stages],
            "predicted_tokens_per_s": self.plan.predicted_tokens_per_second,
        }


def _prompts():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.integers(0, CONFIG["vocab"], size=(BATCH, PROMPT)).astype(np.int32)


def worker(kind: str, reps: int) -> dict:
    if kind == "gpt3":  # 8 H100: pp 8; 64 H100: pp 8 × dp 8 (each replica 16 sequences), and
        # pp 8 × tp 8 (16 sequences, caches split by heads)
        return {
            "gpt3_8": plan_gpt3({"pp": 8, "dp": 1}, 16),
            "gpt3_64": plan_gpt3({"pp": 8, "dp": 8}, 128),
            "gpt3_64_tp": plan_gpt3({"pp": 8, "tp": 8}, 16),
        }
    if kind == "serving":
        return serving(reps)
    makers = {
        "single": {"jit": lambda n: _Plain(n), "autopipe_pp1": lambda n: _Autopipe(1, None, n)},
        "pp2": {
            "autopipe_pp2": lambda n: _Autopipe(2, None, n),
            "naive_pp2": lambda n: _Autopipe(2, 1, n),
        },  # fmt: skip
    }[kind]
    out = {}
    for name, make in makers.items():
        first, full = make(1), make(DECODE + 1)
        t1, tn = _median_call(first, reps), _median_call(full, reps)
        out[name] = {"ttft_s": t1, "decode_s": tn - t1, "tokens_per_s": BATCH * DECODE / (tn - t1)}
        if isinstance(full, _Autopipe):
            out[name] |= full.facts()
    return out


SLOTS, REQUESTS = 16, 64


def serving(reps: int) -> dict:
    """Continuous batching (`GenerationPlan.serve`, 16 slots) vs static batching (`generate`
    over batches of 16, one program for the mix's longest prompt and output) at pp = 2 on the
    same 64 requests: prompt lengths 4–24, outputs 1–32 tokens. Tokens/s counts the tokens the
    requests asked for; compilation is excluded (a warm-up run of each first)."""
    import jax
    import numpy as np

    import autopipe
    from autopipe import decoders as dec

    cfg = dec.DecoderConfig(**CONFIG)
    params, cache = dec.init_gpt(cfg, SLOTS)
    mesh = jax.make_mesh((2,), ("pp",), devices=jax.devices()[:2])
    plan = autopipe.plan_generation(dec.gpt_step(cfg), params, cache, mesh=mesh)
    rng = np.random.default_rng(1)
    lengths = rng.integers(4, 25, REQUESTS).astype(np.int32)
    outputs = rng.integers(1, 33, REQUESTS)
    prompts = rng.integers(0, CONFIG["vocab"], (REQUESTS, int(lengths.max()))).astype(np.int32)
    requests = [(prompts[i, : lengths[i]], int(outputs[i])) for i in range(REQUESTS)]
    wanted = int(outputs.sum())

    def continuous():
        return sum(len(c.tokens) for c in plan.serve(params, cache, requests, steps_per_call=8))

    n_max = int(outputs.max())

    def static():
        for lo in range(0, REQUESTS, SLOTS):
            rows = slice(lo, lo + SLOTS)  # generate returns numpy: the call has finished
            plan.generate(params, cache, prompts[rows], lengths[rows], max_new_tokens=n_max)

    assert continuous() == wanted  # warm-up (compiles), and every request got its tokens
    static()
    times = {"continuous": [], "static": []}
    for _ in range(reps):
        for name, fn in (("continuous", continuous), ("static", static)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    out = {k: {"s": statistics.median(v), "tokens_per_s": wanted / statistics.median(v)}
           for k, v in times.items()}  # fmt: skip
    return {"serving": out | {"requests": REQUESTS, "slots": SLOTS, "tokens": wanted}}


GPT3 = dict(vocab=50257, d_model=12288, heads=96, kv_heads=96, layers=96, max_len=2048,
            dtype="bfloat16")  # fmt: skip


def plan_gpt3(mesh: dict, batch: int) -> dict:
    """GPT-3 175B planned for generation from shapes on a mesh of H100s (nothing allocated)."""
    import autopipe
    from autopipe import decoders as dec

    cfg = dec.DecoderConfig(**GPT3)
    params, cache = dec.gpt_shapes(cfg, batch)
    t = time.perf_counter()
    gen = autopipe.plan_generation(dec.gpt_step(cfg), params, cache, mesh=mesh, hardware="h100")
    return {
        "mesh": mesh,
        "batch": batch,
        "cache_length": cfg.max_len,
        "planning_s": time.perf_counter() - t,
        "stage_layers": [s.layers for s in gen.stages],
        "param_GB_per_stage": [s.param_bytes / 1e9 for s in gen.stages],
        "param_GB_per_device": [lay.device_param_bytes / 1e9 for lay in gen.layouts],
        "cache_GB_per_stage": [s.cache_bytes / 1e9 for s in gen.stages],
        "cache_GB_per_device": [s.device_cache_bytes / 1e9 for s in gen.stages],
        "predicted_tokens_per_s": gen.predicted_tokens_per_second,
        "predicted_ms_per_token": gen.predicted_token_latency * 1e3,
        "summary": gen.summary(),
    }


def _run_worker(kind: str, reps: int) -> dict:
    devices, cores = {
        "single": (1, "0"),
        "pp2": (2, "0,1"),
        "gpt3": (1, "0"),
        "serving": (2, "0,1"),
    }[kind]
    env = os.environ | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    cmd = ["taskset", "-c", cores, sys.executable, __file__, "--worker", kind, "--reps", str(reps)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.reps)))
        return
    runs: dict[str, list] = {}
    for _ in range(args.rounds):  # interleaved: single, pp2, single, pp2, ...
        for kind in ("single", "pp2"):
            for name, r in _run_worker(kind, args.reps).items():
                runs.setdefault(name, []).append(r)
    table = {name: _merge(rs) for name, rs in runs.items()}
    for name, rs in runs.items():  # each round's ratio to jit in the same round
        table[name]["vs_jit_by_round"] = [
            r["tokens_per_s"] / j["tokens_per_s"] for r, j in zip(rs, runs["jit"], strict=True)
        ]
    gpt3 = _run_worker("gpt3", 1)
    serve = _run_worker("serving", args.reps)
    base = table["jit"]["tokens_per_s"]
    print(f"{'program':<14} {'decode tok/s':>12} {'vs jit':>7} {'by round':>18} {'TTFT ms':>8} "
          f"{'all-gathers':>11}")  # fmt: skip
    for name, r in table.items():
        ag = r.get("all_gathers", "-")
        rounds = " ".join(f"{x:.2f}" for x in r["vs_jit_by_round"])
        print(f"{name:<14} {r['tokens_per_s']:>12.0f} {r['tokens_per_s'] / base:>7.2f} "
              f"{rounds:>18} {r['ttft_s'] * 1e3:>8.1f} {ag:>11}")  # fmt: skip
    pp2 = table["autopipe_pp2"]
    own = pp2["stage_params_plus_caches"]
    print(f"pp2 vs naive pp2: {pp2['tokens_per_s'] / table['naive_pp2']['tokens_per_s']:.2f}x; "
          f"argument bytes {pp2['argument_bytes']} vs stage params + caches {own} "
          f"({pp2['argument_bytes'] / own:.3f}x)")  # fmt: skip
    sv = serve["serving"]
    print(f"serving {sv['requests']} requests ({sv['tokens']} tokens) through {sv['slots']} slots "
          f"at pp 2: continuous {sv['continuous']['tokens_per_s']:.0f} tokens/s, static "
          f"{sv['static']['tokens_per_s']:.0f} tokens/s "
          f"({sv['continuous']['tokens_per_s'] / sv['static']['tokens_per_s']:.2f}x)")  # fmt: skip
    for name, r in gpt3.items():
        print(f"{name}: {r['mesh']}, batch {r['batch']}, cache {r['cache_length']} positions, "
              f"planned in {r['planning_s']:.1f} s\n{r['summary']}")  # fmt: skip
    config = CONFIG | {"batch": BATCH, "prompt": PROMPT, "decode": DECODE}
    result = {"config": config, **table, **gpt3, **serve}
    (HERE / "results" / "generate.json").write_text(json.dumps(result, indent=2) + "\n")


def _merge(rs: list[dict]) -> dict:
    """Medians over rounds of the timed fields; the rest from the first round."""
    out = dict(rs[0])
    for k in ("ttft_s", "decode_s", "tokens_per_s"):
        out[k] = statistics.median(r[k] for r in rs)
    return out


if __name__ == "__main__":
    main()
