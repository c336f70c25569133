"""Sharding pass: the choice solver against brute force, rules by hand, real models, XLA."""

from __future__ import annotations

import collections
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from autopipe import models
from autopipe.cost_models.comm import link_time
from autopipe.cost_models.hardware import Link
from autopipe.passes.graph import build_program, op_cost
from autopipe.passes.ir import apply_op, eval_ops, read_atom
from autopipe.passes.layout import live_across, split_ops, stage_layouts
from autopipe.passes.sharding import (
    choice_cost,
    collective_bytes,
    local_bytes,
    reshard,
    signature,
    solve,
    solve_choices,
    strategies,
    transfer,
)
from autopipe.passes.trace import trace
from conftest import GPT, fill

LARGER = models.GPTConfig(vocab=64, seq=8, d_model=64, heads=4, layers=1, mlp_ratio=4)


def _program(fn, *args, m=1):
    traced = trace(fn, args, batch_argnums=(1,), num_microbatches=m)
    return build_program(traced.jaxpr, traced.spec.batch_leaves)


def _segment(prog):
    """All batch ops (and the param ops they recompute); batch inputs and outputs replicated."""
    split = split_ops(prog)
    fixed = {v: None for v in prog.invars if v in prog.batch_dependent}
    fixed.update({a: None for a in prog.outvars if isinstance(a, int)})
    return sorted((*split.pipeline, *split.local)), fixed


def _linen(module, x):
    return _program(module.apply, fill(models.abstract_linen(module, x)), x)


def _costs(prog, tp, *, latency, bandwidth):
    """A memory-bound roofline (peak 1 PFLOP/s, 1 TB/s, bytes per device under the strategy)
    and alpha-beta collectives on one link."""
    flops = {}

    def op_time(i, s):
        if i not in flops:
            flops[i] = op_cost(prog, prog.ops[i]).flops
        return max(s.compute_fraction * flops[i] / 1e15, local_bytes(prog, i, s, tp) / 1e12)

    link = Link(bandwidth=bandwidth, latency=latency)
    return op_time, lambda kind, nbytes: link_time(kind, nbytes, tp, link)


FAST = {"latency": 1e-8, "bandwidth": 1e11}
SLOW = {"latency": 1e-3, "bandwidth": 1e9}


def _solve(prog, ops, fixed, tp, link):
    op_time, comm_time = _costs(prog, tp, **link)
    sharding = solve(prog, ops, tp=tp, fixed=fixed, op_time=op_time, comm_time=comm_time)
    _check_consistent(prog, ops, fixed, sharding, op_time, comm_time)
    return sharding


def _check_consistent(prog, ops, fixed, sharding, op_time, comm_time):
    """Produced Dims are the strategies' outs, every reshard and op collective is listed, and the
    objective is their total time."""
    tp, dims, expected, total = sharding.tp, sharding.dims, [], 0.0
    for i in ops:
        op, s = prog.ops[i], sharding.strategies[i]
        assert s in strategies(prog, i, tp)
        assert tuple(dims[v] for v in op.outvars) == s.outs
        total += op_time(i, s)
        needs = {(a, d) for a, d in zip(op.invars, s.ins, strict=True) if isinstance(a, int)}
        expected += [(reshard(dims[v], d), v) for v, d in needs]
        for v, d in zip(op.outvars, s.outs, strict=True):
            expected += [(s.collective, v), (reshard(d, fixed[v]) if v in fixed else None, v)]
    for v, d in fixed.items():
        if v in dims and v not in {w for i in ops for w in prog.ops[i].outvars}:
            assert dims[v] == d
    expected = [(k, v, collective_bytes(k, prog.nbytes(v), tp)) for k, v in expected if k]
    assert collections.Counter(sharding.collectives) == collections.Counter(expected)
    total += sum(comm_time(k, b) for k, _, b in expected)
    assert sharding.time == pytest.approx(total, rel=1e-9)


# --- the generic solver ---------------------------------------------------------------------


def _brute_force(unary, pairwise):
    space = itertools.product(*(range(len(u)) for u in unary))
    return min(choice_cost(unary, pairwise, c) for c in space)


