"""EndoMamba backbone: parameter count, streaming equals the clip forward, causality, bad input."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from vidssm_jax.models import create_model
from vidssm_jax.models.endomamba import EndoMamba
from vidssm_jax.nn.video import sinusoidal_embedding

CFG = dict(img_size=32, patch_size=16, dim=32, depth=4)  # 2×2 patches + cls = 5 tokens a frame
T = 32


@pytest.fixture(scope="module")
def tiny():
  model = create_model("endomamba_tiny", **CFG)
  video = jax.random.normal(jax.random.key(0), (2, T, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), video[:, :1])
  forward = jax.jit(functools.partial(model.apply, return_intermediates=True))
  chunk = jax.jit(functools.partial(model.apply, method="forward_chunk"))
  step = jax.jit(functools.partial(model.apply, method="step"))
  return model, variables, video, forward, chunk, step


def test_small_has_the_papers_parameter_count():
  model = create_model("endomamba_small")
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 1, 224, 224, 3), jnp.float32))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes)))
  print(f"endomamba_small parameters: {count:,}")
  assert count == 24_462_336  # the release's EndoMamba-S backbone
  p = nn.meta.unbox(shapes)["params"]
  assert p["pos_embed"].shape == (197, 384) and p["cls_token"].shape == (384,)
  # Two scanned stacks: 12 bidirectional blocks, then 12 causal ones.
  assert p["spatial_blocks"]["mixer"]["in_proj"]["kernel"].shape == (12, 384, 1536)
  assert p["spatial_blocks"]["mixer"]["ssm_b"]["A_log"].shape == (12, 768, 16)
  assert "ssm_b" not in p["temporal_blocks"]["mixer"]
  assert p["temporal_blocks"]["mixer"]["ssm"]["A_log"].shape == (12, 768, 16)


def test_shapes_and_intermediates(tiny):
  model, variables, video, forward, _, _ = tiny
  feats, taps = forward(variables, video)
  assert feats.shape == (2, T, 5, 32) and len(taps) == 3
  assert all(t.shape == (2, T, 5, 32) for t in taps)
  assert model.intermediate_layers == (1, 2, 3)
  no_cls = create_model("endomamba_tiny", **CFG, use_cls_token=False)
  v = jax.eval_shape(no_cls.init, jax.random.key(0), video[:, :1])
  assert jax.eval_shape(no_cls.apply, v, video[:, :1]).shape == (2, 1, 4, 32)


def test_intermediates_mixer_output_or_residual_stream(tiny):
  model, variables, video, forward, _, _ = tiny
  assert model.intermediates == "mixer"  # the release's get_features()
  clip = video[:, :4]
  _, mixer = forward(variables, clip)
  ours = create_model("endomamba_tiny", **CFG, intermediates="residual")
  feats, stream = jax.jit(functools.partial(ours.apply, return_intermediates=True))(variables, clip)
  # Taps after blocks 1, 2, 3: the stream after block k is the stream after block k-1 plus
  # block k's mixer output, and norm_f normalises the last stream.
  assert rel_err(stream[1], stream[0] + mixer[1]) <= 1e-6
  assert rel_err(stream[2], stream[1] + mixer[2]) <= 1e-6
  scale = variables["params"]["norm_f"]["scale"]
  last = stream[-1]
  expected = last * jax.lax.rsqrt(jnp.mean(last**2, -1, keepdims=True) + 1e-5) * scale.value
  assert rel_err(feats, expected) <= 1e-6
  with pytest.raises(ValueError, match="intermediates must be one of"):
    create_model("endomamba_tiny", **CFG, intermediates="norm").init(jax.random.key(0), clip)


def test_release_init_or_mamba_init():
  video = jnp.zeros((1, 1, 32, 32, 3))
  init = lambda **kw: nn.meta.unbox(jax.jit(create_model("endomamba_tiny", **CFG, **kw).init)(
      jax.random.key(0), video))["params"]
  release, mamba = init(), init(init="mamba")
  assert jax.tree.map(jnp.shape, release) == jax.tree.map(jnp.shape, mamba)
  for stack in ("spatial_blocks", "temporal_blocks"):
    mixer, ours = release[stack]["mixer"], mamba[stack]["mixer"]
    branches = ("ssm", "ssm_b") if stack == "spatial_blocks" else ("ssm",)
    linears = [mixer["in_proj"]["kernel"]] + [w for b in branches for w in (
        mixer[b]["x_proj"]["kernel"], mixer[b]["dt_proj_kernel"])]
    for w in linears:  # every Linear N(0, 0.02²)
      assert abs(float(jnp.std(w)) - 0.02) < 0.004, w.shape
      assert abs(float(jnp.mean(w))) < 4 * 0.02 / w.size**0.5, w.shape  # within 4 std errors
    for b in branches:  # Linear biases 0, so dt_proj's too (Mamba: softplus⁻¹ of dt in [1e-3, 0.1])
      assert float(jnp.abs(mixer[b]["dt_bias"]).max()) == 0.0
      dt = jax.nn.softplus(ours[b]["dt_bias"])
      assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
      np.testing.assert_array_equal(mixer[b]["A_log"], ours[b]["A_log"])
    bound = 64**-0.5 / 4**0.5  # out_proj: U(±1/√fan_in) / √depth in both
    assert float(jnp.abs(mixer["out_proj"]["kernel"]).max()) <= bound
    assert float(jnp.abs(mixer["out_proj"]["kernel"]).max()) > 0.9 * bound
  bias = release["patch_embed"]["bias"]  # U(±1/√(3·16·16)); Mamba-style init leaves it 0
  assert 0.8 * 768**-0.5 < float(jnp.abs(bias).max()) <= 768**-0.5
  assert float(jnp.abs(mamba["patch_embed"]["bias"]).max()) == 0.0
  with pytest.raises(ValueError, match=r"init must be one of \('release', 'mamba'\)"):
    create_model("endomamba_tiny", **CFG, init="xavier").init(jax.random.key(0), video)


def test_frame_by_frame_equals_whole_clip(tiny):
  model, variables, video, forward, _, step = tiny
  whole, _ = forward(variables, video)
  state = model.init_state(2)
  feats = []
  for t in range(T):
    f, state = step(variables, video[:, t], state)
    feats.append(f)
  streamed = jnp.stack(feats, 1)
  errs = [rel_err(streamed[:, t], whole[:, t]) for t in range(T)]
  assert max(errs) <= 1e-4, f"worst frame {int(np.argmax(errs))}: {max(errs):.2e}"
  np.testing.assert_array_equal(state["frame"], [T, T])


def test_unrolled_layer_stacks_are_the_same_model(tiny):
  # unroll_layers only changes the program (straight-line blocks): same parameters, same
  # features and state, clip and step.
  model, variables, video, forward, _, step = tiny
  unrolled = create_model("endomamba_tiny", **CFG, unroll_layers=True)
  clip = video[:, :3]
  assert rel_err(jax.jit(unrolled.apply)(variables, clip), forward(variables, clip)[0]) <= 1e-6
  state = model.init_state(2)
  out, new = jax.jit(functools.partial(unrolled.apply, method="step"))(variables, clip[:, 0],
                                                                       state)
  ref, ref_new = step(variables, clip[:, 0], state)
  assert rel_err(out, ref) <= 1e-6
  assert rel_err(new["caches"]["ssm"], ref_new["caches"]["ssm"]) <= 1e-6


def test_two_halves_with_carried_state_equal_whole(tiny):
  model, variables, video, forward, chunk, _ = tiny
  whole, _ = forward(variables, video)
  first, state = chunk(variables, video[:, :T // 2], model.init_state(2))
  second, state = chunk(variables, video[:, T // 2:], state)
  assert rel_err(jnp.concatenate([first, second], 1), whole) <= 1e-4
  assert rel_err(second, whole[:, T // 2:]) <= 1e-4


def test_state_size_does_not_grow_with_history(tiny):
  model, variables, video, _, _, step = tiny
  state = model.init_state(2)
  shapes0 = jax.tree.map(lambda a: a.shape, state)
  for t in range(5):
    _, state = step(variables, video[:, t], state)
  assert jax.tree.map(lambda a: a.shape, state) == shapes0


def test_causal_across_frames_bidirectional_within_a_frame(tiny):
  _, _, video, forward, _, _ = tiny
  # Mamba's init (dt in [1e-3, 0.1]) remembers the whole clip; the release's (dt = softplus(0))
  # forgets within a few frames, below float32 resolution by the end of a 32-frame clip.
  variables = jax.jit(create_model("endomamba_tiny", **CFG, init="mamba").init)(
      jax.random.key(1), video[:, :1])
  changed = video.at[:, 3, 16:, 16:].add(1.0)  # the last patch of frame 3
  a, _ = forward(variables, video)
  b, _ = forward(variables, changed)
  diff = jnp.abs(a - b).max(-1)[0]  # (t, tokens)
  assert float(diff[:3].max()) == 0.0  # earlier frames never see a later frame
  assert float(diff[3, 0]) > 0  # the cls token (first) sees the last patch of its own frame
  assert float(diff[4:].min()) > 0  # later frames do


def test_time_embedding_is_sinusoidal_by_absolute_frame():
  emb = sinusoidal_embedding(jnp.array([0, 7]), 8)
  np.testing.assert_allclose(emb[0], [0, 1] * 4, atol=1e-7)
  freq = 10000.0 ** (-np.arange(0, 8, 2) / 8)
  np.testing.assert_allclose(emb[1, 0::2], np.sin(7 * freq), rtol=1e-5)
  np.testing.assert_allclose(emb[1, 1::2], np.cos(7 * freq), rtol=1e-5)


def test_bfloat16_compute_close_to_float32(tiny):
  _, variables, video, forward, _, _ = tiny
  model16 = create_model("endomamba_tiny", **CFG, dtype=jnp.bfloat16)
  f16 = jax.jit(model16.apply)(variables, video[:, :4])
  f32, _ = forward(variables, video[:, :4])
  assert f16.dtype == jnp.bfloat16
  assert rel_err(f16, f32) <= 5e-2


def test_drop_path_only_in_training(tiny):
  _, variables, video, forward, _, _ = tiny
  model = create_model("endomamba_tiny", **CFG, drop_path_rate=0.5)
  clip = video[:, :4]
  run = jax.jit(model.apply, static_argnames="train")
  eval_out = run(variables, clip)
  np.testing.assert_allclose(eval_out, forward(variables, clip)[0], rtol=1e-5, atol=1e-5)
  train_out = run(variables, clip, train=True, rngs={"dropout": jax.random.key(3)})
  assert float(jnp.abs(train_out - eval_out).max()) > 0


def test_bad_input_raises_clear_errors(tiny):
  model, variables, video, _, _, _ = tiny
  with pytest.raises(ValueError, match=r"frames are 30×30, the model expects 32×32"):
    model.apply(variables, jnp.zeros((1, 2, 30, 30, 3)))
  with pytest.raises(ValueError, match="video has 4 channels, the model expects 3"):
    model.apply(variables, jnp.zeros((1, 2, 32, 32, 4)))
  with pytest.raises(ValueError, match=r"expected \(batch, time, height, width, channels\)"):
    model.apply(variables, jnp.zeros((2, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"state was made for batch size 3.*init_state\(2\)"):
    model.apply(variables, video[:, 0], model.init_state(3), method="step")
  with pytest.raises(ValueError, match=r"expected \(batch, height, width, channels\)"):
    model.apply(variables, video[:, :2], model.init_state(2), method="step")
  deeper = EndoMamba(**{**CFG, "depth": 6})
  with pytest.raises(ValueError, match=r"state\['caches'\]\['conv'\] has shape \(3, 2, 3, 64\), "
                     r"expected \(2, 2, 3, 64\)"):
    model.apply(variables, video[:, 0], deeper.init_state(2), method="step")
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    create_model("endomamba_tiny", img_size=40, patch_size=16).init(
        jax.random.key(0), jnp.zeros((1, 1, 40, 40, 3)))


# ---- pretraining -------------------------------------------------------------------------------

PCFG = dict(img_size=32, patch_size=8, dim=32, depth=4)  # 4×4 patches a frame, 12 masked


def _tube_mask(b, t, seed=0):
  rng = np.random.default_rng(seed)
  m = np.zeros((b, 16), bool)
  for i in range(b):
    m[i, rng.permutation(16)[:12]] = True
  return jnp.asarray(np.broadcast_to(m[:, None], (b, t, 16)).reshape(b, t, 4, 4))


@pytest.fixture(scope="module")
def pretrainer():
  model = create_model("endomamba_tiny_pretrain", **PCFG, teacher_dim=48)
  video = jax.random.normal(jax.random.key(0), (2, 2, 32, 32, 3))
  mask = _tube_mask(2, 2)
  teacher = jax.random.normal(jax.random.key(1), (2, 2 * 16, 48))
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(2), video, mask, teacher)
  loss = jax.jit(functools.partial(model.apply, method="pretrain_loss", train=False))
  return model, variables, video, mask, teacher, loss


def test_pretrainer_params_and_loss(pretrainer):
  model, variables, video, mask, teacher, loss_fn = pretrainer
  params = nn.meta.unbox(variables)["params"]
  assert set(params) == {"backbone", "decoder", "align_proj"}
  assert params["decoder"]["embed"]["kernel"].shape == (32, 128)  # tiny: decoder width 128
  assert params["decoder"]["head"]["kernel"].shape == (128, 8 * 8 * 3)
  loss, aux = loss_fn(variables, video, mask, teacher, 0.25)
  assert aux["pred"].shape == aux["target"].shape == (2, 2 * 12, 192)
  np.testing.assert_allclose(loss, aux["loss_rec"] + 0.25 * aux["loss_align"], rtol=1e-6)
  np.testing.assert_allclose(aux["loss_rec"], jnp.mean((aux["pred"] - aux["target"]) ** 2),
                             rtol=1e-6)
  assert 0 < float(aux["loss_align"]) < 2
  # Targets: the masked patches' pixels, ImageNet normalisation undone, normalised per patch and
  # colour channel (mean and unbiased std over the patch's 64 pixels of each channel).
  b0_masked = np.flatnonzero(np.asarray(mask[0, 0]).ravel())[0]  # first masked patch, frame 0
  r, c = divmod(int(b0_masked), 4)
  patch = np.asarray(video[0, 0, 8 * r:8 * r + 8, 8 * c:8 * c + 8]) * [0.229, 0.224, 0.225] + [
      0.485, 0.456, 0.406]
  patch = patch.reshape(64, 3)
  expected = (patch - patch.mean(0)) / (patch.std(0, ddof=1) + 1e-6)
  np.testing.assert_allclose(aux["target"][0, 0], expected.ravel(), rtol=1e-4, atol=1e-5)


def test_pretrain_targets_undo_the_data_statistics_per_patch_or_channel(pretrainer):
  model, variables, video, mask, teacher, _ = pretrainer
  assert model.target_norm == "channel"
  mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
  grey = model.with_pixel_statistics(mean, std)
  patch_norm = grey.clone(target_norm="patch")
  b0_masked = int(np.flatnonzero(np.asarray(mask[0, 0]).ravel())[0])
  r, c = divmod(b0_masked, 4)
  patch = (np.asarray(video[0, 0, 8 * r:8 * r + 8, 8 * c:8 * c + 8]) * std + mean).reshape(64, 3)
  for m, expected in (
      (grey, (patch - patch.mean(0)) / (patch.std(0, ddof=1) + 1e-6)),
      (patch_norm, (patch - patch.mean()) / (patch.std(ddof=1) + 1e-6))):
    _, aux = m.apply(variables, video, mask, teacher, 0.25, method="pretrain_loss", train=False)
    np.testing.assert_allclose(aux["target"][0, 0], expected.ravel(), rtol=1e-4, atol=1e-5)
  # reconstruct() gives every predicted patch the true patch's statistics: with the decoder's
  # head zeroed the prediction is 0, so each masked patch becomes its own per-channel mean.
  params = jax.tree.map(lambda x: x, nn.meta.unbox(variables)["params"])
  params["decoder"]["head"] = jax.tree.map(jnp.zeros_like, params["decoder"]["head"])
  recon = grey.apply({"params": params}, video, mask, method="reconstruct")
  got = (np.asarray(recon[0, 0, 8 * r:8 * r + 8, 8 * c:8 * c + 8]) * std + mean).reshape(64, 3)
  np.testing.assert_allclose(got, np.broadcast_to(patch.mean(0), (64, 3)), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="pixel statistics have 1 / 1 channels, the model expects 3"):
    model.with_pixel_statistics((0.5,), (0.2,))


def test_pretrain_model_is_the_releases():
  model = create_model("endomamba_small_pretrain")
  assert not model.backbone.use_cls_token and model.backbone.drop_path_rate == 0.1
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, 16, 14, 14), jnp.bool_))
  p = nn.meta.unbox(shapes)["params"]
  assert p["backbone"]["pos_embed"].shape == (196, 384) and "cls_token" not in p["backbone"]
  attn = p["decoder"]["stack"]["blocks"]["attn"]
  assert set(attn) == {"qkv", "q_bias", "v_bias", "proj"} and set(attn["qkv"]) == {"kernel"}
  assert attn["q_bias"].shape == attn["v_bias"].shape == (4, 192)
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(p))
  print(f"endomamba_small_pretrain parameters: {count:,}")
  assert count == 26_462_784  # the release's PretrainEndoMamba (small)


def test_encoder_sees_visible_tokens_only(pretrainer):
  model, variables, video, mask, teacher, loss_fn = pretrainer
  _, aux = loss_fn(variables, video, mask, teacher, 0.25)
  # Scramble the masked patches' pixels: the encoder (hence the alignment) must not notice,
  # the reconstruction targets must.
  pix_mask = jnp.repeat(jnp.repeat(mask, 8, 2), 8, 3)[..., None]
  scrambled = jnp.where(pix_mask, -video, video)
  _, aux2 = loss_fn(variables, scrambled, mask, teacher, 0.25)
  np.testing.assert_allclose(aux2["loss_align"], aux["loss_align"], rtol=1e-6)
  np.testing.assert_allclose(aux2["pred"], aux["pred"], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(aux2["target"] - aux["target"]).max()) > 0.1


def test_unmasked_encoder_equals_backbone():
  model = create_model("endomamba_tiny_pretrain", **PCFG, mask_ratio=0.0)
  video = jax.random.normal(jax.random.key(0), (1, 2, 32, 32, 3))
  no_mask = jnp.zeros((1, 2, 4, 4), bool)
  variables = {"params": jax.jit(model.backbone.init)(jax.random.key(1), video)["params"]}
  feats, vis, _ = jax.jit(functools.partial(model.apply, method="encode_visible"))(
      {"params": {"backbone": variables["params"]}}, video, no_mask)
  whole = jax.jit(model.backbone.apply)(variables, video)
  assert rel_err(feats, whole) <= 1e-5  # the pretraining encoder has no cls token
  np.testing.assert_array_equal(vis, np.arange(16)[None])


def test_alignment_loss_and_bad_inputs(pretrainer):
  model, variables, video, mask, teacher, loss_fn = pretrainer
  _, aux = loss_fn(variables, video, mask, teacher[:, :16], 0.25)  # 2-frame tubelet teacher
  assert 0 < float(aux["loss_align"]) < 2
  _, aux = loss_fn(variables, video, mask, None, 0.25)
  assert float(aux["loss_align"]) == 0.0
  with pytest.raises(ValueError, match="expected t·n = 32"):
    model.apply(variables, video, mask, teacher[:, :20], method="pretrain_loss")
  with pytest.raises(ValueError, match="must be a tube mask"):
    model.apply(variables, video, mask.at[0, 1].set(~mask[0, 1]), method="pretrain_loss")
  extra = np.array(mask)
  extra[0, :, *np.argwhere(~extra[0, 0])[0]] = True  # one more masked patch in example 0
  with pytest.raises(ValueError, match=r"hides \[13, 12\] patches per frame, expected .* = 12"):
    model.apply(variables, video, jnp.asarray(extra), method="pretrain_loss")
  with pytest.raises(ValueError, match=r"expected bool \(batch, time, grid, grid\)"):
    model.apply(variables, video, mask.astype(jnp.int32), method="pretrain_loss")


def test_pretrain_gradients_reach_every_part(pretrainer):
  model, variables, video, mask, teacher, _ = pretrainer
  def loss(params):
    return model.apply({"params": params}, video, mask, teacher, 0.25, method="pretrain_loss",
                       train=False)[0]
  grads = jax.jit(jax.grad(loss))(variables["params"])
  grads = nn.meta.unbox(grads)
  for part in ("backbone", "decoder", "align_proj"):
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads[part]))))
    assert np.isfinite(norm) and norm > 0, part


# ---- the release's pretraining recipe (configs/endomamba.py) ------------------------------------


def test_config_is_the_releases_pretraining_recipe():
  import importlib.util
  import os

  from vidssm_jax.train.state import make_optimizer

  path = os.path.join(os.path.dirname(__file__), "..", "configs", "endomamba.py")
  spec = importlib.util.spec_from_file_location("endomamba_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  o, scale = c.pretrain.optim, c.pretrain.batch_size / 256
  assert (o.b1, o.b2, o.weight_decay, o.decay_rule) == (0.9, 0.999, 0.05, "endomamba_release")
  assert c.pretrain.teacher.alpha == 0.25 and c.pretrain.mask.kind == "tube"
  assert c.pretrain.mask.ratio == 0.75
  # The schedule warms up from warmup_lr to lr, then cosine-decays to min_lr (all × batch/256).
  _, schedule = make_optimizer(o, {"w": jnp.zeros((2, 2))}, c.pretrain.steps)
  steps = c.pretrain.steps
  assert o.warmup_steps == steps // 10  # 40 of the release's 400 epochs
  for step, want in ((0, 1e-6), (o.warmup_steps, 1.5e-4), (steps, 1e-5)):
    np.testing.assert_allclose(float(schedule(step)), want * scale, rtol=1e-5)
  assert 1e-5 * scale < float(schedule((steps + o.warmup_steps) // 2)) < 1.5e-4 * scale


def test_pretrainer_inits_from_an_all_visible_placeholder_mask():
  """Trainers init with a zero mask closed over by jit (a concrete array): only its shape counts."""
  model = create_model("endomamba_tiny_pretrain", **PCFG)
  video, mask0 = jnp.zeros((1, 2, 32, 32, 3)), jnp.zeros((1, 2, 4, 4), bool)
  params = jax.jit(lambda: model.init(jax.random.key(0), video, mask0, train=False))()["params"]
  assert set(params) == {"backbone", "decoder"}
  with pytest.raises(ValueError, match="hides \\[0\\] patches per frame"):
    model.apply({"params": params}, video, mask0, method="pretrain_loss", train=False)


def test_fine_tuning_loads_a_pretraining_backbone_as_the_release():
  """The pretraining encoder (no cls token, n position embeddings) into a fine-tuning backbone
  with a cls token: every other leaf copied, cls_token and pos_embed kept at init."""
  video = jnp.zeros((1, 1, 32, 32, 3))
  pre = create_model("endomamba_tiny_pretrain", **PCFG).backbone
  fine = create_model("endomamba_tiny", **PCFG)
  old = nn.meta.unbox(jax.jit(pre.init)(jax.random.key(0), video))["params"]
  new = nn.meta.unbox(jax.jit(fine.init)(jax.random.key(1), video))["params"]
  params, kept = fine.adapt_pretrained(old, new)
  assert sorted(kept) == ["cls_token", "pos_embed"]
  np.testing.assert_array_equal(params["pos_embed"], new["pos_embed"])
  np.testing.assert_array_equal(params["temporal_blocks"]["mixer"]["in_proj"]["kernel"],
                                old["temporal_blocks"]["mixer"]["in_proj"]["kernel"])
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, new)


@pytest.mark.parametrize("n,h,w,c,p", [(1, 16, 16, 3, 16), (3, 8, 12, 1, 4), (2, 6, 4, 5, 2)])
def test_patch_embed_is_the_strided_conv(n, h, w, c, p):
  """PatchEmbed's GEMM of flattened patches equals a p × p conv with stride p (float64 NumPy,
  kernel (p, p, C, dim)), on one patch, non-square grids and odd channel counts."""
  from vidssm_jax.models.endomamba import PatchEmbed
  dim = 7
  layer = PatchEmbed(dim, p, jnp.float32, kernel_init=nn.initializers.normal(1.0),
                     bias_init=nn.initializers.normal(1.0))
  frames = jax.random.normal(jax.random.key(0), (n, h, w, c))
  variables = layer.init(jax.random.key(1), frames)
  got = np.asarray(layer.apply(variables, frames))
  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  bias = np.asarray(variables["params"]["bias"], np.float64)
  x = np.asarray(frames, np.float64)
  want = np.zeros((n, h // p, w // p, dim))
  for i in range(h // p):
    for j in range(w // p):
      window = x[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :]  # (n, p, p, c)
      want[:, i, j] = np.einsum("nabc,abcd->nd", window, kernel) + bias
  assert got.shape == (n, (h // p) * (w // p), dim)
  assert rel_err(got, want.reshape(n, -1, dim)) < 1e-6
