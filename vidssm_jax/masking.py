"""Masks on a token grid, and the index transforms of the visible-token encoder (SPEC §3).

Masks. Every mask is a bool array over the token grid ``(L', H', W')``, True = masked. One
chained sampler draws them all: the grid is tiled by chains of ``(lc, hc, wc)`` tokens, exactly
``int(ratio · n_chains)`` chains are chosen uniformly without replacement, and a token is masked
when its chain is. A grid size that its chain size does not divide is tiled as the E-ViM³
release does: a chain grid of ``ceil(L' / lc)`` (and so on) cells, upsampled to the token grid
by PyTorch's ``nearest`` rule (``_nearest_source``), so the chains along that axis come in two
sizes. The release then draws ``int(ratio · n_chains)`` chains among all of them, and the number
of hidden tokens depends on the draw; ours draws ``int(ratio · n)`` chains among the ``n``
chains of each size (``(lc', hc', wc')``) separately, so that every mask hides the same number of
tokens and a visible-token encoder keeps static shapes (on a grid the chains divide there is one
size, and the two rules agree). Its three faces:

    stc_mask     chains of time_chain × space_chain × space_chain (E-ViM³'s STC masking)
    random_mask  chains of 1 × 1 × 1: exactly int(ratio · L'H'W') tokens
    tube_mask    chains of L' × 1 × 1: the same int(ratio · H'W') positions in every frame

``batched_mask`` draws one mask per example with ``jax.vmap``; every example hides the same number
of tokens, so a visible-token encoder keeps static shapes under ``jit``.

Index transforms. A volume ``(L, H, W)`` (for E-ViM³ the enlarged volume with the global tokens)
is scanned in three orders, named by its axes from slowest to fastest: ``"lhw"`` (the natural
row-major layout, W fastest), ``"hwl"`` (L fastest) and ``"lwh"`` (H fastest). For a visibility
``visible (b, L, H, W)`` with the same number ``V`` of visible positions in every example:

    scan_indices        order -> (b, V) flat LHW positions of the visible tokens, in that order
    scan_permutations   (src, dst) -> (b, V): tokens_dst = take_along_axis(tokens_src, perm, 1)
                        for the consecutive orders lhw -> hwl -> lwh -> lhw

All are ``jnp`` computations with static shapes, usable inside ``jit`` (sorting and cumulative
sums of the visibility; the static parts are NumPy constants computed once at trace time).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

MASK_KINDS = ("stc", "random", "tube")
_OPTIONS = ("time_chain", "space_chain")

# Axis order of each scan, slowest first, as indices into (L, H, W).
SCAN_ORDERS = {"lhw": (0, 1, 2), "hwl": (1, 2, 0), "lwh": (0, 2, 1)}
# The consecutive orders of a Mamba-3D block, as the permutations between them are listed.
ORDER_CYCLE = (("lhw", "hwl"), ("hwl", "lwh"), ("lwh", "lhw"))


# ---- masks ----------------------------------------------------------------------------------


def _check_grid(grid, who: str) -> tuple[int, int, int]:
  grid = tuple(grid)
  if len(grid) != 3 or not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid):
    raise ValueError(f"{who}: grid must be three positive ints (L', H', W'), got {grid!r}")
  return tuple(int(g) for g in grid)


def _check_ratio(ratio, who: str) -> float:
  if not 0.0 <= float(ratio) < 1.0:
    raise ValueError(f"{who}: ratio={ratio!r} must lie in [0, 1) (a fraction of the chains to "
                     "mask; 1 would leave nothing visible)")
  return float(ratio)


def _check_chain(grid, chain, who: str) -> tuple[int, int, int]:
  chain = tuple(int(c) for c in chain)
  if len(chain) != 3 or min(chain) < 1:
    raise ValueError(f"{who}: chain size must be three positive ints, got {chain!r}")
  return chain


def _nearest_source(size: int, cells: int) -> np.ndarray:
  """For each of ``size`` tokens along an axis, its cell of ``cells``: PyTorch's ``nearest``
  interpolation (``F.interpolate(mode="nearest")``), which computes ``floor(i · (cells / size))``
  in float32 (exactly ``i // chain`` when the chain divides the size)."""
  scale = np.float32(cells) / np.float32(size)
  return np.minimum(np.floor(np.arange(size, dtype=np.float32) * scale).astype(np.int64),
                    cells - 1)


@functools.lru_cache(maxsize=None)
def _tiling(grid: tuple[int, int, int], chain: tuple[int, int, int]):
  """``(sources, strata, counts)``: per axis the cell of every token; per cell its stratum (the
  index of its chain size); per stratum ``(number of cells, tokens per chain)``."""
  cells = tuple(-(-g // c) for g, c in zip(grid, chain))
  sources = tuple(_nearest_source(g, m) for g, m in zip(grid, cells))
  sizes = _cell_sizes(sources)
  size_of_cell = np.stack(np.meshgrid(*sizes, indexing="ij"), -1).reshape(-1, 3)
  kinds, strata = np.unique(size_of_cell, axis=0, return_inverse=True)
  counts = tuple((int(np.sum(strata == k)), int(np.prod(kinds[k]))) for k in range(len(kinds)))
  return sources, strata.reshape(-1), counts


def _masked_count(grid, chain, ratio) -> tuple[tuple[int, ...], int]:
  """Chains masked per stratum, and the tokens they hide."""
  _, _, counts = _tiling(grid, chain)
  per_stratum = tuple(int(ratio * n) for n, _ in counts)
  return per_stratum, sum(k * size for k, (_, size) in zip(per_stratum, counts))


def chain_mask(key: Array, grid: Sequence[int], ratio: float, chain: Sequence[int]) -> Array:
  """Masks ``int(ratio · n)`` whole chains of each chain size, chosen uniformly at random.

  Args:
    key: a PRNG key; the same key gives the same mask.
    grid: the token grid ``(L', H', W')``.
    ratio: fraction of the chains to mask, in ``[0, 1)``.
    chain: chain size ``(lc, hc, wc)``; a size that does not divide its grid size gives chains
      of two sizes along that axis (the module docstring).

  Returns:
    bool ``(L', H', W')``, True = masked.
  """
  grid = _check_grid(grid, "chain_mask")
  ratio = _check_ratio(ratio, "chain_mask")
  chain = _check_chain(grid, chain, "chain_mask")
  return _draw_chains(key, grid, _masked_count(grid, chain, ratio)[0], chain)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_chains(key, grid, per_stratum, chain):
  sources, strata, counts = _tiling(grid, chain)
  n_cells = strata.size
  # Rank every chain by a random permutation; within each stratum the chains of the lowest
  # ranks are masked (with one stratum, the first per_stratum[0] ranks).
  rank = jax.random.permutation(key, n_cells)
  if len(counts) == 1:
    masked = rank < per_stratum[0]
  else:
    order = jnp.argsort(jnp.asarray(strata) * n_cells + rank)  # stratum by stratum, by rank
    # Sorted position p holds a cell of stratum sorted_strata[p], of rank p - (that stratum's
    # first position) within it.
    sorted_strata = np.sort(strata)
    starts = np.searchsorted(sorted_strata, np.arange(len(counts)))
    rank_in_stratum = jnp.zeros(n_cells, jnp.int32).at[order].set(
        jnp.asarray(np.arange(n_cells) - starts[sorted_strata], jnp.int32))
    masked = rank_in_stratum < jnp.asarray(np.asarray(per_stratum)[strata], jnp.int32)
  masked = masked.reshape(tuple(len(sizes) for sizes in _cell_sizes(sources)))
  return masked[np.ix_(*sources)]


def _cell_sizes(sources):
  return [np.bincount(src) for src in sources]


def stc_mask(key: Array, grid: Sequence[int], ratio: float, time_chain: int = 2,
             space_chain: int = 4) -> Array:
  """Spatial-temporal chained mask: chains of ``time_chain × space_chain × space_chain`` tokens.

  ``grid (L', H', W')`` -> bool ``(L', H', W')`` with ``int(ratio · n_chains)`` chains masked
  (per chain size, on a grid the chain size does not divide: the module docstring).
  """
  return chain_mask(key, grid, ratio, (time_chain, space_chain, space_chain))


def random_mask(key: Array, grid: Sequence[int], ratio: float) -> Array:
  """Token-wise random mask: exactly ``int(ratio · L'H'W')`` tokens of ``grid`` masked."""
  return chain_mask(key, grid, ratio, (1, 1, 1))


def tube_mask(key: Array, grid: Sequence[int], ratio: float) -> Array:
  """Tube mask: the same ``int(ratio · H'W')`` spatial positions masked in every frame."""
  grid = _check_grid(grid, "tube_mask")
  return chain_mask(key, grid, ratio, (grid[0], 1, 1))


def _chain_of(kind: str, grid, options: dict) -> tuple[int, int, int]:
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise ValueError(f"mask options {unknown} are not known; the options are {list(_OPTIONS)} "
                     "(used by kind='stc', ignored by the others)")
  if kind == "stc":
    sc = options.get("space_chain", 4)
    return (options.get("time_chain", 2), sc, sc)
  if kind == "random":
    return (1, 1, 1)
  if kind == "tube":
    return (grid[0], 1, 1)
  raise ValueError(f"mask kind {kind!r} is not one of {MASK_KINDS}")


def num_masked(grid: Sequence[int], ratio: float, kind: str = "stc", **options) -> int:
  """How many tokens of ``grid`` a mask of this kind hides (the same for every key)."""
  grid = _check_grid(grid, "num_masked")
  ratio = _check_ratio(ratio, "num_masked")
  chain = _check_chain(grid, _chain_of(kind, grid, options), f"{kind} mask")
  return _masked_count(grid, chain, ratio)[1]


def batched_mask(key: Array, batch_size: int, grid: Sequence[int], ratio: float,
                 kind: str = "stc", **options) -> Array:
  """One mask per example: bool ``(batch, L', H', W')``, True = masked.

  Args:
    key: PRNG key, split into one key per example.
    batch_size: number of examples.
    grid: the token grid ``(L', H', W')``.
    ratio: fraction masked, in ``[0, 1)``.
    kind: ``"stc"`` (options ``time_chain`` default 2, ``space_chain`` default 4), ``"random"``
      or ``"tube"``. Options that do not apply to the kind are ignored.

  Every example hides exactly ``num_masked(grid, ratio, kind, **options)`` tokens.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batched_mask: batch_size must be a positive int, got {batch_size!r}")
  grid = _check_grid(grid, "batched_mask")
  chain = _chain_of(kind, grid, options)
  _check_chain(grid, chain, f"{kind} mask")
  ratio = _check_ratio(ratio, "batched_mask")
  chain = tuple(int(c) for c in chain)
  per_stratum = _masked_count(grid, chain, ratio)[0]
  return _draw_batch(key, int(batch_size), grid, per_stratum, chain)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _draw_batch(key, batch_size, grid, per_stratum, chain):
  keys = jax.random.split(key, batch_size)
  return jax.vmap(lambda k: _draw_chains(k, grid, per_stratum, chain))(keys)


# ---- index transforms -----------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def scan_positions(shape: tuple[int, int, int], order: str) -> np.ndarray:
  """Static: ``(L·H·W,)`` flat LHW positions of a volume ``shape`` listed in scan ``order``."""
  if order not in SCAN_ORDERS:
    raise ValueError(f"scan order {order!r} is not one of {sorted(SCAN_ORDERS)}")
  ids = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
  out = np.ascontiguousarray(np.transpose(ids, SCAN_ORDERS[order]).reshape(-1))
  out.flags.writeable = False
  return out


@functools.lru_cache(maxsize=None)
def scan_ranks(shape: tuple[int, int, int], order: str) -> np.ndarray:
  """Static: ``(L, H, W)`` index of each position in the scan ``order`` of the full volume."""
  pos = scan_positions(shape, order)
  rank = np.empty_like(pos)
  rank[pos] = np.arange(pos.size, dtype=pos.dtype)
  rank = rank.reshape(shape)
  rank.flags.writeable = False
  return rank


def _as_batched(visible, who):
  if visible.ndim not in (3, 4) or visible.dtype != jnp.bool_:
    raise ValueError(f"{who}: visible has shape {tuple(visible.shape)} dtype {visible.dtype}, "
                     "expected bool (batch, L, H, W) or (L, H, W)")
  return (visible, False) if visible.ndim == 4 else (visible[None], True)


def concrete(x) -> Optional[np.ndarray]:
  """``x`` as a NumPy array when its values are known here, None inside a trace (``jit``)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_count(num_visible, visible, who):
  n = int(np.prod(visible.shape[1:]))
  if not isinstance(num_visible, (int, np.integer)) or not 0 < num_visible <= n:
    raise ValueError(f"{who}: num_visible={num_visible!r} must be a static int in [1, {n}]")
  values = concrete(visible)
  if values is not None:  # outside jit the count is checkable here
    counts = values.reshape(visible.shape[0], -1).sum(-1)
    if not (counts == num_visible).all():
      raise ValueError(f"{who}: visible has {sorted(set(counts.tolist()))} visible positions per "
                       f"example, expected num_visible={num_visible} in every example")


def scan_indices(visible: Array, num_visible: int) -> dict[str, Array]:
  """Flat LHW positions of the visible tokens, listed in each scan order.

  Args:
    visible: bool ``(b, L, H, W)`` (or ``(L, H, W)``), True = the token takes part in the scan.
    num_visible: the static number ``V`` of True entries in every example.

  Returns:
    ``{"lhw", "hwl", "lwh"} -> int32 (b, V)`` (``(V,)`` for an unbatched input): the positions
    ``l·H·W + h·W + w`` of the visible tokens, sorted by their index in that scan order.
  """
  visible, squeeze = _as_batched(visible, "scan_indices")
  _check_count(num_visible, visible, "scan_indices")
  out = _scan_indices(visible, int(num_visible))
  return {k: v[0] for k, v in out.items()} if squeeze else out


@functools.partial(jax.jit, static_argnums=1)
def _scan_indices(visible, num_visible):
  b, shape = visible.shape[0], tuple(visible.shape[1:])
  flat = visible.reshape(b, -1)
  out = {}
  for order in SCAN_ORDERS:
    pos = scan_positions(shape, order)
    in_order = flat[:, pos]  # visibility listed in scan order
    # A stable sort of "is hidden" puts the visible entries first, still in scan order.
    first = jnp.argsort(~in_order, axis=-1, stable=True)[:, :num_visible]
    out[order] = jnp.asarray(pos)[first]
  return out


def visible_ranks(visible: Array, order: str) -> Array:
  """int32 ``(b, L·H·W)``: for each flat LHW position, its index in the visible list of
  ``order`` (meaningful at visible positions only)."""
  visible, squeeze = _as_batched(visible, "visible_ranks")
  if order not in SCAN_ORDERS:
    raise ValueError(f"scan order {order!r} is not one of {sorted(SCAN_ORDERS)}")
  ranks = _visible_ranks(visible, order)
  return ranks[0] if squeeze else ranks


@functools.partial(jax.jit, static_argnums=1)
def _visible_ranks(visible, order):
  b, shape = visible.shape[0], tuple(visible.shape[1:])
  pos = scan_positions(shape, order)
  in_order = visible.reshape(b, -1)[:, pos].astype(jnp.int32)
  rank_in_order = jnp.cumsum(in_order, axis=-1) - 1
  return rank_in_order[:, scan_ranks(shape, order).reshape(-1)]  # back to LHW positions


def scan_permutations(visible: Array, indices: Optional[dict] = None,
                      num_visible: Optional[int] = None,
                      pairs: Sequence[tuple[str, str]] = ORDER_CYCLE) -> dict:
  """Permutations between the visible lists of scan orders.

  Args:
    visible: bool ``(b, L, H, W)`` (or ``(L, H, W)``).
    indices: ``scan_indices(visible, V)`` if already computed (else ``num_visible`` is needed).
    pairs: the ``(src, dst)`` orders wanted; default the consecutive orders
      ``("lhw", "hwl"), ("hwl", "lwh"), ("lwh", "lhw")``. ``(dst, src)`` is the inverse of
      ``(src, dst)``.

  Returns:
    ``(src, dst) -> int32 (b, V)``: for tokens listed in order ``src``,
    ``take_along_axis(tokens, perm[..., None], axis=1)`` lists them in order ``dst``.
  """
  if indices is None:
    if num_visible is None:
      raise ValueError("scan_permutations: pass indices (from scan_indices) or num_visible")
    indices = scan_indices(visible, num_visible)
  ranks = {o: visible_ranks(visible, o) for o in {src for src, _ in pairs}}
  # Token j of the dst list sits at position idx_dst[j], which is number rank_src[...] in src.
  return {(src, dst): jnp.take_along_axis(ranks[src], indices[dst], axis=-1) for src, dst in pairs}


def scan_transforms(visible: Array, num_visible: int, *, with_inverse: bool = False):
  """``(scan_indices(visible, V), scan_permutations(visible, ...))`` in one call; with
  ``with_inverse`` the permutations also hold the reverse pairs ``(dst, src)``."""
  indices = scan_indices(visible, num_visible)
  pairs = ORDER_CYCLE + (tuple((d, s) for s, d in ORDER_CYCLE) if with_inverse else ())
  return indices, scan_permutations(visible, indices, pairs=pairs)
