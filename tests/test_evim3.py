"""E-ViM³: the enclosure layout, the visible-token MAE encoder against an independent NumPy-driven
path, ratio 0 against the full-volume encoder, the decoder and loss, the EGT head, the trainer
contract (parameter trees, one training step) and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import rel_err
from vidssm_jax import masking
from vidssm_jax.models import create_model
from vidssm_jax.models.evim3 import (CORNER, EDGE, FACE, LAYER_ORDERS, REAL, REGISTER,
                                     enclosure_layout, gather_indices, gather_moves)
from vidssm_jax.nn.mamba import MambaBlock, MambaConfig
from vidssm_jax.train import pretrain as pt
from vidssm_jax.train.state import create_state, decay_mask, layer_ids, make_optimizer

# 4 frames of 16 × 16 grey, tubelet 2×4×4 -> tokens (2, 4, 4), enlarged (5, 7, 7) = 245 positions.
# STC chains 2×2×2 at 0.5: 2 of 4 chains masked = 16 tokens, so V = 245 - 16 = 229.
CFG = dict(img_size=16, num_frames=4, in_chans=1, patch=4, tubelet=2, dim=16, depth=2, d_state=4,
           expand=2, decoder_depth=0, decoder_dim=16, pool="egt", head_hidden=None, head_layers=1,
           mask_kind="stc", mask_ratio=0.5, time_chain=2, space_chain=2, scan_backend="reference")
MASK = dict(kind="stc", time_chain=2, space_chain=2)
B, D = 2, 16
# Compile time dominates on CPU; these programs are tiny, so skip XLA's backend optimisations.
FAST = {"xla_backend_optimization_level": 0}


def compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(FAST)


def np_layer_norm(x, p, eps=1e-5):
  x = np.asarray(x, np.float64)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def np_patches(video, tt=2, p=4):
  """(b, t, H, W, C) -> (b, L'·H'·W', tt·p·p·C) with pixels ordered (t, h, w, C)."""
  b, t, h, w, c = video.shape
  x = np.asarray(video).reshape(b, t // tt, tt, h // p, p, w // p, p, c)
  return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, tt * p * p * c)


def init_params(model, video, mask, key):
  """Encoder, decoder and head parameters. Compiling the whole model's init costs more than the
  tests, so the Mamba layers are initialised with one compiled layer init called per layer and
  the rest through the model (``test_parameter_trees...`` checks the tree equals the model's).
  Each stack's layers are stacked on a leading axis, as ``nn.scan`` keeps them."""
  def shell(mod, v, m):  # touches every parameter but the Mamba layers
    x = mod.encoder.norm_f(mod.encoder.embed_volume(mod._patches(v)))
    return mod.decoder(x, None, jnp.zeros(x.shape[:2], bool)), mod.head(x[:, 0])

  init = lambda k, v, m: model.init(k, v, m, method=shell)
  params = nn.meta.unbox(compiled(init, key, video, mask)(key, video, mask))["params"]
  layer = MambaBlock(dim=D, cfg=MambaConfig(d_state=4), n_layers=6 * model.depth, norm="layer")
  x = jnp.zeros((1, 8, D))
  init_layer = compiled(lambda k: nn.meta.unbox(layer.init(k, x, x))["params"], key)
  for part, depth in (("encoder", model.depth), ("decoder", model.decoder_depth)):
    if not depth:
      continue
    layers = {}
    for j in range(6):
      per_block = [init_layer(jax.random.fold_in(key, hash((part, i, j)) % 2**31))
                   for i in range(depth)]
      layers[f"layers_{j}"] = jax.tree.map(lambda *a: jnp.stack(a), *per_block)
    params[part]["stack"] = {"blocks": layers}
  return params


def block_params(params, part, i, j):
  """Layer ``j`` of Mamba-3D block ``i``: slice ``i`` of the stacked parameters."""
  return jax.tree.map(lambda a: a[i], params[part]["stack"]["blocks"][f"layers_{j}"])


@pytest.fixture(scope="module")
def tiny():
  model = create_model("evim3_tiny", **CFG)
  video = jax.random.normal(jax.random.key(0), (B, 4, 16, 16, 1))
  mask = masking.batched_mask(jax.random.key(1), B, model.token_grid, 0.5, **MASK)
  params = init_params(model, video, mask, jax.random.key(2))
  pretrain = lambda mod, v, m: (mod.encode_visible(v, m), mod.pretrain_loss(v, m),
                                mod.reconstruct(v, m), mod.encode_visible(v, m, norm=False)[0])
  run = compiled(lambda p, v, m: model.apply({"params": p}, v, m, method=pretrain),
                 params, video, mask)
  return model, params, video, mask, run


# ---- enclosure layout -------------------------------------------------------------------------


def test_enclosure_layout_on_a_4x4x4_grid():
  lay = enclosure_layout((4, 4, 4), 1)
  assert lay.shape == (7, 7, 7) and lay.planes == ((0, 3, 6),) * 3
  counts = {k: int((lay.kind == k).sum()) for k in (REAL, FACE, EDGE, CORNER, REGISTER)}
  # 8 corners, 12 edges × 5, 6 faces × 5², the 5³ interior minus 4³ real tokens.
  assert counts == {CORNER: 8, EDGE: 60, FACE: 150, REGISTER: 61, REAL: 64}
  # Faces 0-5 (L start, L end, H start, H end, W start, W end), edges 6-17, corners 18-25,
  # register 26; checked by hand:
  by_hand = {(0, 0, 0): (CORNER, 18), (6, 0, 0): (CORNER, 19), (0, 6, 6): (CORNER, 24),
             (6, 6, 6): (CORNER, 25), (0, 0, 2): (EDGE, 6), (6, 3, 0): (EDGE, 6 + 4 + 1),
             (2, 6, 6): (EDGE, 6 + 8 + 3), (0, 2, 2): (FACE, 0), (2, 2, 6): (FACE, 5),
             (0, 3, 2): (FACE, 0), (3, 3, 3): (REGISTER, 26), (3, 1, 1): (REGISTER, 26),
             (1, 5, 3): (REGISTER, 26), (1, 1, 1): (REAL, -1), (4, 5, 5): (REAL, -1)}
  for pos, (kind, token) in by_hand.items():
    assert (lay.kind[pos], lay.token[pos]) == (kind, token), pos
  # Real tokens fill the rest in order (real coordinates 1, 2, 4, 5 on every axis): (1,1,1) is
  # token 0, (1,1,2) token 1, (2,1,1) token 16, (4,5,5) token 2·16 + 3·4 + 3, (5,5,5) the last.
  flat = lambda p: np.ravel_multi_index(p, lay.shape)
  sources = [lay.source[flat(p)] for p in [(1, 1, 1), (1, 1, 2), (2, 1, 1), (4, 5, 5), (5, 5, 5)]]
  assert sources == [0, 1, 16, 47, 63]
  assert len(lay.pool_positions) == 27 and flat((3, 3, 3)) in lay.pool_positions
  assert len(lay.global_positions) == 343 - 64 and flat((1, 1, 1)) not in lay.global_positions
  # More registers: planes at floor(linspace(0, 7, 4)) = 0, 2, 4, 7; none: the enclosure only.
  assert enclosure_layout((4, 4, 4), 2).planes[0] == (0, 2, 4, 7)
  assert not (enclosure_layout((4, 4, 4), 0).kind == REGISTER).any()
  p4 = enclosure_layout((32, 28, 28), 1)
  assert p4.shape == (35, 31, 31) and p4.planes == ((0, 17, 34), (0, 15, 30), (0, 15, 30))
  assert p4.num_real == 32 * 28 * 28 and p4.num_global == 35 * 31 * 31 - 32 * 28 * 28


def test_embedding_places_patches_tokens_and_position_embeddings(tiny):
  model, params, video, _, _ = tiny
  embed = lambda mod, v: mod.encoder.embed_volume(mod._patches(v))
  vol = np.asarray(model.apply({"params": params}, video, method=embed))
  e, lay = params["encoder"], model.layout
  expected = np.zeros((B,) + lay.shape + (D,))
  real = lay.kind == REAL
  kernel, bias = np.asarray(e["patch_embed"]["kernel"]), np.asarray(e["patch_embed"]["bias"])
  expected[:, real] = np_patches(video) @ kernel + bias  # boolean assignment: in LHW order
  table = np.concatenate([e["face_tokens"], e["edge_tokens"], e["corner_tokens"],
                          e["register_token"]])
  expected[:, ~real] = table[lay.token[~real]]
  pl, ph, pw = (np.asarray(e[f"pos_embed_{a}"]) for a in "lhw")
  expected += pl[:, None, None] + ph[None, :, None] + pw[None, None, :]
  assert rel_err(vol.reshape(expected.shape), expected) <= 1e-6


# ---- the visible-token encoder ----------------------------------------------------------------


def test_mae_encoder_equals_an_independent_numpy_driven_path(tiny):
  """Each of the 12 layers: np.transpose the enlarged volume to the layer's order, drop hidden
  positions with boolean indexing, (flip,) run that one layer, put the result back."""
  model, params, video, mask, run = tiny
  (feats, positions), _, _, _ = run(params, video, mask)
  lay = model.layout
  vol = model.apply({"params": params}, video,
                    method=lambda mod, v: mod.encoder.embed_volume(mod._patches(v)))
  hidden = np.asarray(vol).reshape((B,) + lay.shape + (D,))
  residual = None  # before the first layer: residual = hidden, as in the release
  visible = np.ones((B,) + lay.shape, bool)
  for b in range(B):
    visible[b][lay.kind == REAL] = ~np.asarray(mask[b]).reshape(-1)

  layer = MambaBlock(dim=D, cfg=MambaConfig(d_state=4, scan_backend="reference"), norm="layer")
  v = int(visible[0].sum())
  seq = jnp.zeros((B, v, D))
  p0 = block_params(params, "encoder", 0, 0)
  first = compiled(lambda p, h: layer.apply({"params": p}, jnp.zeros_like(h), h), p0, seq)
  later = compiled(lambda p, h, r: layer.apply({"params": p}, h, r), p0, seq, seq)
  axes = {"lhw": (1, 2, 3), "hwl": (2, 3, 1), "lwh": (1, 3, 2)}
  for i in range(CFG["depth"]):
    for j, (order, rev) in enumerate(LAYER_ORDERS):
      perm = (0,) + axes[order]
      vis = np.transpose(visible, perm)
      h = np.transpose(hidden, perm + (4,))[vis].reshape(B, v, D)
      r = None if residual is None else np.transpose(residual, perm + (4,))[vis].reshape(B, v, D)
      flip = (lambda x: x[:, ::-1]) if rev else (lambda x: x)
      p = block_params(params, "encoder", i, j)
      out_h, out_r = first(p, flip(h)) if r is None else later(p, flip(h), flip(r))
      new_h = np.zeros(np.transpose(hidden, perm + (4,)).shape, np.float32)
      new_r = np.zeros_like(new_h)
      new_h[vis] = flip(np.asarray(out_h)).reshape(-1, D)
      new_r[vis] = flip(np.asarray(out_r)).reshape(-1, D)
      back = tuple(np.argsort(perm + (4,)))
      hidden, residual = np.transpose(new_h, back), np.transpose(new_r, back)
  expected = np_layer_norm(residual + hidden, params["encoder"]["norm_f"])[visible].reshape(B, v, D)
  assert feats.shape == (B, 229, D) and rel_err(feats, expected) <= 1e-5
  np.testing.assert_array_equal(positions, np.stack([np.flatnonzero(x) for x in visible]))


def test_order_changes_and_their_gradient():
  """From the reversed list of one order to the next order, by one gather whose gradient is the
  inverse gather (equal to autodiff's scatter-add)."""
  shape, v = (3, 4, 5), 37
  rank = jax.vmap(lambda k: jax.random.permutation(k, 60))(jax.random.split(jax.random.key(0), 2))
  visible = (rank < v).reshape((2,) + shape)
  indices, perms = masking.scan_transforms(visible, v, with_inverse=True)
  moves = gather_moves(gather_indices(perms, v))
  x = jax.random.normal(jax.random.key(1), (2, v, 3))
  g = jax.random.normal(jax.random.key(2), (2, v, 3))
  for src, dst in masking.ORDER_CYCLE:
    ids = np.asarray(indices[src])[:, ::-1]  # token ids listed in reversed src order
    np.testing.assert_array_equal(moves.change(jnp.asarray(ids)[..., None], src, dst)[..., 0],
                                  indices[dst])
    plain = lambda x: jnp.take_along_axis(x, (v - 1 - perms[(src, dst)])[..., None], axis=1)
    ours = lambda x: moves.change(x, src, dst)
    np.testing.assert_array_equal(jax.vjp(ours, x)[1](g)[0], jax.vjp(plain, x)[1](g)[0])


@pytest.fixture(scope="module")
def ratio0(tiny):
  _, params, video, _, _ = tiny
  model = create_model("evim3_tiny", **{**CFG, "mask_ratio": 0.0})
  none = jnp.zeros((B,) + model.token_grid, bool)
  both = lambda mod, v, m: (mod.encode_visible(v, m), mod.features(v), mod(v))
  run = compiled(lambda p, v, m: model.apply({"params": p}, v, m, method=both), params, video, none)
  return model, run(params, video, none)


def test_ratio_zero_mae_encoder_equals_full_volume_encoder(ratio0):
  model, ((feats, positions), full, _) = ratio0
  assert model.num_visible == 245 and full.shape == (B, 5, 7, 7, D)
  np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(245), (B, 245)))
  assert rel_err(feats, np.asarray(full).reshape(B, 245, D)) <= 1e-5


