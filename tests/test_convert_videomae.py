"""VideoMAE(-v2) conversion: the released ViT-S layout's key names and shapes
(tests/data/videomae_vit_s_keys.json, read once from OpenGVLab/VideoMAEv2's VisionTransformer on
CPU torch: 16 frames, tubelet 2, mean pooling, 710-way head) fill our VideoViT exactly and
round-trip; converted weights give the outputs of the params they came from; bad inputs are one
ValueError. (Against VideoMAE's own code the converted model's logits and tokens matched to
7e-7: the closing note's harness.)"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vidssm_jax import convert
from vidssm_jax.models import create_model
from vidssm_jax.train.state import count_params

DATA = json.load(open(os.path.join(os.path.dirname(__file__), "data", "videomae_vit_s_keys.json")))
KEYS = DATA["videomae"]


def flat(params):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def test_release_keys_fill_our_vit_s_and_round_trip():
  model = create_model("vit_s_videomae")
  rng = np.random.default_rng(0)
  state = {f"module.{k}": rng.standard_normal(s).astype(np.float32) for k, s in KEYS.items()}
  params = convert.convert_state_dict("videomae", state, model)
  assert count_params(params) == DATA["num_params"]["videomae"] == 22_153_286
  back = convert.to_state_dict("videomae", params, model)
  release = convert.strip_prefixes(state)
  assert set(back) == set(release)
  for k, v in back.items():
    np.testing.assert_array_equal(v, release[k], err_msg=k)


@pytest.mark.parametrize("pooling", [True, False], ids=["mean-pooling-head", "final-norm"])
def test_converted_weights_give_the_same_outputs(pooling):
  kw = dict(img_size=32, patch_size=16, dim=48, depth=2, num_heads=3, tubelet=2, k_bias=False,
            use_mean_pooling=pooling, num_classes=5 if pooling else 0)
  model = create_model("vit_s", **kw)
  video = jax.random.normal(jax.random.key(0), (2, 4, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(1), video)["params"]
  # Every leaf moved off its init (biases and norms included), so a dropped rule shows.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  state = convert.to_state_dict("videomae", params, model)
  assert ("head.weight" in state) == pooling and ("norm.weight" in state) != pooling
  again = convert.convert_state_dict("videomae", state, model)
  want = model.apply({"params": params}, video)
  got = model.apply({"params": again}, video)
  assert want.shape == ((2, 5) if pooling else (2, 2, 4, 48))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_inputs():
  with pytest.raises(ValueError, match="needs k_bias=False"):
    convert.convert_state_dict("videomae", {}, create_model("vit_s"))
  with pytest.raises(ValueError, match="num_classes > 0 needs use_mean_pooling=True"):
    create_model("vit_s", num_classes=3).init(jax.random.key(0), jnp.zeros((1, 1, 224, 224, 3)))
  model = create_model("vit_s", tubelet=2, k_bias=False, use_mean_pooling=True, num_classes=710)
  state = {k: np.zeros(s, np.float32) for k, s in KEYS.items()}
  state["blocks.0.gamma_1"] = np.zeros(384, np.float32)  # layer scale: not supported
  del state["head.bias"]
  with pytest.raises(ValueError) as e:
    convert.convert_state_dict("videomae", state, model)
  assert "blocks.0.gamma_1" in str(e.value) and "head.bias" in str(e.value)
