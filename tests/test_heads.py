"""Task heads: documented shapes, the phase head is causal and streams, backbone+head wrapper."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from vidssm_jax.models import create_model
from vidssm_jax.models.heads import ClipClassifier, PhaseClassifier, SegmentationDecoder

CFG = dict(img_size=32, patch_size=16, dim=32, depth=4)
B, T, K = 2, 6, 7


@pytest.fixture(scope="module")
def video():
  return jax.random.normal(jax.random.key(0), (B, T, 32, 32, 3))


def _build(head, video, **kw):
  model = create_model("endomamba_tiny", **CFG, head=head, num_classes=K, **kw)
  variables = jax.jit(model.init)(jax.random.key(1), video[:, :1])
  return model, variables


@pytest.fixture(scope="module")
def phase(video):
  model, variables = _build("phase", video)
  return model, variables, jax.jit(model.apply)


def test_clip_head_shape_and_param_tree(video):
  model, variables = _build("clip", video, pool="cls")
  logits = jax.jit(model.apply)(variables, video)
  assert logits.shape == (B, K) and logits.dtype == jnp.float32
  params = nn.meta.unbox(variables)["params"]
  assert set(params) == {"backbone", "head"}
  backbone = create_model("endomamba_tiny", **CFG)
  plain = jax.eval_shape(backbone.init, jax.random.key(0), video[:, :1])["params"]
  # A pretrained backbone's params drop in unchanged.
  assert jax.tree.structure(nn.meta.unbox(plain)) == jax.tree.structure(params["backbone"])


def test_segmentation_logits_at_input_resolution(video):
  model, variables = _build("segmentation", video)
  logits = jax.jit(model.apply)(variables, video[:, :2])
  assert logits.shape == (B, 2, 32, 32, K)
  assert np.isfinite(np.asarray(logits)).all()
  assert float(jnp.std(logits)) > 0
  dec = SegmentationDecoder(K, img_size=40, patch_size=10, has_cls_token=False)
  taps = [jnp.ones((1, 1, 16, 8))] * 3  # 4×4 grid of 10-pixel patches
  out, _ = jax.jit(dec.init_with_output)(jax.random.key(0), taps)
  assert out.shape == (1, 1, 40, 40, K)


def test_phase_head_is_causal(video, phase):
  _, variables, apply = phase
  logits = apply(variables, video)
  assert logits.shape == (B, T, K)
  for t in (0, 3):
    changed = apply(variables, video.at[:, t + 1].multiply(-1.0))
    np.testing.assert_array_equal(np.asarray(changed[:, :t + 1]), np.asarray(logits[:, :t + 1]))
    # The changed frame's own logits move in every clip. (Its influence on later frames is real
    # but, at the release's init, decays to ~1e-9 within a few frames, below float32 noise.)
    assert float(jnp.abs(changed[:, t + 1] - logits[:, t + 1]).max(-1).min()) > 1e-4


def test_phase_head_streams_frame_by_frame(video, phase):
  model, variables, apply = phase
  whole = apply(variables, video)
  step = jax.jit(functools.partial(model.apply, method="step"))
  state = model.init_state(B)
  out = []
  for t in range(T):
    logits_t, state = step(variables, video[:, t], state)
    assert logits_t.shape == (B, K)
    out.append(logits_t)
  assert rel_err(jnp.stack(out, 1), whole) <= 1e-4


def test_heads_on_their_own_and_errors():
  feats = jnp.ones((2, 3, 5, 16))
  init = lambda head, x: jax.jit(head.init_with_output)(jax.random.key(0), x)[0]
  clip, per_frame = init(ClipClassifier(4), feats), init(PhaseClassifier(4), feats)
  one_frame = init(PhaseClassifier(4), feats[:, 0])
  assert clip.shape == (2, 4) and per_frame.shape == (2, 3, 4) and one_frame.shape == (2, 4)
  with pytest.raises(ValueError, match="needs num_classes"):
    create_model("endomamba_tiny", **CFG, head="clip")
  with pytest.raises(ValueError, match="head must be one of"):
    create_model("endomamba_tiny", **CFG, head="detect", num_classes=2)
  with pytest.raises(ValueError, match="pool='cls' needs a backbone with use_cls_token"):
    PhaseClassifier(4, pool="cls", has_cls_token=False).init(jax.random.key(0), feats)
  with pytest.raises(ValueError, match="expected the backbone's 3 intermediate maps"):
    SegmentationDecoder(2, img_size=32).init(jax.random.key(0), [feats])
  model = create_model("endomamba_tiny", **CFG, head="clip", num_classes=2)
  with pytest.raises(ValueError, match="streaming needs the per-frame head"):
    model.init_state(1)