def test_solve_choices_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 8))
        sizes = rng.integers(1, 4, size=n)
        unary = [rng.random(k) * rng.choice([0.0, 1.0, 10.0]) for k in sizes]
        pairwise = {}
        for a, b in itertools.permutations(range(n), 2):  # both orientations may appear
            if rng.random() < 0.3:
                pairwise[a, b] = rng.random((sizes[a], sizes[b])).round(rng.integers(1, 3))
        best = _brute_force(unary, pairwise)
        for presolve in (True, False):  # elimination + enumeration, and the MILP alone
            choice, cost = solve_choices(unary, pairwise, presolve=presolve)
            assert cost == pytest.approx(choice_cost(unary, pairwise, choice), abs=1e-12)
            assert cost == pytest.approx(best, abs=1e-9)


def test_solve_choices_prefers_lower_choices_on_ties():
    # two nodes, every joint choice costs 1: the first choices win
    choice, cost = solve_choices([[0.5, 0.5], [0.0, 0.0, 0.0]], {(0, 1): np.full((2, 3), 0.5)})
    assert choice == (0, 0) and cost == 1.0


def test_reshard_kinds_and_bytes():
    assert [reshard(None, None), reshard(1, 1), reshard(None, 0)] == [None] * 3
    assert reshard(2, None) == "all_gather" and reshard(0, 1) == "all_to_all"
    # 1024 bytes over tp=4: gathers and all-to-alls move the 256-byte shard, reductions the whole
    assert [collective_bytes(k, 1024, 4) for k in ("all_gather", "all_to_all")] == [256, 256]
    assert [collective_bytes(k, 1024, 4) for k in ("all_reduce", "reduce_scatter")] == [1024] * 2


# --- rules ------------------------------------------------------------------------------------


def _rules(prog, primitive, tp):
    i = next(i for i, op in enumerate(prog.ops) if op.primitive == primitive)
    return {(s.name, s.ins, s.outs, s.collective) for s in strategies(prog, i, tp)}


def test_a_fixed_dim_that_does_not_split_is_a_clear_error():
    prog = _program(lambda w, x: x @ w, jnp.ones((16, 32)), jnp.ones((6, 16)))
    ops, fixed = _segment(prog)
    op_time, comm_time = _costs(prog, 4, **FAST)
    with pytest.raises(ValueError, match=r"fixed Dim 0 of value \d+ \(shape \(6, 16\)\).*tp=4"):
        solve(
            prog,
            ops,
            tp=4,
            fixed={**fixed, prog.invars[-1]: 0},
            op_time=op_time,
            comm_time=comm_time,
        )


def test_dot_general_strategies_by_hand():
    prog = _program(lambda w, x: x @ w, jnp.ones((16, 32)), jnp.ones((8, 16)))
    replicated = ("replicated", (None, None), (None,), None)
    assert _rules(prog, "dot_general", 2) == {
        replicated,
        # no "lhs" (rows of x with w whole): rows of the batch belong to the data axis
        ("column", (None, 1), (1,), None),  # columns of w: output columns
        ("row", (1, 0), (None,), "all_reduce"),  # the contraction: partial sums
    }
    # two batch-dependent operands (attention's q·k): splitting rows of one is offered
    acts = _program(lambda w, x: (x @ w) @ (x @ w).T, jnp.ones((16, 32)), jnp.ones((8, 16)))
    i = max(i for i, op in enumerate(acts.ops) if op.primitive == "dot_general")
    assert "lhs" in {s.name for s in strategies(acts, i, 2)}
    # 8 rows do not split 16 ways, 32 columns and 16 contracted do
    assert {r[0] for r in _rules(prog, "dot_general", 16)} == {"replicated", "column", "row"}
    assert _rules(prog, "dot_general", 1) == {replicated}


def test_reshape_transpose_reduce_strategies_by_hand():
    def fn(w, x):  # x: [8, 8, 32]
        heads = (x * w).reshape(8, 8, 2, 16)  # split 32 into (2, 16)
        return jnp.transpose(heads, (0, 2, 1, 3)).sum(axis=3)

    prog = _program(fn, jnp.ones((32,)), jnp.ones((8, 8, 32)))
    split = {s[1:] for s in _rules(prog, "reshape", 2)}
    assert split == {
        ((None,), (None,), None),
        ((0,), (0,), None),
        ((1,), (1,), None),
        ((2,), (2,), None),
    }
    assert ((2,), (2,), None) not in {s[1:] for s in _rules(prog, "reshape", 4)}  # 2 % 4 != 0
    perm = {s[1:] for s in _rules(prog, "transpose", 2)}
    assert ((2,), (1,), None) in perm and ((1,), (2,), None) in perm
    reduce = {s[1:] for s in _rules(prog, "reduce_sum", 2)}
    assert ((1,), (1,), None) in reduce and ((3,), (None,), "all_reduce") in reduce


