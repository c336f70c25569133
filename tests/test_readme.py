"""The README's examples run as written (the front door must stay true)."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_and_training_examples_run():
    quickstart, training = _blocks()[:2]
    namespace: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    logits, model = namespace["logits"], namespace["model"]
    reference = model.apply(namespace["variables"], namespace["tokens"])
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
    exec(compile(training, "README training", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))


@pytest.mark.slow  # the calibration measures every operator: ~1 min
def test_calibration_example_runs(tmp_path, monkeypatch):
    quickstart, _, calibration = _blocks()[:3]
    namespace: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    monkeypatch.chdir(tmp_path)  # the calibration example writes its profile to the cwd
    exec(compile(calibration, "README calibration", "exec"), namespace)
    assert (tmp_path / "cpu-profile.json").exists()
    assert len(namespace["plan"].profile(namespace["variables"], namespace["tokens"])) == 8


@pytest.mark.slow  # ~40 s: plans and runs a 3D mesh, then plans 64 devices
def test_3d_example_runs():
    blocks = _blocks()
    quickstart, example = blocks[0], next(b for b in blocks if "mesh3d" in b)
    namespace: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    exec(compile(example, "README 3D", "exec"), namespace)
    reference = namespace["model"].apply(namespace["variables"], namespace["tokens"])
    np.testing.assert_allclose(namespace["logits"], reference, rtol=1e-5, atol=1e-5)
    assert np.prod([k for _, k in namespace["big"].mesh_axes]) == 64


def test_staged_example_runs():
    blocks = _blocks()
    quickstart, example = blocks[0], next(b for b in blocks if "autopipe.trace(" in b)
    namespace: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    exec(compile(example, "README staged", "exec"), namespace)
    np.testing.assert_allclose(
        namespace["logits"],
        namespace["plan"](namespace["variables"], namespace["tokens"]),
        rtol=1e-6,
        atol=1e-6,
    )
    assert namespace["planned"].to_json() == namespace["plan"].to_json()


def test_generation_example_runs_and_matches_one_device():
    from test_generate import reference

    example = next(b for b in _blocks() if "autopipe.plan_generation(" in b)
    namespace: dict = {}
    exec(compile(example, "README generation", "exec"), namespace)
    ns = namespace
    want, count = reference(ns["step"], ns["params"], ns["cache"], ns["prompts"].astype(np.int32),
                            ns["lengths"], 16)  # fmt: skip
    np.testing.assert_array_equal(ns["out"].tokens, want)
    np.testing.assert_array_equal(ns["out"].lengths, count)
    assert ns["sampled"].tokens.shape == (8, 16)
    assert sorted(ns["completions"]) == list(range(12))
    assert [len(ns["completions"][i]) for i in range(3)] == [5, 20, 2]  # no end token given
