"""Small layers shared by the models: RMSNorm, stochastic depth, norms and the scanned layer stack.

Parameters carry logical axis names (``nn.with_logical_partitioning``); ``train/sharding.py``
maps them to mesh axes. Names used across the package:

    "embed"   model width (dim)           "mlp"     inner width (expand * dim)
    "state"   SSM state size (d_state)    "rank"    dt_rank / low-rank projections
    "conv"    convolution taps            "layers"  the stacked axis of a scanned layer stack
    None      never sharded
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


def drop_path(rng, x: Array, rate) -> Array:
  """Stochastic depth: zeroes the whole branch ``x (b, ...)`` of each example with probability
  ``rate`` and scales the kept ones by ``1 / (1 - rate)``. ``rate`` may be traced (a scanned
  layer's own rate); at rate 0 it is the identity."""
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class DropPath(nn.Module):
  """:func:`drop_path` as a module: identity when ``deterministic`` or ``rate == 0``; needs the
  ``"dropout"`` RNG when active. ``(b, ...) -> (b, ...)``."""

  rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    return drop_path(self.make_rng("dropout"), x, self.rate)


def make_norm(kind: str, eps: float, dtype=None) -> nn.Module:
  """``"rms"`` (EndoMamba, Vim) or ``"layer"`` (E-ViM³) pre-norm, named "norm"."""
  if kind == "rms":
    return RMSNorm(eps=eps, dtype=dtype, name="norm")
  if kind == "layer":
    return nn.LayerNorm(epsilon=eps, dtype=dtype, name="norm",
                        scale_init=partitioned(nn.initializers.ones, "embed"),
                        bias_init=partitioned(nn.initializers.zeros, "embed"))
  raise ValueError(f"norm must be 'rms' or 'layer', got {kind!r}")


# Rematerialisation of a scanned layer (``config.model.remat``): "none" keeps every activation
# the backward pass needs; "full" keeps only each layer's input and recomputes the layer in the
# backward pass (least memory, one more forward); "dots" keeps the results of matrix products
# without batch dimensions (the projections) and recomputes the rest (the scan, norms, gates).
REMAT_POLICIES = ("none", "full", "dots")


def layer_stack(body, length: int, *, remat: str = "none", num_broadcast: int = 0,
                static_broadcast: tuple = (), unroll: bool = False):
  """``nn.scan`` of the module class ``body`` over ``length`` layers with stacked parameters.

  ``body.__call__(self, carry, xs, *broadcast) -> (carry, ys)``: ``xs`` and ``ys`` have a
  leading ``layers`` axis, the ``num_broadcast`` arguments after ``xs`` are the same for every
  layer (``static_broadcast`` lists the positions among them that are Python values, e.g. a
  ``train`` flag, 0-based). Parameters get a leading axis named ``"layers"``; the ``params`` and
  ``dropout`` RNGs are split per layer. Returns the scanned class (instantiate it with the
  body's fields). ``unroll``: the layers as straight-line code instead of a loop (the same
  stacked parameters; a longer compile).
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
  if remat != "none":
    policy = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    # argnums count self (0), carry (1) and xs (2).
    body = nn.remat(body, policy=policy, prevent_cse=False,
                    static_argnums=tuple(3 + i for i in static_broadcast))
  return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                 in_axes=(0,) + (nn.broadcast,) * num_broadcast, length=length,
                 unroll=length if unroll else 1,
                 metadata_params={nn.PARTITION_NAME: "layers"})
