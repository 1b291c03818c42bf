"""Video ViT: token layout lines up with EndoMamba, tubelets, global attention, sizes, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidssm_jax.models import create_model

CFG = dict(img_size=32, patch_size=16, dim=32, depth=2, num_heads=4)


def _count(model, shape):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes)))


def test_tokens_line_up_with_endomamba_patches_and_attention_is_global():
  vit = create_model("vit_s", **CFG)
  video = jax.random.normal(jax.random.key(0), (2, 4, 32, 32, 3))
  variables = jax.jit(vit.init)(jax.random.key(1), video)
  apply = jax.jit(vit.apply)
  tokens = apply(variables, video)
  backbone = create_model("endomamba_tiny", img_size=32, patch_size=16, dim=32, depth=2)
  assert tokens.shape == (2, 4, backbone.num_patches, 32)
  # Space-time attention: a later frame changes every token of an earlier frame.
  changed = apply(variables, video.at[:, 3].add(1.0))
  assert float(jnp.abs(changed[:, 0] - tokens[:, 0]).min()) > 0
  # Final LayerNorm: zero mean, unit variance per token.
  np.testing.assert_allclose(jnp.mean(tokens, -1), 0, atol=1e-5)


def test_two_frame_tubelets():
  vit = create_model("vit_s", **CFG, tubelet=2)
  video = jnp.ones((1, 4, 32, 32, 3))
  out, variables = jax.jit(vit.init_with_output)(jax.random.key(0), video)
  assert out.shape == (1, 2, 4, 32)
  assert nn.meta.unbox(variables)["params"]["patch_embed"]["kernel"].shape == (2, 16, 16, 3, 32)
  with pytest.raises(ValueError, match="3 frames, not a multiple of the temporal tubelet size 2"):
    vit.apply(variables, jnp.ones((1, 3, 32, 32, 3)))
  with pytest.raises(ValueError, match="frames are 48×48, the model expects 32×32"):
    vit.apply(variables, jnp.ones((1, 2, 48, 48, 3)))


def test_sizes():
  n_s = _count(create_model("vit_s"), (1, 2, 224, 224, 3))
  n_b = _count(create_model("vit_b"), (1, 2, 224, 224, 3))
  print(f"vit_s {n_s:,} parameters, vit_b {n_b:,}")
  assert 21.5e6 < n_s < 22.5e6 and 85.5e6 < n_b < 87e6