def test_egt_head_reads_where_the_register_planes_meet(tiny, ratio0):
  _, params, _, _, _ = tiny
  model, (_, full, out) = ratio0
  pl, ph, pw = model.layout.planes
  pooled = np.asarray(full)[:, pl][:, :, ph][:, :, :, pw].reshape(B, 27, D).mean(1)
  h = params["head"]
  hid = pooled @ np.asarray(h["fc1"]["kernel"]) + np.asarray(h["fc1"]["bias"])
  silu = hid / (1 + np.exp(-hid))
  expected = silu @ np.asarray(h["fc"]["kernel"]) + np.asarray(h["fc"]["bias"])
  assert out.shape == (B, 1) and out.dtype == jnp.float32
  assert rel_err(out, expected) <= 1e-5
  # The other pools: all global tokens (the release's enclosure mean), or the real tokens.
  lay, flat = model.layout, np.asarray(full).reshape(B, -1, D)
  for pool, positions in (("egt_all", lay.kind.reshape(-1) != REAL),
                          ("mean", lay.kind.reshape(-1) == REAL)):
    other = create_model("evim3_tiny", **{**CFG, "pool": pool})
    got = other.apply({"params": params}, full.reshape(B, -1, D), method="pool_features")
    assert rel_err(got, flat[:, positions].mean(1)) <= 1e-6, pool


