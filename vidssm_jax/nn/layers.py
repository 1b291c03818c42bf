"""Small layers shared by the models: RMSNorm, DropPath and the pre-norm residual block.

Parameters carry logical axis names (``nn.with_logical_partitioning``); ``train/sharding.py``
maps them to mesh axes. Names used across the package:

    "embed"   model width (dim)           "mlp"     inner width (expand * dim)
    "state"   SSM state size (d_state)    "rank"    dt_rank / low-rank projections
    "conv"    convolution taps            None      never sharded
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


def partitioned(init, *names):
  """An initializer whose parameter carries the given logical axis names."""
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis: ``x / rms(x) * scale``, computed in float32.

  ``(..., dim) -> (..., dim)`` in ``dtype`` (default: the input's dtype).
  """

  eps: float = 1e-5
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", partitioned(nn.initializers.ones, "embed"), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype or x.dtype)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch of an example with probability ``rate``.

  ``(b, ...) -> (b, ...)``; identity when ``deterministic`` or ``rate == 0``. Needs the
  ``"dropout"`` RNG when active.
  """

  rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def make_norm(kind: str, eps: float, dtype=None) -> nn.Module:
  """``"rms"`` (EndoMamba, Vim) or ``"layer"`` (E-ViM³) pre-norm, named "norm"."""
  if kind == "rms":
    return RMSNorm(eps=eps, dtype=dtype, name="norm")
  if kind == "layer":
    return nn.LayerNorm(epsilon=eps, dtype=dtype, name="norm",
                        scale_init=partitioned(nn.initializers.ones, "embed"),
                        bias_init=partitioned(nn.initializers.zeros, "embed"))
  raise ValueError(f"norm must be 'rms' or 'layer', got {kind!r}")


class ResidualBlock(nn.Module):
  """Pre-norm residual block around a sequence mixer, as in Mamba / Vision Mamba (SPEC §1).

      residual = residual + drop_path(hidden)       (or hidden, for the first block)
      hidden   = mixer(norm(residual))

  The residual stream is kept in float32 whatever the compute dtype. Call with
  ``(hidden, residual)`` of shape ``(b, l, dim)`` (``residual=None`` for the first block);
  returns the new ``(hidden, residual)``. After the last block, the model adds the final
  ``hidden`` to ``residual`` and applies its final norm.

  The mixer's streaming methods are forwarded: ``step`` (one token) and ``forward_chunk``
  (a sequence continuing from a cache), so a block stack can stream.
  """

  mixer: nn.Module
  norm: str = "rms"
  norm_eps: float = 1e-5
  drop_path: float = 0.0

  def setup(self):
    self.norm_layer = make_norm(self.norm, self.norm_eps)
    self.drop = DropPath(self.drop_path)

  def _pre(self, hidden, residual, train):
    if residual is None:
      residual = hidden.astype(jnp.float32)
    else:
      residual = residual + self.drop(hidden, deterministic=not train).astype(jnp.float32)
    return self.norm_layer(residual), residual

  def __call__(self, hidden: Array, residual: Optional[Array] = None, *, train: bool = False):
    normed, residual = self._pre(hidden, residual, train)
    return self.mixer(normed), residual

  def forward_chunk(self, hidden: Array, residual: Optional[Array], cache: dict):
    """Runs a chunk ``(b, l, dim)`` continuing from ``cache``; returns (hidden, residual, cache)."""
    normed, residual = self._pre(hidden, residual, False)
    out, cache = self.mixer.forward_chunk(normed, cache)
    return out, residual, cache

  def step(self, hidden_t: Array, residual_t: Optional[Array], cache: dict):
    """One token ``(b, dim)``; returns (hidden_t, residual_t, cache)."""
    normed, residual_t = self._pre(hidden_t, residual_t, False)
    out, cache = self.mixer.step(normed, cache)
    return out, residual_t, cache
