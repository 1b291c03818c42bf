"""E-ViM³ conversion: the release's p4 key names and shapes (tests/data/evim3_p4_keys.json, read
once from the release on CPU torch, no weights) fill our p4 model exactly, round-trip, and every
bad input is one ValueError listing the problems. Shapes only: nothing here runs the model."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from vidssm_jax import convert
from vidssm_jax.convert import evim3 as cv
from vidssm_jax.models import create_model
from vidssm_jax.models.evim3 import patchify
from vidssm_jax.train.state import count_params

KEYS = json.load(open(os.path.join(os.path.dirname(__file__), "data", "evim3_p4_keys.json")))
SOURCES = ("evim3", "evim3_pretrain")


def release_state(source, seed=0):
  """Random arrays under the release's names and shapes, as a DDP checkpoint would hold them."""
  rng = np.random.default_rng(seed)
  return {f"module.{k}": rng.standard_normal(s).astype(np.float32)
          for k, s in KEYS[source].items()}


def flat(params):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def p4():
  return create_model("evim3_p4")


@pytest.mark.parametrize("source", SOURCES)
def test_release_keys_fill_our_p4_model_and_round_trip(p4, source):
  state = release_state(source)
  params = convert.convert_state_dict(source, state, p4)
  want = convert.param_shapes(convert.recipe_for(source, p4), p4)
  got = flat(params)
  assert set(got) == set(want)
  assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)
  # The release's parameter counts (its pretraining model holds one unused 192-wide mask token).
  unused = {"evim3": 0, "evim3_pretrain": 192}[source]
  assert count_params(params) == KEYS["num_params"][source] - unused
  # Every value lands somewhere and comes back: ours -> release format -> ours is the identity.
  back = convert.to_state_dict(source, params, p4)
  release = convert.strip_prefixes(state)
  assert set(release) - set(back) == ({"encoder_random_patch_mask_maker.mask_token"}
                                      if unused else set())
  for k, v in back.items():
    np.testing.assert_array_equal(v, release[k], err_msg=k)
  again = flat(convert.convert_state_dict(source, back, p4))
  assert all(np.array_equal(again[k], got[k]) for k in got)


def test_named_layers_land_where_the_release_uses_them(p4):
  """Spot checks of the layout: block i of the scan is net.encoder.{i}; j-th layer the j-th
  scan order; tokens, position embeddings and the EF head in our shapes."""
  state = convert.strip_prefixes(release_state("evim3"))
  got = convert.convert_state_dict("evim3", state, p4)
  enc = got["encoder"]
  layer = enc["stack"]["blocks"]["layers_3"]  # r_lwh_mamba
  key = "net.encoder.4.r_lwh_mamba.mamba_layers.0.mamba_block"
  np.testing.assert_array_equal(layer["mixer"]["in_proj"]["kernel"][4],
                                state[f"{key}.in_proj.weight"].T)
  np.testing.assert_array_equal(layer["mixer"]["ssm"]["conv_weight"][4],
                                state[f"{key}.conv1d.weight"][:, 0, :].T)
  np.testing.assert_array_equal(layer["mixer"]["ssm"]["dt_proj_kernel"][4],
                                state[f"{key}.dt_proj.weight"].T)
  np.testing.assert_array_equal(enc["edge_tokens"][7], state["net.global_edges_token"][7, 0, 0, 0, 0])
  np.testing.assert_array_equal(enc["pos_embed_h"], state["net.h_pos_embed"][0, 0, :, 0])
  np.testing.assert_array_equal(enc["norm_f"]["scale"], state["final.final_norm.weight"])
  assert got["head"]["fc1"]["kernel"].shape == (27 * 192, 512)
  np.testing.assert_array_equal(got["head"]["fc"]["kernel"], state["ef_head.net.mlp.4.weight"].T)