def test_release_head_concatenates_the_27_normalised_tokens(ratio0):
  """pool="egt_concat" (the release): the 27 plane-intersection tokens (normalised by norm_f),
  concatenated in LHW order -> fc1 + SiLU -> (head_layers - 1) Linear + SiLU -> fc, whose bias
  starts at head_bias_init."""
  model, (_, full, _) = ratio0
  release = create_model("evim3_tiny", **{**CFG, "pool": "egt_concat", "head_hidden": 8,
                                          "head_layers": 3, "head_bias_init": 55.777})
  flat = full.reshape(B, -1, D)
  run = lambda mod, x: mod.head(mod.pool_features(x))
  variables = release.init(jax.random.key(4), flat, method=run)
  out = release.apply(variables, flat, method=run)
  h = nn.meta.unbox(variables["params"])["head"]
  assert set(h) == {"fc1", "mlp_0", "mlp_1", "fc"} and h["fc"]["bias"][0] == np.float32(55.777)
  pl, ph, pw = model.layout.planes
  x = np.asarray(full)[:, pl][:, :, ph][:, :, :, pw].reshape(B, 27 * D)
  for name in ("fc1", "mlp_0", "mlp_1"):
    x = x @ np.asarray(h[name]["kernel"]) + np.asarray(h[name]["bias"])
    x = x / (1 + np.exp(-x))
  expected = x @ np.asarray(h["fc"]["kernel"]) + np.asarray(h["fc"]["bias"])
  assert out.shape == (B, 1) and rel_err(out, expected) <= 1e-5


