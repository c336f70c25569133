"""Small decoders with explicit KV caches, as `autopipe.generate` takes them.

Every model here is a decode step ``step(params, cache, tokens, positions) -> (logits, cache)``:
``tokens`` and ``positions`` are ``(B,)`` int32 (each row at its own position), ``cache`` holds
one ``(B, max_len, kv_heads, head_dim)`` key and value array per layer, and the step writes row
r's key and value at ``positions[r]`` and attends to positions ``<= positions[r]``. Four forms:

- `LinenDecoder`: a linen module whose caches live in the ``cache`` collection; `linen_step`
  turns it into a step (``apply(..., mutable=["cache"])``);
- `NNXDecoder`: an ``nnx.Module`` whose caches are ``nnx.Cache`` variables that each call
  rewrites; `nnx_step` turns it into a pure step with NNX's functional API (``nnx.split`` into
  graph, parameters and caches; the step ``nnx.merge``s them, calls the module, and splits the
  changed caches back out);
- `gpt_step` / `init_gpt`: a plain function over a params dict and a list of per-layer caches;
- ``DecoderConfig(kv_heads < heads, rotary=True)``: a Llama-style decoder (grouped key/value
  heads, rotary positions, RMSNorm, SwiGLU), in both forms.

The head is tied to the embedding (``logits = x @ embedding.T``). Used by tests and bench.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    kv_heads: int = 4  # < heads: grouped-query attention
    layers: int = 4
    max_len: int = 32  # cache length (positions)
    mlp_ratio: int = 4
    rotary: bool = False  # Llama-style: rotary positions, RMSNorm, SwiGLU (else GPT-style)
    fused_qkv: bool = False  # linen: GPT-2's one q/k/v matmul with a bias, cut by jnp.split
    init_scale: float = 0.3  # standard deviation of the random weights
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def cache_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.max_len, self.kv_heads, self.head_dim)


def llama_config(**changes: Any) -> DecoderConfig:
    return DecoderConfig(**{"heads": 4, "kv_heads": 2, "rotary": True, **changes})


# --- shared math ----------------------------------------------------------------------------


def _rotate(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary embedding of ``x`` (B, heads, head_dim) at per-row ``positions`` (B,)."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = positions.astype(jnp.float32)[:, None, None] * freq
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated.astype(x.dtype)  # the angles are float32: keep a bf16 model's k/v in bf16


def _write(cache: jax.Array, rows: jax.Array, positions: jax.Array) -> jax.Array:
    """``cache`` (B, S, kv, hd) with row r's ``rows[r]`` (kv, hd) written at ``positions[r]``."""
    return jax.vmap(lambda c, x, p: jax.lax.dynamic_update_slice(c, x[None], (p, 0, 0)))(
        cache, rows, positions
    )


def _attend(q, k_cache, v_cache, positions, cfg: DecoderConfig) -> jax.Array:
    """Row r's query heads (B, heads, hd) over its cached positions ``<= positions[r]``."""
    group = cfg.heads // cfg.kv_heads
    b = q.shape[0]
    q = q.reshape(b, cfg.kv_heads, group, cfg.head_dim)
    scores = jnp.einsum("bkgd,bskd->bkgs", q, k_cache) / math.sqrt(cfg.head_dim)
    seen = jnp.arange(cfg.max_len)[None, :] <= positions[:, None]
    scores = jnp.where(seen[:, None, None, :], scores, -1e30)
    out = jnp.einsum("bkgs,bskd->bkgd", jax.nn.softmax(scores, axis=-1), v_cache)
    return out.reshape(b, cfg.d_model)


def _qkv(x, wq, wk, wv, positions, cfg: DecoderConfig):
    return _heads(x @ wq, x @ wk, x @ wv, positions, cfg)


