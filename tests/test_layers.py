"""RMSNorm, DropPath and the pre-norm residual block."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import rel_err
from vidssm_jax.nn.layers import DropPath, ResidualBlock, RMSNorm
from vidssm_jax.nn.mamba import MambaMixer


def test_rmsnorm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32) * 3
  norm = RMSNorm(eps=1e-5)
  v = norm.init(jax.random.key(0), x)
  scale = np.random.default_rng(1).normal(size=8).astype(np.float32)
  v = {"params": {"scale": scale}}
  ref = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * scale
  assert rel_err(norm.apply(v, x), ref) <= 1e-6
  assert norm.apply(v, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_drop_path_drops_whole_examples_and_rescales():
  x = jnp.ones((4000, 3, 2))
  y = DropPath(0.25).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  per_example = np.asarray(y).reshape(4000, -1)
  kept = per_example[:, 0] > 0
  np.testing.assert_allclose(np.unique(per_example), [0.0, 1 / 0.75], rtol=1e-6)
  assert np.all(per_example == per_example[:, :1])  # whole example kept or dropped
  assert abs(kept.mean() - 0.75) < 0.03
  np.testing.assert_array_equal(DropPath(0.25).apply({}, x, deterministic=True), x)


def test_residual_block_keeps_float32_residual_and_matches_manual():
  x = jax.random.normal(jax.random.key(1), (2, 7, 16))
  block = ResidualBlock(mixer=MambaMixer(dim=16))
  v = block.init(jax.random.key(2), x, None)
  h1, r1 = block.apply(v, x, None)
  np.testing.assert_array_equal(r1, x)
  h2, r2 = block.apply(v, h1.astype(jnp.bfloat16), r1)
  assert r2.dtype == jnp.float32
  p = nn.meta.unbox(v)["params"]
  expected_r2 = r1 + h1.astype(jnp.bfloat16).astype(jnp.float32)
  assert rel_err(r2, expected_r2) <= 1e-7
  expected_h2 = MambaMixer(dim=16).apply({"params": p["mixer"]},
                                         RMSNorm().apply({"params": p["norm"]}, expected_r2))
  assert rel_err(h2, expected_h2) <= 1e-6


def test_residual_block_streams():
  x = jax.random.normal(jax.random.key(3), (1, 6, 16))
  block = ResidualBlock(mixer=MambaMixer(dim=16), norm="layer", norm_eps=1e-6)
  v = block.init(jax.random.key(4), x, None)
  h, r = block.apply(v, x, None)
  cache = MambaMixer(dim=16).init_cache(1)
  hs = []
  for t in range(6):
    h_t, _, cache = block.apply(v, x[:, t], None, cache, method="step")
    hs.append(h_t)
  assert rel_err(jnp.stack(hs, 1), h) <= 1e-5
