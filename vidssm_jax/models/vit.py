"""Video ViT with joint space-time attention (VideoMAE-style): the frozen teacher for feature
alignment during EndoMamba pretraining, and the speed baseline of ``bench.stream``.

    patch_embed   tubelet (tt, p, p) 3D conv -> (b, t/tt, n, dim), n = (img/p)²
    + pos         fixed sinusoidal over all (t/tt)·n positions, flattened time-major
    blocks        pre-norm: x + attn(LN(x)); x + MLP(LN(x)); attention over all tokens of the clip
    norm          LayerNorm -> tokens (b, t/tt, n, dim)

``use_mean_pooling=True`` is VideoMAE(-v2)'s fine-tuned layout: no final norm on the tokens, and
with ``num_classes > 0`` the output is ``head(fc_norm(mean of the tokens))`` ``(b, num_classes)``
(the layout of its released checkpoints, ``convert`` source ``"videomae"``); ``k_bias=False``
gives its attention biases (``q_bias``, ``v_bias``, none on the keys).

With the default tubelet ``(1, 16, 16)`` the tokens line up one to one with EndoMamba's
per-frame patches. Attention costs O((t·n)²), which is why recomputing a T-frame window for
every new frame slows down with T.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vidssm_jax.models.registry import register
from vidssm_jax.nn.layers import REMAT_POLICIES, drop_path, layer_stack, partitioned
from vidssm_jax.nn.video import check_video, sinusoidal_table

Array = jax.Array
Dtype = Any


def _dense(features, name, dtype, axes, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=partitioned(nn.initializers.xavier_uniform(), *axes),
                  bias_init=partitioned(nn.initializers.zeros, axes[1]))


def vit_layer_norm(eps, dtype, name):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=partitioned(nn.initializers.ones, "embed"),
                      bias_init=partitioned(nn.initializers.zeros, "embed"))


class Attention(nn.Module):
  """Multi-head self-attention over ``(b, l, dim)``.

  ``qkv_bias`` with ``k_bias=False`` is VideoMAE's (and EndoMamba's decoder's) bias: learned
  ``q_bias`` and ``v_bias`` ``(dim,)``, none on the keys; the default is one ``qkv/bias``.
  """

  dim: int
  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = None  # jax.nn.dot_product_attention: None (XLA) or "cudnn"
  k_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, l, _ = x.shape
    split = self.qkv_bias and not self.k_bias
    qkv = _dense(3 * self.dim, "qkv", self.dtype, ("embed", "mlp"), self.qkv_bias and not split)(x)
    if split:
      q_bias, v_bias = (self.param(n, partitioned(nn.initializers.zeros, "mlp"), (self.dim,))
                        for n in ("q_bias", "v_bias"))
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    q, k, v = jnp.split(qkv.reshape(b, l, 3 * self.num_heads, -1), 3, axis=2)
    y = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    return _dense(self.dim, "proj", self.dtype, ("mlp", "embed"))(y.reshape(b, l, self.dim))


class ViTBlock(nn.Module):
  """Pre-norm transformer block, the body of a scanned stack: ``(x (b, l, dim), drop_rate)``
  -> ``(x, None)``; ``drop_rate`` is this block's stochastic-depth rate (used in training when
  ``stochastic_depth``)."""

  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  norm_eps: float = 1e-6
  stochastic_depth: bool = False
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  k_bias: bool = True  # False: q and v biases only (Attention)

  @nn.compact
  def __call__(self, x: Array, drop_rate, train: bool = False):
    def drop(h):
      if not (train and self.stochastic_depth):
        return h
      return drop_path(self.make_rng("dropout"), h, drop_rate)

    h = vit_layer_norm(self.norm_eps, self.dtype, "norm1")(x)
    h = Attention(self.dim, self.num_heads, self.qkv_bias, self.dtype, self.attention_impl,
                  self.k_bias, name="attn")(h)
    x = x + drop(h)
    h = vit_layer_norm(self.norm_eps, self.dtype, "norm2")(x)
    h = _dense(int(self.dim * self.mlp_ratio), "fc1", self.dtype, ("embed", "mlp"))(h)
    h = _dense(self.dim, "fc2", self.dtype, ("mlp", "embed"))(nn.gelu(h, approximate=False))
    return x + drop(h), None


class ViTStack(nn.Module):
  """``depth`` ViT blocks as one scan over stacked parameters (``blocks``, leading ``layers``
  axis): ``(b, l, dim) -> (b, l, dim)``. Stochastic depth linear from 0 to ``drop_path_rate``."""

  dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  norm_eps: float = 1e-6
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: str = "none"
  k_bias: bool = True  # False: q and v biases only (Attention)

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    rates = jnp.asarray([self.drop_path_rate * i / max(self.depth - 1, 1)
                         for i in range(self.depth)], jnp.float32)
    stack = layer_stack(ViTBlock, self.depth, remat=self.remat, num_broadcast=1,
                        static_broadcast=(0,))
    x, _ = stack(self.dim, self.num_heads, self.mlp_ratio, self.qkv_bias, self.norm_eps,
                 self.drop_path_rate > 0, self.dtype, self.attention_impl, self.k_bias,
                 name="blocks")(x, rates, train)
    return x


class VideoViT(nn.Module):
  """``video (b, t, H, W, C) -> tokens (b, t / tubelet_t, n, dim)`` after the final LayerNorm."""

  img_size: int = 224
  patch_size: int = 16
  tubelet: int = 1  # temporal tubelet size tt: tubelet (tt, patch, patch)
  in_chans: int = 3
  dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  norm_eps: float = 1e-6
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: str = "none"  # per scanned block: "none" | "full" | "dots" (nn/layers.py)
  k_bias: bool = True  # False: q and v biases only, as VideoMAE (Attention)
  use_mean_pooling: bool = False  # VideoMAE's fine-tuned layout (module docstring)
  num_classes: int = 0  # > 0 (with use_mean_pooling): a classification head

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_layers(self) -> int:
    return self.depth

  @property
  def layer_groups(self) -> dict:
    return {("stack", "blocks"): 0}

  @nn.compact
  def __call__(self, video: Array, *, train: bool = False) -> Array:
    check_video(video, img_size=self.img_size, in_chans=self.in_chans, who="VideoViT")
    b, t = video.shape[:2]
    if t % self.tubelet:
      raise ValueError(f"VideoViT: the clip has {t} frames, not a multiple of the temporal "
                       f"tubelet size {self.tubelet}")
    if self.img_size % self.patch_size or self.dim % self.num_heads:
      raise ValueError(f"VideoViT: img_size={self.img_size} must be a multiple of patch_size="
                       f"{self.patch_size} and dim={self.dim} of num_heads={self.num_heads}")
    if self.num_classes and not self.use_mean_pooling:
      raise ValueError("VideoViT: num_classes > 0 needs use_mean_pooling=True (the head reads "
                       "the mean of the tokens)")
    p, tt, g = self.patch_size, self.tubelet, self.grid_size
    x = nn.Conv(self.dim, (tt, p, p), strides=(tt, p, p), padding="VALID", dtype=self.dtype,
                name="patch_embed",
                kernel_init=partitioned(nn.initializers.xavier_uniform(), None, None, None, None,
                                        "embed"),
                bias_init=partitioned(nn.initializers.zeros, "embed"))(video.astype(self.dtype))
    t_out, n = t // tt, g * g
    x = x.reshape(b, t_out * n, self.dim)
    x = x + jnp.asarray(sinusoidal_table(t_out * n, self.dim), x.dtype)
    x = ViTStack(self.dim, self.depth, self.num_heads, self.mlp_ratio, self.qkv_bias,
                 self.norm_eps, self.drop_path_rate, self.dtype, self.attention_impl, self.remat,
                 self.k_bias, name="stack")(x, train=train)
    if self.use_mean_pooling:
      if self.num_classes:
        pooled = vit_layer_norm(self.norm_eps, self.dtype, "fc_norm")(jnp.mean(x, axis=1))
        return _dense(self.num_classes, "head", self.dtype, ("embed", None))(pooled)
    else:
      x = vit_layer_norm(self.norm_eps, self.dtype, "norm")(x)
    return x.reshape(b, t_out, n, self.dim)


VIT_SIZES = {"s": dict(dim=384, depth=12, num_heads=6), "b": dict(dim=768, depth=12, num_heads=12)}


@register("vit_s")
def vit_s(**overrides) -> nn.Module:
  """ViT-S/16 video (~22M parameters): the teacher width of endomamba_small."""
  return VideoViT(**{**VIT_SIZES["s"], **overrides})


@register("vit_b")
def vit_b(**overrides) -> nn.Module:
  """ViT-B/16 video (~86M parameters)."""
  return VideoViT(**{**VIT_SIZES["b"], **overrides})


@register("vit_s_videomae")
def vit_s_videomae(**overrides) -> nn.Module:
  """ViT-S/16 in VideoMAE-v2's released fine-tuned layout (tubelet 2, q and v biases, mean
  pooling, a 710-way Kinetics-710 head as its distilled ViT-S): the target of ``python -m
  vidssm_jax.convert --from videomae --preset vit_s_videomae`` (22,153,286 parameters)."""
  return VideoViT(**{**VIT_SIZES["s"], "tubelet": 2, "k_bias": False, "use_mean_pooling": True,
                     "num_classes": 710, **overrides})