# ---- decoder, loss, reconstruction ------------------------------------------------------------


def test_decoder_loss_and_reconstruction(tiny):
  """With decoder_depth=0 the decoder is per token: encoder output (or the mask token) + decoder
  position embedding -> LayerNorm -> pixels; checked against NumPy, as are the loss and the
  reconstruction. No LayerNorm between encoder and decoder (the release)."""
  model, params, video, mask, run = tiny
  (_, positions), (loss, aux), recon, feats = run(params, video, mask)
  lay, d = model.layout, params["decoder"]
  vol = np.broadcast_to(np.asarray(d["mask_token"]), (B, lay.num_positions, D)).copy()
  for b in range(B):  # scatter the encoder output back, in NumPy
    vol[b, np.asarray(positions[b])] = np.asarray(feats[b])
  pl, ph, pw = (np.asarray(d[f"pos_embed_{a}"]) for a in "lhw")
  vol = vol + (pl[:, None, None] + ph[None, :, None] + pw[None, None, :]).reshape(-1, D)
  y = np_layer_norm(vol[:, lay.real_positions], d["norm"])
  pred = y @ np.asarray(d["pred"]["kernel"]) + np.asarray(d["pred"]["bias"])
  assert aux["pred"].shape == (B, 2, 4, 4, 32)
  assert rel_err(np.asarray(aux["pred"]).reshape(B, 32, 32), pred) <= 1e-5

  target, hidden = np_patches(video), np.asarray(mask).reshape(B, -1)
  expected_loss = np.mean((pred[hidden] - target[hidden]) ** 2)
  assert abs(float(loss) - expected_loss) <= 1e-5 * expected_loss
  assert float(aux["loss_rec"]) == float(loss)
  got = np_patches(recon)
  np.testing.assert_array_equal(got[~hidden], target[~hidden])
  assert rel_err(got[hidden], pred[hidden]) <= 1e-5


