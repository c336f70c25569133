"""Fused projections cut apart (`passes.split_fused`): ``split(x · W + b)`` as one matmul per
piece, so that a tensor axis splits q, k and v by heads the way Megatron does.

- The rewritten program computes what the traced one does (float32 and bf16; q/k/v of equal
  and of unequal sizes, as grouped k/v heads fuse them); a weight read anywhere else is left
  whole.
- Training on a tensor axis: fused-qkv decoders (GPT-2's equal pieces, grouped k/v heads'
  unequal ones) equal the single-device reference; the planned strategies are Megatron's (only
  all-reduces); an optimizer that reads a leaf's shape keeps the fused leaves whole and still
  trains exactly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_tp_models import SPLIT_PAYS
from test_tp_training import MEGATRON_PAYS

import autopipe
from autopipe import library_models as lm
from autopipe import models
from autopipe.passes.ir import eval_ops
from autopipe.passes.split_fused import split_fused
from conftest import BATCH, fill, mesh, reference_training


class _FusedBlock(nn.Module):
    """A pre-norm decoder block with one fused projection for q, k and v, cut with
    ``jnp.split``; ``kv_heads`` < ``heads`` fuses grouped k/v heads (unequal pieces)."""

    heads: int = 4
    kv_heads: int = 4

    @nn.compact
    def __call__(self, x, _=None):
        b, t, d = x.shape
        hd = d // self.heads
        qkv = nn.Dense((self.heads + 2 * self.kv_heads) * hd, name="qkv")(nn.LayerNorm()(x))
        q, k, v = jnp.split(qkv, [self.heads * hd, (self.heads + self.kv_heads) * hd], axis=-1)
        q = q.reshape(b, t, self.heads, hd)
        k, v = (z.reshape(b, t, self.kv_heads, hd) for z in (k, v))
        k, v = (jnp.repeat(z, self.heads // self.kv_heads, axis=2) for z in (k, v))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, axis=-1), v).reshape(b, t, d)
        x = x + nn.Dense(d, name="proj")(out)
        h = nn.gelu(nn.Dense(4 * d, name="fc")(nn.LayerNorm()(x)))
        return x + nn.Dense(d, name="out")(h), None


class _FusedDecoder(nn.Module):
    vocab: int = 64
    d: int = 32
    layers: int = 4
    kv_heads: int = 4

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d)(tokens)
        for i in range(self.layers):
            x, _ = _FusedBlock(kv_heads=self.kv_heads, name=f"block_{i}")(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def _tokens(vocab: int = 64, seq: int = 8):
    return jnp.asarray(np.random.default_rng(0).integers(0, vocab, (BATCH, seq)), jnp.int32)


def _run(program, leaves):
    env = dict(zip(program.invars, leaves, strict=True))
    env.update(dict(program.consts))
    eval_ops(program, range(len(program.ops)), env)
    return [env[a] for a in program.outvars]


@pytest.mark.parametrize(
    "model",
    [
        lm.LinenGPT2(lm.DecoderConfig(layers=2, dropout=0.0)),
        lm.LinenGPT2(lm.DecoderConfig(layers=2, dropout=0.0, dtype=jnp.bfloat16)),
        _FusedDecoder(layers=2, kv_heads=2),
    ],
    ids=["gpt2", "gpt2_bf16", "grouped_kv"],
)
def test_cut_program_computes_what_the_fused_one_does(model):
    tokens = _tokens()
    variables = fill(models.abstract_linen(model, tokens))
    program = autopipe.trace(model.apply, variables, tokens).program
    cut = split_fused(program)
    blocks = [op for op in cut.ops if op.kind == "block"]
    assert len(blocks) == 2 * 3 * 2  # per layer: 3 pieces of the kernel and of the bias
    assert not any(op.primitive == "split" for op in cut.ops)
    leaves = jax.tree.leaves((variables, tokens))
    want, got = _run(program, leaves), _run(cut, leaves)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-6, atol=1e-6)


def test_a_weight_read_elsewhere_is_left_whole():
    """The fused kernel also read by another operator (its norm in the output): cutting it
    would hold it twice, so the program is unchanged."""

    def fn(params, x):
        q, k, v = jnp.split(x @ params["w"], 3, axis=-1)
        return (q * k + v).sum() + jnp.sum(params["w"] ** 2)

    params = {"w": jnp.ones((8, 24))}
    program = autopipe.trace(fn, params, jnp.ones((4, 8))).program
    assert split_fused(program) is program


# --- training on the tensor axis ----------------------------------------------------------------


def _loss(model):
    def loss_fn(params, batch):
        t, lab = batch
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, t), lab).mean()

    return loss_fn


def test_training_plans_megatrons_collectives_for_fused_qkv():
    """GPT-2 (fused qkv + split, tied head) planned for training at tp 2 from shapes, under a
    preset where Megatron's split pays: q, k and v are column-parallel pieces of the cut
    kernel, the tied embedding is vocab-parallel (lookup and label pick), and the only tensor
    collectives are all-reduces (no gather, no all-to-all). (At vocab 512 the planner holds the
    embedding split on its hidden dim instead: the lookup's output is all-gathered and the
    row-parallel logits' all-reduce costs less than the loss's latency-bound small ones.)"""
    cfg = lm.DecoderConfig(vocab=4096, seq=32, layers=2, d_model=256, heads=8, d_ff=1024)
    model = lm.LinenGPT2(cfg)
    tokens = jax.ShapeDtypeStruct((BATCH, 32), jnp.int32)
    params = models.abstract_linen(model, tokens)
    plan = autopipe.train(
        _loss(model),
        optax.adamw(1e-3),
        params,
        (tokens, tokens),
        mesh={"pp": 1, "dp": 1, "tp": 2},
        num_microbatches=1,
        hardware=MEGATRON_PAYS,
        compile=False,
    )
    assert sum(op.kind == "block" for op in plan.program.ops) == 2 * 3 * cfg.layers
    (stage,) = plan.stages
    assert dict(stage.strategies)["column"] >= 3 * cfg.layers
    assert dict(stage.strategies)["vocab"] == 2
    assert {k for k, n in stage.collectives if n} == {"all_reduce"}


@pytest.mark.parametrize(
    ("kv_heads", "optimizer", "factors", "cut"),
    [
        # eps=1e-3 as tests/test_tp_training.py: float noise in near-zero gradients stays small
        pytest.param(4, optax.adamw(1e-2, eps=1e-3), (2, 1, 2), True, marks=pytest.mark.slow),
        (2, optax.adamw(1e-2, eps=1e-3), (1, 2, 2), True),
        pytest.param(4, optax.lamb(1e-2, eps=1e-3), (1, 1, 2), False, marks=pytest.mark.slow),
    ],
    ids=["adamw", "grouped_kv-adamw", "lamb"],
)
def test_fused_qkv_trains_like_the_reference_on_a_tensor_axis(kv_heads, optimizer, factors, cut):
    """3 steps equal single-device training (rtol 1e-5). AdamW trains the cut blocks (and
    `unplace` puts each kernel together again); lamb's trust ratio reads whole leaves, so the
    kernels stay fused."""
    model = _FusedDecoder(kv_heads=kv_heads)
    tokens = _tokens()
    params = fill(models.abstract_linen(model, tokens))
    batch = (tokens, jnp.roll(tokens, -1, axis=1))
    pp, dp, tp = factors
    plan = autopipe.train(
        _loss(model),
        optimizer,
        params,
        batch,
        mesh=mesh(pp, dp=dp, tp=tp),
        num_microbatches=2,
        hardware=SPLIT_PAYS,
    )
    assert any(op.kind == "block" for op in plan.program.ops) == cut
    assert sum(n for s in plan.stages for k, n in s.strategies if k in ("column", "row")) > 0
    state, losses = plan.init(params), []
    for _ in range(3):
        state, loss = plan.step(state, batch)
        losses.append(float(loss))
    want_losses, want = reference_training(_loss(model), params, batch, 2, dp, optimizer, 3)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6)
    got = plan.unplace(state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