def test_patch_embedding_and_pixel_order_match_the_release_layout():
  """The Conv3d patch embedding (stride = kernel) and the decoder's pixel order, computed the
  release's way in NumPy, equal ours after the transforms (2 colour channels, so C matters)."""
  rng = np.random.default_rng(0)
  c, t, p, d = 2, 2, 4, 5
  video = rng.standard_normal((1, 4, 8, 8, c))  # (b, T, H, W, C)
  weight = rng.standard_normal((d, c, t, p, p))
  # Release: conv over (C, T, H, W) with stride = kernel, output (d, L', H', W').
  x = video[0].transpose(3, 0, 1, 2).reshape(c, 2, t, 2, p, 2, p)
  conv = np.einsum("cltaubv,dctuv->dlab", x, weight)
  kernel = convert.conv3d_patch((t, p, p)).forward(weight, None)
  ours = np.asarray(patchify(video, t, p))[0] @ kernel  # (L', H', W', d)
  np.testing.assert_allclose(ours, conv.transpose(1, 2, 3, 0), rtol=1e-12)
  # Release targets: patch pixels flattened (C, t, h, w); ours (t, h, w, C).
  theirs = x.transpose(1, 3, 5, 0, 2, 4, 6).reshape(2, 2, 2, c * t * p * p)
  w_rel = rng.standard_normal((c * t * p * p, d))  # patch_reconstruct.weight (P, d)
  k_ours = cv.pixel_order(c, (t, p, p), True).forward(w_rel, None)
  h = rng.standard_normal((3, d))
  pred_rel, pred_ours = h @ w_rel.T, h @ k_ours  # the same pixels, in each one's order
  reorder = lambda y: y.reshape(-1, c, t, p, p).transpose(0, 2, 3, 4, 1).reshape(len(y), -1)
  np.testing.assert_allclose(pred_ours, reorder(pred_rel), rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(patchify(video, t, p))[0].reshape(8, -1),
                                reorder(theirs.reshape(8, -1)))
  for transform, x in ((cv.pixel_order(c, (t, p, p), True), w_rel),
                       (cv.pixel_order(c, (t, p, p), False), w_rel[:, 0]),
                       (convert.conv3d_patch((t, p, p)), weight)):
    np.testing.assert_array_equal(transform.backward(transform.forward(x, None)), x)


def test_bad_state_dicts_are_one_error_listing_every_problem(p4):
  state = convert.strip_prefixes(release_state("evim3"))
  gone = "net.encoder.2.lhw_mamba.mamba_layers.0.mamba_block.A_log"
  del state[gone]
  state["net.extra.weight"] = np.zeros(3, np.float32)
  state["net.patch_embed.proj.bias"] = np.zeros(7, np.float32)
  state["final.final_linear.mlp.0.weight"] = np.zeros((512, 100), np.float32)
  with pytest.raises(ValueError) as e:
    convert.convert_state_dict("evim3", state, p4)
  msg = str(e.value)
  assert "1 missing keys: " + gone in msg
  assert "1 unexpected keys: net.extra.weight" in msg
  assert "2 wrong shapes" in msg and "net.patch_embed.proj.bias (7,)" in msg
  assert "final.final_linear.mlp.0.weight (512, 100) (for head/fc1/kernel (5184, 512))" in msg
  # A model that differs from the release (the mean-pooled head) names the mis-shaped head.
  with pytest.raises(ValueError, match=r"head/fc1/kernel \(192, 512\)"):
    convert.convert_state_dict("evim3", release_state("evim3"), create_model("evim3_p4",
                                                                             pool="egt"))
  # Our own choice of a LayerNorm before the decoder has no release weights.
  with pytest.raises(ValueError, match="params no rule fills: encoder/norm_f/bias"):
    convert.convert_state_dict("evim3_pretrain", release_state("evim3_pretrain"),
                               create_model("evim3_p4", pretrain_norm=True))
  with pytest.raises(ValueError, match=r"unknown source 'evim4'; sources are \['endomamba'"):
    convert.convert_state_dict("evim4", state, p4)
