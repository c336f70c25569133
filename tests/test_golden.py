"""Behaviour is pinned: every golden plan's `to_json()` equals the file committed before the
driver layer was restructured (tests/golden_cases.py lists them and rewrites them)."""

from __future__ import annotations

import pytest

from golden_cases import GOLDEN, golden_plans

PLANS = golden_plans()


def test_every_golden_file_has_a_case():
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(PLANS)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_json_unchanged(name):
    assert PLANS[name]().to_json() + "\n" == (GOLDEN / f"{name}.json").read_text()