def _heads(q, k, v, positions, cfg: DecoderConfig):
    """The projections (B, width) as heads (B, heads, head_dim), rotated where rotary."""
    b = q.shape[0]
    q = q.reshape(b, cfg.heads, cfg.head_dim)
    k = k.reshape(b, cfg.kv_heads, cfg.head_dim)
    v = v.reshape(b, cfg.kv_heads, cfg.head_dim)
    if cfg.rotary:
        q, k = _rotate(q, positions), _rotate(k, positions)
    return q, k, v


def _norm(x, scale, bias, cfg: DecoderConfig) -> jax.Array:
    if cfg.rotary:  # RMSNorm
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * scale + bias


def _mlp(x, w_in, w_gate, w_out, cfg: DecoderConfig) -> jax.Array:
    if cfg.rotary:  # SwiGLU
        return (jax.nn.silu(x @ w_gate) * (x @ w_in)) @ w_out
    return jax.nn.gelu(x @ w_in) @ w_out


# --- linen, caches in the "cache" collection ------------------------------------------------


class _LinenBlock(nn.Module):
    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, positions):
        cfg, d = self.cfg, self.cfg.d_model
        kv = cfg.kv_heads * cfg.head_dim
        init = nn.initializers.normal(cfg.init_scale)
        projections = [("wq", (d, d)), ("wk", (d, kv)), ("wv", (d, kv))]
        if cfg.fused_qkv:
            projections = [("c_attn", (d, d + 2 * kv))]
        p = {
            n: self.param(n, init, shape)
            for n, shape in [
                *projections,
                ("wo", (d, d)),
                ("w_in", (d, cfg.mlp_ratio * d)),
                ("w_gate", (d, cfg.mlp_ratio * d)),
                ("w_out", (cfg.mlp_ratio * d, d)),
            ]
        }
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        s1, s2 = self.param("ln1", ones, (d,)), self.param("ln2", ones, (d,))
        b1, b2 = self.param("ln1_b", zeros, (d,)), self.param("ln2_b", zeros, (d,))
        shape = cfg.cache_shape(x.shape[0])
        k_cache = self.variable("cache", "k", jnp.zeros, shape, cfg.dtype)
        v_cache = self.variable("cache", "v", jnp.zeros, shape, cfg.dtype)
        h = _norm(x, s1, b1, cfg)
        if cfg.fused_qkv:
            fused = h @ p["c_attn"] + self.param("b_attn", init, (d + 2 * kv,))
            q, k, v = _heads(*jnp.split(fused, [d, d + kv], axis=-1), positions, cfg)
        else:
            q, k, v = _qkv(h, p["wq"], p["wk"], p["wv"], positions, cfg)
        k_cache.value = _write(k_cache.value, k, positions)
        v_cache.value = _write(v_cache.value, v, positions)
        x = x + _attend(q, k_cache.value, v_cache.value, positions, cfg) @ p["wo"]
        return x + _mlp(_norm(x, s2, b2, cfg), p["w_in"], p["w_gate"], p["w_out"], cfg)


