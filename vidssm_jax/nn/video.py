"""Video helpers shared by every model: input checks, 2D patches, the sin/cos embedding and the
ImageNet statistics the RGB models are normalised with."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sinusoidal_embedding(positions: Array, dim: int) -> Array:
  """Transformer sin/cos embedding: ``positions (...,)`` (any number) -> ``(..., dim)`` float32.

  ``emb[..., 2i] = sin(p / 10000^(2i/dim))``, ``emb[..., 2i+1] = cos(p / 10000^(2i/dim))``.
  """
  if dim % 2:
    raise ValueError(f"sinusoidal_embedding: dim must be even, got {dim}")
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angle = jnp.asarray(positions, jnp.float32)[..., None] * freq
  return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(*angle.shape[:-1], dim)


def sinusoidal_table(num_positions: int, dim: int) -> np.ndarray:
  """``sinusoidal_embedding`` of positions ``0 .. num_positions - 1`` as a NumPy table computed in
  float64 (as VideoMAE's and EndoMamba's decoder tables are): float32 angles of positions in the
  thousands are off by ~1e-4 in their sines. For static positions (a table of the clip)."""
  if dim % 2:
    raise ValueError(f"sinusoidal_table: dim must be even, got {dim}")
  angle = np.arange(num_positions, dtype=np.float64)[:, None] / np.power(
      10000.0, np.arange(0, dim, 2, dtype=np.float64) / dim)
  return np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(num_positions, dim)


def check_video(video, *, img_size: int, in_chans: int, ndim: int = 5, who: str = "EndoMamba"):
  """Raises a ValueError naming the problem unless ``video`` is ``(..., img, img, in_chans)``."""
  layout = {5: "(batch, time, height, width, channels)", 4: "(batch, height, width, channels)"}[ndim]
  if video.ndim != ndim:
    raise ValueError(f"{who}: input has shape {tuple(video.shape)}, expected {layout}")
  if not jnp.issubdtype(video.dtype, jnp.floating):
    raise ValueError(f"{who}: input has dtype {video.dtype}, expected a float video "
                     "(normalise uint8 frames first, e.g. with vidssm_jax.stream.preprocess)")
  h, w, c = video.shape[-3:]
  if c != in_chans:
    raise ValueError(f"{who}: video has {c} channels, the model expects {in_chans} "
                     "(set in_chans)")
  if (h, w) != (img_size, img_size):
    raise ValueError(f"{who}: frames are {h}×{w}, the model expects {img_size}×{img_size} "
                     "(set img_size, or resize the frames)")


def patchify(video: Array, patch_size: int) -> Array:
  """``(b, t, H, W, C) -> (b, t, n, p·p·C)``, patches in raster order, pixels as ``(p, p, C)``."""
  b, t, h, w, c = video.shape
  p = patch_size
  x = video.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Array, patch_size: int, grid_h: int, grid_w: int) -> Array:
  """Inverse of :func:`patchify`: ``(b, t, grid_h·grid_w, p·p·C) -> (b, t, H, W, C)``."""
  b, t, _, ppc = patches.shape
  p = patch_size
  c = ppc // (p * p)
  x = patches.reshape(b, t, grid_h, grid_w, p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t, grid_h * p, grid_w * p, c)
