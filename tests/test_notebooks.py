"""The research notebooks in examples/ run top to bottom (executed with nbclient)."""

from __future__ import annotations

import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def test_there_are_notebooks():
    names = {p.name for p in NOTEBOOKS}
    assert {
        "plan_175b_on_a_laptop.ipynb",
        "schedules_compared.ipynb",
        "generation.ipynb",
    } <= names


_SLOW_BOOKS = {"plan_175b_on_a_laptop", "generation"}


@pytest.mark.parametrize(
    "path",
    [
        # the 175B planning is also run by tests/test_cli.py::test_gpt3_175b_on_1024_h100, and
        # generation by tests/test_readme.py::test_generation_example_runs_and_matches_one_device
        pytest.param(p, marks=pytest.mark.slow) if p.stem in _SLOW_BOOKS else p
        for p in NOTEBOOKS
    ],
    ids=lambda p: p.stem,
)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # Jupyter's own settings: its platformdirs paths (no deprecation warning), a private
    # runtime dir for connection files, and no IPython history database.
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o
        for c in book.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "error"
    ]
    assert not errors
    images = [
        o for c in book.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 2  # the pictures were drawn and shown
