"""The generic choice problem behind the sharding pass: pick one choice per node minimising
Σ unary[n][c_n] + Σ pairwise[a, b][c_a, c_b], exactly.

`solve_choices` eliminates nodes of degree ≤ 2 (min-sum variable elimination), enumerates a
small remainder and hands a larger one to ``scipy.optimize.milp`` as a 0/1 program. Nothing
here knows about operators or shardings (`passes.sharding` builds the costs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.optimize
import scipy.sparse

_MAX_ELIMINATION_TABLE = 64  # largest |choices(p)| x |choices(q)| a degree-2 elimination builds
_MAX_ENUMERATION = 4096  # a core with at most this many joint choices is enumerated, not a MILP


def choice_cost(
    unary: Sequence[Sequence[float]],
    pairwise: Mapping[tuple[int, int], Any],
    choice: Sequence[int],
) -> float:
    """Σ_n unary[n][c_n] + Σ_(a,b) pairwise[a, b][c_a, c_b]."""
    total = sum(float(u[c]) for u, c in zip(unary, choice, strict=True))
    return total + sum(float(np.asarray(m)[choice[a], choice[b]]) for (a, b), m in pairwise.items())


def solve_choices(
    unary: Sequence[Sequence[float]],
    pairwise: Mapping[tuple[int, int], Any],
    *,
    presolve: bool = True,
) -> tuple[tuple[int, ...], float]:
    """One choice per node minimising `choice_cost`; returns (choices, cost).

    ``unary[n][c]`` is node n's cost for choice c; ``pairwise[a, b][c_a, c_b]`` an edge's cost.
    With `presolve`, nodes of degree ≤ 2 (or with one choice) are eliminated exactly first and
    a small remainder is enumerated; otherwise the remainder is a 0/1 program (`_milp`). Ties go
    to lower choice indices as far as elimination and enumeration decide them.
    """
    u = [np.asarray(c, dtype=float).copy() for c in unary]
    pair: dict[tuple[int, int], np.ndarray] = {}
    for (a, b), m in pairwise.items():
        m = np.asarray(m, dtype=float)
        key, m = ((a, b), m) if a < b else ((b, a), m.T)
        assert a != b and m.shape == (len(u[key[0]]), len(u[key[1]])), (a, b, m.shape)
        pair[key] = pair[key] + m if key in pair else m
    adj: dict[int, set[int]] = {n: set() for n in range(len(u))}
    for a, b in pair:
        adj[a].add(b)
        adj[b].add(a)
    steps = _eliminate(u, pair, adj) if presolve else []
    core = sorted(adj)
    small = presolve and np.prod([len(u[n]) for n in core], dtype=float) <= _MAX_ENUMERATION
    choice = (_enumerate if small else _milp)(u, pair, core)
    for n, nbrs, arg in reversed(steps):
        choice[n] = int(arg[tuple(choice[p] for p in nbrs)])
    result = tuple(choice[n] for n in range(len(u)))
    return result, choice_cost(unary, pairwise, result)


def _oriented(pair: dict, n: int, p: int) -> np.ndarray:
    """The edge matrix between n and p indexed [choice of n, choice of p]."""
    return pair[n, p] if n < p else pair[p, n].T


def _eliminate(u: list, pair: dict, adj: dict) -> list[tuple[int, tuple[int, ...], np.ndarray]]:
    """Min-sum variable elimination of nodes with one choice or degree ≤ 2, in place.

    Each step (n, neighbours, arg) records n's best choice per choice of its neighbours:
    # arg[c_p, c_q] = argmin_i u[n][i] + M[n,p][i, c_p] + M[n,q][i, c_q]
    """
    steps, changed = [], True
    while changed:
        changed = False
        for n in sorted(adj):
            nbrs = tuple(sorted(adj[n]))
            if len(u[n]) == 1:
                for p in nbrs:
                    u[p] += _oriented(pair, p, n)[:, 0]
                nbrs, table = (), u[n]
            elif len(nbrs) > 2 or np.prod([len(u[p]) for p in nbrs]) > _MAX_ELIMINATION_TABLE:
                continue
            else:
                table = u[n].reshape(-1, *[1] * len(nbrs))
                for k, p in enumerate(nbrs):
                    shape = [len(u[n])] + [1] * len(nbrs)
                    shape[k + 1] = len(u[p])
                    table = table + _oriented(pair, n, p).reshape(shape)
            best, arg = table.min(axis=0), table.argmin(axis=0)
            if len(nbrs) == 1:
                u[nbrs[0]] += best
            elif len(nbrs) == 2:
                p, q = nbrs
                pair[p, q] = pair[p, q] + best if (p, q) in pair else best
                adj[p].add(q)
                adj[q].add(p)
            for p in adj.pop(n):
                adj[p].discard(n)
                pair.pop((min(n, p), max(n, p)))
            steps.append((n, nbrs, np.asarray(arg)))
            changed = True
    return steps


def _enumerate(u: list, pair: dict, nodes: list[int]) -> dict[int, int]:
    """The remaining problem by evaluating every joint choice (cheaper than a MILP when small).
    # total[c_0, c_1, ...] = Σ_n u[n][c_n] + Σ_(a,b) M[a,b][c_a, c_b]"""
    pos = {n: k for k, n in enumerate(nodes)}
    total = np.zeros([len(u[n]) for n in nodes])
    for n in nodes:
        total = total + u[n].reshape([-1 if k == pos[n] else 1 for k in range(len(nodes))])
    for (a, b), m in pair.items():
        shape = [1] * len(nodes)
        shape[pos[a]], shape[pos[b]] = m.shape
        total = total + m.reshape(shape)
    best = np.unravel_index(int(np.argmin(total)), total.shape) if nodes else ()
    return {n: int(c) for n, c in zip(nodes, best, strict=True)}