class LinenDecoder(nn.Module):
    """A decoder whose per-layer caches are variables of the ``cache`` collection."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, tokens, positions):
        cfg = self.cfg
        embed = self.param("embed", nn.initializers.normal(1.0), (cfg.vocab, cfg.d_model))
        x = embed[tokens]
        if not cfg.rotary:
            table = self.param(
                "pos", nn.initializers.normal(cfg.init_scale), (cfg.max_len, cfg.d_model)
            )
            x = x + table[positions]
        for i in range(cfg.layers):
            x = _LinenBlock(cfg, name=f"block_{i}")(x, positions)
        scale = self.param("ln_f", nn.initializers.ones, (cfg.d_model,))
        bias = self.param("ln_f_b", nn.initializers.zeros, (cfg.d_model,))
        return _norm(x, scale, bias, cfg) @ embed.T


def linen_init(model: LinenDecoder, batch: int, seed: int = 0) -> tuple[Any, Any]:
    """(params, zero cache) of ``model`` for ``batch`` rows."""
    tokens = jnp.zeros((batch,), jnp.int32)
    variables = model.init(jax.random.key(seed), tokens, tokens)
    return variables["params"], jax.tree.map(jnp.zeros_like, variables["cache"])


def linen_step(model: nn.Module) -> Callable:
    """``step(params, cache, tokens, positions) -> (logits, cache)`` of a linen decoder whose
    caches live in the ``cache`` collection."""

    def step(params, cache, tokens, positions):
        variables = {"params": params, "cache": cache}
        logits, changed = model.apply(variables, tokens, positions, mutable=["cache"])
        return logits, changed["cache"]

    return step


# --- NNX, caches as nnx.Cache variables ------------------------------------------------------


class _NNXBlock(nnx.Module):
    def __init__(self, cfg: DecoderConfig, batch: int, rngs: nnx.Rngs):
        d, kv, f = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.mlp_ratio * cfg.d_model
        init = nnx.initializers.normal(cfg.init_scale)
        self.cfg = cfg
        for name, shape in [("wq", (d, d)), ("wk", (d, kv)), ("wv", (d, kv)), ("wo", (d, d))]:
            setattr(self, name, nnx.Param(init(rngs.params(), shape, cfg.dtype)))
        for name, shape in [("w_in", (d, f)), ("w_gate", (d, f)), ("w_out", (f, d))]:
            setattr(self, name, nnx.Param(init(rngs.params(), shape, cfg.dtype)))
        self.ln1, self.ln2 = nnx.Param(jnp.ones((d,))), nnx.Param(jnp.ones((d,)))
        self.ln1_b, self.ln2_b = nnx.Param(jnp.zeros((d,))), nnx.Param(jnp.zeros((d,)))
        self.k = nnx.Cache(jnp.zeros(cfg.cache_shape(batch), cfg.dtype))
        self.v = nnx.Cache(jnp.zeros(cfg.cache_shape(batch), cfg.dtype))

    def __call__(self, x, positions):
        cfg = self.cfg
        h = _norm(x, self.ln1[...], self.ln1_b[...], cfg)
        q, k, v = _qkv(h, self.wq[...], self.wk[...], self.wv[...], positions, cfg)
        self.k[...] = _write(self.k[...], k, positions)
        self.v[...] = _write(self.v[...], v, positions)
        x = x + _attend(q, self.k[...], self.v[...], positions, cfg) @ self.wo[...]
        h = _norm(x, self.ln2[...], self.ln2_b[...], cfg)
        return x + _mlp(h, self.w_in[...], self.w_gate[...], self.w_out[...], cfg)


class NNXDecoder(nnx.Module):
    """A decoder whose per-layer caches are ``nnx.Cache`` variables (for ``batch`` rows), which
    each call writes; the head is tied to the embedding."""

    def __init__(self, cfg: DecoderConfig, batch: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(
            nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab, cfg.d_model))
        )
        init = nnx.initializers.normal(cfg.init_scale)
        self.pos = nnx.Param(init(rngs.params(), (cfg.max_len, cfg.d_model)))
        self.blocks = nnx.List([_NNXBlock(cfg, batch, rngs) for _ in range(cfg.layers)])
        self.ln_f = nnx.Param(jnp.ones((cfg.d_model,)))
        self.ln_f_b = nnx.Param(jnp.zeros((cfg.d_model,)))

    def __call__(self, tokens, positions):
        cfg, embed = self.cfg, self.embed[...]
        x = embed[tokens]
        if not cfg.rotary:
            x = x + self.pos[...][positions]
        for block in self.blocks:
            x = block(x, positions)
        return _norm(x, self.ln_f[...], self.ln_f_b[...], cfg) @ embed.T


def nnx_init(cfg: DecoderConfig, batch: int, seed: int = 0) -> tuple[Callable, Any, Any]:
    """(step, params, zero caches) of an `NNXDecoder` for ``batch`` rows: ``nnx.split`` of the
    module into its graph, its ``nnx.Param`` state and its ``nnx.Cache`` state."""
    _linen_only(cfg, "NNXDecoder")
    graphdef, params, cache = nnx.split(
        NNXDecoder(cfg, batch, rngs=nnx.Rngs(seed)), nnx.Param, nnx.Cache
    )
    return nnx_step(graphdef), params, cache


def nnx_step(graphdef: Any) -> Callable:
    """``step(params, cache, tokens, positions) -> (logits, cache)`` of an NNX module split as
    ``nnx.split(module, nnx.Param, nnx.Cache)``: merge, call (the module rewrites its caches),
    return the caches' new state."""

    def step(params, cache, tokens, positions):
        module = nnx.merge(graphdef, params, cache)
        logits = module(tokens, positions)
        return logits, nnx.state(module, nnx.Cache)

    return step


