"""Structural tests of the passes: graph lowering, costs, layout, cluster, schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest

from autopipe.cost_models.hardware import PRESETS
from autopipe.cost_models.rules import Cost, eqn_cost, op_time
from autopipe.passes.cluster import cluster
from autopipe.passes.graph import build_program, operator_graph
from autopipe.passes.ir import bind
from autopipe.passes.layout import live_across, split_ops, stage_layouts
from autopipe.passes.trace import trace
from conftest import GPT


def _program(fn, *args, batch_argnums=(1,), m=1):
    traced = trace(fn, args, batch_argnums=batch_argnums, num_microbatches=m)
    return traced, build_program(traced.jaxpr, traced.spec.batch_leaves)


def test_calls_are_inlined_and_custom_jvp_kept():
    @jax.jit
    def inner(w, x):
        return jax.nn.relu(x @ w)

    def fn(w, x):
        return inner(w, inner(w, x))

    _, prog = _program(fn, jnp.ones((4, 4)), jnp.ones((2, 4)))
    prims = [op.primitive for op in prog.ops]
    assert "pjit" not in prims and "jit" not in prims
    assert prims.count("dot_general") == 2
    assert prims.count("custom_jvp_call") == 2  # relu keeps its differentiation rule
    assert all(op.where.startswith("inner/") for op in prog.ops)


def test_differentiated_values_are_those_the_backward_reaches():
    """A softmax's stop_gradient'd max, a value only an argmax reads and the mask get no
    cotangent (JAX's AD drops their symbolic zeros), so no backward collective is priced
    for them; the logits and what reaches the loss through them do."""

    def fn(w, x):
        h = x @ w
        m = jax.lax.stop_gradient(h.max(axis=1, keepdims=True))
        picked = jnp.argmax(h * 3.0, axis=1).astype(jnp.float32)  # through integers only
        mask = x[:, :1] > 0
        return (jnp.where(mask, jnp.exp(h - m), 0.0).sum() + picked.sum()).reshape(())

    _, prog = _program(fn, jnp.ones((4, 3)), jnp.ones((2, 4)))
    out = {op.primitive: op.outvars[0] for op in prog.ops}
    (w,) = prog.param_invars
    assert {w, out["dot_general"], out["sub"], out["exp"]} <= prog.differentiated
    for prim in ("stop_gradient", "mul", "convert_element_type", "gt"):
        assert out[prim] not in prog.differentiated, prim


def test_layer_scan_split_by_iterations(cases):
    fn, args = cases["scanned_gpt"]
    _, prog = _program(fn, *args)
    steps = [op for op in prog.ops if op.kind == "scan_step"]
    assert [op.iteration for op in steps] == list(range(GPT.layers))
    assert not any(op.kind == "eqn" and op.primitive == "scan" for op in prog.ops)
    # per-iteration parameter rows are index ops on parameters: hoisted, not pipeline ops
    split = split_ops(prog)
    index_ops = [i for i, op in enumerate(prog.ops) if op.kind == "index"]
    assert index_ops and set(index_ops) <= split.hoisted


def test_time_loop_scan_with_batch_xs_is_kept_whole():
    def rnn(w, xs):  # scans over time with batch-dependent xs: not a layer stack
        def step(h, x):
            h = jnp.tanh(h @ w + x)
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros_like(xs[:, 0]), jnp.swapaxes(xs, 0, 1))
        return jnp.swapaxes(hs, 0, 1)

    _, prog = _program(rnn, jnp.ones((4, 4)), jnp.ones((2, 5, 4)))
    assert [op.kind for op in prog.ops if op.primitive == "scan"] == ["eqn"]


def test_operator_graph_nodes_and_edges_carry_costs():
    def fn(w, x):
        return jnp.tanh(x @ w)

    _, prog = _program(fn, jnp.ones((16, 32)), jnp.ones((8, 16)))
    g = operator_graph(prog, PRESETS["cpu"])
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    dot = next(n for n in g if g.nodes[n]["primitive"] == "dot_general")
    tanh = next(n for n in g if g.nodes[n]["primitive"] == "tanh")
    assert g.nodes[dot]["flops"] == 2 * 8 * 32 * 16  # (8,16)@(16,32): 2·M·N·K
    assert g.nodes[tanh]["flops"] == 8 * 32  # one per output element
    assert g.edges[dot, tanh]["bytes"] == 8 * 32 * 4
    assert g.nodes[dot]["shapes"] == ((8, 32),) and g.nodes[dot]["batch"]


def test_cost_rules_and_roofline_by_hand():
    a, b = jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((8, 3), jnp.float32)
    out = jax.ShapeDtypeStruct((4, 3), jnp.float32)
    dims = (((1,), (0,)), ((), ()))
    c = eqn_cost("dot_general", [a, b], [out], {"dimension_numbers": dims})
    assert c.flops == 2 * 4 * 3 * 8  # 192
    assert c.bytes_accessed == (32 + 24 + 12) * 4  # read both operands, write the result
    unknown = eqn_cost("my_custom_prim", [a], [a], {})
    assert unknown.unruled == {"my_custom_prim"} and unknown.bytes_accessed == 2 * 32 * 4
    assert (c + unknown).unruled == {"my_custom_prim"}
    assert (c * 3).flops == 3 * c.flops and Cost.zeros().flops == 0
    hw = PRESETS["h100"]
    big = Cost(flops=1e12, bytes_accessed=1e6)  # compute bound: 1e12 / (989e12 · 0.6)
    assert op_time(big, hw) == pytest.approx(1e12 / (989e12 * 0.6) + hw.op_overhead)


def test_hoisting_keeps_growth_inside_stages():
    def fn(w, x):
        mask = jnp.tril(jnp.ones((4, 4), bool))  # grows from nothing: recomputed in-stage
        wt = w.T  # same size: hoisted, computed once at placement
        return jnp.where(mask[None, 0], x @ wt, 0.0)

    _, prog = _program(fn, jnp.ones((4, 4)), jnp.ones((2, 4)))
    split = split_ops(prog)
    hoisted = {prog.ops[i].primitive for i in split.hoisted}
    local = {prog.ops[i].primitive for i in split.local}
    assert "transpose" in hoisted
    assert "iota" in local or "broadcast_in_dim" in local


def test_live_values_and_stage_layout_forward_skips():
    def fn(ws, x):
        h0 = jnp.sin(x @ ws[0])
        h1 = jnp.sin(h0 @ ws[1])
        h2 = jnp.sin(h1 @ ws[2])
        return h2 + h0  # h0 crosses every cut after it is made

    ws = [jnp.ones((4, 4))] * 3
    _, prog = _program(fn, ws, jnp.ones((2, 4)))
    split = split_ops(prog)
    live = live_across(prog, split)
    h0 = prog.ops[split.pipeline[1]].outvars[0]
    assert all(h0 in live[k] for k in range(2, len(split.pipeline)))
    layouts = stage_layouts(prog, split, (0, 2, 4, len(split.pipeline)))
    assert h0 in layouts[1].recv.values() and h0 in layouts[1].send.values()
    assert h0 in layouts[2].recv.values() and not layouts[2].send.values()


def test_cluster_cuts_at_cheap_points_and_respects_min_layers():
    # 12 ops in 3 "blocks" of 4; crossing a block boundary costs 10 bytes, inside 100
    times = [1.0] * 12
    cut = [0] + [10 if k % 4 == 0 else 100 for k in range(1, 12)] + [0]
    bounds = cluster(times, cut, min_layers=3)
    assert bounds[0] == 0 and bounds[-1] == 12 and list(bounds) == sorted(set(bounds))
    assert {4, 8} <= set(bounds)
    assert len(cluster(times, cut, min_layers=12)) == 13
    assert cluster(times, cut, min_layers=1)[-1] == 12


def test_trace_accepts_shape_structs_and_splits_batch():
    traced = trace(
        lambda w, x: x @ w,
        (jax.ShapeDtypeStruct((4, 3), jnp.float32), jax.ShapeDtypeStruct((8, 4), jnp.float32)),
        batch_argnums=(1,),
        num_microbatches=4,
    )
    assert traced.batch_size == 8 and traced.microbatch_size == 2
    assert [tuple(v.aval.shape) for v in traced.jaxpr.jaxpr.invars] == [(4, 3), (2, 4)]
    assert traced.spec.in_paths == ("args[0]", "args[1]")
    np.testing.assert_array_equal(traced.spec.batch_leaves, [False, True])


@pytest.mark.parametrize(
    "dims, xs, ws",
    [
        ((((2,), (0,)), ((), ())), (2, 3, 5), (5, 4)),  # x (batch, seq, d) · W
        ((((0,), (1,)), ((), ())), (5, 2, 3), (4, 5)),  # W^T on the left's free (2, 3)
        ((((1,), (0,)), ((), ())), (4, 5), (5, 2, 3)),  # the right operand's free block
        ((((3,), (2,)), ((0, 1), (0, 1))), (2, 2, 3, 5), (2, 2, 5, 3)),  # batched: as bound
    ],
)
def test_matmul_binding_merges_free_dims_and_keeps_the_result(dims, xs, ws):
    """`ir.bind` merges an operand's consecutive free dims into one for dot_general (a free
    reshape), so the weight transpose contracts one dim: same result as the equation bound as
    traced, and the weight gradient of x (batch, seq, d) · W compiles with no copy or
    transpose of the stored operands (XLA:CPU transposed the cotangent for (batch, seq))."""
    # small integers: every product and sum is exact in float32, in any summation order
    x = (jnp.arange(np.prod(xs), dtype=jnp.float32) % 5 - 2).reshape(xs)
    w = (jnp.arange(np.prod(ws), dtype=jnp.float32) % 7 - 3).reshape(ws)
    f = lambda a, b: jax.lax.dot_general(a, b, dims)  # noqa: E731
    (eqn,) = jax.make_jaxpr(f)(x, w).jaxpr.eqns
    np.testing.assert_array_equal(bind(eqn, x, w)[0], f(x, w))

    def weight_grad(x, w, g):
        return jax.vjp(lambda w: bind(eqn, x, w)[0], w)[1](g)[0]

    g = f(x, w) % 3 - 1
    want = jax.vjp(lambda w: f(x, w), w)[1](g)[0]
    np.testing.assert_array_equal(weight_grad(x, w, g), want)
    if dims[1] == ((), ()) and len(xs) == 3:
        hlo = jax.jit(weight_grad).lower(x, w, g).compile().as_text()
        assert " copy(" not in hlo and " transpose(" not in hlo, hlo