def _milp(u: list, pair: dict, nodes: list[int]) -> dict[int, int]:
    """The remaining problem as a 0/1 program: x[n, c] = node n takes choice c; y[e, i, j] = edge
    e takes (i, j), tied to x by its marginals (Σ_j y[e, i, j] = x[a, i], Σ_i y = x[b, j]), which
    makes y the product of the x's for integral x, so y may stay continuous."""
    if not pair:
        return {n: int(np.argmin(u[n])) for n in nodes}
    start, size = {}, 0
    for n in nodes:
        start[n], size = size, size + len(u[n])
    num_x, edges = size, sorted(pair.items())
    rows, cols, row = [], [], 0
    for n in nodes:  # Σ_c x[n, c] = 1
        rows += [row] * len(u[n])
        cols += range(start[n], start[n] + len(u[n]))
        row += 1
    equal_one = row
    vals = [1.0] * len(rows)
    for (a, b), m in edges:
        grid = size + np.arange(m.size).reshape(m.shape)
        size += m.size
        for n, lines in ((a, grid), (b, grid.T)):
            for i, line in enumerate(lines):  # Σ y[line] - x[n, i] = 0
                rows += [row] * (len(line) + 1)
                cols += [*line.tolist(), start[n] + i]
                vals += [1.0] * len(line) + [-1.0]
                row += 1
    shifted = [u[n] - u[n].min() for n in nodes] + [m.ravel() - m.min() for _, m in edges]
    cost = np.concatenate(shifted)
    cost /= max(float(np.abs(cost).max()), 1e-300)
    matrix = scipy.sparse.csr_array((vals, (rows, cols)), shape=(row, size))
    rhs = np.zeros(row)
    rhs[:equal_one] = 1.0
    result = scipy.optimize.milp(
        cost,
        constraints=scipy.optimize.LinearConstraint(matrix, rhs, rhs),
        integrality=np.r_[np.ones(num_x), np.zeros(size - num_x)],
        bounds=scipy.optimize.Bounds(0.0, 1.0),
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise RuntimeError(f"sharding MILP failed: {result.message}")
    return {n: int(np.argmax(result.x[start[n] : start[n] + len(u[n])])) for n in nodes}
