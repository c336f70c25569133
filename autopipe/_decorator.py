"""`@autopipe.parallelize`: plan on first call per argument signature, then run the plan."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from autopipe._api import plan
from autopipe._planned import Plan


def parallelize(fn: Callable | None = None, **options: Any) -> Callable:
    """Decorator: ``@autopipe.parallelize(mesh=mesh, num_microbatches=4)``.

    The decorated function plans on first call for each argument structure/shapes/dtypes
    (cached) and runs the plan; ``decorated.plan(*args)`` returns that `Plan`.
    """
    if fn is None:
        return functools.partial(parallelize, **options)
    cache: dict[Any, Plan] = {}

    def plan_for(*args: Any) -> Plan:
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", ""))) for x in leaves))
        if key not in cache:
            cache[key] = plan(fn, *args, **options)
        return cache[key]

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        return plan_for(*args)(*args)

    wrapper.plan = plan_for
    return wrapper
