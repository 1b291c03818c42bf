"""The pretraining step with a frozen teacher, and the reconstruction summaries."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vidssm_jax.models import create_model
from vidssm_jax.train import pretrain as pt
from vidssm_jax.train.state import create_state, make_optimizer

T, SIZE, B = 4, 32, 2
TINY = dict(img_size=SIZE, patch_size=8, depth=2, dim=32, num_frames=T)
TUBE = ml_collections.ConfigDict(dict(kind="tube", ratio=0.75))


@pytest.fixture(scope="module")
def setup():
  student = create_model("endomamba_tiny_pretrain", **TINY)
  teacher = create_model("vit_s", img_size=SIZE, patch_size=8, dim=32, depth=1, num_heads=2)
  video = jax.random.normal(jax.random.key(0), (B, T, SIZE, SIZE, 3))
  mask = pt.draw_mask(jax.random.key(1), B, pt.token_grid(student), TUBE)
  t_params = nn.meta.unbox(teacher.init(jax.random.key(2), video))["params"]
  s_params = nn.meta.unbox(student.init(jax.random.key(3), video, mask))["params"]
  return student, teacher, video, t_params, s_params


def test_token_grid_is_frames_by_patch_grid(setup):
  student = setup[0]
  assert pt.token_grid(student) == (T, SIZE // 8, SIZE // 8)


def test_teacher_params_are_bit_identical_after_training_steps(setup):
  student, teacher, video, t_params, s_params = setup
  optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, weight_decay=0.05,
                                         clip_norm=1.0))
  tx, _ = make_optimizer(optim, s_params, total_steps=10)
  state = create_state(s_params, tx, use_ema=False)
  before = jax.tree.map(np.array, t_params)
  step = jax.jit(pt.make_pretrain_step(student, TUBE, teacher=teacher, alpha=0.25))
  losses = []
  for i in range(3):
    state, metrics = step(state, {"video": video}, jax.random.key(10 + i), t_params)
    losses.append(metrics)
  after = jax.tree.map(np.array, t_params)
  # The teacher is untouched, bit for bit; the student moved; both loss terms are live.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before, after)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                                       state.params, jax.tree.map(np.array, s_params)))
  assert max(moved) > 0
  for m in losses:
    assert float(m["loss_align"]) > 0 and float(m["loss_rec"]) > 0
    np.testing.assert_allclose(float(m["loss"]), float(m["loss_rec"]) + 0.25 * float(m["loss_align"]),
                               rtol=1e-5)


def test_reconstruction_grid_shows_input_masked_and_recon(setup):
  student, _, video, _, s_params = setup
  image_fn = pt.make_image_fn(student, TUBE, seed=0, max_frames=3)

  class State:
    params = s_params

  images = image_fn(State, {"video": video})
  grid = images["reconstruction"]
  assert grid.shape == (3 * SIZE, 3 * SIZE, 3)
  assert np.all(np.isfinite(grid)) and grid.min() >= 0 and grid.max() <= 1
  # Row 1 (masked input) equals row 0 (input) exactly where patches are visible, and is the
  # flat grey 0.5 where they are masked; in the reconstruction, visible patches are the input's.
  mask = pt.draw_mask(jax.random.key(0), 1, pt.token_grid(student), TUBE)[0, 0]
  pix = np.repeat(np.repeat(np.asarray(mask), 8, 0), 8, 1)  # (SIZE, SIZE) of frame 0
  inp, masked, recon = (grid[r * SIZE:(r + 1) * SIZE, :SIZE] for r in range(3))
  assert pix.any() and (~pix).any()
  np.testing.assert_allclose(masked[pix], 0.5)
  np.testing.assert_allclose(masked[~pix], inp[~pix])
  np.testing.assert_allclose(recon[~pix], inp[~pix], atol=1e-5)
