"""Models written the way popular model libraries write them, for tests and examples.

`autopipe.models` holds models written plainly (separate q/k/v, untied heads, no dropout).
Users bring models like these instead, and they are what the planner must get right:

- `LinenGPT2` / `NnxGPT2`: one fused qkv matmul cut with `jnp.split`, the output head tied to
  the token embedding (`Embed.attend`), dropout in training mode (``deterministic=False``,
  keys from the ``"dropout"`` stream), an optional boolean padding mask.
- `LinenLlama`: RMSNorm, rotary position embeddings, grouped k/v heads (fewer k/v heads than
  query heads, repeated over the query groups), SwiGLU, no biases, untied head.
- `LinenBert`: word + position + token-type embeddings, post-LayerNorm blocks, a boolean
  padding mask read in every block, a classifier on the first token.

Every model is per-sample over the leading batch axis. The linen and NNX GPT-2 share parameter
names so `nnx_gpt2_from_linen` moves weights between them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "DecoderConfig",
    "LinenBert",
    "LinenGPT2",
    "LinenLlama",
    "NnxGPT2",
    "nnx_gpt2_from_linen",
    "padding_mask",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    vocab: int = 64
    seq: int = 8
    layers: int = 4
    d_model: int = 32
    heads: int = 4
    kv_heads: int = 2  # Llama only: grouped k/v heads (GQA); heads % kv_heads == 0
    d_ff: int = 64
    dropout: float = 0.1
    type_vocab: int = 2  # BERT only
    classes: int = 3  # BERT only
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.d_model % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"DecoderConfig: d_model={self.d_model} must divide by heads={self.heads} and "
                f"heads by kv_heads={self.kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


def padding_mask(lengths: jax.Array, seq: int) -> jax.Array:
    """``bool[B, S]``: True where position < the row's length (the usual attention_mask)."""
    return jnp.arange(seq)[None, :] < jnp.asarray(lengths)[:, None]


def _attention(q, k, v, *, causal: bool, mask: jax.Array | None) -> jax.Array:
    """Softmax attention over ``[B, S, H, Dh]`` heads; ``mask`` is ``bool[B, S]`` over keys."""
    seq, head_dim = q.shape[1], q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
    keep = jnp.ones((1, 1, seq, seq), bool)
    if causal:
        keep = keep & jnp.tril(jnp.ones((seq, seq), bool))[None, None]
    if mask is not None:
        keep = keep & mask[:, None, None, :]
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _heads(t: jax.Array, heads: int) -> jax.Array:
    return t.reshape(*t.shape[:2], heads, t.shape[-1] // heads)


def _merge(t: jax.Array) -> jax.Array:
    return t.reshape(*t.shape[:2], -1)


# --------------------------------------------------------------------------------------------
# GPT-2 (linen): fused qkv + split, tied head, dropout
# --------------------------------------------------------------------------------------------


class _Gpt2Attention(nn.Module):
    config: DecoderConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        qkv = nn.Dense(3 * cfg.d_model, dtype=cfg.dtype, name="c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = _attention(*(_heads(t, cfg.heads) for t in (q, k, v)), causal=True, mask=mask)
        out = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="c_proj")(_merge(out))
        return nn.Dropout(cfg.dropout)(out, deterministic=self.deterministic)


class _Gpt2Block(nn.Module):
    config: DecoderConfig
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        h = nn.LayerNorm(dtype=cfg.dtype, name="ln_1")(x)
        x = x + _Gpt2Attention(cfg, self.deterministic, name="attn")(h, mask)
        h = nn.LayerNorm(dtype=cfg.dtype, name="ln_2")(x)
        h = nn.Dense(cfg.d_ff, dtype=cfg.dtype, name="c_fc")(h)
        h = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="c_proj")(nn.gelu(h))
        return x + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)


