"""autopipe benchmarks: ``python bench/run.py [name ...] [--quick] [--gpu]``.

Each benchmark returns rows (dicts); the runner prints a markdown table per benchmark, each
metric beside its target or ideal, writes ``bench/results/<name>.json`` and the latest tables
of every benchmark to ``bench/results/summary.md``. The whole suite takes about 10 minutes on
a 2-core CPU machine; ``--quick`` runs a reduced version of each (for the tests). ``--gpu``
runs the same suite on the GPUs JAX sees (CPU-only benchmarks say they were skipped).
``--pages small`` keeps glibc's 4 KB pages for XLA:CPU's per-call temp buffers (default: huge
pages for every process of the run; see `huge_pages`).

Benchmarks live in ``bench/_planning.py`` (planner only: planning time, DP optimality, plan
quality, schedules) and ``bench/_runtime.py`` (compiled plans: parameter bytes, activation
memory per schedule, pp = 1 overhead, measured CPU pipeline speedup). ``bench/cost_model.py``,
when present, adds the cost-model fidelity rows (``run(args) -> list[dict]``).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name -> (module in bench/, function); imported only when the benchmark runs
BENCHMARKS: dict[str, tuple[str, str]] = {
    "planning_time": ("_planning", "planning_time"),
    "dp_optimality": ("_planning", "dp_optimality"),
    "plan_quality": ("_planning", "plan_quality"),
    "schedules": ("_planning", "schedules"),
    "pictures": ("_planning", "pictures"),
    "param_bytes": ("_runtime", "param_bytes"),
    "activation_memory": ("_runtime", "activation_memory"),
    "runtime_overhead": ("_runtime", "runtime_overhead"),
    "pipeline_speedup": ("_runtime", "pipeline_speedup"),
    "training_speedup": ("_runtime", "training_speedup"),
    "training": ("training", "run"),
    "training_tensor": ("training", "tensor_axis"),
    "tied": ("tied", "run"),
    "cost_model": ("cost_model", "run"),
    "parallel": ("parallel", "run"),
    "microbatches": ("microbatches", "run"),
}


def load(name: str) -> Callable[[argparse.Namespace], list[dict]]:
    module, fn = BENCHMARKS[name]
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return getattr(importlib.import_module(module), fn)


def markdown(name: str, rows: list[dict], seconds: float | None = None) -> str:
    """One table per run of consecutive rows with the same columns."""
    took = f" ({seconds:.0f} s)" if seconds is not None else ""
    if not rows:
        return f"### {name}{took}\n\n(no rows)\n"
    lines = [f"### {name}{took}"]
    for cols, group in itertools.groupby(rows, key=lambda r: tuple(r)):
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in group]
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default all: {', '.join(BENCHMARKS)})"
    )
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per measurement")
    parser.add_argument("--quick", action="store_true", help="reduced sizes (for tests)")
    parser.add_argument("--gpu", action="store_true", help="run on the GPUs JAX sees")
    parser.add_argument(
        "--pages",
        choices=("huge", "small"),
        default="huge",
        help="huge (default): run with glibc's transparent-huge-page tunable (see huge_pages)",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=RESULTS, help="results directory (bench/results)"
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    return args


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_pages(args: argparse.Namespace) -> None:
    """Re-executes this runner with glibc's transparent-huge-page tunable, unless ``--pages
    small`` or it is already set; every worker process inherits it, baselines and plans alike.

    Why: XLA:CPU allocates a call's temp buffers afresh on every call, and glibc maps an
    allocation over 32 MB with ``mmap`` and unmaps it on free, so every call faults its whole
    temp back in, one 4 KB page at a time, each zeroed by the kernel. Measured (2026-12-07,
    GPT 8×256 seq 64 batch 32, SGD, m 8, pp 4 on one core, 46–70 MB temp per device): 44 k
    and 67 k faults per step, i.e. all of the temp, costing 1f1b 628 → 599 ms and gpipe
    784 → 597 ms. That is a host allocator's cost, largest for the schedules that hold most
    (GPipe), not the executor's; XLA:GPU/TPU allocate from a pool."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if args.pages == "small" or HUGE_PAGES in tunables or not sys.platform.startswith("linux"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, HUGE_PAGES))))
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _pages() -> str:
    """The page policy this process runs under, and the kernel's THP mode."""
    try:
        thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "?"
    huge = HUGE_PAGES in os.environ.get("GLIBC_TUNABLES", "")
    return f"{'huge' if huge else 'small'} (THP: {thp})"


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Runs the benchmarks ``args`` names (all by default) and writes their results."""
    import jax

    if args.gpu:
        if not any(d.platform == "gpu" for d in jax.devices()):
            raise SystemExit("--gpu: JAX sees no GPU (install jax[cuda12] on a GPU machine).")
    else:
        jax.config.update("jax_num_cpu_devices", 8)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "machine": platform.machine(),
        "backend": jax.default_backend() if args.gpu else "cpu",
        "devices": str(jax.devices("gpu" if args.gpu else "cpu")[0].device_kind),
        "quick": args.quick,
        "pages": _pages(),
        "date": time.strftime("%F"),
    }
    for name in args.names or list(BENCHMARKS):
        started = time.perf_counter()
        rows = load(name)(args)
        seconds = time.perf_counter() - started
        payload = {"meta": meta | {"seconds": round(seconds, 1)}, "rows": rows}
        (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))
        print(markdown(name, rows, seconds), flush=True)
    (args.out / "summary.md").write_text(summary(args.out))


def summary(out: pathlib.Path) -> str:
    """The tables of every benchmark with results in ``out``, each from its latest run (a run
    of some benchmarks keeps the others' tables), with the date it ran."""
    tables = []
    for name in BENCHMARKS:
        path = out / f"{name}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            meta = saved.get("meta", {})  # a bench script run by itself writes rows only
            title = f"{name}, {meta.get('date', 'undated')}" + " --quick" * bool(meta.get("quick"))
            title += f", pages {meta['pages']}" if "pages" in meta else ""
            tables.append(markdown(title, saved.get("rows", []), meta.get("seconds")))
    return "\n".join(tables)


if __name__ == "__main__":
    parsed = parse_args(None)
    huge_pages(parsed)
    run(parsed)
