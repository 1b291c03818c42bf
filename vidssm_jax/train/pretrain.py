"""One jitted pretraining step: mask → student encoder → decoder → L_rec (+ alpha · L_align).

The model supplies ``pretrain_loss(video, mask, ...) -> (loss, aux)`` (E-ViM³ and the EndoMamba
pretrainer both do). For EndoMamba a frozen teacher (the video ViT) runs on the full clip and its
token features go in as ``teacher_features``; the teacher's parameters are an argument of the
step, never part of the train state, so the optimizer cannot touch them.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from vidssm_jax import masking
from vidssm_jax.train.state import TrainState


def token_grid(model) -> tuple[int, int, int]:
  """(L', H', W') of the model's token volume, the grid the mask is drawn on."""
  grid = model.token_grid
  return tuple(int(g) for g in (grid() if callable(grid) else grid))


def draw_mask(rng, batch_size: int, grid, mask_config) -> jax.Array:
  """One mask per example, ``bool (b, L', H', W')``, True = masked."""
  options = {k: v for k, v in mask_config.items() if k not in ("kind", "ratio")}
  return masking.batched_mask(rng, batch_size, grid, float(mask_config.ratio),
                              kind=mask_config.kind, **options)


def make_pretrain_step(model, mask_config, *, teacher=None, alpha: float = 0.0,
                       ema_decay: float = 0.0, ema_every: int = 1):
  """Returns ``step(state, batch, rng, teacher_params=None) -> (state, metrics)`` (not jitted:
  the caller jits it with shardings)."""
  grid = token_grid(model)

  def step(state: TrainState, batch: dict, rng, teacher_params: Optional[Any] = None):
    video = batch["video"]
    mask_rng, drop_rng = jax.random.split(rng)
    mask = draw_mask(mask_rng, video.shape[0], grid, mask_config)
    kwargs = {}
    if teacher is not None:
      feats = teacher.apply({"params": teacher_params}, video)
      kwargs = dict(teacher_features=jax.lax.stop_gradient(feats.reshape(
          feats.shape[0], -1, feats.shape[-1])), alpha=alpha)

    def loss_fn(params):
      loss, aux = model.apply({"params": params}, video, mask, train=True, **kwargs,
                              method="pretrain_loss", rngs={"dropout": drop_rng})
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads, ema_decay=ema_decay, ema_every=ema_every)
    metrics = {"loss": loss, "grad_norm": _global_norm(grads)}
    for k in ("loss_rec", "loss_align"):
      if k in aux:
        metrics[k] = aux[k]
    return state, metrics

  return step


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_image_fn(model, mask_config, *, seed: int = 0, max_frames: int = 8):
  """``image_fn(state, batch) -> {"reconstruction": (3·H, F·W, 3) float in [0, 1]}`` for the
  loop's image summaries: rows input / masked input / reconstruction of the first clip of the
  batch, ``F = min(t, max_frames)`` frames, with a fixed mask so summaries compare across steps.
  Returns None when the model has no ``reconstruct`` method."""
  if not hasattr(model, "reconstruct"):
    return None
  grid = token_grid(model)

  @jax.jit
  def images(params, video):
    video = video[:1]
    mask = draw_mask(jax.random.key(seed), 1, grid, mask_config)
    recon = model.apply({"params": params}, video, mask, method="reconstruct")
    _, t, h, w, c = video.shape
    up = (t // grid[0], h // grid[1], w // grid[2])
    pixel_mask = mask[0]
    for axis, r in enumerate(up):
      pixel_mask = jnp.repeat(pixel_mask, r, axis=axis)
    lo, hi = jnp.min(video), jnp.max(video)
    norm = lambda x: jnp.clip((x[0].astype(jnp.float32) - lo) / (hi - lo + 1e-6), 0.0, 1.0)
    rows = [norm(video), jnp.where(pixel_mask[..., None], 0.5, norm(video)), norm(recon)]
    f = min(t, max_frames)
    rows = [jnp.concatenate(list(r[:f]), axis=1) for r in rows]  # (H, F·W, C) each
    grid_img = jnp.concatenate(rows, axis=0)
    return jnp.broadcast_to(grid_img, grid_img.shape[:2] + (3,)) if c == 1 else grid_img[..., :3]

  def image_fn(state, batch):
    return {"reconstruction": jax.device_get(images(state.params, batch["video"]))}

  return image_fn
