"""EndoMamba release state_dicts -> our params: the release's key names and shapes (committed
under tests/data, no weights) fill ``endomamba_small`` and its pretraining model exactly, with
the release's parameter counts; conversion round-trips; converted weights give the outputs of
the params they came from; bad inputs raise the converter's ValueError."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vidssm_jax.convert import convert_state_dict, param_shapes, recipe_for, to_state_dict
from vidssm_jax.models import create_model

DATA = os.path.join(os.path.dirname(__file__), "data")


def release_keys(name):
  with open(os.path.join(DATA, f"{name}.json")) as f:
    data = json.load(f)
  return data["parameters"], {k: tuple(v) for k, v in data["keys"].items()}


def random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def leaf_count(params):
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name, source, json_name, count", [
    ("endomamba_small", "endomamba", "endomamba_small_keys", 24_462_336),
    ("endomamba_small_pretrain", "endomamba_pretrain", "endomamba_small_pretrain_keys",
     26_462_784),
])
def test_release_keys_fill_the_model_exactly_and_round_trip(name, source, json_name, count):
  total, shapes = release_keys(json_name)
  assert total == count  # the release's parameter count
  model = create_model(name)
  state = random_state_dict(shapes)
  params = convert_state_dict(source, {f"module.{k}": v for k, v in state.items()}, model)
  ours = param_shapes(recipe_for(source, model), model)
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  assert set(flat) == set(ours)
  assert all(flat[k].shape == ours[k].shape for k in ours)
  assert leaf_count(params) == count
  back = to_state_dict(source, params, model)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)


def test_layer_placement_and_layouts():
  _, shapes = release_keys("endomamba_small_keys")
  state = random_state_dict(shapes, seed=1)
  params = convert_state_dict("endomamba", state, create_model("endomamba_small"))
  spatial, temporal = params["spatial_blocks"]["mixer"], params["temporal_blocks"]["mixer"]
  # Release block 13 is slice 1 of the temporal (causal) stack; block 3 slice 3 of the spatial.
  np.testing.assert_array_equal(temporal["in_proj"]["kernel"][1],
                                state["layers.13.mixer.in_proj.weight"].T)
  np.testing.assert_array_equal(spatial["ssm_b"]["A_log"][3], state["layers.3.mixer.A_b_log"])
  np.testing.assert_array_equal(spatial["ssm"]["conv_weight"][0],
                                state["layers.0.mixer.conv1d.weight"][:, 0].T)
  np.testing.assert_array_equal(temporal["ssm"]["dt_proj_kernel"][11],
                                state["layers.23.mixer.dt_proj.weight"].T)
  # patch_embed: torch (dim, C, 1, p, p) -> (p, p, C, dim): pixel (row 2, col 5, green).
  np.testing.assert_array_equal(params["patch_embed"]["kernel"][2, 5, 1],
                                state["patch_embed.proj.weight"][:, 1, 0, 2, 5])


TINY = dict(img_size=32, patch_size=16, dim=32, depth=4)


def test_converted_weights_give_the_same_outputs_as_their_source():
  """Our tiny model's params -> release format -> back: the same clip features and the same
  per-frame logits of the release's head (our phase head on the mean token)."""
  model = create_model("endomamba_tiny", **TINY, head="phase", num_classes=5)
  video = jax.random.normal(jax.random.key(0), (1, 3, 32, 32, 3))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), video))["params"]
  state = to_state_dict("endomamba", params, model)
  assert state["head.weight"].shape == (5, 32) and state["pos_embed"].shape == (1, 5, 32)
  back = convert_state_dict("endomamba", state, model)
  run = jax.jit(model.apply)
  np.testing.assert_array_equal(run({"params": back}, video), run({"params": params}, video))


def test_pretrain_converted_weights_give_the_same_predictions():
  model = create_model("endomamba_tiny_pretrain", img_size=32, patch_size=8, dim=32, depth=4,
                       decoder_dim=16, decoder_heads=2)
  video = jax.random.normal(jax.random.key(0), (1, 16, 32, 32, 3))
  recipe = recipe_for("endomamba_pretrain", model)
  params = nn.meta.unbox(recipe.init(model, jax.random.key(2)))["params"]
  state = to_state_dict("endomamba_pretrain", params, model)
  assert state["encoder.pos_embed"].shape == (1, 16, 32) and "encoder.cls_token" not in state
  assert state["decoder.blocks.0.attn.q_bias"].shape == (16,)
  back = convert_state_dict("endomamba_pretrain", state, model)
  mask = jnp.broadcast_to(jnp.arange(16).reshape(4, 4) % 4 != 1, (1, 16, 4, 4))
  loss = jax.jit(functools.partial(model.apply, method="pretrain_loss", train=False))
  _, ours = loss({"params": params}, video, mask)
  _, converted = loss({"params": back}, video, mask)
  np.testing.assert_array_equal(converted["pred"], ours["pred"])


def test_bad_inputs_raise_one_clear_error():
  _, shapes = release_keys("endomamba_small_keys")
  model = create_model("endomamba_small")
  state = random_state_dict(shapes)
  missing = {k: v for k, v in state.items() if k != "layers.20.mixer.D"}
  with pytest.raises(ValueError, match=r"1 missing keys: layers\.20\.mixer\.D"):
    convert_state_dict("endomamba", missing, model)
  extra = {**state, "head.weight": np.zeros((1000, 384), np.float32)}
  with pytest.raises(ValueError, match=r"1 unexpected keys: head\.weight"):
    convert_state_dict("endomamba", extra, model)
  wrong = {**state, "norm_f.weight": np.zeros((192,), np.float32)}
  with pytest.raises(ValueError, match=r"1 wrong shapes: norm_f\.weight \(192,\)"):
    convert_state_dict("endomamba", wrong, model)
  seg = create_model("endomamba_tiny", **TINY, head="segmentation", num_classes=2)
  with pytest.raises(ValueError, match="'segmentation' head has no counterpart"):
    convert_state_dict("endomamba", state, seg)
