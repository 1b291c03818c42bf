"""VideoMamba (OpenGVLab, github.com/OpenGVLab/VideoMamba): a bidirectional Mamba over the whole
clip, EndoMamba's pretraining teacher (the 384-wide VideoMamba-S, ``videomamba_s``).

Data flow for ``video: (b, t, H, W, C)``, ``k`` frames a tubelet (1 in the release's presets),
``T = t / k`` token frames and ``n = (H / p)²`` patches a frame:

    patch_embed            Conv3d (k, p, p), stride = kernel, as a Dense on flattened tubelets
                           -> (b, T, n, dim)
    + pos_embed[1:]        learned, spatial, shared by every frame
    + temporal_pos_embed   learned, one vector per token frame (T <= num_frames / k)
    tokens                 [cls + pos_embed[0], patches time-major] -> (b, 1 + T·n, dim)
    blocks                 ``depth`` bidirectional Mamba blocks over all 1 + T·n tokens (RMSNorm,
                           residual stream in float32, the two directions summed)
    norm_f                 RMSNorm -> features (b, 1 + T·n, dim)

``__call__`` returns what the release's ``forward`` does: the head's logits from the cls token, or
the cls token's features without a head. ``teacher_features`` returns the **patch tokens only**,
``(b, T·n, dim)`` time-major (the cls token dropped), the layout ``EndoMambaPretrainer``'s
``teacher_features`` expects: token ``f·n + j`` is patch ``j`` of token frame ``f``. (The EndoMamba
release indexes the teacher's 1 + T·n tokens with a T·n mask; we choose to drop the cls token.)

The blocks are EndoMamba's scanned block (``EndoMambaLayer``, bidirectional): the release builds
its Mamba blocks and initialises them the same way (every Linear N(0, 0.02²) with zero bias, so the
dt bias starts at 0; ``out_proj`` U(±1/√fan_in)/√depth).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidssm_jax.models.endomamba import EndoMambaLayer, release_normal
from vidssm_jax.models.registry import register
from vidssm_jax.nn.layers import REMAT_POLICIES, RMSNorm, drop_path, layer_stack, partitioned
from vidssm_jax.nn.mamba import MambaConfig, symmetric_uniform, torch_linear_init
from vidssm_jax.nn.video import check_video

Array = jax.Array
Dtype = Any


def tubelets(video: Array, kernel: int, patch_size: int) -> Array:
  """``(b, t, H, W, C) -> (b, t/kernel, n, kernel·p·p·C)``: non-overlapping tubelets of
  ``kernel`` frames and ``p × p`` pixels, patches in raster order, values ordered (t, h, w, C)
  (the rows of ``convert.conv3d_patch``)."""
  b, t, h, w, c = video.shape
  k, p = kernel, patch_size
  x = video.reshape(b, t // k, k, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, t // k, (h // p) * (w // p), k * p * p * c)


class VideoMamba(nn.Module):
  """VideoMamba backbone (+ an optional linear head on the cls token).

  Parameters: ``patch_embed`` (Dense ``(k·p·p·C, dim)``), ``cls_token (dim,)``, ``pos_embed
  (1 + n, dim)``, ``temporal_pos_embed (num_frames / k, dim)``, ``blocks`` (stacked on a leading
  ``layers`` axis: ``norm``, ``mixer``), ``norm_f``, and ``head`` when ``num_classes > 0``.
  """

  img_size: int = 224
  patch_size: int = 16
  kernel_size: int = 1  # frames a tubelet (the release's Conv3d temporal kernel and stride)
  in_chans: int = 3
  num_frames: int = 8  # the release's default; EndoMamba's teacher is built with 16
  dim: int = 384
  depth: int = 24
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  num_classes: int = 0  # 0: no head (the teacher); the release's classifier has 1000
  drop_path_rate: float = 0.1  # the release's default
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32  # compute dtype; parameters, residual and scan state stay float32
  scan_backend: str = "auto"
  chunk_size: int = 64
  remat: str = "none"

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @property
  def token_frames(self) -> int:
    return self.num_frames // self.kernel_size

  @property
  def mamba(self) -> MambaConfig:
    return MambaConfig.of(self)

  # ---- what the trainer asks of a model (see models/registry.py) ----------------------------

  @property
  def num_layers(self) -> int:
    return self.depth

  @property
  def layer_groups(self) -> dict:
    return {("blocks",): 0}

  def drop_rates(self) -> np.ndarray:
    """Block i drops the previous block's output at ``linspace(0, rate, depth)[i - 1]`` (the
    release's ``inter_dpr``); the last output is dropped at ``drop_path_rate`` before norm_f."""
    return np.array([0.0] + [self.drop_path_rate * i / max(self.depth - 1, 1)
                             for i in range(self.depth - 1)], np.float32)

  def _check_config(self):
    if self.img_size % self.patch_size:
      raise ValueError(f"VideoMamba: img_size={self.img_size} is not a multiple of "
                       f"patch_size={self.patch_size}")
    if self.num_frames % self.kernel_size:
      raise ValueError(f"VideoMamba: num_frames={self.num_frames} is not a multiple of "
                       f"kernel_size={self.kernel_size}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"VideoMamba: remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

  def setup(self):
    self._check_config()
    fan_in = self.kernel_size * self.patch_size**2 * self.in_chans
    # torch's default Conv3d init (the release leaves the patch embedding as torch makes it).
    self.patch_embed = nn.Dense(
        self.dim, dtype=self.dtype, name="patch_embed",
        kernel_init=partitioned(torch_linear_init(), None, "embed"),
        bias_init=partitioned(symmetric_uniform(fan_in**-0.5), "embed"))
    self.cls_token = self.param("cls_token", partitioned(nn.initializers.zeros, "embed"),
                                (self.dim,))
    self.pos_embed = self.param("pos_embed", partitioned(release_normal(), None, "embed"),
                                (self.num_patches + 1, self.dim))
    self.temporal_pos_embed = self.param(
        "temporal_pos_embed", partitioned(nn.initializers.zeros, None, "embed"),
        (self.token_frames, self.dim))
    self.blocks = layer_stack(EndoMambaLayer, self.depth, remat=self.remat, num_broadcast=1,
                              static_broadcast=(0,))(
        dim=self.dim, cfg=self.mamba, n_layers=self.depth, bidirectional=True, norm="rms",
        norm_eps=self.norm_eps, stochastic_depth=self.drop_path_rate > 0, weight_init="release")
    self.norm_f = RMSNorm(eps=self.norm_eps, dtype=self.dtype, name="norm_f")
    if self.num_classes > 0:
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                           kernel_init=partitioned(release_normal(), "embed", None),
                           bias_init=partitioned(nn.initializers.zeros, None))

  def _check_input(self, video):
    check_video(video, img_size=self.img_size, in_chans=self.in_chans, who="VideoMamba")
    t = video.shape[1]
    if t % self.kernel_size or t > self.num_frames:
      raise ValueError(f"VideoMamba: clip has {t} frames, expected a multiple of kernel_size="
                       f"{self.kernel_size} up to num_frames={self.num_frames} (set num_frames)")

  def embed(self, video: Array) -> Array:
    """``video (b, t, H, W, C)`` -> tokens ``(b, 1 + T·n, dim)`` float32, cls first, then the
    patches time-major."""
    b = video.shape[0]
    x = self.patch_embed(tubelets(video.astype(self.dtype), self.kernel_size, self.patch_size))
    x = x.astype(jnp.float32) + self.pos_embed[1:]  # (b, T, n, dim)
    x = x + self.temporal_pos_embed[: x.shape[1], None]
    cls = jnp.broadcast_to(self.cls_token + self.pos_embed[0], (b, 1, self.dim))
    return jnp.concatenate([cls, x.reshape(b, -1, self.dim)], axis=1)

  def forward_features(self, video: Array, *, train: bool = False) -> Array:
    """All tokens after norm_f: ``video (b, t, H, W, C) -> (b, 1 + T·n, dim)`` in ``dtype``,
    the cls token first, then the patch tokens time-major. ``train`` enables stochastic depth
    (needs the ``"dropout"`` RNG when ``drop_path_rate > 0``)."""
    self._check_input(video)
    residual = self.embed(video)
    hidden = jnp.zeros(residual.shape, self.dtype)
    index, rates = jnp.arange(self.depth), jnp.asarray(self.drop_rates())
    (hidden, residual, _), _ = self.blocks((hidden, residual, ()), (index, rates, None), train)
    if train and self.drop_path_rate > 0:
      hidden = drop_path(self.make_rng("dropout"), hidden, self.drop_path_rate)
    return self.norm_f(residual + hidden.astype(jnp.float32))

  def teacher_features(self, video: Array) -> Array:
    """The patch tokens, cls dropped: ``video (b, t, H, W, C) -> (b, T·n, dim)`` float32,
    time-major (token ``f·n + j`` is patch ``j`` of token frame ``f``), as
    ``EndoMambaPretrainer.pretrain_loss(teacher_features=...)`` takes them. Inference mode."""
    return self.forward_features(video)[:, 1:].astype(jnp.float32)

  def __call__(self, video: Array, *, train: bool = False) -> Array:
    """The release's ``forward``: ``video (b, t, H, W, C)`` -> logits ``(b, num_classes)``
    from the cls token, or its features ``(b, dim)`` without a head (head dropout is 0)."""
    cls = self.forward_features(video, train=train)[:, 0]
    return self.head(cls) if self.num_classes > 0 else cls


