"""RMSNorm, stochastic depth, the pre-norm Mamba block and the scanned layer stack."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import rel_err
import pytest

from vidssm_jax.nn.layers import DropPath, RMSNorm, drop_path, layer_stack
from vidssm_jax.nn.mamba import MambaBlock, MambaConfig, MambaMixer


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


def test_drop_path_with_a_traced_rate():
  x = jnp.ones((4000, 3))
  y = jax.jit(drop_path)(jax.random.key(0), x, jnp.float32(0.5))
  assert abs(float((np.asarray(y)[:, 0] > 0).mean()) - 0.5) < 0.03
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 2.0])
  np.testing.assert_array_equal(jax.jit(drop_path)(jax.random.key(0), x, 0.0), x)


def test_residual_block_keeps_float32_residual_and_matches_manual():
  x = jax.random.normal(jax.random.key(1), (2, 7, 16))
  block = MambaBlock(dim=16)
  zero = jnp.zeros_like(x)
  v = block.init(jax.random.key(2), x, zero)
  h1, r1 = block.apply(v, x, zero)
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
  block = MambaBlock(dim=16, norm="layer", norm_eps=1e-6)
  zero = jnp.zeros_like(x)
  v = block.init(jax.random.key(4), x, zero)
  h, r = block.apply(v, x, zero)
  cache = MambaMixer(dim=16).init_cache(1)
  hs = []
  for t in range(6):
    h_t, _, cache = block.apply(v, x[:, t], zero[:, t], cache, method="step")
    hs.append(h_t)
  assert rel_err(jnp.stack(hs, 1), h) <= 1e-5


class _Affine(nn.Module):
  """A scan body: carry <- carry * w + b + xs, ys = carry (for the stack tests)."""

  @nn.compact
  def __call__(self, carry, xs, scale, train):
    w = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)),
                   (carry.shape[-1],))
    out = carry * w * scale + xs + (1.0 if train else 0.0)
    return out, out


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_layer_stack_equals_a_loop_over_its_slices(remat):
  stack = layer_stack(_Affine, 5, remat=remat, num_broadcast=2, static_broadcast=(1,))()
  x = jax.random.normal(jax.random.key(0), (3, 4))
  xs = jnp.arange(5.0)
  v = stack.init(jax.random.key(1), x, xs, 2.0, True)
  assert nn.get_partition_spec(v)["params"]["w"] == jax.sharding.PartitionSpec("layers", "embed")
  w = nn.meta.unbox(v)["params"]["w"]
  assert w.shape == (5, 4)

  def loss(w, x):
    out, ys = stack.apply({"params": {"w": w}}, x, xs, 2.0, True)
    return jnp.sum(out**2) + jnp.sum(ys)

  def loop(w, x):
    ys = []
    for i in range(5):
      x = x * w[i] * 2.0 + xs[i] + 1.0
      ys.append(x)
    return jnp.sum(x**2) + jnp.sum(jnp.stack(ys))

  assert rel_err(loss(w, x), loop(w, x)) <= 1e-6
  for g, g_ref in zip(jax.grad(loss, (0, 1))(w, x), jax.grad(loop, (0, 1))(w, x)):
    assert rel_err(g, g_ref) <= 1e-5


def test_layer_stack_rejects_an_unknown_remat():
  with pytest.raises(ValueError, match=r"remat must be one of \('none', 'full', 'dots'\)"):
    layer_stack(_Affine, 2, remat="some")


def test_mamba_config_rejects_bad_values():
  with pytest.raises(ValueError, match="scan_backend 'fast' is not one of"):
    MambaConfig(scan_backend="fast")
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    MambaConfig(chunk_size=0)
