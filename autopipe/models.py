"""Small reference models for tests, the demo and the CLI.

Written plainly for the pipeline compiler: no dropout, no RNG at apply time, float32 by
default, strictly per-sample over the leading batch axis. One GPT architecture exists three
ways (linen unrolled, linen with ``nn.scan`` over the blocks, NNX) with matching parameter
names; the converters at the bottom move weights between them, so tests can check that all
three compute identical logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "GPTConfig",
    "LinenAttention",
    "LinenBlock",
    "LinenCNN",
    "LinenFeedForward",
    "LinenGPT",
    "LinenMLP",
    "NnxAttention",
    "NnxBlock",
    "NnxFeedForward",
    "NnxGPT",
    "NnxMLP",
    "ScannedLinenGPT",
    "abstract_linen",
    "abstract_nnx",
    "gpt3_175b",
    "init_linen",
    "make_tokens",
    "nnx_gpt_from_linen",
    "stack_linen_gpt_params",
]

_POS_INIT_STDDEV = 0.02


# --- Configuration --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Hyper-parameters of the GPT-2 style decoder shared by all GPT variants.

    ``dtype`` is both the parameter and the compute dtype; attention softmax is always done in
    float32 and logits are returned as float32.
    """

    vocab: int = 256
    seq: int = 32
    d_model: int = 64
    heads: int = 4
    layers: int = 4
    mlp_ratio: int = 4
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by heads={self.heads}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.heads

    @property
    def d_ff(self) -> int:
        """Hidden width of the MLP."""
        return self.mlp_ratio * self.d_model

    @classmethod
    def gpt3_175b(cls) -> GPTConfig:
        """The GPT-3 175B shape (Brown et al. 2020), for abstract planning only."""
        return cls(vocab=50257, seq=2048, d_model=12288, heads=96, layers=96)


def gpt3_175b() -> GPTConfig:
    """Module-level alias of :meth:`GPTConfig.gpt3_175b`."""
    return GPTConfig.gpt3_175b()


# --- Shared, framework-neutral pieces of math -----------------------------------------------


def _causal_mask(seq: int) -> jax.Array:
    """Lower-triangular ``bool[S, S]``; built inside the trace so it is a constant, not input."""
    return jnp.tril(jnp.ones((seq, seq), bool))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """Causal multi-head attention on already projected ``[B, S, D]`` q/k/v.

    Scores and softmax are computed in float32 regardless of the compute dtype, then the
    weights are cast back so the value contraction runs in the compute dtype.
    """
    batch, seq, d_model = q.shape
    head_dim = d_model // heads

    def split(t: jax.Array) -> jax.Array:
        return t.reshape(batch, seq, heads, head_dim)

    q, k, v = split(q), split(k), split(v)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / math.sqrt(head_dim)
    scores = jnp.where(_causal_mask(seq), scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return out.reshape(batch, seq, d_model)


def _position_ids(seq: int, max_seq: int) -> jax.Array:
    """Position ids ``0..S-1``; identical for every sample.

    ``S`` is static, so the check costs nothing at trace time; without it an over-long input
    would silently reuse the last position embedding (gathers clamp out-of-range indices).
    """
    if seq > max_seq:
        raise ValueError(f"sequence length {seq} exceeds config.seq={max_seq}")
    return jnp.arange(seq)


# --- Flax linen models ----------------------------------------------------------------------


class LinenMLP(nn.Module):
    """Dense + gelu for every width in ``features`` except the last, which has no activation.

    ``__call__(x: f32[B, d_in]) -> f32[B, features[-1]]``.
    """

    features: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.features):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = nn.gelu(x)
        return x


class LinenAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/out dense projections."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        q, k, v = (_linen_dense(cfg, cfg.d_model, name)(x) for name in ("query", "key", "value"))
        return _linen_dense(cfg, cfg.d_model, "out")(_attend(q, k, v, cfg.heads))


class LinenFeedForward(nn.Module):
    """Position-wise MLP ``d -> mlp_ratio * d -> d`` with gelu."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = nn.gelu(_linen_dense(cfg, cfg.d_ff, "fc")(x))
        return _linen_dense(cfg, cfg.d_model, "proj")(h)


class LinenBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _linen_block_body(self.config, x)


class _LinenScanBlock(nn.Module):
    """:class:`LinenBlock` in the ``(carry, x) -> (carry, y)`` form that ``nn.scan`` expects.

    It shares the block body instead of wrapping ``LinenBlock`` so its parameters sit at the
    same relative paths as an unscanned block's, which keeps restacking a pure tree operation.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        return _linen_block_body(self.config, x), None


def _linen_block_body(cfg: GPTConfig, x: jax.Array) -> jax.Array:
    """The pre-LN block math; call only from a compact method (submodules attach to it)."""
    x = x + LinenAttention(cfg, name="attn")(_linen_ln(cfg, "ln1")(x))
    return x + LinenFeedForward(cfg, name="mlp")(_linen_ln(cfg, "ln2")(x))