# --- a plain function over a params dict and a list of per-layer caches ---------------------


def init_gpt(cfg: DecoderConfig, batch: int, seed: int = 0) -> tuple[dict, list]:
    """(params, zero caches) of `gpt_step`: a dict of arrays, one {"k", "v"} per layer."""
    rng = np.random.default_rng(seed)

    def weight(shape, scale):
        return jnp.asarray(rng.normal(0.0, scale, size=shape), cfg.dtype)

    def norm(shape):
        return weight(shape, cfg.init_scale) + 1

    return _gpt_tree(cfg, batch, weight, norm, lambda shape: jnp.zeros(shape, cfg.dtype))


def gpt_shapes(cfg: DecoderConfig, batch: int) -> tuple[dict, list]:
    """`init_gpt`'s trees as ``jax.ShapeDtypeStruct`` (planning from shapes allocates nothing)."""

    def sds(shape, *_):
        return jax.ShapeDtypeStruct(shape, cfg.dtype)

    return _gpt_tree(cfg, batch, sds, sds, sds)


def _linen_only(cfg: DecoderConfig, form: str) -> None:
    if cfg.fused_qkv:
        raise ValueError(f"DecoderConfig(fused_qkv=True) is built by LinenDecoder, not {form}")


def _gpt_tree(cfg: DecoderConfig, batch: int, weight, norm, zeros) -> tuple[dict, list]:
    _linen_only(cfg, "the plain step (init_gpt, gpt_shapes)")
    d, kv, f = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.mlp_ratio * cfg.d_model
    scale = cfg.init_scale
    params = {
        "embed": weight((cfg.vocab, d), 1.0),
        "pos": weight((cfg.max_len, d), scale),
        "ln_f": norm((d,)),
    }
    shapes = {"wq": (d, d), "wk": (d, kv), "wv": (d, kv), "wo": (d, d), "w_in": (d, f)}
    shapes |= {"w_gate": (d, f), "w_out": (f, d)}
    params["blocks"] = [
        {n: weight(shape, scale) for n, shape in shapes.items()}
        | {"ln1": norm((d,)), "ln2": norm((d,))}
        for _ in range(cfg.layers)
    ]
    cache = zeros(cfg.cache_shape(batch))
    return params, [{"k": cache, "v": cache} for _ in range(cfg.layers)]


def gpt_step(cfg: DecoderConfig) -> Callable:
    """The decode step of `init_gpt`'s parameters: ``(params, caches, tokens, positions)``."""

    def step(params, caches, tokens, positions):
        x = params["embed"][tokens]
        if not cfg.rotary:
            x = x + params["pos"][positions]
        new = []
        for p, c in zip(params["blocks"], caches, strict=True):
            zero = jnp.zeros_like(p["ln1"])
            q, k, v = _qkv(_norm(x, p["ln1"], zero, cfg), p["wq"], p["wk"], p["wv"], positions, cfg)
            k_cache, v_cache = _write(c["k"], k, positions), _write(c["v"], v, positions)
            x = x + _attend(q, k_cache, v_cache, positions, cfg) @ p["wo"]
            x = x + _mlp(_norm(x, p["ln2"], zero, cfg), p["w_in"], p["w_gate"], p["w_out"], cfg)
            new.append({"k": k_cache, "v": v_cache})
        zero = jnp.zeros_like(params["ln_f"])
        return _norm(x, params["ln_f"], zero, cfg) @ params["embed"].T, new

    return step
