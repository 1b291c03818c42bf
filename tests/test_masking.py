"""Masks (exact counts, chain structure, determinism, batching) and the scan index transforms
(against NumPy argsort, and a round trip through the three orders)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vidssm_jax import masking as M


def chains_of(mask, chain):
  """``(L', H', W')`` mask -> ``(n_chains, chain tokens)`` grouped by chain."""
  (l, h, w), (cl, ch, cw) = mask.shape, chain
  m = np.asarray(mask).reshape(l // cl, cl, h // ch, ch, w // cw, cw)
  return m.transpose(0, 2, 4, 1, 3, 5).reshape(-1, cl * ch * cw)


def test_stc_masks_whole_chains_exactly():
  grid, chain = (4, 8, 12), (2, 4, 4)
  for seed in range(4):
    mask = M.stc_mask(jax.random.key(seed), grid, 0.6, time_chain=2, space_chain=4)
    assert mask.shape == grid and mask.dtype == jnp.bool_
    per_chain = chains_of(mask, chain)
    # Every chain is fully masked or fully visible, and int(0.6 · 12) = 7 chains are masked.
    assert (per_chain.all(1) | ~per_chain.any(1)).all()
    assert per_chain.all(1).sum() == 7 and int(mask.sum()) == 7 * 32
  assert M.num_masked(grid, 0.6, "stc", time_chain=2, space_chain=4) == 7 * 32


def test_random_and_tube_counts():
  grid = (3, 5, 7)
  mask = M.random_mask(jax.random.key(0), grid, 0.37)
  assert int(mask.sum()) == int(0.37 * 105) == M.num_masked(grid, 0.37, "random")
  tube = np.asarray(M.tube_mask(jax.random.key(1), (4, 6, 6), 0.75))
  assert (tube == tube[:1]).all(), "tube masks hide the same positions in every frame"
  assert tube[0].sum() == int(0.75 * 36) == 27
  assert M.num_masked((4, 6, 6), 0.75, "tube") == 4 * 27
  assert not M.random_mask(jax.random.key(0), grid, 0.0).any()


def test_masks_are_deterministic_per_key_and_differ_across_keys():
  grid = (4, 8, 8)
  for make in (functools.partial(M.stc_mask, time_chain=2, space_chain=2), M.random_mask,
               M.tube_mask):
    a, b = make(jax.random.key(3), grid, 0.5), make(jax.random.key(3), grid, 0.5)
    c = make(jax.random.key(4), grid, 0.5)
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()


def test_stc_chains_are_chosen_uniformly():
  # 2000 masks of 8 chains at ratio 0.5: each chain is masked in about half of them.
  masks = M.batched_mask(jax.random.key(0), 2000, (2, 4, 8), 0.5, kind="stc", time_chain=2,
                         space_chain=2)
  per_chain = np.stack([chains_of(m, (2, 2, 2))[:, 0] for m in np.asarray(masks)])  # (2000, 8)
  np.testing.assert_allclose(per_chain.mean(0), 0.5, atol=0.05)
  assert (per_chain.sum(1) == 4).all()


def test_batched_mask_one_per_example_static_count_under_jit():
  grid = (4, 8, 8)
  draw = jax.jit(M.batched_mask, static_argnums=(1, 2, 3), static_argnames=("kind", "time_chain",
                                                                             "space_chain"))
  masks = draw(jax.random.key(0), 5, grid, 0.75, kind="stc", time_chain=2, space_chain=4)
  assert masks.shape == (5,) + grid and masks.dtype == jnp.bool_
  counts = np.asarray(masks).reshape(5, -1).sum(1)
  assert (counts == M.num_masked(grid, 0.75, "stc", time_chain=2, space_chain=4)).all()
  assert len({np.asarray(m).tobytes() for m in masks}) == 5, "every example draws its own mask"
  np.testing.assert_array_equal(masks, M.batched_mask(jax.random.key(0), 5, grid, 0.75))
  # Options that do not apply to the kind are ignored.
  tubes = M.batched_mask(jax.random.key(1), 3, grid, 0.5, kind="tube", time_chain=2, space_chain=4)
  assert (np.asarray(tubes) == np.asarray(tubes)[:, :1]).all()
  assert (np.asarray(tubes).reshape(3, -1).sum(1) == 4 * 32).all()


# PyTorch's F.interpolate(mode="nearest") of cells 0..m-1 to each size (torch 2.13, printed once).
TORCH_NEAREST = {
    (9, 3): [0, 0, 0, 1, 1, 1, 2, 2, 2],
    (10, 3): [0, 0, 0, 0, 1, 1, 1, 2, 2, 2],
    (7, 4): [0, 0, 1, 1, 2, 2, 3],
    (13, 4): [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3],
    (30, 8): [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7,
              7, 7],
}


def test_chains_on_grids_they_do_not_divide_tile_as_the_release():
  # The chain grid by ceiling (7/2 -> 4, 13/4 -> 4, 10/4 -> 3), upsampled by PyTorch's nearest.
  for (size, cells), want in TORCH_NEAREST.items():
    np.testing.assert_array_equal(M._nearest_source(size, cells), want)
  grid, ratio = (7, 13, 10), 0.8
  cells = (4, 4, 3)
  src = [np.asarray(TORCH_NEAREST[(g, m)]) for g, m in zip(grid, cells)]
  cell_of = np.arange(48).reshape(cells)[np.ix_(*src)]  # the cell of every token
  masks = np.asarray(M.batched_mask(jax.random.key(3), 4, grid, ratio, "stc", time_chain=2,
                                    space_chain=4))
  assert masks.shape == (4,) + grid
  # Every example hides the same number of tokens; every cell is masked whole.
  assert (masks.reshape(4, -1).sum(1) == M.num_masked(grid, ratio, "stc")).all()
  size_of = {}
  for c in range(48):
    size_of[c] = tuple(int(np.sum(s == idx)) for s, idx in zip(src, np.unravel_index(c, cells)))
  for m in masks:
    hidden = {c for c in range(48) if m[cell_of == c].all()}
    assert all(not m[cell_of == c].any() for c in set(range(48)) - hidden)
    # int(ratio · n) chains of each chain size.
    for size in set(size_of.values()):
      n = sum(1 for c in size_of if size_of[c] == size)
      assert sum(1 for c in hidden if size_of[c] == size) == int(ratio * n), size
  assert len({m.tobytes() for m in masks}) == 4


@pytest.mark.parametrize("call,message", [
    (lambda: M.stc_mask(jax.random.key(0), (4, 8, 8), 1.0), "ratio=1.0 must lie in [0, 1)"),
    (lambda: M.random_mask(jax.random.key(0), (4, 8, 8), -0.1), "ratio=-0.1"),
    (lambda: M.stc_mask(jax.random.key(0), (4, 8, 8), 0.5, space_chain=0), "chain size"),
    (lambda: M.batched_mask(jax.random.key(0), 2, (4, 8, 8), 0.5, kind="blocks"), "'blocks'"),
    (lambda: M.batched_mask(jax.random.key(0), 2, (4, 8, 8), 0.5, spacechain=2), "spacechain"),
    (lambda: M.batched_mask(jax.random.key(0), 0, (4, 8, 8), 0.5), "batch_size"),
    (lambda: M.random_mask(jax.random.key(0), (4, 0, 8), 0.5), "grid"),
])
def test_bad_mask_arguments(call, message):
  with pytest.raises(ValueError) as e:
    call()
  assert message in str(e.value)


# ---- index transforms -------------------------------------------------------------------------

SHAPE = (3, 4, 5)
AXES = {"lhw": (0, 1, 2), "hwl": (1, 2, 0), "lwh": (0, 2, 1)}


def random_visibility(key, batch, shape, num_visible):
  n = int(np.prod(shape))
  order = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, batch)))
  return (order < num_visible).reshape((batch,) + shape)