def test_elementwise_broadcast_operands_stay_replicated():
    prog = _program(lambda b, x: x * b[None, :] + 1.0, jnp.ones((32,)), jnp.ones((8, 32)))
    mul = {s[1:] for s in _rules(prog, "mul", 2)}
    assert mul == {((None, None), (None,), None), ((0, None), (0,), None), ((1, 1), (1,), None)}
    add = {s[1:] for s in _rules(prog, "add", 2)}  # the literal 1.0 is never split
    assert add == {((None, None), (None,), None), ((0, None), (0,), None), ((1, None), (1,), None)}


def test_unknown_and_scan_ops_are_replicated_only(cases):
    prog = _program(lambda w, x: jax.lax.lgamma(x @ w), jnp.ones((16, 32)), jnp.ones((8, 16)))
    i = next(i for i, op in enumerate(prog.ops) if op.primitive == "lgamma")
    assert [s.name for s in strategies(prog, i, 2)] == ["replicated"]
    ops, fixed = _segment(prog)
    sharding = _solve(prog, ops, fixed, 2, FAST)
    assert sharding.unruled == {"lgamma"}

    fn, args = cases["scanned_gpt"]
    prog = _program(fn, *args)
    steps = [i for i, op in enumerate(prog.ops) if op.kind in ("scan_step", "index")]
    assert steps and all(len(strategies(prog, i, 2)) == 1 for i in steps)


def test_cnn_rules(cases):
    fn, args = cases["cnn"]
    prog = _program(fn, *args)
    assert ("column", (None, 3), (3,), None) in _rules(prog, "conv_general_dilated", 2)  # HWIO
    assert ("elementwise", (3,), (3,), None) in _rules(prog, "custom_jvp_call", 2)  # relu
    assert ("window", (3,), (3,), None) in _rules(prog, "reduce_window_sum", 2)
    ops, fixed = _segment(prog)
    _solve(prog, ops, fixed, 2, FAST)


def test_embedding_gather_splits_hidden_dim_or_vocab(cases):
    fn, args = cases["linen_gpt"]
    prog = _program(fn, *args)
    assert _rules(prog, "gather", 2) == {
        ("replicated", (None, None), (None,), None),
        ("gather", (1, None), (2,), None),  # table [vocab, d] split on d: output [b, s, d] on d
        # split on vocab (Megatron's vocab-parallel lookup): each device gathers the rows it
        # holds, zeros elsewhere, and an all-reduce sums the partial outputs
        ("vocab", (0, None), (None,), "all_reduce"),
    }


# --- real models ------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4])
def test_mlp_block_is_column_then_row(tp):
    prog = _linen(models.LinenFeedForward(LARGER), jnp.ones((1, LARGER.seq, LARGER.d_model)))
    ops, fixed = _segment(prog)
    dots = [i for i in ops if prog.ops[i].primitive == "dot_general"]

    sharding = _solve(prog, ops, fixed, tp, FAST)
    assert [sharding.strategies[i].name for i in dots] == ["column", "row"]
    assert [k for k, _, _ in sharding.collectives] == ["all_reduce"]
    weights = [prog.ops[i].invars[1] for i in dots]
    assert [sharding.dims[w] for w in weights] == [1, 0]  # stored split as used
    full = sum(prog.nbytes(w) for w in weights)
    assert sharding.param_bytes(prog, weights) == full / tp

    sharding = _solve(prog, ops, fixed, tp, SLOW)
    assert all(s.name == "replicated" for s in sharding.strategies.values())
    assert not sharding.collectives and sharding.param_bytes(prog, weights) == full


@pytest.mark.parametrize(
    ("config", "tp", "link"),
    [(GPT, 2, {"latency": 1e-9, "bandwidth": 1e12}), (LARGER, 2, FAST), (LARGER, 4, FAST)],
)
def test_gpt_attention_is_split_over_heads(config, tp, link):
    prog = _linen(models.LinenBlock(config), jnp.ones((1, config.seq, config.d_model)))
    ops, fixed = _segment(prog)
    sharding = _solve(prog, ops, fixed, tp, link)
    attention = [
        i
        for i in ops
        if prog.ops[i].primitive == "dot_general"
        and prog.ops[i].eqn.params["dimension_numbers"][1][0]  # has batch dims: (b, heads)
    ]
    assert len(attention) == 2
    for i in attention:  # split on the second shared batch dim: heads ([b, h, ...] outputs)
        assert sharding.strategies[i].name == "batch" and sharding.strategies[i].outs == (1,)


