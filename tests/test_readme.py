"""The README's examples run as written (the front door must stay true)."""

from __future__ import annotations

import pathlib
import re

import numpy as np

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
