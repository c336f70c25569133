"""Tests for the reference models in ``autopipe.models``.

They pin the properties the pipeline compiler relies on: output shapes, the three GPT variants
computing the same function, causality, per-sample independence over the batch axis, and
abstract (allocation-free) tracing, including the GPT-3 175B shape.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autopipe import models
from autopipe.models import (
    GPTConfig,
    LinenCNN,
    LinenGPT,
    LinenMLP,
    NnxGPT,
    NnxMLP,
    ScannedLinenGPT,
)
from conftest import fill

TINY = GPTConfig(vocab=37, seq=8, d_model=16, heads=2, layers=2, mlp_ratio=2)
BATCH = 3
IMAGE = jax.ShapeDtypeStruct((BATCH, 8, 8, 3), jnp.float32)


_JITTED: dict = {}


def _apply(model, variables, x) -> jax.Array:
    """Jitted linen apply, one compiled function per model (op-by-op dispatch is slower)."""
    if model not in _JITTED:
        _JITTED[model] = jax.jit(model.apply)
    return _JITTED[model](variables, x)


@nnx.jit
def _call_nnx(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x)


@pytest.fixture(scope="module")
def tokens() -> jax.Array:
    return models.make_tokens(TINY, BATCH, seed=1)


@pytest.fixture(scope="module")
def linen_vars(tokens: jax.Array) -> dict:
    return fill(models.abstract_linen(LinenGPT(TINY), tokens))


@pytest.fixture(scope="module")
def linen_logits(linen_vars: dict, tokens: jax.Array) -> jax.Array:
    return _apply(LinenGPT(TINY), linen_vars, tokens)


@pytest.fixture(scope="module")
def images() -> jax.Array:
    return jnp.asarray(np.random.default_rng(2).normal(size=IMAGE.shape), jnp.float32)


@pytest.fixture(scope="module")
def cnn_vars() -> dict:
    return fill(models.abstract_linen(LinenCNN(), IMAGE))


def _is_struct_tree(tree) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def _shapes(tree):
    return jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), tree)


# --- config and inputs ----------------------------------------------------------------------


def test_config_defaults_and_gpt3() -> None:
    cfg = GPTConfig()
    assert (cfg.vocab, cfg.seq, cfg.d_model, cfg.heads, cfg.layers) == (256, 32, 64, 4, 4)
    assert cfg.head_dim == 16 and cfg.d_ff == 256 and cfg.dtype == jnp.float32
    big = models.gpt3_175b()
    assert big == GPTConfig.gpt3_175b()
    assert (big.vocab, big.seq, big.d_model, big.heads, big.layers) == (50257, 2048, 12288, 96, 96)
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=10, heads=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layers = 3  # type: ignore[misc]


def test_make_tokens_deterministic_and_in_range() -> None:
    a = models.make_tokens(TINY, 4, seed=3)
    assert a.shape == (4, TINY.seq) and a.dtype == jnp.int32
    assert int(a.min()) >= 0 and int(a.max()) < TINY.vocab
    np.testing.assert_array_equal(a, models.make_tokens(TINY, 4, seed=3))
    assert not np.array_equal(a, models.make_tokens(TINY, 4, seed=4))


# --- shapes ---------------------------------------------------------------------------------


def test_mlps_shapes() -> None:
    x = jnp.ones((BATCH, 5), jnp.float32)
    linen = LinenMLP(features=(7, 3))
    variables = models.init_linen(linen, x)
    assert _apply(linen, variables, x).shape == (BATCH, 3)
    nnx_mlp = NnxMLP((5, 7, 3), rngs=nnx.Rngs(0))
    assert _call_nnx(nnx_mlp, x).shape == (BATCH, 3)
    with pytest.raises(ValueError):
        NnxMLP((5,), rngs=nnx.Rngs(0))


def test_linen_gpt_logits(linen_logits: jax.Array) -> None:
    assert linen_logits.shape == (BATCH, TINY.seq, TINY.vocab)
    assert linen_logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(linen_logits)))


def test_sequence_longer_than_config_is_rejected(linen_vars: dict) -> None:
    too_long = jax.ShapeDtypeStruct((BATCH, TINY.seq + 1), jnp.int32)
    with pytest.raises(ValueError, match="exceeds config.seq"):
        jax.make_jaxpr(lambda v, t: LinenGPT(TINY).apply(v, t))(linen_vars, too_long)
    graphdef, state = nnx.split(models.abstract_nnx(lambda: NnxGPT(TINY, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match="exceeds config.seq"):
        jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, too_long)


def test_bfloat16_params_give_float32_logits(linen_vars: dict, tokens: jax.Array) -> None:
    cfg = dataclasses.replace(TINY, dtype=jnp.bfloat16)
    abstract = models.abstract_linen(LinenGPT(cfg), tokens)
    assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}
    variables = jax.tree.map(lambda x: x.astype(jnp.bfloat16), linen_vars)
    logits = _apply(LinenGPT(cfg), variables, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (BATCH, TINY.seq, TINY.vocab)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_cnn_uses_batch_stats(cnn_vars: dict, images: jax.Array) -> None:
    assert set(cnn_vars) == {"params", "batch_stats"}
    assert set(cnn_vars["batch_stats"]) == {"bn_0", "bn_1"}
    assert set(cnn_vars["batch_stats"]["bn_0"]) == {"mean", "var"}
    model = LinenCNN()
    out = _apply(model, cnn_vars, images)
    assert out.shape == (BATCH, 10) and out.dtype == jnp.float32
    # Inference-mode BatchNorm reads the running stats: shifting them changes the output.
    shifted = jax.tree.map(lambda s: s + 1.0, cnn_vars["batch_stats"])
    out2 = _apply(model, {**cnn_vars, "batch_stats": shifted}, images)
    assert not np.allclose(out, out2)


# --- equivalence of the GPT variants ----------------------------------------------------------


def test_nnx_gpt_matches_linen(linen_vars: dict, tokens, linen_logits) -> None:
    model = models.nnx_gpt_from_linen(TINY, linen_vars)
    assert isinstance(model, NnxGPT)
    np.testing.assert_allclose(_call_nnx(model, tokens), linen_logits, rtol=1e-5, atol=1e-5)


def test_nnx_gpt_from_linen_rejects_mismatch(linen_vars: dict) -> None:
    with pytest.raises(ValueError, match="differ"):
        models.nnx_gpt_from_linen(dataclasses.replace(TINY, layers=3), linen_vars)
    with pytest.raises(ValueError, match="shape/dtype"):
        models.nnx_gpt_from_linen(dataclasses.replace(TINY, vocab=40), linen_vars)


def test_nnx_gpt_native_init(tokens: jax.Array) -> None:
    a = NnxGPT(TINY, rngs=nnx.Rngs(0))
    b = NnxGPT(TINY, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_call_nnx(a, tokens), _call_nnx(b, tokens))
    k0, k1 = (blk.attn.query.kernel[...] for blk in a.blocks)
    assert not np.allclose(k0, k1), "each block must get its own init"
    assert _call_nnx(a, tokens).shape == (BATCH, TINY.seq, TINY.vocab)


def test_scanned_matches_unscanned(linen_vars: dict, tokens, linen_logits) -> None:
    scanned = ScannedLinenGPT(TINY)
    stacked = models.stack_linen_gpt_params(linen_vars, TINY.layers)
    native = models.abstract_linen(scanned, tokens)
    assert _shapes(stacked) == _shapes(native)
    assert stacked["params"]["blocks"]["attn"]["query"]["kernel"].shape[0] == TINY.layers
    np.testing.assert_allclose(_apply(scanned, stacked, tokens), linen_logits, rtol=1e-5, atol=1e-5)


# --- properties the compiler relies on ------------------------------------------------------


def test_causality(linen_vars: dict, tokens, linen_logits) -> None:
    t = TINY.seq // 2
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % TINY.vocab)
    logits = _apply(LinenGPT(TINY), linen_vars, changed)
    np.testing.assert_array_equal(logits[:, :t], linen_logits[:, :t])
    assert not np.allclose(logits[:, t:], linen_logits[:, t:])


def test_per_sample_over_batch(linen_vars: dict, tokens, linen_logits, cnn_vars, images) -> None:
    changed = tokens.at[1:].set((tokens[1:] + 5) % TINY.vocab)
    logits = _apply(LinenGPT(TINY), linen_vars, changed)
    np.testing.assert_allclose(logits[0], linen_logits[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits[1], linen_logits[1])
    out = _apply(LinenCNN(), cnn_vars, images)
    out_changed = _apply(LinenCNN(), cnn_vars, images.at[1:].multiply(-3.0))
    np.testing.assert_allclose(out_changed[0], out[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out_changed[1], out[1])


def test_make_jaxpr_concrete_and_abstract(linen_vars: dict, tokens: jax.Array) -> None:
    tok_struct = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)
    abstract_vars = models.abstract_linen(LinenGPT(TINY), tok_struct)

    def fwd(v, t):
        return LinenGPT(TINY).apply(v, t)

    concrete = jax.make_jaxpr(fwd)(linen_vars, tokens)
    abstract = jax.make_jaxpr(fwd)(abstract_vars, tok_struct)
    assert len(concrete.jaxpr.eqns) == len(abstract.jaxpr.eqns) > 0
    assert abstract.out_avals[0].shape == (BATCH, TINY.seq, TINY.vocab)

    graphdef, state = nnx.split(models.abstract_nnx(lambda: NnxGPT(TINY, rngs=nnx.Rngs(0))))
    nnx_jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tok_struct)
    assert nnx_jaxpr.out_avals[0].shape == (BATCH, TINY.seq, TINY.vocab)

    cnn_abstract = models.abstract_linen(LinenCNN(), IMAGE)
    cnn_jaxpr = jax.make_jaxpr(lambda v, x: LinenCNN().apply(v, x))(cnn_abstract, IMAGE)
    assert cnn_jaxpr.out_avals[0].shape == (BATCH, 10)


def test_abstract_helpers_return_structs(linen_vars: dict, tokens: jax.Array) -> None:
    abstract = models.abstract_linen(LinenGPT(TINY), tokens)
    assert _is_struct_tree(abstract)
    assert _shapes(abstract) == _shapes(linen_vars)
    module = models.abstract_nnx(lambda: NnxGPT(TINY, rngs=nnx.Rngs(0)))
    assert isinstance(module, NnxGPT)
    assert _is_struct_tree(nnx.state(module, nnx.Param))
    concrete = NnxGPT(TINY, rngs=nnx.Rngs(0))
    assert _shapes(nnx.state(module, nnx.Param)) == _shapes(nnx.state(concrete, nnx.Param))


def _param_count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_gpt3_175b_plans_without_allocating() -> None:
    cfg = models.gpt3_175b()
    tok_struct = jax.ShapeDtypeStruct((8, cfg.seq), jnp.int32)
    # Scanned linen: full depth is cheap to trace (one scan body).
    scanned_vars = models.abstract_linen(ScannedLinenGPT(cfg), tok_struct)
    assert _is_struct_tree(scanned_vars)
    assert 174e9 < _param_count(scanned_vars) < 176e9
    jaxpr = jax.make_jaxpr(lambda v, t: ScannedLinenGPT(cfg).apply(v, t))(scanned_vars, tok_struct)
    assert jaxpr.out_avals[0].shape == (8, cfg.seq, cfg.vocab)
    # Unrolled linen at full width but two layers keeps the test fast.
    shallow = dataclasses.replace(cfg, layers=2)
    shallow_vars = models.abstract_linen(LinenGPT(shallow), tok_struct)
    jaxpr = jax.make_jaxpr(lambda v, t: LinenGPT(shallow).apply(v, t))(shallow_vars, tok_struct)
    assert jaxpr.out_avals[0].dtype == jnp.float32
    # NNX at full size.
    module = models.abstract_nnx(lambda: NnxGPT(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(module, nnx.Param)
    assert _is_struct_tree(params)
    assert _param_count(params) == _param_count(scanned_vars)