def test_identical_gpt_layers_share_a_signature_and_a_solution():
    tokens = models.make_tokens(GPT, 8)
    prog = _program(*_gpt_fn(tokens), m=1)
    split = split_ops(prog)
    live = live_across(prog, split)
    residual = [
        k
        for k, vs in enumerate(live)
        if len(vs) == 1 and prog.avals[vs[0]].shape == (8, GPT.seq, GPT.d_model)
    ]
    bounds = [0, *residual[1::2][: GPT.layers + 1]]  # the stream between blocks, not inside
    segments = []
    for layout in stage_layouts(prog, split, bounds)[1:]:  # the embedding, then the blocks
        fixed = {v: None for v in (*layout.recv.values(), *layout.send.values())}
        segments.append((layout.ops, fixed))
    assert len({signature(prog, ops, fixed) for ops, fixed in segments}) == 1
    first = _solve(prog, *segments[0], 2, FAST)
    last = _solve(prog, *segments[-1], 2, FAST)
    moved = transfer(first, prog, segments[-1][0])
    assert (moved.dims, moved.strategies, moved.collectives) == (
        last.dims,
        last.strategies,
        last.collectives,
    )
    assert moved.time == pytest.approx(last.time)
    assert _solve(prog, *segments[0], 2, FAST) == first  # deterministic


def _gpt_fn(tokens):
    module = models.LinenGPT(GPT)
    return module.apply, fill(models.abstract_linen(module, tokens)), tokens


# --- against XLA ------------------------------------------------------------------------------

MEDIUM = {"latency": 1e-6, "bandwidth": 1e10}
_HLO = {"all_reduce": "all-reduce", "all_gather": "all-gather", "all_to_all": "all-to-all"}


def _on_mesh(tp, fn, inputs):
    """Runs jit(fn(mesh)) on `inputs` = [(array, Dim)] placed on a tp mesh; returns its outputs
    and the collectives in the compiled HLO."""
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:tp]), ("tp",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    with jax.set_mesh(mesh):
        args = [jax.device_put(x, _spec(mesh, np.ndim(x), d)) for x, d in inputs]
        run = jax.jit(fn(mesh))
        outs = run(*args)
        hlo = run.lower(*args).compile().as_text()
    counted = {k: len(re.findall(rf"\b{name}(?:-start)?\(", hlo)) for k, name in _HLO.items()}
    return outs, {k: n for k, n in counted.items() if n}


def _spec(mesh, rank, d):
    return NamedSharding(mesh, P(*("tp" if k == d else None for k in range(rank))))


def _emit(prog, ops, inputs, dims, outputs):
    """Evaluates `ops` on `inputs` (value ids) with every value constrained to its Dim in `dims`,
    as the emission pass does; returns the `outputs` [(value, Dim)] constrained to their Dims."""

    def make(mesh):
        def run(*args):
            env = dict(zip(inputs, args, strict=True))
            for i in ops:
                op = prog.ops[i]
                outs = apply_op(op, [read_atom(env, a) for a in op.invars])
                for v, x in zip(op.outvars, outs, strict=True):
                    env[v] = jax.lax.with_sharding_constraint(x, _spec(mesh, x.ndim, dims[v]))
            return [
                jax.lax.with_sharding_constraint(env[v], _spec(mesh, env[v].ndim, d))
                for v, d in outputs
            ]

        return run

    return make


@pytest.mark.parametrize(
    ("tp", "link", "x_dim", "out_dim", "names", "expected"),
    [
        (2, FAST, None, None, ["column", "row"], {"all_reduce": 1}),
        (4, FAST, 0, None, ["column", "row"], {"all_gather": 1, "all_reduce": 1}),
        # rows of x arrive split, columns leave split; no weight meets split rows
        (4, MEDIUM, 0, 1, ["replicated", "column"], {"all_gather": 1}),
        (2, MEDIUM, 1, None, ["replicated", "replicated"], {"all_gather": 1}),
        (4, SLOW, None, None, ["replicated", "replicated"], {}),
    ],
)
def test_predicted_collectives_match_xla(tp, link, x_dim, out_dim, names, expected):
    def fn(params, x):
        return jax.nn.relu(x @ params["w1"]) @ params["w2"]

    rng = np.random.default_rng(0)
    shapes = {"w1": (64, 256), "w2": (256, 64)}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float32)
    prog = _program(fn, params, x)
    ops, _ = _segment(prog)
    (y,) = prog.outvars
    fixed = {prog.invars[-1]: x_dim, y: out_dim}
    sharding = _solve(prog, ops, fixed, tp, link)
    dots = [i for i in ops if prog.ops[i].primitive == "dot_general"]
    assert [sharding.strategies[i].name for i in dots] == names
    assert collections.Counter(k for k, _, _ in sharding.collectives) == expected

    flat = jax.tree.leaves((params, x))
    inputs = [(a, sharding.dims[v]) for v, a in zip(prog.invars, flat, strict=True)]
    emit = _emit(prog, ops, prog.invars, sharding.dims, [(y, out_dim)])
    (out,), counted = _on_mesh(tp, emit, inputs)
    reference = fn(params, x)
    np.testing.assert_allclose(out, reference, atol=1e-6 * float(jnp.abs(reference).max()))
    assert counted == expected