def test_mask_count_mismatch_is_nan_under_jit_and_an_error_outside(tiny):
  model, params, video, mask, run = tiny
  other = mask.at[:, 0, 0, 0].set(~mask[:, 0, 0, 0])
  assert np.isnan(float(run(params, video, other)[1][0]))
  with pytest.raises(ValueError, match=r"mask hides .* tokens per example, the model expects 16"):
    model.apply({"params": params}, video, other, method="pretrain_loss")


def test_masked_pixels_never_reach_the_prediction(tiny):
  """The visible-token encoder and the dense baseline (masked tokens replaced by a mask token)
  predict the same pixels whatever the masked patches contain."""
  model, params, video, mask, run = tiny
  pixel_mask = np.asarray(mask)
  for axis, r in enumerate((2, 4, 4)):
    pixel_mask = np.repeat(pixel_mask, r, axis=axis + 1)
  noise = jax.random.normal(jax.random.key(9), video.shape)
  scrambled = jnp.where(pixel_mask[..., None], noise, video)
  pred = lambda out: np.asarray(out[1][1]["pred"])
  np.testing.assert_array_equal(pred(run(params, scrambled, mask)), pred(run(params, video, mask)))
  assert not np.allclose(pred(run(params, video.at[:, :, :4, :4].add(1.0), mask)),
                         pred(run(params, video, mask)))

  dense = create_model("evim3_tiny", **CFG, visible_only=False)
  p = {**params, "encoder": {**params["encoder"], "mask_token": jnp.ones((D,))}}
  loss = compiled(lambda p, v, m: dense.apply({"params": p}, v, m, method="pretrain_loss"),
                  p, video, mask)
  a, b = loss(p, video, mask), loss(p, scrambled, mask)
  np.testing.assert_allclose(a[1]["pred"], b[1]["pred"], rtol=1e-6, atol=1e-6)
  assert np.isfinite(float(a[0])) and not np.allclose(a[1]["pred"], pred(run(params, video, mask)))


# ---- the trainer's contract -------------------------------------------------------------------