class LinenGPT2(nn.Module):
    """``apply(variables, tokens, mask=None)`` → logits ``[B, S, vocab]``; the head is the token
    embedding (``wte.attend``), or with ``tied=False`` a separate ``lm_head`` Dense. Dropout runs
    when ``deterministic=False`` (pass ``rngs={"dropout": key}`` to ``apply``)."""

    config: DecoderConfig
    deterministic: bool = True
    tie_word_embeddings: bool = True  # False: a separate ``lm_head`` (for comparisons)

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        wte = nn.Embed(cfg.vocab, cfg.d_model, dtype=cfg.dtype, name="wte")
        wpe = nn.Embed(cfg.seq, cfg.d_model, dtype=cfg.dtype, name="wpe")
        x = wte(tokens) + wpe(jnp.arange(tokens.shape[1]))[None]
        x = nn.Dropout(cfg.dropout)(x, deterministic=self.deterministic)
        for i in range(cfg.layers):
            x = _Gpt2Block(cfg, self.deterministic, name=f"h_{i}")(x, mask)
        x = nn.LayerNorm(dtype=cfg.dtype, name="ln_f")(x)
        if self.tie_word_embeddings:
            return wte.attend(x)
        return nn.Dense(cfg.vocab, use_bias=False, dtype=cfg.dtype, name="lm_head")(x)


# --------------------------------------------------------------------------------------------
# GPT-2 (NNX), same parameter names
# --------------------------------------------------------------------------------------------


class _NnxGpt2Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        d = cfg.d_model
        self.cfg = cfg
        self.ln_1 = nnx.LayerNorm(d, dtype=cfg.dtype, rngs=rngs)
        self.c_attn = nnx.Linear(d, 3 * d, dtype=cfg.dtype, rngs=rngs)
        self.attn_proj = nnx.Linear(d, d, dtype=cfg.dtype, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(d, dtype=cfg.dtype, rngs=rngs)
        self.c_fc = nnx.Linear(d, cfg.d_ff, dtype=cfg.dtype, rngs=rngs)
        self.c_proj = nnx.Linear(cfg.d_ff, d, dtype=cfg.dtype, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        q, k, v = jnp.split(self.c_attn(self.ln_1(x)), 3, axis=-1)
        heads = (_heads(t, self.cfg.heads) for t in (q, k, v))
        x = x + self.drop(self.attn_proj(_merge(_attention(*heads, causal=True, mask=mask))))
        h = self.c_proj(nnx.gelu(self.c_fc(self.ln_2(x))))
        return x + self.drop(h)


class NnxGPT2(nnx.Module):
    """NNX twin of `LinenGPT2`; dropout follows the module's train/eval mode
    (``model.train()`` / ``model.eval()``), keys from ``rngs``."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs) -> None:
        self.wte = nnx.Embed(cfg.vocab, cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.wpe = nnx.Embed(cfg.seq, cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.blocks = nnx.List([_NnxGpt2Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, dtype=cfg.dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = self.drop(self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))[None])
        for block in self.blocks:
            x = block(x, mask)
        return self.wte.attend(self.ln_f(x))


def nnx_gpt2_from_linen(cfg: DecoderConfig, variables: Mapping[str, Any]) -> NnxGPT2:
    """An `NnxGPT2` (eval mode) holding the weights of `LinenGPT2` ``variables``."""
    model = NnxGPT2(cfg, rngs=nnx.Rngs(0))
    model.eval()
    p = variables["params"]

    def put(layer, tree) -> None:
        for name, value in tree.items():
            getattr(layer, name)[...] = value

    put(model.wte, {"embedding": p["wte"]["embedding"]})
    put(model.wpe, {"embedding": p["wpe"]["embedding"]})
    put(model.ln_f, p["ln_f"])
    for i, block in enumerate(model.blocks):
        src = p[f"h_{i}"]
        put(block.ln_1, src["ln_1"])
        put(block.c_attn, src["attn"]["c_attn"])
        put(block.attn_proj, src["attn"]["c_proj"])
        put(block.ln_2, src["ln_2"])
        put(block.c_fc, src["c_fc"])
        put(block.c_proj, src["c_proj"])
    return model


# --------------------------------------------------------------------------------------------
# Llama (linen): RMSNorm, rotary, grouped k/v heads, SwiGLU
# --------------------------------------------------------------------------------------------


def _rotary(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotate ``[B, S, H, Dh]`` pairs (first half, second half) by position-dependent angles."""
    seq, dim = x.shape[1], x.shape[-1]
    freqs = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None]
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x.dtype)


