"""VideoMamba (models/videomamba.py) and its converter (convert/videomamba.py): shapes and a
forward of a tiny preset, the token layout (cls first, patches time-major; the teacher drops the
cls token) checked against a NumPy Conv3d patch embedding, the release's key names and shapes
(tests/data, no weights) filling ``videomamba_s`` exactly with the release's parameter count,
round trips, the image-checkpoint inflation, and every bad input."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

from vidssm_jax.convert import convert_state_dict, param_shapes, recipe_for, to_state_dict
from vidssm_jax.convert.videomamba import inflate_image_state_dict
from vidssm_jax.models import create_model

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY = dict(img_size=32, patch_size=16, dim=32, depth=2, num_frames=4, scan_backend="reference")
RELEASE_PARAMETERS = 25_417_728  # videomamba_small(num_frames=16, num_classes=0) in torch


def release_keys():
  with open(os.path.join(DATA, "videomamba_s16_keys.json")) as f:
    data = json.load(f)
  return data["parameters"], {k: tuple(v) for k, v in data["keys"].items()}


def random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def random_video(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def init(model, video):
  return meta.unbox(model.init(jax.random.PRNGKey(0), video)["params"])


def test_tiny_forward_shapes_and_scanned_blocks():
  model = create_model("videomamba_s", **TINY, num_classes=5)
  video = random_video((2, 4, 32, 32, 3))
  params = init(model, video)
  assert params["blocks"]["mixer"]["in_proj"]["kernel"].shape == (2, 32, 128)  # (layers, ...)
  assert params["temporal_pos_embed"].shape == (4, 32)
  logits = model.apply({"params": params}, video)
  tokens = model.apply({"params": params}, video, method="forward_features")
  teacher = model.apply({"params": params}, video, method="teacher_features")
  assert logits.shape == (2, 5) and tokens.shape == (2, 1 + 4 * 4, 32)
  assert teacher.shape == (2, 4 * 4, 32) and teacher.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_array_equal(teacher, tokens[:, 1:])
  # Stochastic depth draws from the dropout RNG and changes the output in training only.
  train = model.apply({"params": params}, video, train=True,
                      rngs={"dropout": jax.random.PRNGKey(1)})
  assert train.shape == (2, 5) and not np.allclose(train, logits)


def conv3d_patch_embed(video, weight, bias, kernel, p):
  """NumPy Conv3d, stride = kernel: ``video (b, t, H, W, C)``, ``weight (d, C, k, p, p)`` ->
  ``(b, t/k, H/p, W/p, d)``."""
  b, t, h, w, c = video.shape
  x = video.reshape(b, t // kernel, kernel, h // p, p, w // p, p, c)
  return np.einsum("bTkhiwjc,dckij->bThwd", x, weight) + bias


@pytest.mark.parametrize("kernel_size", [1, 2])
def test_token_layout_cls_first_then_patches_time_major(kernel_size):
  model = create_model("videomamba_s", **TINY, kernel_size=kernel_size)
  video = random_video((1, 4, 32, 32, 3), seed=1)
  state = to_state_dict("videomamba", init(model, video), model)
  state = {**state, **random_state_dict({k: state[k].shape for k in (
      "patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "temporal_pos_embedding")})}
  params = convert_state_dict("videomamba", state, model)
  tokens = model.apply({"params": params}, video, method="embed")
  frames, n, d = 4 // kernel_size, 4, 32
  assert tokens.shape == (1, 1 + frames * n, d)
  pos, temporal = state["pos_embed"][0], state["temporal_pos_embedding"][0]
  np.testing.assert_allclose(tokens[0, 0], state["cls_token"][0, 0] + pos[0], rtol=1e-6)
  patches = conv3d_patch_embed(np.asarray(video), state["patch_embed.proj.weight"],
                               state["patch_embed.proj.bias"], kernel_size, 16)
  for f in range(frames):
    for j in range(n):  # token 1 + f·n + j: patch j (raster order) of token frame f
      want = patches[0, f, j // 2, j % 2] + pos[1 + j] + temporal[f]
      np.testing.assert_allclose(tokens[0, 1 + f * n + j], want, rtol=1e-5, atol=1e-4)  # float32 sums of 768 terms


def test_teacher_features_feed_the_endomamba_pretrainer():
  teacher = create_model("videomamba_s", **TINY)
  video = random_video((2, 4, 32, 32, 3), seed=2)
  features = teacher.apply({"params": init(teacher, video)}, video, method="teacher_features")
  student = create_model("endomamba_tiny_pretrain", img_size=32, patch_size=16, dim=16, depth=2,
                         num_frames=4, teacher_dim=32, decoder_depth=1, mask_ratio=0.5,
                         scan_backend="reference")
  mask = jnp.zeros((2, 4, 2, 2), bool).at[:, :, 0, :].set(True)  # tube mask, 2 of 4 masked
  loss = functools.partial(student.apply, method="pretrain_loss", train=False)
  variables = student.init(jax.random.PRNGKey(0), video, mask, features, method="pretrain_loss",
                           train=False)
  _, aux = loss(variables, video, mask, features)
  assert 0.0 < float(aux["loss_align"]) < 2.0  # mean(1 - cos) over the visible tokens


def test_release_keys_fill_videomamba_s_exactly_and_round_trip():
  total, shapes = release_keys()
  assert total == RELEASE_PARAMETERS == sum(int(np.prod(s)) for s in shapes.values())
  model = create_model("videomamba_s_teacher")  # 16 frames, no head: EndoMamba's teacher
  assert (model.dim, model.depth, model.num_frames, model.num_classes) == (384, 24, 16, 0)
  state = random_state_dict(shapes)
  params = convert_state_dict("videomamba", {f"module.{k}": v for k, v in state.items()}, model)
  ours = param_shapes(recipe_for("videomamba", model), model)
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  assert set(flat) == set(ours) and all(flat[k].shape == ours[k].shape for k in ours)
  assert sum(v.size for v in flat.values()) == RELEASE_PARAMETERS
  np.testing.assert_array_equal(flat["blocks/mixer/ssm_b/A_log"][7], state["layers.7.mixer.A_b_log"])
  np.testing.assert_array_equal(flat["blocks/mixer/in_proj/kernel"][23],
                                state["layers.23.mixer.in_proj.weight"].T)
  back = to_state_dict("videomamba", params, model)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_converted_weights_give_the_same_outputs_as_their_source():
  model = create_model("videomamba_s", **TINY, num_classes=3)
  video = random_video((1, 4, 32, 32, 3), seed=3)
  params = init(model, video)
  back = convert_state_dict("videomamba", to_state_dict("videomamba", params, model), model)
  np.testing.assert_array_equal(model.apply({"params": back}, video),
                                model.apply({"params": params}, video))


def test_inflating_an_image_checkpoint_as_the_release_loads_it():
  model = create_model("videomamba_s", **TINY)
  video_state = to_state_dict("videomamba", init(model, random_video((1, 4, 32, 32, 3))), model)
  image = {k: v for k, v in video_state.items() if k != "temporal_pos_embedding"}
  image["patch_embed.proj.weight"] = video_state["patch_embed.proj.weight"][:, :, 0]
  image["head.weight"], image["head.bias"] = np.ones((10, 32), np.float32), np.ones(10, np.float32)
  inflated = inflate_image_state_dict(image, num_frames=4, kernel_size=2)
  weight = inflated["patch_embed.proj.weight"]
  assert weight.shape == (32, 3, 2, 16, 16) and not weight[:, :, 0].any()
  np.testing.assert_array_equal(weight[:, :, 1], image["patch_embed.proj.weight"])  # centre
  assert inflated["temporal_pos_embedding"].shape == (1, 2, 32)
  assert not inflated["temporal_pos_embedding"].any() and "head.weight" not in inflated
  tubelet_model = create_model("videomamba_s", **TINY, kernel_size=2)
  convert_state_dict("videomamba", inflated, tubelet_model)  # fits exactly
  with pytest.raises(ValueError, match="no 'patch_embed.proj.weight'"):
    inflate_image_state_dict({"pos_embed": np.zeros((1, 5, 32))}, num_frames=4)


def test_bad_inputs_raise_one_clear_error():
  _, shapes = release_keys()
  model = create_model("videomamba_s", num_frames=16)
  state = random_state_dict(shapes)
  missing = {k: v for k, v in state.items() if k != "layers.3.mixer.D_b"}
  with pytest.raises(ValueError, match=r"1 missing keys: layers\.3\.mixer\.D_b"):
    convert_state_dict("videomamba", missing, model)
  extra = {**state, "head.weight": np.zeros((1000, 384), np.float32)}
  with pytest.raises(ValueError, match=r"1 unexpected keys: head\.weight"):
    convert_state_dict("videomamba", extra, model)
  eight = {**state, "temporal_pos_embedding": np.zeros((1, 8, 384), np.float32)}
  with pytest.raises(ValueError, match=r"1 wrong shapes: temporal_pos_embedding \(1, 8, 384\)"):
    convert_state_dict("videomamba", eight, model)
  tiny = create_model("videomamba_s", **TINY, kernel_size=2)
  params = init(tiny, random_video((1, 4, 32, 32, 3)))
  with pytest.raises(ValueError, match="clip has 6 frames.*num_frames=4"):
    tiny.apply({"params": params}, random_video((1, 6, 32, 32, 3)))
  with pytest.raises(ValueError, match="clip has 3 frames.*kernel_size=2"):
    tiny.apply({"params": params}, random_video((1, 3, 32, 32, 3)))
  with pytest.raises(ValueError, match="video has 1 channels"):
    tiny.apply({"params": params}, random_video((1, 4, 32, 32, 1)))
  with pytest.raises(ValueError, match="num_frames=5 is not a multiple of kernel_size=2"):
    create_model("videomamba_s", **{**TINY, "num_frames": 5}, kernel_size=2).init(
        jax.random.PRNGKey(0), random_video((1, 4, 32, 32, 3)))