def test_parameter_trees_follow_the_trainer_contract(tiny):
  model = create_model("evim3_tiny", **CFG)
  video = jax.ShapeDtypeStruct((B, 4, 16, 16, 1), jnp.float32)
  mask = jax.ShapeDtypeStruct((B, 2, 4, 4), jnp.bool_)
  pre = nn.meta.unbox(jax.eval_shape(lambda v, m: model.init(jax.random.key(0), v, m,
                                                             method="pretrain_loss"), video, mask))
  fine = nn.meta.unbox(jax.eval_shape(lambda v: model.init(jax.random.key(0), v), video))
  assert set(pre["params"]) == {"encoder", "decoder"} and set(fine["params"]) == {"encoder", "head"}
  shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
  # Fine-tuning adds the per-token LayerNorm the release keeps outside its pretraining model.
  fine_enc = dict(fine["params"]["encoder"])
  fine_enc.pop("norm_f")
  assert shapes(pre["params"]["encoder"]) == shapes(fine_enc)
  ours = {k: v for k, v in tiny[1].items() if k != "head"}  # the fixture's hand-made tree
  ours["encoder"] = {k: v for k, v in ours["encoder"].items() if k != "norm_f"}
  assert shapes(pre["params"]) == shapes(ours)
  enc = fine["params"]["encoder"]
  assert set(enc) == {"patch_embed", "face_tokens", "edge_tokens", "corner_tokens",
                      "register_token", "pos_embed_l", "pos_embed_h", "pos_embed_w", "stack",
                      "norm_f"}
  blocks = enc["stack"]["blocks"]  # one scan over the Mamba-3D blocks: leading axis = depth
  assert set(blocks) == {f"layers_{j}" for j in range(6)}
  assert enc["pos_embed_l"].shape == (5, D) and enc["face_tokens"].shape == (6, D)
  assert blocks["layers_3"]["norm"]["scale"].shape == (2, D)  # LayerNorm: scale + bias
  decay = decay_mask(fine["params"])["encoder"]
  dblocks = decay["stack"]["blocks"]
  assert dblocks["layers_0"]["mixer"]["in_proj"]["kernel"]
  assert decay["patch_embed"]["kernel"]
  assert not any([decay["face_tokens"], decay["register_token"], decay["pos_embed_w"],
                  dblocks["layers_0"]["mixer"]["ssm"]["A_log"],
                  dblocks["layers_0"]["norm"]["scale"], decay["norm_f"]["bias"]])
  ids = layer_ids(fine["params"], model.layer_groups, num_layers=model.depth)
  assert ids["encoder"]["pos_embed_l"] == 0 and ids["encoder"]["edge_tokens"] == 0
  np.testing.assert_array_equal(
      ids["encoder"]["stack"]["blocks"]["layers_5"]["mixer"]["in_proj"]["kernel"],
      np.array([1, 2]).reshape(2, 1, 1))
  assert ids["head"]["fc"]["kernel"] == 3
  assert pt.token_grid(model) == (2, 4, 4)

  # Without the enclosure (the ablation): no global tokens, pool="mean" over the real tokens.
  plain = create_model("evim3_tiny", **{**CFG, "use_egt": False, "pool": "mean"})
  p = nn.meta.unbox(jax.eval_shape(lambda v: plain.init(jax.random.key(0), v), video))["params"]
  assert not any("token" in k for k in p["encoder"]) and p["encoder"]["pos_embed_h"].shape == (4, D)
  assert jax.eval_shape(lambda p, v: plain.apply({"params": p}, v), p, video).shape == (B, 1)
  assert plain.num_visible == 32 - 16


def test_a_pretraining_step_through_the_trainer_learns(tiny):
  """One encoder and one decoder block (with a per-token decoder, decoder_depth=0, masked
  predictions cannot depend on the encoder), the trainer's step (mask drawn inside, AdamW):
  every parameter gets a gradient and the loss on a fixed batch and mask falls."""
  _, _, video, mask, _ = tiny
  model = create_model("evim3_tiny", **{**CFG, "depth": 1, "decoder_depth": 1})
  params = init_params(model, video, mask, jax.random.key(3))
  params.pop("head")
  params["encoder"].pop("norm_f")  # not in the pretraining model (pretrain_norm=False)
  optim = ml_collections.ConfigDict(dict(lr=3e-3, warmup_steps=0, weight_decay=0.05, clip_norm=1.0))
  tx, _ = make_optimizer(optim, params, total_steps=100)
  state = create_state(params, tx, use_ema=False)
  mask_config = ml_collections.ConfigDict(dict(ratio=0.5, **MASK))
  step = compiled(pt.make_pretrain_step(model, mask_config), state, {"video": video},
                  jax.random.key(5))
  losses = []
  for i in range(6):
    state, metrics = step(state, {"video": video}, jax.random.key(5))  # the same mask each time
    losses.append(float(metrics["loss"]))
    if i == 0:  # Adam moves a parameter without weight decay only if its gradient is nonzero
      still = [jax.tree_util.keystr(k) for k, x in jax.tree_util.tree_leaves_with_path(
          jax.tree.map(lambda a, b: np.array_equal(a, b), state.params, params)) if x]
      assert not still, f"no gradient reached {still}"
  assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0], losses


# ---- presets and bad input --------------------------------------------------------------------


