"""The bench entry point runs (reduced) and writes its JSON and markdown."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

RUN = pathlib.Path(__file__).resolve().parent.parent / "bench" / "run.py"


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