class _LlamaBlock(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=cfg.dtype, name=name)  # noqa: E731
        h = nn.RMSNorm(dtype=cfg.dtype, name="input_norm")(x)
        q = _rotary(_heads(dense(cfg.d_model, "q_proj")(h), cfg.heads))
        kv_dim = cfg.kv_heads * cfg.head_dim
        k = _rotary(_heads(dense(kv_dim, "k_proj")(h), cfg.kv_heads))
        v = _heads(dense(kv_dim, "v_proj")(h), cfg.kv_heads)
        groups = cfg.heads // cfg.kv_heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        x = x + dense(cfg.d_model, "o_proj")(_merge(_attention(q, k, v, causal=True, mask=None)))
        h = nn.RMSNorm(dtype=cfg.dtype, name="post_norm")(x)
        gate, up = dense(cfg.d_ff, "gate_proj")(h), dense(cfg.d_ff, "up_proj")(h)
        return x + dense(cfg.d_model, "down_proj")(nn.silu(gate) * up)


class LinenLlama(nn.Module):
    """``apply(variables, tokens)`` → logits ``[B, S, vocab]`` (untied ``lm_head``)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Embed(cfg.vocab, cfg.d_model, dtype=cfg.dtype, name="embed_tokens")(tokens)
        for i in range(cfg.layers):
            x = _LlamaBlock(cfg, name=f"layers_{i}")(x)
        x = nn.RMSNorm(dtype=cfg.dtype, name="norm")(x)
        return nn.Dense(cfg.vocab, use_bias=False, dtype=cfg.dtype, name="lm_head")(x)


# --------------------------------------------------------------------------------------------
# BERT (linen): boolean padding mask in every block, post-LayerNorm, classifier
# --------------------------------------------------------------------------------------------


class _BertBlock(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        proj = {n: nn.Dense(cfg.d_model, dtype=cfg.dtype, name=n)(x) for n in ("q", "k", "v")}
        heads = (_heads(proj[n], cfg.heads) for n in ("q", "k", "v"))
        att = _merge(_attention(*heads, causal=False, mask=mask))
        x = nn.LayerNorm(dtype=cfg.dtype, name="ln_att")(
            x + nn.Dense(cfg.d_model, dtype=cfg.dtype, name="out")(att)
        )
        h = nn.gelu(nn.Dense(cfg.d_ff, dtype=cfg.dtype, name="intermediate")(x))
        h = nn.Dense(cfg.d_model, dtype=cfg.dtype, name="output")(h)
        return nn.LayerNorm(dtype=cfg.dtype, name="ln_out")(x + h)


class LinenBert(nn.Module):
    """``apply(variables, tokens, mask, token_types)`` → class logits ``[B, classes]`` from the
    first token; ``mask`` is ``bool[B, S]`` (True: a real token)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array, token_types: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Embed(cfg.vocab, cfg.d_model, dtype=cfg.dtype, name="word")(tokens)
        x = x + nn.Embed(cfg.seq, cfg.d_model, dtype=cfg.dtype, name="position")(
            jnp.arange(tokens.shape[1])
        )
        x = x + nn.Embed(cfg.type_vocab, cfg.d_model, dtype=cfg.dtype, name="type")(token_types)
        x = nn.LayerNorm(dtype=cfg.dtype, name="ln_embed")(x)
        for i in range(cfg.layers):
            x = _BertBlock(cfg, name=f"layer_{i}")(x, mask)
        pooled = jnp.tanh(nn.Dense(cfg.d_model, dtype=cfg.dtype, name="pooler")(x[:, 0]))
        return nn.Dense(cfg.classes, dtype=cfg.dtype, name="classifier")(pooled)