def test_presets():
  p4 = create_model("evim3_p4")
  assert p4.token_grid == (32, 28, 28) and p4.layout.shape == (35, 31, 31)
  assert p4.num_masked == int(0.8 * 16 * 7 * 7) * 32 and p4.num_visible == 33635 - 20064
  video = jax.ShapeDtypeStruct((1, 64, 112, 112, 1), jnp.float32)
  tree = jax.eval_shape(lambda v: p4.init(jax.random.key(0), v), video)["params"]
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(t)))
  print(f"evim3_p4: encoder {count(tree['encoder']):,}, head {count(tree['head']):,} parameters")
  blocks = nn.meta.unbox(tree["encoder"]["stack"]["blocks"])
  assert blocks["layers_0"]["mixer"]["in_proj"]["kernel"].shape == (6, 192, 768)
  assert count(tree["encoder"]) > 1e6
  p8 = create_model("evim3_p8")
  assert p8.token_grid == (32, 14, 14) and p8.num_masked == int(0.8 * 16 * 7 * 7) * 8
  assert create_model("evim3_p4", dim=96).dim == 96
  assert create_model("evim3_tiny").token_grid == (4, 8, 8)


@pytest.mark.parametrize("shape,message", [
    ((B, 4, 16, 16, 3), "video has 3 channels, the model expects 1 (set in_chans)"),
    ((B, 6, 16, 16, 1), "video has 6 frames, the model expects 4 (set num_frames); expected "
                        "shape (batch, 4, 16, 16, 1)"),
    ((B, 4, 16, 20, 1), "frames are 16×20, the model expects 16×16"),
    ((4, 16, 16, 1), "expected (batch, time, height, width, channels)"),
])
def test_bad_video(tiny, shape, message):
  model, params, _, _, _ = tiny
  with pytest.raises(ValueError) as e:
    model.apply({"params": params}, jnp.zeros(shape))
  assert message in str(e.value)


def test_pretrains_with_chains_that_do_not_divide_the_grid(tiny):
  # Chains of 2x3x3 on the (2, 4, 4) grid: a 1x2x2 chain grid upsampled as the release does
  # (chains of 2x2x2 tokens); every example hides the same number of tokens, as the static
  # visible-token shapes need.
  _, params, video, _, _ = tiny
  model = create_model("evim3_tiny", **{**CFG, "space_chain": 3})
  mask = masking.batched_mask(jax.random.key(4), B, model.token_grid, 0.5, kind="stc",
                              time_chain=2, space_chain=3)
  assert (np.asarray(mask).reshape(B, -1).sum(1) == model.num_masked).all()
  assert model.num_masked == 2 * 8  # int(0.5 * 4) chains of 8 tokens
  loss, _ = compiled(lambda p, v, m: model.apply({"params": p}, v, m, method="pretrain_loss"),
                     params, video, mask)(params, video, mask)
  assert np.isfinite(float(loss))


def test_bad_mask_and_config(tiny):
  model, params, video, mask, _ = tiny
  with pytest.raises(ValueError, match=r"expected bool \(batch, L', H', W'\) = \(2, 2, 4, 4\)"):
    model.apply({"params": params}, video, mask[:, :1], method="pretrain_loss")
  with pytest.raises(ValueError, match="dtype int32"):
    model.apply({"params": params}, video, mask.astype(jnp.int32), method="pretrain_loss")
  with pytest.raises(ValueError, match="img_size=18 is not a multiple of patch=4"):
    _ = create_model("evim3_tiny", **{**CFG, "img_size": 18}).token_grid
  with pytest.raises(ValueError, match="num_frames=5 is not a multiple of tubelet=2"):
    _ = create_model("evim3_tiny", **{**CFG, "num_frames": 5}).token_grid
  with pytest.raises(ValueError, match="chain size must be three positive ints"):
    _ = create_model("evim3_tiny", **{**CFG, "space_chain": 0}).num_masked
  with pytest.raises(ValueError, match="ratio=1.0 must lie in"):
    _ = create_model("evim3_tiny", **{**CFG, "mask_ratio": 1.0}).num_masked
  with pytest.raises(ValueError, match="use_egt=False use pool='mean'"):
    create_model("evim3_tiny", **CFG, use_egt=False).apply({"params": params}, video)
  with pytest.raises(TypeError, match="unknown field"):
    create_model("evim3_tiny", patch_size=4)
