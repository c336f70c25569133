"""`autopipe plan` from the command line, run as a user would: in a subprocess."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from autopipe import _cli


def _run(*argv: str, cwd=None, script: bool = False) -> subprocess.CompletedProcess:
    exe = shutil.which("autopipe") if script else None
    cmd = [exe, *argv] if exe else [sys.executable, "-m", "autopipe", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_explains_every_option_with_examples():
    result = _run("plan", "--help", script=True)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for action in _cli.build_parser()._subparsers._group_actions[0].choices["plan"]._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help, f"{action.option_strings} has no help"
    assert "examples:" in text and "--size 175b --devices 1024" in text
    assert _run("--help").returncode == 0  # python -m autopipe (autopipe/__main__.py)


@pytest.mark.slow  # 175B planning also runs in test_golden (fwd-gpt3_175b-pp16-h100)
def test_gpt3_175b_on_1024_h100(tmp_path):
    out = tmp_path / "plan"
    result = _run(
        "plan", "--model", "gpt", "--size", "175b", "--devices", "1024", "--hardware", "h100",
        "--out", str(out), script=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = re.search(r"1024 = (\d+) pipeline stages × (\d+) data-parallel", result.stdout)
    pp, dp = int(found.group(1)), int(found.group(2))
    assert pp * dp == 1024 and pp >= 8  # 350 GB of bf16 parameters need >= 5 x 80 GB
    assert "assumption" in result.stdout and "tokens/s" in result.stdout
    saved = json.loads((out / "plan.json").read_text())
    assert saved["mesh_axes"] == [["pp", pp]] and len(saved["stages"]) == pp
    assert saved["hardware"]["name"] == "h100"
    assert all(s["memory"] <= 80e9 for s in saved["stages"])
    for name in ("schedule.png", "stages.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    trace = json.loads((out / "trace.json").read_text())
    assert sum(e["ph"] == "X" for e in trace["traceEvents"]) == pp * saved["num_microbatches"]
    assert (out / "summary.txt").read_text().startswith("autopipe plan for")


def test_explicit_pp_and_shape_options(tmp_path):
    result = _run(
        "plan", "--layers", "4", "--d-model", "64", "--heads", "2", "--vocab", "256",
        "--seq", "16", "--batch", "8", "--dtype", "float32", "--devices", "8", "--pp", "4",
        "--microbatches", "4", "--hardware", "cpu", "--out", str(tmp_path), "--no-pictures",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["mesh_axes"] == [["pp", 4]] and saved["num_microbatches"] == 4
    assert "8 = 4 pipeline stages × 2 data-parallel replicas" in result.stdout
    assert not (tmp_path / "schedule.png").exists()


def test_user_function_with_input_shapes_and_factory(tmp_path):
    (tmp_path / "usernet.py").write_text(
        textwrap.dedent(
            """
            import jax
            import jax.numpy as jnp

            def forward(w, x):
                for _ in range(6):
                    x = jnp.tanh(x @ w)
                return x

            def make():
                w = jax.ShapeDtypeStruct((32, 32), jnp.float32)
                return forward, (w, jax.ShapeDtypeStruct((16, 32), jnp.float32))
            """
        )
    )
    common = ("--devices", "2", "--hardware", "cpu", "--no-pictures")
    result = _run(
        "plan", "--function", "usernet:forward", "--input", "f32[32,32]", "--input",
        "f32[16,32]", "--out", str(tmp_path / "a"), *common, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "forward" in result.stdout
    result = _run("plan", "--function", "usernet:make", "--out", "b", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert saved["function"].endswith("forward") and saved["mesh_axes"] == [["pp", 1]]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pp", "3", "--devices", "8"], r"--pp 3 does not divide --devices 8"),
        (["--d-model", "100", "--heads", "3"], r"not divisible by heads"),
        (["--function", "nope"], r"expected MODULE:FUNCTION"),
        (["--function", "json:dumps", "--input", "f32(3)"], r"expected DTYPE\[DIMS\]"),
        (["--memory-limit", "lots"], r"expected a size"),
        (["--hardware", "tpu9"], r"not a preset"),
        (["--size", "175b", "--devices", "2"], r"does not fit 2 devices"),
    ],
)
def test_user_errors_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(["plan", *argv, "--no-pictures", "--out", "/nonexistent/never-written"])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_parsers():
    assert _cli.parse_bytes("64GB") == 64e9 and _cli.parse_bytes("1GiB") == 2**30
    s = _cli.parse_shape("bf16[8, 2048]")
    assert s.shape == (8, 2048) and str(s.dtype) == "bfloat16"
    assert _cli.pipeline_depths(1024, "auto", 5)[:3] == [8, 16, 32]
