"""Task heads on backbone features ``(b, t, tokens, dim)`` (SPEC §2 "Outputs"), and the
backbone + head wrapper that ``create_model("endomamba_small", head=..., num_classes=K)`` builds.

- ``ClipClassifier``      clip classification (PolypDiag): pool tokens, then frames -> ``(b, K)``.
- ``PhaseClassifier``     online per-frame classification (Cholec80): each frame's prediction
                          reads only that frame's features, so with the causal backbone it is
                          causal and runs in streaming -> ``(b, t, K)`` (or ``(b, K)`` a frame).
- ``SegmentationDecoder`` (CVC-12K): the three intermediate maps -> per-pixel logits at input
                          resolution ``(b, t, H, W, K)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vidssm_jax.nn.layers import partitioned

Array = jax.Array
Dtype = Any


def _dense(features: int, name: str, dtype, in_axis="embed", out_axis=None):
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=partitioned(nn.initializers.truncated_normal(0.02), in_axis, out_axis),
                  bias_init=partitioned(nn.initializers.zeros, out_axis))


def pool_tokens(features: Array, pool: str, has_cls_token: bool) -> Array:
  """``(..., tokens, dim) -> (..., dim)``: the mean of all tokens (as the release), or the cls token."""
  if pool == "mean":
    return jnp.mean(features.astype(jnp.float32), axis=-2)
  if pool == "cls":
    if not has_cls_token:
      raise ValueError("pool='cls' needs a backbone with use_cls_token=True")
    return features[..., 0, :].astype(jnp.float32)
  raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")


class ClipClassifier(nn.Module):
  """``features (b, t, tokens, dim) -> logits (b, num_classes)`` float32."""

  num_classes: int
  pool: str = "mean"
  has_cls_token: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Array, *, train: bool = False) -> Array:
    if features.ndim != 4:
      raise ValueError(f"ClipClassifier: features have shape {tuple(features.shape)}, expected "
                       "(batch, time, tokens, dim)")
    x = jnp.mean(pool_tokens(features, self.pool, self.has_cls_token), axis=1)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return _dense(self.num_classes, "fc", self.dtype)(x).astype(jnp.float32)


class PhaseClassifier(nn.Module):
  """Per-frame logits, each from its own frame's features only.

  ``(b, t, tokens, dim) -> (b, t, num_classes)``, or a single streamed frame
  ``(b, tokens, dim) -> (b, num_classes)``; float32.
  """

  num_classes: int
  pool: str = "mean"
  has_cls_token: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Array, *, train: bool = False) -> Array:
    if features.ndim not in (3, 4):
      raise ValueError(f"PhaseClassifier: features have shape {tuple(features.shape)}, expected "
                       "(batch, time, tokens, dim) or one frame (batch, tokens, dim)")
    x = pool_tokens(features, self.pool, self.has_cls_token)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return _dense(self.num_classes, "fc", self.dtype)(x).astype(jnp.float32)


class SegmentationDecoder(nn.Module):
  """Three intermediate maps ``[(b, t, tokens, dim)] * 3`` -> logits ``(b, t, H, W, K)`` float32.

  Each map (patch tokens only) is layer-normed and projected to ``decoder_dim``; the three are
  concatenated and fused by a linear layer on the ``(H/p, W/p)`` grid (ours), then upsampled
  ×2 per stage (bilinear resize, 3×3 conv, GELU; channels halve down to 32) until the patch
  grid is at input resolution; a 1×1 conv gives the class logits. Each frame is decoded alone.
  """

  num_classes: int
  img_size: int
  patch_size: int = 16
  has_cls_token: bool = True
  decoder_dim: int = 128
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, intermediates: Sequence[Array], *, train: bool = False) -> Array:
    del train
    if len(intermediates) != 3 or any(f.ndim != 4 for f in intermediates):
      raise ValueError("SegmentationDecoder: expected the backbone's 3 intermediate maps, each "
                       "(batch, time, tokens, dim)")
    b, t, m, _ = intermediates[0].shape
    g = self.img_size // self.patch_size
    n_cls = int(self.has_cls_token)
    if m - n_cls != g * g:
      raise ValueError(f"SegmentationDecoder: maps have {m} tokens, expected {g * g + n_cls} "
                       f"({g}×{g} patches{' + cls' if n_cls else ''} for img_size={self.img_size})")
    maps = []
    for i, f in enumerate(intermediates):
      f = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"norm_{i}")(f[:, :, n_cls:])
      maps.append(_dense(self.decoder_dim, f"proj_{i}", self.dtype)(f))
    x = _dense(self.decoder_dim, "fuse", self.dtype, None)(jnp.concatenate(maps, -1))
    x = nn.gelu(x).reshape(b * t, g, g, self.decoder_dim)
    size, channels, stage = g, self.decoder_dim, 0
    while size * 2 <= self.img_size:
      size, channels = size * 2, max(channels // 2, 32)
      x = jax.image.resize(x, (b * t, size, size, x.shape[-1]), "bilinear")
      x = nn.gelu(nn.Conv(channels, (3, 3), dtype=self.dtype, name=f"up_{stage}")(x))
      stage += 1
    if size != self.img_size:  # patch sizes that are not powers of two
      x = jax.image.resize(x, (b * t, self.img_size, self.img_size, x.shape[-1]), "bilinear")
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)
    return x.reshape(b, t, self.img_size, self.img_size, self.num_classes).astype(jnp.float32)


HEADS = ("clip", "phase", "segmentation")


class BackboneWithHead(nn.Module):
  """A backbone and a task head in one module; params ``{"backbone": ..., "head": ...}``.

  ``__call__(video (b, t, H, W, C), *, train=False)`` -> logits ``(b, K)`` (clip),
  ``(b, t, K)`` (phase) or ``(b, t, H, W, K)`` (segmentation). With the phase head the model
  also streams: ``init_state(b)``, ``step(frame (b, H, W, C), state) -> (logits (b, K), state)``.
  """

  backbone: nn.Module
  head: nn.Module
  kind: str

  transfer_subtree = "backbone"

  @property
  def in_chans(self) -> int:
    return self.backbone.in_chans

  @property
  def num_layers(self) -> int:
    return self.backbone.num_layers

  @property
  def layer_groups(self) -> dict:
    return {("backbone",) + k: v for k, v in self.backbone.layer_groups.items()}

  def __call__(self, video: Array, *, train: bool = False) -> Array:
    if self.kind == "segmentation":
      _, taps = self.backbone(video, train=train, return_intermediates=True)
      return self.head(taps, train=train)
    return self.head(self.backbone(video, train=train), train=train)

  def init_state(self, batch_size: int) -> dict:
    self._check_streams()
    return self.backbone.init_state(batch_size)

  def step(self, frame: Array, state: dict):
    self._check_streams()
    features, state = self.backbone.step(frame, state)
    return self.head(features), state

  def forward_chunk(self, video: Array, state: dict):
    self._check_streams()
    features, state = self.backbone.forward_chunk(video, state)
    return self.head(features), state

  def _check_streams(self):
    if self.kind != "phase":
      raise ValueError(f"streaming needs the per-frame head (head='phase'); this model has "
                       f"head={self.kind!r}")


def build_with_head(backbone: nn.Module, head: str, *, num_classes: int | None = None,
                    pool: str = "mean", head_dropout: float = 0.0,
                    decoder_dim: int = 128) -> BackboneWithHead:
  """Wraps ``backbone`` (an EndoMamba) with the head named ``head``: clip, phase, segmentation."""
  if head not in HEADS:
    raise ValueError(f"head must be one of {HEADS}, got {head!r}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"head={head!r} needs num_classes=K (a positive int), got {num_classes!r}")
  cls = backbone.use_cls_token
  if head == "clip":
    module = ClipClassifier(num_classes, pool, cls, head_dropout, parent=None)
  elif head == "phase":
    module = PhaseClassifier(num_classes, pool, cls, head_dropout, parent=None)
  else:
    module = SegmentationDecoder(num_classes, backbone.img_size, backbone.patch_size, cls,
                                 decoder_dim, dtype=backbone.dtype, parent=None)
  return BackboneWithHead(backbone=backbone.clone(parent=None), head=module, kind=head)
