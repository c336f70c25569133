"""Forward plans of models written as model libraries write them equal the plain function.

Fused qkv cut with `jnp.split` and a head tied to the embedding (GPT-2, linen and NNX),
grouped k/v heads with rotary embeddings and SwiGLU (Llama), a boolean padding mask read in
every block (BERT, GPT-2), on pipeline-only, data-parallel and tensor-parallel meshes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autopipe
from autopipe import library_models as lm
from autopipe import models
from autopipe.cost_models.hardware import get_hardware
from conftest import BATCH, fill, mesh

CFG = lm.DecoderConfig()
# Free launches and messages make tensor splitting pay on these tiny models (as in
# tests/test_parallel.py), so the tp cases really run split operators.
SPLIT_PAYS = dataclasses.replace(
    get_hardware("h100"), name="h100-no-latency", op_overhead=0.0, link_latency=0.0
)
# (pp, m, other axes); the first two of each model run by default.
MESHES = [
    (4, 4, {}),
    (2, 1, {"dp": 2, "tp": 2}),
    (2, 2, {}),
    (2, 2, {"dp": 2}),
    (2, 2, {"tp": 2}),
    (1, 1, {"tp": 4}),
    (2, 2, {"tp": 4}),
]


def _inputs():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab, (BATCH, CFG.seq)))
    mask = lm.padding_mask(jnp.array([8, 3, 5, 8, 1, 6, 7, 2]), CFG.seq)
    types = jnp.broadcast_to((jnp.arange(CFG.seq) >= 4).astype(jnp.int32), (BATCH, CFG.seq))
    return tokens.astype(jnp.int32), mask, types


def _case(name):
    tokens, mask, types = _inputs()
    gpt2 = lm.LinenGPT2(CFG)
    gpt2_vars = fill(models.abstract_linen(gpt2, tokens))
    if name == "gpt2":
        return gpt2.apply, (gpt2_vars, tokens), (1,)
    if name == "gpt2_padding_mask":
        return gpt2.apply, (gpt2_vars, tokens, mask), (1, 2)
    if name == "nnx_gpt2":  # Dropout modules in eval mode: their Rngs state is a typed key
        return (lambda m, t: m(t)), (lm.nnx_gpt2_from_linen(CFG, gpt2_vars), tokens), (1,)
    if name == "llama":
        llama = lm.LinenLlama(CFG)
        return llama.apply, (fill(models.abstract_linen(llama, tokens)), tokens), (1,)
    bert = lm.LinenBert(CFG)
    abstract = jax.eval_shape(lambda: bert.init(jax.random.key(0), tokens, mask, types))
    return bert.apply, (fill(abstract), tokens, mask, types), (1, 2, 3)


NAMES = ["gpt2", "gpt2_padding_mask", "nnx_gpt2", "llama", "bert"]


def _grid():
    for i, name in enumerate(NAMES):  # by default one of the first two meshes per model
        for k, (pp, m, other) in enumerate(MESHES):
            default = k == i % 2 and name not in ("gpt2", "nnx_gpt2")  # gpt2_padding_mask runs
            marks = () if default else (pytest.mark.slow,)
            ids = f"{name}-pp{pp}-m{m}-" + "-".join(f"{a}{n}" for a, n in other.items())
            yield pytest.param(name, pp, m, other, marks=marks, id=ids)


@pytest.mark.parametrize(("name", "pp", "m", "other"), list(_grid()))
def test_library_model_forward_equals_plain_function(name, pp, m, other):
    fn, args, batch_argnums = _case(name)
    plan = autopipe.plan(
        fn,
        *args,
        mesh=mesh(pp, **other),
        num_microbatches=m,
        batch_argnums=batch_argnums,
        hardware=SPLIT_PAYS if "tp" in other else None,
    )
    np.testing.assert_allclose(plan(*args), jax.jit(fn)(*args), rtol=1e-5, atol=2e-6)
    if "tp" in other:  # the tensor axis is really used
        assert any(k != "replicated" for s in plan.stages for k, _ in s.strategies)
