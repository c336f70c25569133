"""The ``autopipe`` command: ``autopipe plan`` plans a model for a cluster from shapes alone.

    autopipe plan --model gpt --size 175b --devices 1024 --hardware h100 --out plan-175b

prints the plan's summary, and writes ``plan.json`` (reload with ``autopipe.Plan.from_json``),
``schedule.png``, ``stages.png``, ``trace.json`` (Chrome trace) and ``summary.txt`` into
``--out``. Nothing is allocated or compiled: the model's parameters and inputs are
``jax.ShapeDtypeStruct``s, so a 175B model plans on a laptop.

Devices: autopipe plans pipeline stages only (tensor and data sharding inside a stage are not
planned yet). ``--pp auto`` (the default) takes the shallowest pipeline, among the divisors of
``--devices``, whose stages fit the device memory; the remaining ``devices / pp`` devices are
reported as data-parallel replicas that each run the same plan on their own batch of
``--batch`` examples. That throughput figure is an assumption, labelled as such: it ignores
the gradient all-reduce and optimizer state of training, which are not modelled yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import pathlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# GPT-3 family shapes (Brown et al. 2020, table 2.1). Where the paper's heads × head size does
# not equal d_model (1.3B, 13B), the heads (1.3B) or d_model (13B: 5140 → 5120) are adjusted
# to divide evenly.
GPT3_SIZES: dict[str, dict[str, int]] = {
    "125m": {"layers": 12, "d_model": 768, "heads": 12},
    "350m": {"layers": 24, "d_model": 1024, "heads": 16},
    "760m": {"layers": 24, "d_model": 1536, "heads": 16},
    "1.3b": {"layers": 24, "d_model": 2048, "heads": 16},
    "2.7b": {"layers": 32, "d_model": 2560, "heads": 32},
    "6.7b": {"layers": 32, "d_model": 4096, "heads": 32},
    "13b": {"layers": 40, "d_model": 5120, "heads": 40},
    "175b": {"layers": 96, "d_model": 12288, "heads": 96},
}
DTYPES = {
    "f32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "f16": "float16",
    "float16": "float16",
    "i32": "int32",
    "int32": "int32",
    "i64": "int64",
    "int64": "int64",
    "bool": "bool",
}
_DESCRIPTION = """\
Plans a model for a cluster from shapes alone: nothing is allocated or compiled, so GPT-3 175B
plans on a laptop in seconds. Prints the plan's summary and writes plan.json (reload with
autopipe.Plan.from_json), summary.txt, schedule.png, stages.png and trace.json (Chrome trace)
into --out.

Only pipeline stages are planned today. --pp auto picks the shallowest pipeline (a divisor of
--devices) whose stages fit the device memory; the other devices are reported as data-parallel
replicas running the same plan on their own --batch. That throughput is an assumption: the
gradient all-reduce and tensor/data sharding inside stages are not modelled yet.
"""
_EPILOG = """\
examples:
  # GPT-3 175B (bf16) for 1024 H100s: pipeline depth chosen to fit 80 GB, rest data-parallel
  autopipe plan --model gpt --size 175b --devices 1024 --hardware h100 --out plan-175b

  # an explicit GPT shape, 16 pipeline stages, 32 microbatches of a 64-sequence batch
  autopipe plan --model gpt --layers 96 --d-model 12288 --heads 96 --vocab 50257 \\
      --seq 2048 --batch 64 --devices 16 --pp 16 --microbatches 32

  # your own function: module:function plus one --input per argument (dtype[dims])
  autopipe plan --function mypkg.nets:forward --input f32[4096,4096] --input f32[64,4096] \\
      --batch-argnums 1 --devices 4

  # or a factory module:function that takes no arguments and returns (fn, example_args)
  autopipe plan --function mypkg.nets:make_example --devices 8