def _linen_dense(cfg: GPTConfig, features: int, name: str) -> nn.Dense:
    """A Dense layer in the config's dtype."""
    return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


def _linen_ln(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    """A LayerNorm in the config's dtype (epsilon matches ``nnx.LayerNorm``'s default)."""
    return nn.LayerNorm(epsilon=1e-6, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


def _linen_embed(cfg: GPTConfig, tokens: jax.Array) -> jax.Array:
    """Token embedding plus learned position embedding, ``int32[B, S] -> [B, S, D]``.

    Must be called from inside a compact method; it registers ``wte`` and ``wpe`` on it.
    """
    wte = nn.Embed(cfg.vocab, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.dtype, name="wte")
    wpe = nn.Embed(cfg.seq, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.dtype, name="wpe")
    return wte(tokens) + wpe(_position_ids(tokens.shape[1], cfg.seq))[None]


def _linen_head(cfg: GPTConfig, x: jax.Array) -> jax.Array:
    """Final LayerNorm and untied LM head; logits are returned in float32."""
    x = _linen_ln(cfg, "ln_f")(x)
    return _linen_dense(cfg, cfg.vocab, "lm_head")(x).astype(jnp.float32)


class LinenGPT(nn.Module):
    """GPT-2 style decoder with the blocks unrolled (params ``block_0`` ... ``block_{N-1}``).

    ``__call__(tokens: int32[B, S]) -> logits f32[B, S, vocab]``.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        x = _linen_embed(cfg, tokens)
        for i in range(cfg.layers):
            x = LinenBlock(cfg, name=f"block_{i}")(x)
        return _linen_head(cfg, x)


class ScannedLinenGPT(nn.Module):
    """Same math as :class:`LinenGPT`, but the blocks are one ``nn.scan`` named ``blocks``.

    Block parameters are stacked along a leading layer axis of length ``config.layers``.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        x = _linen_embed(cfg, tokens)
        blocks = nn.scan(
            _LinenScanBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=cfg.layers,
        )
        x, _ = blocks(cfg, name="blocks")(x, None)
        return _linen_head(cfg, x)


class LinenCNN(nn.Module):
    """Two ``Conv3x3 -> BatchNorm(inference) -> relu -> avg_pool2`` stages, flatten, Dense head.

    BatchNorm always uses its running averages, so the model is per-sample and its variables
    contain a ``batch_stats`` collection that is read but never updated.
    ``__call__(x: f32[B, H, W, C]) -> f32[B, num_classes]``.
    """

    num_classes: int = 10
    widths: Sequence[int] = (8, 16)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.widths):
            x = nn.Conv(width, (3, 3), name=f"conv_{i}")(x)
            x = nn.BatchNorm(use_running_average=True, name=f"bn_{i}")(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="head")(x)


# --- Flax NNX models ------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    """NNX counterpart of :class:`LinenMLP`.

    NNX builds parameters eagerly, so ``features`` here includes the input width:
    ``features = (d_in, h_1, ..., d_out)`` gives ``len(features) - 1`` Linear layers, gelu
    between them and none after the last. ``__call__(x: f32[B, d_in]) -> f32[B, d_out]``.
    """

    def __init__(self, features: Sequence[int], *, rngs: nnx.Rngs) -> None:
        if len(features) < 2:
            raise ValueError("NnxMLP needs features=(d_in, ..., d_out) with at least 2 entries")
        pairs = zip(features[:-1], features[1:], strict=True)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nnx.gelu(x)
        return x


def _nnx_linear(cfg: GPTConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear layer in the config's dtype."""
    return nnx.Linear(d_in, d_out, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)


def _nnx_ln(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """A LayerNorm in the config's dtype."""
    return nnx.LayerNorm(
        cfg.d_model, epsilon=1e-6, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs
    )


def _nnx_embed(cfg: GPTConfig, num: int, rngs: nnx.Rngs) -> nnx.Embed:
    """An embedding table in the config's dtype."""
    return nnx.Embed(num, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.dtype, rngs=rngs)


class NnxAttention(nnx.Module):
    """NNX counterpart of :class:`LinenAttention` (same attribute names as linen param names)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs) -> None:
        d = config.d_model
        self.heads = config.heads
        self.query = _nnx_linear(config, d, d, rngs)
        self.key = _nnx_linear(config, d, d, rngs)
        self.value = _nnx_linear(config, d, d, rngs)
        self.out = _nnx_linear(config, d, d, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(_attend(self.query(x), self.key(x), self.value(x), self.heads))


class NnxFeedForward(nnx.Module):
    """NNX counterpart of :class:`LinenFeedForward`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.fc = _nnx_linear(config, config.d_model, config.d_ff, rngs)
        self.proj = _nnx_linear(config, config.d_ff, config.d_model, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(nnx.gelu(self.fc(x)))


class NnxBlock(nnx.Module):
    """NNX counterpart of :class:`LinenBlock`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.ln1 = _nnx_ln(config, rngs)
        self.attn = NnxAttention(config, rngs=rngs)
        self.ln2 = _nnx_ln(config, rngs)
        self.mlp = NnxFeedForward(config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


@nnx.jit(static_argnums=0)
def _build_nnx_block(config: GPTConfig, rngs: nnx.Rngs) -> NnxBlock:
    """Construct one block in its own trace.

    Why: under ``nnx.eval_shape`` every RNG draw assigns a tracer to the stream's counter, and
    on jax 0.10 flax's ``Variable.set_value`` probes ``tracer.sharding``, whose error message
    walks every equation traced so far -- quadratic in model size (~45 s for GPT-3 175B).
    A nested jit keeps each block's equations in a small frame of its own; concretely it also
    means one compiled init reused by all layers.
    """
    return NnxBlock(config, rngs=rngs)


class NnxGPT(nnx.Module):
    """NNX counterpart of :class:`LinenGPT`; blocks live in ``self.blocks[i]``.

    ``__call__(tokens: int32[B, S]) -> logits f32[B, S, vocab]``.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs) -> None:
        self.config = config
        self.wte = _nnx_embed(config, config.vocab, rngs)
        self.wpe = _nnx_embed(config, config.seq, rngs)
        self.blocks = nnx.List([_build_nnx_block(config, rngs) for _ in range(config.layers)])
        self.ln_f = _nnx_ln(config, rngs)
        self.lm_head = _nnx_linear(config, config.d_model, config.vocab, rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.wte(tokens) + self.wpe(_position_ids(tokens.shape[1], self.config.seq))[None]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x)).astype(jnp.float32)


# --- Helpers: inputs, initialisation, abstract shapes, parameter conversion -----------------


def make_tokens(config: GPTConfig, batch: int, seed: int = 0) -> jax.Array:
    """Deterministic random token ids ``int32[batch, config.seq]`` in ``[0, vocab)``.

    Drawn with numpy rather than ``jax.random`` so tests and demos do not pay an XLA compile
    of the PRNG just to make inputs.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab, size=(batch, config.seq), dtype=np.int32)
    return jnp.asarray(ids)


def init_linen(model: nn.Module, example_input: Any, seed: int = 0) -> Any:
    """Concrete variables of a linen model, deterministic in ``seed``.

    ``model.init`` is jitted: one compile is much faster than op-by-op dispatch of the init.
    """
    return jax.jit(model.init)(jax.random.key(seed), example_input)


def abstract_linen(model: nn.Module, example_input_struct: Any) -> Any:
    """Variables of a linen model as a ``jax.ShapeDtypeStruct`` pytree; never allocates.

    ``example_input_struct`` may be a concrete array or a ``ShapeDtypeStruct`` (pytree).
    """
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), example_input_struct)


def abstract_nnx(ctor: Callable[[], nnx.Module]) -> nnx.Module:
    """Build an NNX module whose variable values are ``ShapeDtypeStruct``s; never allocates.

    ``ctor`` is a zero-argument constructor, e.g. ``lambda: NnxGPT(cfg, rngs=nnx.Rngs(0))``.
    """
    return nnx.eval_shape(ctor)


def stack_linen_gpt_params(variables: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """Convert :class:`LinenGPT` variables into :class:`ScannedLinenGPT` variables.

    ``params/block_i/...`` (``i < layers``) are stacked along a new leading axis into
    ``params/blocks/...``; all other parameters are passed through unchanged.
    """
    params = dict(variables["params"])
    per_layer = [params.pop(f"block_{i}") for i in range(layers)]
    params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return {**variables, "params": params}


def _linen_path_to_nnx(path: tuple[str, ...]) -> tuple[str | int, ...]:
    """Map a linen GPT param path to its NNX attribute path (``block_i`` -> ``blocks, i``)."""
    head, *rest = path
    if head.startswith("block_"):
        return ("blocks", int(head.removeprefix("block_")), *rest)
    return tuple(path)


def nnx_gpt_from_linen(config: GPTConfig, variables: Mapping[str, Any]) -> NnxGPT:
    """Build an :class:`NnxGPT` holding exactly the parameters of :class:`LinenGPT` variables.

    The NNX skeleton is created abstractly (no random init), then every parameter is filled
    from the linen tree; a missing or extra parameter on either side raises ``ValueError``.
    """
    model = abstract_nnx(lambda: NnxGPT(config, rngs=nnx.Rngs(0)))
    flat_linen = {
        _linen_path_to_nnx(tuple(k.key for k in path)): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    }
    targets = {
        tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)
    }
    if set(targets) != set(flat_linen):
        missing = sorted(map(str, set(targets) ^ set(flat_linen)))
        raise ValueError(f"linen/NNX GPT parameter trees differ at: {missing}")
    for path, param in targets.items():
        expected = param.get_value()
        value = jnp.asarray(flat_linen[path])
        if value.shape != expected.shape or value.dtype != expected.dtype:
            got, want = (value.shape, value.dtype), (expected.shape, expected.dtype)
            raise ValueError(f"param {path}: got shape/dtype {got}, want {want}")
        param.set_value(value)
    return model
