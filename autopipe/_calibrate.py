"""`autopipe.calibrate()`: measure this backend and fit the cost model's factors to it.

Micro-benchmarks, each compiled once and timed over several repeats (median), on the current
backend's devices:

1. dispatch floor: a jitted call that does (almost) nothing — subtracted from every timing;
2. per-operator overhead: a chain of tiny dependent matmuls (each its own kernel);
3. matmul throughput per dtype over square and transformer-like rectangular shapes, a few
   rows' GEMMs among them: the best rate is the peak; the efficiency and the fixed time per
   matmul (`Hardware.matmul_overhead`) are fitted together over all shapes;
4. memory bandwidth: one elementwise op over arrays from cache-sized to DRAM-sized;
5. transcendentals: ``exp`` against a multiply of the same size;
6. fusion: layer-norm, softmax, gelu and bias+residual patterns fix the share of unfused
   elementwise traffic that XLA's fusion removes;
7. ppermute and all-reduce between devices (when there are ≥ 2): latency and bandwidth by a
   least-squares line over message sizes.

Factors are fitted one at a time against the very time model the planner uses
(`autopipe.cost_models.rules.op_time`), minimising the median |log(predicted / measured)|.
The result is a `Hardware` the planner takes (`autopipe.plan(..., hardware=profile)` or a saved
path). Progress is printed; the whole run takes well under two minutes on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from autopipe.cost_models.hardware import PRESETS, Hardware, dtype_class, get_hardware
from autopipe.cost_models.rules import Cost, jaxpr_cost, op_time

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measurement:
    """One timed micro-benchmark: what ran, its cost facts and the median seconds per call."""

    kind: str
    label: str
    seconds: float
    cost: Cost = dataclasses.field(repr=False)
    extra: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """What `calibrate` measured and the `Hardware` it fitted."""

    hardware: Hardware
    dispatch_seconds: float
    measurements: tuple[Measurement, ...]
    seconds: float

    def to_dict(self) -> dict:
        return {
            "hardware": self.hardware.to_dict(),
            "dispatch_seconds": self.dispatch_seconds,
            "seconds": self.seconds,
            "measurements": [
                {"kind": m.kind, "label": m.label, "seconds": m.seconds, **dict(m.extra)}
                for m in self.measurements
            ],
        }

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)


# --- timing -----------------------------------------------------------------------------------


def time_call(fn: Callable, *args: Any, repeats: int = 7, min_sample: float = 2e-3) -> float:
    """Median seconds per call of a compiled `fn(*args)` (several calls per sample if short)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, min(200, int(min_sample / once)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def _cost_of(fn: Callable, *args: Any) -> Cost:
    return jaxpr_cost(jax.make_jaxpr(fn)(*args).jaxpr)


def _measure(kind: str, label: str, fn: Callable, args: Sequence[Any], dispatch: float, **extra):
    args = [jax.device_put(a, jax.devices()[0]) for a in args]
    seconds = max(time_call(jax.jit(fn), *args) - dispatch, 1e-8)
    extra_rows = tuple((k, float(v)) for k, v in extra.items())
    return Measurement(
        kind=kind, label=label, seconds=seconds, cost=_cost_of(fn, *args), extra=extra_rows
    )


def _rand(shape: Sequence[int], dtype: Any = jnp.float32, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# --- the micro-benchmarks ---------------------------------------------------------------------


def _dispatch_floor() -> float:
    x = jnp.ones((8,), jnp.float32)
    return time_call(jax.jit(lambda a: a + 1.0), x, repeats=9)


def _overhead_chain(k: int) -> Callable:
    def chain(x, w):
        for _ in range(k):
            x = jnp.tanh(x @ w)
        return x

    return chain


def _overhead_benchmarks(dispatch: float) -> list[Measurement]:
    x, w = _rand((8, 8)), _rand((8, 8), seed=1) * 0.1
    return [
        _measure("overhead", f"{k} tiny dot+tanh", _overhead_chain(k), (x, w), dispatch)
        for k in (1, 16, 48)
    ]


MATMUL_SHAPES = (
    (128, 128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (1024, 1024, 1024),
    (64, 256, 1024),
    (256, 1024, 256),
    (512, 256, 1024),
    (2048, 64, 256),
    (32, 512, 512),
    (16, 256, 1024),  # a microbatch's few rows: below the rate (`Hardware.matmul_overhead`)
    (64, 256, 256),
    (16, 1024, 256),
)
# (batch, m, k, n): attention-like batched matmuls
BATCHED_SHAPES = ((32, 64, 32, 64), (16, 128, 16, 128), (8, 256, 64, 256))
CONV_SHAPES = (  # (batch, height, width, in channels, out channels), 3x3 SAME
    (8, 24, 24, 3, 16),
    (8, 16, 16, 16, 32),
    (4, 12, 12, 48, 48),
    (16, 8, 8, 64, 64),
)


def _matmul_benchmarks(dtypes: Sequence[str], dispatch: float) -> list[Measurement]:
    out = []
    for dt in dtypes:
        for m, k, n in MATMUL_SHAPES:
            a, b = _rand((m, k), dt), _rand((k, n), dt, seed=1)
            label = f"{dt}[{m}x{k}]@[{k}x{n}]"
            out.append(_measure(f"matmul:{dtype_class(dt)}", label, jnp.matmul, (a, b), dispatch))
    for bsz, m, k, n in BATCHED_SHAPES:
        a, b = _rand((bsz, m, k)), _rand((bsz, k, n), seed=1)
        label = f"float32[{bsz}x{m}x{k}]@[{k}x{n}]"
        out.append(_measure("batched", label, jnp.matmul, (a, b), dispatch))
    return out


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _conv_benchmarks(dispatch: float) -> list[Measurement]:
    out = []
    for b, h, w, cin, cout in CONV_SHAPES:
        x, k = _rand((b, h, w, cin)), _rand((3, 3, cin, cout), seed=1)
        label = f"conv3x3 [{b}x{h}x{w}x{cin}]->{cout}"
        out.append(_measure("conv", label, _conv, (x, k), dispatch))
    return out


def _bandwidth_benchmarks(dispatch: float) -> list[Measurement]:
    out = []
    for n in (1 << 16, 1 << 18, 1 << 20, 1 << 22):
        x = _rand((n,))
        out.append(_measure("bandwidth", f"x*2 f32[{n}]", lambda a: a * 2.0, (x,), dispatch))
        out.append(_measure("exp", f"exp f32[{n}]", jnp.exp, (x,), dispatch))
    return out


def _layernorm(x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * g + b


def _fusion_benchmarks(dispatch: float) -> list[Measurement]:
    out = []
    for rows, d in ((256, 256), (1024, 512), (64, 128)):
        x, g, b = _rand((rows, d)), _rand((d,), seed=1), _rand((d,), seed=2)
        y = _rand((rows, d), seed=3)
        shape = f"[{rows}x{d}]"
        out += [
            _measure("fusion", f"layernorm{shape}", _layernorm, (x, g, b), dispatch),
            _measure("fusion", f"softmax{shape}", jax.nn.softmax, (x,), dispatch),
            _measure("fusion", f"gelu{shape}", jax.nn.gelu, (x,), dispatch),
            _measure("fusion", f"bias+res{shape}", lambda a, c, v: a + c + v, (x, b, y), dispatch),
        ]
    return out


# --- communication ----------------------------------------------------------------------------


def _collective_fn(kind: str, mesh: Any) -> Callable:
    from jax.sharding import PartitionSpec as P

    n = mesh.shape["x"]

    def body(a):
        if kind == "ppermute":
            return jax.lax.ppermute(a, "x", [(i, (i + 1) % n) for i in range(n)])
        if kind == "all_reduce":
            return jax.lax.psum(a, "x")
        return a + 1.0

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))


def _comm_benchmarks(n_devices: int) -> list[Measurement]:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((n_devices,), ("x",), devices=jax.devices()[:n_devices])
    out = []
    for kind in ("baseline", "ppermute", "all_reduce"):
        fn = _collective_fn(kind, mesh)
        for per_device in (1 << 10, 1 << 14, 1 << 18, 1 << 21):
            x = jax.device_put(
                jnp.ones((n_devices * per_device // 4,), jnp.float32),
                NamedSharding(mesh, P("x")),
            )
            seconds = time_call(fn, x, repeats=5)
            out.append(
                Measurement(
                    kind=f"comm:{kind}",
                    label=f"{kind} {per_device} B/device over {n_devices}",
                    seconds=seconds,
                    cost=Cost(),
                    extra=(("bytes", float(per_device)), ("devices", float(n_devices))),
                )
            )
    return out


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope), both clipped to be positive."""
    slope, intercept = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
    return max(float(intercept), 1e-7), max(float(slope), 1e-15)


def _fit_links(ms: Sequence[Measurement], hw: Hardware) -> Hardware:
    base = {dict(m.extra)["bytes"]: m.seconds for m in ms if m.kind == "comm:baseline"}
    pp = [m for m in ms if m.kind == "comm:ppermute"]
    if not pp:
        return hw
    xs = [dict(m.extra)["bytes"] for m in pp]
    ys = [max(m.seconds - base.get(x, 0.0), 1e-8) for m, x in zip(pp, xs, strict=True)]
    latency, per_byte = _fit_line(xs, ys)
    if per_byte <= 1e-14:  # too noisy to see a bandwidth: keep the base profile's link
        return hw
    n = int(dict(pp[0].extra)["devices"])
    return dataclasses.replace(
        hw, link_latency=latency, link_bandwidth=1.0 / per_byte, devices_per_node=n
    )


# --- fitting ----------------------------------------------------------------------------------


def _log_error(
    hw: Hardware, ms: Sequence[Measurement], stat: Callable = statistics.median
) -> float:
    return stat(abs(math.log(op_time(m.cost, hw) / m.seconds)) for m in ms)


def _fit(hw: Hardware, field: str, ms: Sequence[Measurement], lo: float, hi: float) -> Hardware:
    """The value of `field` in [lo, hi] (log grid, then refined) that best predicts `ms`."""
    if not ms:
        return hw
    grid = np.geomspace(lo, hi, 41) if lo > 0 else np.linspace(lo, hi, 41)
    for _ in range(3):
        errs = [_log_error(dataclasses.replace(hw, **{field: float(v)}), ms) for v in grid]
        k = int(np.argmin(errs))
        a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        grid = np.geomspace(a, b, 21) if lo > 0 else np.linspace(a, b, 21)
    return dataclasses.replace(hw, **{field: float(grid[len(grid) // 2])})


def _fit_matmul(hw: Hardware, ms: Sequence[Measurement]) -> Hardware:
    """Peak per dtype = best measured rate; efficiency fitted per dtype, float32's kept as the
    global factor and the others folded into their dtype's rate."""
    rates: dict[str, float] = {}
    for m in ms:
        dt = m.kind.split(":")[1]
        rates[dt] = max(rates.get(dt, 0.0), m.cost.matmul_flops / m.seconds)
    hw = dataclasses.replace(
        hw, flops_by_dtype=tuple(rates.items()), peak_flops=max(rates.values())
    )
    effs = {
        dt: _fit(hw, "flops_efficiency", _by_kind(ms, f"matmul:{dt}"), 0.05, 1.0).flops_efficiency
        for dt in rates
    }
    eff = effs.get("float32", max(effs.values()))
    scaled = tuple((dt, rates[dt] * effs[dt] / eff) for dt in rates)
    return dataclasses.replace(hw, flops_efficiency=eff, flops_by_dtype=scaled)


def _by_kind(ms: Sequence[Measurement], kind: str) -> list[Measurement]:
    return [m for m in ms if m.kind == kind]


def _fit_all(hw: Hardware, ms: Sequence[Measurement]) -> Hardware:
    bw = _by_kind(ms, "bandwidth")
    peak_bw = max(m.cost.bytes_accessed / m.seconds for m in bw)
    hw = dataclasses.replace(hw, memory_bandwidth=peak_bw, fusion_discount=0.0, matmul_overhead=0.0)
    hw = _fit(hw, "op_overhead", _by_kind(ms, "overhead")[:1], 1e-8, 1e-3)
    hw = _fit(hw, "bandwidth_efficiency", bw, 0.05, 1.0)
    hw = _fit_matmul(hw, [m for m in ms if m.kind.startswith("matmul:")])
    hw = _fit(hw, "conv_efficiency", _by_kind(ms, "conv"), 0.01, 2.0)
    hw = _fit(hw, "transcendental_time", _by_kind(ms, "exp"), 1e-13, 1e-7)
    hw = _fit(hw, "fusion_discount", _by_kind(ms, "fusion"), 0.0, 0.95)
    chains = _by_kind(ms, "overhead")
    hw = _fit(hw, "op_overhead", chains, hw.op_overhead / 10, hw.op_overhead * 10)
    # matmul efficiency of the shapes models are made of, dense and attention-like together
    return _fit_matmul_rate(hw, _by_kind(ms, "matmul:float32") + _by_kind(ms, "batched"))


def _fit_matmul_rate(hw: Hardware, ms: Sequence[Measurement]) -> Hardware:
    """Efficiency and fixed time per matmul (`Hardware.matmul_overhead`: a few rows' GEMM
    runs below the rate) fitted together on one grid, by the mean |log| error: small and large
    shapes alike. The tiny chains fit op_overhead without it: 8 × 8 products run inline, so
    the model overprices those (models have few)."""
    overheads = (0.0, *np.geomspace(1e-8, 1e-3, 51))
    pairs = [(e, o) for e in np.linspace(0.05, 1.0, 39) for o in overheads]
    errors = [
        _log_error(
            dataclasses.replace(hw, flops_efficiency=e, matmul_overhead=o), ms, statistics.mean
        )
        for e, o in pairs
    ]
    e, o = pairs[int(np.argmin(errors))]
    return dataclasses.replace(hw, flops_efficiency=float(e), matmul_overhead=float(o))


def calibrate(
    path: str | os.PathLike | None = None,
    *,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    base: str | Hardware | None = None,
    name: str | None = None,
    comm: bool = True,
    progress: Progress | None = print,
) -> Calibration:
    """Measures the current backend and returns a `Calibration` whose ``.hardware`` the planner
    takes (``autopipe.plan(..., hardware=calibration.hardware)``); saves it to `path` (JSON) if
    given, which ``hardware=path`` then loads.

    Args:
      path: where to save the profile (JSON), or None.
      dtypes: matmul dtypes to measure.
      base: the `Hardware` (or preset name) whose capacity and unmeasured fields are kept;
        None = the preset of this platform.
      name: the profile's name; None = "<platform>-calibrated".
      comm: measure ppermute / all-reduce between the first devices (needs ≥ 2 devices).
      progress: called with one line per step (None = silent).
    """
    say = progress or (lambda _: None)
    started = time.perf_counter()
    dev = jax.devices()[0]
    hw = get_hardware(base, platform=dev.platform)
    say(f"autopipe.calibrate: {dev.platform} ({dev.device_kind}), {len(jax.devices())} devices")
    dispatch = _dispatch_floor()
    say(f"  dispatch floor {dispatch * 1e6:.1f} µs per call")
    steps: list[tuple[str, Callable[[], list[Measurement]]]] = [
        ("per-operator overhead", lambda: _overhead_benchmarks(dispatch)),
        (f"matmul throughput ({', '.join(dtypes)})", lambda: _matmul_benchmarks(dtypes, dispatch)),
        ("convolutions", lambda: _conv_benchmarks(dispatch)),
        ("memory bandwidth and transcendentals", lambda: _bandwidth_benchmarks(dispatch)),
        ("fusion of elementwise patterns", lambda: _fusion_benchmarks(dispatch)),
    ]
    n_comm = min(len(jax.devices()), 8)
    if comm and n_comm >= 2:
        steps.append(
            (f"ppermute / all-reduce over {n_comm} devices", lambda: _comm_benchmarks(n_comm))
        )
    ms: list[Measurement] = []
    for k, (what, run) in enumerate(steps, 1):
        t0 = time.perf_counter()
        ms += run()
        say(f"  [{k}/{len(steps)}] {what}: {time.perf_counter() - t0:.1f} s")
    hw = _fit_all(hw, [m for m in ms if not m.kind.startswith("comm:")])
    hw = _fit_links(ms, hw)
    memory = hw.memory_bytes if dev.platform != "cpu" else PRESETS["cpu"].memory_bytes
    hw = dataclasses.replace(
        hw,
        name=name or f"{dev.platform}-calibrated",
        memory_bytes=memory,
        copies_library_operands=dev.platform == "cpu",
        source=f"autopipe.calibrate on {dev.device_kind} ({platform.node()}), "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
    )
    result = Calibration(
        hardware=hw,
        dispatch_seconds=dispatch,
        measurements=tuple(ms),
        seconds=time.perf_counter() - started,
    )
    say(_summary(result))
    if path is not None:
        result.save(path)
        say(f"  saved to {os.fspath(path)}")
    return result


def _summary(c: Calibration) -> str:
    hw = c.hardware
    rates = ", ".join(f"{dt} {r / 1e9:.0f}" for dt, r in hw.flops_by_dtype)
    return (
        f"  fitted in {c.seconds:.1f} s: matmul peak GFLOP/s [{rates}] × efficiency "
        f"{hw.flops_efficiency:.2f} + {hw.matmul_overhead * 1e6:.1f} µs per matmul; bandwidth "
        f"{hw.memory_bandwidth / 1e9:.1f} GB/s × "
        f"{hw.bandwidth_efficiency:.2f}; overhead {hw.op_overhead * 1e6:.2f} µs/op; fusion "
        f"discount {hw.fusion_discount:.2f}; exp {hw.transcendental_time * 1e9:.2f} ns/elem; "
        f"link {hw.link_bandwidth / 1e9:.2f} GB/s, {hw.link_latency * 1e6:.1f} µs"
    )