"""


class CliError(Exception):
    """A user error: printed as ``autopipe plan: error: ...`` with exit status 2."""


# --- arguments ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopipe",
        description="autopipe: automatic pipeline parallelism for JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "plan",
        help="plan a model for a device count and hardware preset (shapes only)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _what_arguments(p.add_argument_group("what to plan (a built-in model, or --function)"))
    _where_arguments(p.add_argument_group("where it runs"))
    out = p.add_argument_group("output")
    out.add_argument(
        "--out",
        default="autopipe-plan",
        help="directory for plan.json, summary.txt, schedule.png, stages.png, trace.json "
        "(default ./autopipe-plan)",
    )
    out.add_argument("--no-pictures", action="store_true", help="skip the PNG pictures")
    return parser


def _what_arguments(what: Any) -> None:
    what.add_argument(
        "--model",
        choices=("gpt", "scanned-gpt", "mlp"),
        default="gpt",
        help="built-in family: gpt (unrolled blocks), scanned-gpt (nn.scan over blocks), "
        "mlp (--layers Dense layers of width --d-model). Default: gpt.",
    )
    what.add_argument(
        "--size",
        choices=tuple(GPT3_SIZES),
        help="GPT-3 shape preset for --model gpt/scanned-gpt (layers, d-model, heads); "
        "explicit --layers/--d-model/--heads override it. Default: 125m shapes.",
    )
    what.add_argument("--layers", type=int, help="transformer blocks (or MLP layers)")
    what.add_argument("--d-model", type=int, help="model width")
    what.add_argument("--heads", type=int, help="attention heads (must divide --d-model)")
    what.add_argument("--vocab", type=int, default=50257, help="vocabulary (default 50257)")
    what.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    what.add_argument("--mlp-ratio", type=int, default=4, help="MLP width / d-model (default 4)")
    what.add_argument(
        "--dtype",
        choices=("bfloat16", "float32", "float16"),
        default="bfloat16",
        help="parameter and compute dtype of the built-in models (default bfloat16)",
    )
    what.add_argument(
        "--function",
        metavar="MODULE:FUNCTION",
        help="plan your own function instead of a built-in model; with --input it is the "
        "function itself, without --input it is called with no arguments and must return "
        "(fn, example_args) with arrays or jax.ShapeDtypeStructs. The current directory is "
        "importable.",
    )
    what.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="DTYPE[DIMS]",
        help="abstract shape of one argument of --function, e.g. f32[64,1024] or "
        "bfloat16[8,2048]; repeat once per argument, in order",
    )
    what.add_argument(
        "--batch-argnums",
        default="1",
        help="comma-separated argument positions whose leading axis is the batch "
        "(default 1: fn(params, batch)); built-in models ignore it",
    )
    what.add_argument(
        "--batch",
        type=int,
        default=8,
        help="batch per replica for built-in models (default 8)",
    )


def _where_arguments(where: Any) -> None:
    where.add_argument("--devices", type=int, default=8, help="total devices (default 8)")
    where.add_argument(
        "--pp",
        default="auto",
        help="pipeline stages, a divisor of --devices; 'auto' (default) = the fewest stages "
        "whose memory fits, the other devices counted as data-parallel replicas",
    )
    where.add_argument(
        "--microbatches",
        type=int,
        help="microbatches per batch (default: the count whose plan predicts the fastest step)",
    )
    where.add_argument(
        "--hardware",
        default="h100",
        help="hardware preset (see autopipe.PRESETS, e.g. h100, v100, cpu) or the path of a "
        "saved hardware profile JSON (default h100)",
    )
    where.add_argument(
        "--memory-limit",
        help="bytes per device for the stage search, e.g. 64GB or 40GiB (default: the "
        "hardware's memory)",
    )


def parse_shape(spec: str) -> Any:
    """``"f32[64,1024]"`` → ``jax.ShapeDtypeStruct((64, 1024), float32)``."""
    import jax
    import jax.numpy as jnp

    match = re.fullmatch(r"\s*(\w+)\s*\[\s*([\d,\s]*)\]\s*", spec)
    if not match or match.group(1).lower() not in DTYPES:
        raise CliError(
            f"--input {spec!r}: expected DTYPE[DIMS] such as f32[64,1024] or bf16[8,2048], "
            f"with DTYPE one of {sorted(set(DTYPES))}."
        )
    dims = tuple(int(d) for d in match.group(2).replace(" ", "").split(",") if d)
    return jax.ShapeDtypeStruct(dims, jnp.dtype(DTYPES[match.group(1).lower()]))


def parse_bytes(text: str) -> float:
    """``"64GB"`` → 64e9, ``"40GiB"`` → 40·2³⁰, ``"1e9"`` → 1e9."""
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    match = re.fullmatch(r"\s*([\d.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise CliError(f"--memory-limit {text!r}: expected a size such as 64GB, 40GiB or 8e10.")
    return float(match.group(1)) * units[match.group(2).lower()]


# --- what to plan ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    """A function and abstract example arguments to plan, with a name for the report."""

    name: str
    fn: Callable
    args: tuple
    batch_argnums: tuple[int, ...]
    tokens_per_example: int = 1  # for a tokens/s figure (sequence length of GPT models)


def builtin_target(args: argparse.Namespace) -> Target:
    import jax
    import jax.numpy as jnp

    from autopipe import models

    if args.model == "mlp":
        layers, width = args.layers or 8, args.d_model or 1024
        dtype = jnp.dtype(args.dtype)
        model = models.LinenMLP(features=(width,) * layers)
        x = jax.ShapeDtypeStruct((args.batch, width), jnp.float32)
        variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
        variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, dtype), variables)
        return Target(
            name=f"mlp {layers}x{width}", fn=model.apply, args=(variables, x), batch_argnums=(1,)
        )
    shape = dict(GPT3_SIZES[args.size or "125m"])
    for key in ("layers", "d_model", "heads"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    try:
        cfg = models.GPTConfig(
            vocab=args.vocab,
            seq=args.seq,
            mlp_ratio=args.mlp_ratio,
            dtype=jnp.dtype(args.dtype),
            **shape,
        )
    except ValueError as e:
        raise CliError(f"{e}; choose --heads dividing --d-model.") from None
    cls = models.ScannedLinenGPT if args.model == "scanned-gpt" else models.LinenGPT
    model = cls(cfg)
    tokens = jax.ShapeDtypeStruct((args.batch, cfg.seq), jnp.int32)
    variables = models.abstract_linen(model, tokens)
    label = f"{args.model} {args.size or 'custom'} ({cfg.layers}x{cfg.d_model}, {args.dtype})"
    return Target(
        name=label,
        fn=model.apply,
        args=(variables, tokens),
        batch_argnums=(1,),
        tokens_per_example=cfg.seq,
    )


def function_target(args: argparse.Namespace) -> Target:
    module_name, sep, attr = args.function.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--function {args.function!r}: expected MODULE:FUNCTION, e.g. pkg.mod:fn")
    if "" not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: the current directory is importable
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise CliError(f"--function {args.function!r}: cannot import {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"--function {args.function!r}: {module_name} has no {attr!r}.")
        obj = getattr(obj, part)
    batch_argnums = _parse_ints(args.batch_argnums, "--batch-argnums")
    if args.input:
        example = tuple(parse_shape(s) for s in args.input)
        return Target(name=args.function, fn=obj, args=example, batch_argnums=batch_argnums)
    made = obj()
    if not (isinstance(made, tuple) and len(made) == 2 and callable(made[0])):
        raise CliError(
            f"--function {args.function!r} was given no --input, so it must be a factory "
            f"returning (fn, example_args); it returned {type(made).__name__}. Pass one "
            "--input DTYPE[DIMS] per argument to plan the function itself."
        )
    fn, example = made
    return Target(name=args.function, fn=fn, args=tuple(example), batch_argnums=batch_argnums)


def _parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CliError(f"{option} {text!r}: expected comma-separated integers.") from None


# --- planning -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chosen:
    plan: Any
    pp: int
    replicas: int
    tried: tuple[tuple[int, str], ...]  # (pp, why it was rejected)


def param_bytes(target: Target) -> int:
    import jax
    import numpy as np

    leaves = [
        x
        for k, a in enumerate(target.args)
        if k not in target.batch_argnums
        for x in jax.tree.leaves(a)
    ]
    return int(sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in leaves))


def pipeline_depths(devices: int, pp: str, min_stages: int) -> list[int]:
    """Candidate pipeline depths, shallowest first."""
    divisors = [d for d in range(1, devices + 1) if devices % d == 0]
    if pp != "auto":
        try:
            depth = int(pp)
        except ValueError:
            raise CliError(f"--pp {pp!r}: expected 'auto' or a number of stages.") from None
        if depth < 1 or devices % depth:
            raise CliError(
                f"--pp {depth} does not divide --devices {devices}; the devices are "
                f"pp × data-parallel replicas. Divisors of {devices}: {divisors}."
            )
        return [depth]
    return [d for d in divisors if d >= min_stages]


def choose_plan(target: Target, args: argparse.Namespace, hardware: Any) -> Chosen:
    import autopipe

    limit = parse_bytes(args.memory_limit) if args.memory_limit else hardware.memory_bytes
    lower = math.ceil(param_bytes(target) / limit) if limit > 0 else 1
    tried: list[tuple[int, str]] = []
    for pp in pipeline_depths(args.devices, args.pp, lower):
        try:
            plan = autopipe.plan(
                target.fn,
                *target.args,
                mesh={"pp": pp},
                num_microbatches=args.microbatches,
                batch_argnums=target.batch_argnums,
                hardware=hardware,
                memory_limit=limit,
            )
        except autopipe.PlanInfeasible as e:
            if args.pp == "auto":
                tried.append((pp, "does not fit memory"))
                continue
            raise CliError(str(e)) from None
        except ValueError as e:
            raise CliError(str(e)) from None
        return Chosen(plan=plan, pp=pp, replicas=args.devices // pp, tried=tuple(tried))
    why = (
        f"tried {[pp for pp, _ in tried]}"
        if tried
        else f"its parameters alone need at least {lower} devices"
    )
    raise CliError(
        f"{target.name} does not fit {args.devices} devices of {hardware.name} "
        f"({limit / 1e9:.1f} GB each) as a pipeline of any depth dividing {args.devices}: "
        f"{why}. Use more devices, a larger --memory-limit, or a smaller --batch."
    )


def report(target: Target, chosen: Chosen, batch: int) -> str:
    plan, pp, dp = chosen.plan, chosen.pp, chosen.replicas
    step = plan.predicted.step_time
    per_replica = batch / step if step > 0 else math.inf
    lines = [
        plan.summary(),
        "",
        f"devices: {pp * dp} = {pp} pipeline stages × {dp} data-parallel replica"
        f"{'s' if dp != 1 else ''}",
    ]
    if chosen.tried:
        lines.append(
            "  (pipeline depth chosen: shallowest that fits memory; rejected "
            + ", ".join(f"pp={p}: {why}" for p, why in chosen.tried)
            + ")"
        )
    throughput = f"{dp * per_replica:,.1f} examples/s"
    if target.tokens_per_example > 1:
        throughput += f" ({dp * per_replica * target.tokens_per_example:,.0f} tokens/s)"
    lines.append(
        f"predicted forward throughput: {dp} × {batch} examples / {step:.4g} s = {throughput}"
    )
    if dp > 1:
        lines.append(
            "  assumption: replicas run the same plan on their own batch, independently; "
            "tensor/data sharding inside stages is not planned yet and the gradient all-reduce "
            "of training is not priced."
        )
    return "\n".join(lines)


def write_outputs(chosen: Chosen, text: str, out: pathlib.Path, pictures: bool) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    plan = chosen.plan
    (out / "plan.json").write_text(plan.to_json())
    (out / "summary.txt").write_text(text + "\n")
    plan.save_chrome_trace(out / "trace.json")
    written = ["plan.json", "summary.txt", "trace.json"]
    if pictures:
        plan.plot_schedule(out / "schedule.png")
        plan.plot_stages(out / "stages.png")
        written += ["schedule.png", "stages.png"]
    return [str(out / name) for name in written]


def cli_hardware(text: str) -> Any:
    """``--hardware``: a preset name or the path of a saved profile (public API only)."""
    import autopipe

    if text in autopipe.PRESETS:
        return autopipe.PRESETS[text]
    if text.endswith(".json") or pathlib.Path(text).exists():
        try:
            return autopipe.load_hardware(text)
        except (ValueError, OSError, TypeError) as e:
            raise CliError(f"--hardware {text!r}: {e}") from None
    raise CliError(
        f"--hardware {text!r} is not a preset; choose one of {sorted(autopipe.PRESETS)}, or "
        "the path of a profile saved by autopipe.calibrate()."
    )


def plan_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.devices < 1:
        raise CliError(f"--devices {args.devices}: need at least 1 device.")
    hardware = cli_hardware(args.hardware)
    target = function_target(args) if args.function else builtin_target(args)
    chosen = choose_plan(target, args, hardware)
    batch = chosen.plan.traced.batch_size
    text = report(target, chosen, batch)
    print(text, flush=True)
    files = write_outputs(chosen, text, pathlib.Path(args.out), not args.no_pictures)
    print(f"wrote {', '.join(files)} ({time.perf_counter() - started:.1f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            return plan_command(args)
    except CliError as e:
        parser.exit(2, f"autopipe {args.command}: error: {e}\n")
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