def order_key(shape, order):
  """NumPy: linear index of every position in the scan ``order`` (slowest axis first)."""
  c = np.indices(shape)
  a0, a1, a2 = AXES[order]
  return (c[a0] * shape[a1] + c[a1]) * shape[a2] + c[a2]


@pytest.fixture(scope="module")
def transforms():
  vis = random_visibility(jax.random.key(0), 3, SHAPE, 37)
  fn = jax.jit(M.scan_transforms, static_argnums=1, static_argnames="with_inverse")
  indices, perms = fn(jnp.asarray(vis), 37, with_inverse=True)
  return vis, jax.device_get(indices), jax.device_get(perms)


def test_visible_lists_equal_numpy_argsort(transforms):
  vis, indices, _ = transforms
  for order in ("lhw", "hwl", "lwh"):
    key = order_key(SHAPE, order).reshape(-1)
    for b in range(vis.shape[0]):
      positions = np.flatnonzero(vis[b].reshape(-1))
      expected = positions[np.argsort(key[positions])]
      np.testing.assert_array_equal(indices[order][b], expected, err_msg=order)
  # Full visibility: the lists are the transposes of the volume of ids.
  full = M.scan_indices(jnp.ones(SHAPE, bool), 60)
  ids = np.arange(60).reshape(SHAPE)
  for order, axes in AXES.items():
    np.testing.assert_array_equal(full[order], np.transpose(ids, axes).reshape(-1))


def test_token_ids_round_trip_through_the_three_orders(transforms):
  vis, indices, perms = transforms
  ids = np.arange(vis[0].size) * 10 + 7  # a volume of token ids, any values
  tokens = ids[indices["lhw"]]  # (b, V) listed in LHW
  start = tokens
  for src, dst in M.ORDER_CYCLE:
    tokens = np.take_along_axis(tokens, perms[(src, dst)], axis=1)
    np.testing.assert_array_equal(tokens, ids[indices[dst]], err_msg=f"{src} -> {dst}")
  np.testing.assert_array_equal(tokens, start)  # back in LHW: the identity
  for perm in perms.values():  # each is a permutation of 0..V-1
    np.testing.assert_array_equal(np.sort(perm, axis=1), np.broadcast_to(np.arange(37), perm.shape))
  for src, dst in M.ORDER_CYCLE:  # (dst, src) undoes (src, dst)
    there = np.take_along_axis(tokens, perms[(src, dst)], axis=1)
    np.testing.assert_array_equal(np.take_along_axis(there, perms[(dst, src)], axis=1), tokens)


def test_index_transforms_check_their_inputs():
  vis = random_visibility(jax.random.key(1), 2, SHAPE, 20)
  with pytest.raises(ValueError, match="num_visible=21"):
    M.scan_indices(jnp.asarray(vis), 21)
  with pytest.raises(ValueError, match="expected bool"):
    M.scan_indices(jnp.asarray(vis).astype(jnp.int32), 20)
  unbatched = M.scan_indices(jnp.asarray(vis[1]), 20)
  np.testing.assert_array_equal(unbatched["hwl"], M.scan_indices(jnp.asarray(vis), 20)["hwl"][1])