def test_gpt_block_collectives_match_xla():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, GPT.seq, GPT.d_model)), jnp.float32)
    module = models.LinenBlock(GPT)
    variables = fill(models.abstract_linen(module, x))
    prog = _program(module.apply, variables, x)
    ops, fixed = _segment(prog)
    sharding = _solve(prog, ops, fixed, 2, {"latency": 1e-9, "bandwidth": 1e12})
    # hoisted param ops run once at placement; the segment reads their results as free inputs
    env = dict(zip(prog.invars, jax.tree.leaves((variables, x)), strict=True))
    env = eval_ops(prog, sorted(split_ops(prog).hoisted), env)
    inputs = [*sharding.free, *(v for v in prog.invars if v in fixed)]
    (y,) = prog.outvars
    emit = _emit(prog, ops, inputs, sharding.dims, [(y, None)])
    (out,), counted = _on_mesh(2, emit, [(env[v], sharding.dims[v]) for v in inputs])
    np.testing.assert_allclose(out, jax.jit(module.apply)(variables, x), atol=1e-5)
    assert counted == collections.Counter(k for k, _, _ in sharding.collectives)
    assert counted == {"all_gather": 4, "all_to_all": 1, "all_reduce": 1}  # sequence-parallel LN


# the rest (transpose, reductions, select_n, attention dots) run in the GPT block above
_CHECKED = (
    "dot_general reshape broadcast_in_dim gather conv_general_dilated reduce_window_sum "
    "custom_jvp_call"
).split()


@pytest.mark.parametrize("case", ["linen_gpt", "cnn"])
def test_each_strategy_needs_exactly_its_collective_in_xla(cases, case):
    """Every sharded strategy of the first op of each non-trivial primitive, alone: with operands
    on `ins` and results on `outs`, XLA computes it right using its own collective only."""
    fn, args = cases[case]
    prog = _program(fn, *args)
    rng = np.random.default_rng(0)
    firsts = {}
    for i, op in enumerate(prog.ops):
        if op.primitive in _CHECKED:
            firsts.setdefault(op.primitive, i)
    for i in firsts.values():
        op = prog.ops[i]
        values = {a: _random(prog.avals[a], rng) for a in op.invars if isinstance(a, int)}
        reference = apply_op(op, [read_atom(values, a) for a in op.invars])
        for s in strategies(prog, i, 2)[1:]:
            ins = {a: d for a, d in zip(op.invars, s.ins, strict=True) if isinstance(a, int)}
            outputs = list(zip(op.outvars, s.outs, strict=True))
            emit = _emit(prog, [i], list(ins), dict(outputs), outputs)
            outs, counted = _on_mesh(2, emit, [(values[a], d) for a, d in ins.items()])
            for x, r in zip(outs, reference, strict=True):
                np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-5)
            assert counted == ({s.collective: 1} if s.collective else {}), (op.primitive, s)


def _random(aval, rng):
    if jnp.issubdtype(aval.dtype, jnp.floating):
        return jnp.asarray(rng.normal(size=aval.shape), aval.dtype)
    if aval.dtype == jnp.bool_:
        return jnp.asarray(rng.random(aval.shape) < 0.5)
    return jnp.asarray(rng.integers(0, 4, size=aval.shape), aval.dtype)  # gather indices too
