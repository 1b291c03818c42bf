"""The VideoMamba release (github.com/OpenGVLab/VideoMamba) -> our ``VideoMamba`` params.

Source ``"videomamba"``: the video model (``videomamba/video_sm/models/videomamba.py``,
``VisionMamba``), with its ``head`` Linear or without (``num_classes=0``). Release names -> ours:

    patch_embed.proj.weight (dim, C, k, p, p), .bias   patch_embed kernel (k·p·p·C, dim), bias
    cls_token (1, 1, dim), pos_embed (1, 1 + n, dim)    cls_token (dim,), pos_embed (1 + n, dim)
    temporal_pos_embedding (1, T, dim)                  temporal_pos_embed (T, dim)
    layers.{i}.norm / mixer.*                           blocks slice i (as convert/endomamba.py:
                                                        mixer/ssm and mixer/ssm_b)
    norm_f.weight                                       norm_f/scale
    head.weight, .bias                                  head (with num_classes > 0)

The released ImageNet checkpoints (``videomamba_s16_in1k_res224.pth``, the EndoMamba teacher's
weights) hold the *image* model: a 2D patch embedding, no temporal embedding, a 1000-way head.
:func:`inflate_image_state_dict` turns one into the video model's state_dict as the release's
``load_state_dict`` does, before ``convert_state_dict``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vidssm_jax.convert import Recipe, Rule, conv3d_patch, linear, reshape_from
from vidssm_jax.convert.endomamba import mamba_block_rules


def recipe(model) -> Recipe:
  """Source ``"videomamba"``: every parameter of a ``VideoMamba`` from the release's keys."""
  d, k, p = model.dim, model.kernel_size, model.patch_size
  rules = [
      Rule("patch_embed/kernel", "patch_embed.proj.weight", conv3d_patch((k, p, p))),
      Rule("patch_embed/bias", "patch_embed.proj.bias"),
      Rule("cls_token", "cls_token", reshape_from((1, 1, d))),
      Rule("pos_embed", "pos_embed", reshape_from((1, model.num_patches + 1, d))),
      Rule("temporal_pos_embed", "temporal_pos_embedding",
           reshape_from((1, model.token_frames, d))),
      Rule("norm_f/scale", "norm_f.weight"),
  ]
  rules += mamba_block_rules("blocks", "layers", 0, bidirectional=True)
  if model.num_classes > 0:
    rules += linear("head", "head")

  def init(m, rng):
    return m.init(rng, jnp.zeros((1, m.num_frames, m.img_size, m.img_size, m.in_chans)))

  return Recipe(init=init, rules=rules)


def inflate_image_state_dict(state_dict: dict, num_frames: int, kernel_size: int = 1) -> dict:
  """An image VideoMamba state_dict (``patch_embed.proj.weight (dim, C, p, p)``, no
  ``temporal_pos_embedding``) -> the video model's, as the release's ``load_state_dict``:
  the 2D patch kernel placed at the centre frame of a ``kernel_size``-frame kernel (zeros
  elsewhere), ``temporal_pos_embedding`` zeros ``(1, num_frames / kernel_size, dim)``, ``head.*``
  dropped. A video state_dict passes through unchanged but for the head."""
  out = {key: np.asarray(v) for key, v in state_dict.items() if not key.startswith("head.")}
  key = "patch_embed.proj.weight"
  if key not in out:
    raise ValueError(f"inflate_image_state_dict: no {key!r} (not a VideoMamba state_dict?)")
  w = out[key]
  if w.ndim == 4:
    kernel = np.zeros((w.shape[0], w.shape[1], kernel_size) + w.shape[2:], w.dtype)
    kernel[:, :, kernel_size // 2] = w
    out[key] = kernel
  if "temporal_pos_embedding" not in out:
    if num_frames % kernel_size:
      raise ValueError(f"inflate_image_state_dict: num_frames={num_frames} is not a multiple "
                       f"of kernel_size={kernel_size}")
    out["temporal_pos_embedding"] = np.zeros((1, num_frames // kernel_size, w.shape[0]),
                                             np.float32)
  return out
