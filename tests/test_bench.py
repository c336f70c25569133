"""The bench entry point runs (reduced) and writes its JSON and markdown."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

RUN = pathlib.Path(__file__).resolve().parent.parent / "bench" / "run.py"
GPU_CHECK = RUN.parent / "gpu_check.py"


@pytest.mark.slow
def test_bench_quick_writes_json_and_markdown(tmp_path):
    names = ["dp_optimality", "schedules"]
    result = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(tmp_path), *names],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in names:
        saved = json.loads((tmp_path / f"{name}.json").read_text())
        assert saved["rows"] and saved["meta"]["quick"] is True
    dp = json.loads((tmp_path / "dp_optimality.json").read_text())["rows"]
    assert all(r["max_rel_gap"] < 1e-9 for r in dp)  # the DP is exact
    summary = (tmp_path / "summary.md").read_text()
    assert "### dp_optimality" in summary and "| schedule |" in summary


def test_bench_rejects_unknown_names(tmp_path):
    result = subprocess.run(
        [sys.executable, str(RUN), "--out", str(tmp_path), "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown benchmark" in result.stderr


def test_summary_keeps_every_benchmarks_latest_table(tmp_path):
    """A run of some benchmarks rewrites summary.md with every benchmark's latest results in
    the directory, each titled with its date (a script's rows-only JSON: undated)."""
    sys.path.insert(0, str(RUN.parent))
    import run

    meta = {"date": "2026-12-06", "quick": False, "seconds": 3.0}
    (tmp_path / "schedules.json").write_text(json.dumps({"meta": meta, "rows": [{"a": 1}]}))
    (tmp_path / "tied.json").write_text(json.dumps({"rows": [{"b": 2.5}]}))
    (tmp_path / "notes.json").write_text("{}")  # not a benchmark: left out
    text = run.summary(tmp_path)
    assert "### schedules, 2026-12-06 (3 s)" in text and "| 1 |" in text
    assert "### tied, undated" in text and "| 2.5 |" in text
    assert "notes" not in text and text.index("schedules") < text.index("tied")


def test_gpu_check_runs_on_cpu_and_its_plans_match_their_references(tmp_path):
    """The one-call accelerator check (`bench/gpu_check.py`) was written for a session that has a
    GPU for 15 minutes: it must not fail there on a bug this machine can find. Its small CPU
    version runs every check; the plans equal their references and read parameters in place."""
    result = subprocess.run(
        [sys.executable, str(GPU_CHECK), "--cpu", "--reps", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["check"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    assert set(rows) == {
        "forward pp=1",
        "forward pp=2",
        "training pp=2 1f1b m=4",
        "gpt train step pp=1",
        "gpt train step pp=1 m=8: per-tick cost",
        "calibration",
    }
    # jit and the plans are different XLA programs (fusions may round differently): the same
    # bound for both, far above float32 rounding of these O(1) outputs, far below a wrong result
    assert rows["forward pp=1"]["max_abs_err"] < 1e-5
    assert rows["forward pp=2"]["max_abs_err"] < 1e-5
    assert rows["training pp=2 1f1b m=4"]["max_abs_err"] < 1e-5
    assert not rows["forward pp=1"]["params_copied"] and not rows["forward pp=2"]["params_copied"]
    fitted = rows["calibration"]["fitted"]
    assert fitted["peak_flops"] > 0 and fitted["matmul_overhead"] >= 0
    tick = rows["gpt train step pp=1 m=8: per-tick cost"]
    assert tick["ticks"] == 16 and set(tick["action_s"]) == {"F0", "B0"}