SIZES = {
    "tiny": dict(dim=192, depth=24),
    "small": dict(dim=384, depth=24),
    "middle": dict(dim=576, depth=32),
}


@register("videomamba_t")
def videomamba_t(**overrides) -> nn.Module:
  """VideoMamba-Ti: dim 192, depth 24."""
  return VideoMamba(**{**SIZES["tiny"], **overrides})


@register("videomamba_s")
def videomamba_s(**overrides) -> nn.Module:
  """VideoMamba-S (``videomamba_s16_in1k_res224``): dim 384, depth 24, 16×16 patches; 25,417,728
  parameters without a head at ``num_frames=16`` (EndoMamba's teacher)."""
  return VideoMamba(**{**SIZES["small"], **overrides})


@register("videomamba_m")
def videomamba_m(**overrides) -> nn.Module:
  """VideoMamba-M: dim 576, depth 32."""
  return VideoMamba(**{**SIZES["middle"], **overrides})


@register("videomamba_s_teacher")
def videomamba_s_teacher(**overrides) -> nn.Module:
  """VideoMamba-S as EndoMamba's pretraining script builds its teacher: 16 frames, no head
  (``python -m vidssm_jax.convert --from videomamba --preset videomamba_s_teacher``)."""
  return VideoMamba(**{**SIZES["small"], "num_frames": 16, **overrides})
