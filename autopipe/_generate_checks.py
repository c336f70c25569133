"""Checks of `autopipe.plan_generation`'s arguments: mesh axes, batch, request groups and
cache length, each a clear error naming the numbers and the fix."""

from __future__ import annotations


def check_axes(
    axes: dict, pipeline_axis: str, data_axis: str, tensor_axis: str, fn_name: str
) -> None:
    named = (pipeline_axis, data_axis, tensor_axis)
    other = {n: k for n, k in axes.items() if n not in named and k > 1}
    if other:
        raise ValueError(
            f"{fn_name}: generation runs over a pipeline axis ({pipeline_axis!r}), a data axis "
            f"({data_axis!r}) and a tensor axis ({tensor_axis!r}); the mesh also has {other}. "
            "Name those axes with pipeline_axis=/data_axis=/tensor_axis=, or use a mesh "
            "without them."
        )


def batch_of(leaves: list, fn_name: str) -> int:
    sizes = {int(x.shape[0]) if len(x.shape) else None for x in leaves}
    if not leaves or len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{fn_name}: every cache leaf must have the batch on its leading axis, the same for "
            f"all; got leading sizes {sorted(map(str, sizes))}."
        )
    return sizes.pop()


def groups(num_groups: int | None, batch: int, dp: int, p: int, fn_name: str) -> int:
    g = p if num_groups is None else int(num_groups)
    if batch % dp or (batch // dp) % g or g < 1:
        local = batch // dp if batch % dp == 0 else 0
        fits = [k for k in range(1, local + 1) if local % k == 0]
        raise ValueError(
            f"{fn_name}: the batch of {batch} rows over {dp} data replica(s) cannot be split "
            f"into {g} request groups of equal size (num_groups={num_groups}, {p} stages). "
            f"Use num_groups in {fits} (≥ {p} keeps every stage busy), or a batch that is a "
            f"multiple of {dp * g}."
        )
    return g


def cache_length_of(leaves: list, given: int | None, fn_name: str) -> int:
    if given is not None:
        return int(given)
    lengths = {int(x.shape[1]) for x in leaves if len(x.shape) >= 2}
    if len(lengths) != 1:
        raise ValueError(
            f"{fn_name}: cannot tell the cache length from the cache leaves (axis 1 sizes "
            f"{sorted(lengths)}); pass cache_length=... (positions the cache holds)."
        )
    return lengths.pop()
