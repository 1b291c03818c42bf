"""E-ViM³ (SPEC §3): Mamba-3D blocks over a token volume enclosed by global tokens, pretrained as
a masked autoencoder whose encoder runs on the visible tokens only.

Data flow for ``video: (b, t, H, W, C)`` with tubelet ``(tubelet, patch, patch)``:

    patchify      (b, L', H', W', P) pixels, L' = t/tubelet, H' = W' = H/patch, P = tubelet·patch²·C
    patch_embed   linear P -> dim on every real token (a 3D conv with stride = kernel)
    enclosure     the enlarged volume (L'+r+2, H'+r+2, W'+r+2): 6 face, 12 edge, 8 corner tokens and
                  one register token fill the global positions, real tokens the rest (in order)
    + pos         factorised learned embeddings, one per axis, summed
    blocks        Mamba-3D: six pre-norm residual Mamba layers scanning HWL, rev HWL, LWH, rev LWH,
                  LHW, rev LHW; the tokens are permuted between layers
    norm_f        LayerNorm per token -> features (b, L+, H+, W+, dim)
    head          pool="egt_concat" (the release): the (r+2)³ = 27 global tokens where the
                  register planes meet, concatenated (27·dim); "egt": their mean (the paper's
                  text); "egt_all": mean of all global tokens (the release's "enclosure mean");
                  "mean": mean of the real tokens -> fc1 (-> head_hidden) + SiLU -> head_layers - 1
                  more Linear + SiLU -> fc -> (b, num_outputs)

Pretraining (``pretrain_loss``): a mask ``(b, L', H', W')`` hides real tokens (global tokens are
always visible). The MAE encoder embeds only the visible tokens of the enlarged volume, listed in
HWL order, and moves them between the scan orders with per-example gather indices (see
``vidssm_jax.masking``); it never scatters back to the full volume. The decoder places the
encoder output back into the volume, fills masked real positions with a mask token, adds its own
position embeddings (no LayerNorm between encoder and decoder, as the release; ``pretrain_norm``
applies ``norm_f`` first, ours), runs ``decoder_depth`` Mamba-3D blocks, a LayerNorm and a linear map to the
``P`` pixels of every real token; the loss is the MSE on the masked patches' pixels.

Layout (``enclosure_layout``): along an axis of enlarged size ``S = n + r + 2`` the global planes
sit at ``floor(linspace(0, S - 1, r + 2))`` (0 and ``S - 1`` are the enclosure; the ``r`` in between
are register planes). A global position is a face, edge or corner when 1, 2 or 3 of its
coordinates are 0 or ``S - 1``, otherwise a register position. Learned tokens, in the order of
the table ``[faces 0-5 | edges 6-17 | corners 18-25 | register 26]``:

    face    2·axis + side                       (axis 0 = L, 1 = H, 2 = W; side 1 = the far end)
    edge    4·g + side(a) + 2·side(b)           g = 0, 1, 2 for the edges along W, H, L; a < b the
                                                two axes the edge is bounded on
    corner  side(L) + 2·side(H) + 4·side(W)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidssm_jax import masking
from vidssm_jax.models.registry import register
from vidssm_jax.nn.layers import REMAT_POLICIES, layer_stack, partitioned
from vidssm_jax.nn.mamba import MambaBlock, MambaConfig, torch_linear_init
from vidssm_jax.nn.video import check_video

Array = jax.Array
Dtype = Any

REAL, FACE, EDGE, CORNER, REGISTER = 0, 1, 2, 3, 4
NUM_FACES, NUM_EDGES, NUM_CORNERS = 6, 12, 8
# The six layers of a Mamba-3D block: (scan order, reversed).
POOLS = ("egt_concat", "egt", "egt_all", "mean")
LAYER_ORDERS = (("hwl", False), ("hwl", True), ("lwh", False), ("lwh", True), ("lhw", False),
                ("lhw", True))


# ---- enclosure geometry (NumPy, static) -------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class EnclosureLayout:
  """Where the real and global tokens sit in the enlarged volume (all NumPy, read-only).

  Attributes:
    grid: ``(L', H', W')`` real tokens.
    shape: ``(L+, H+, W+)`` the enlarged volume (equal to ``grid`` without the enclosure).
    planes: per axis, the indices of the global planes (enclosure and registers), ascending.
    kind: int8 ``shape``: REAL, FACE, EDGE, CORNER or REGISTER.
    token: int32 ``shape``: the row of the token table filling a global position, -1 if real.
    source: int32 ``(N,)`` per flat LHW position: the real token's index in LHW order, or
      ``num_real + token`` for a global position (one gather from [real tokens | table]).
    real_positions: int32 ``(num_real,)`` flat positions of the real tokens, in LHW order.
    pool_positions: int32 flat positions where a plane of every axis meets (the global tokens
      the ``"egt"`` head reads): ``(r+2)³`` of them, none without the enclosure.
    global_positions: int32 flat positions of every global token (the ``"egt_all"`` head).
  """

  grid: tuple
  shape: tuple
  planes: tuple
  kind: np.ndarray
  token: np.ndarray
  source: np.ndarray
  real_positions: np.ndarray
  pool_positions: np.ndarray
  global_positions: np.ndarray

  @property
  def num_positions(self) -> int:
    return int(np.prod(self.shape))

  @property
  def num_real(self) -> int:
    return int(np.prod(self.grid))

  @property
  def num_global(self) -> int:
    return self.num_positions - self.num_real


def register_planes(size: int, num_registers: int) -> np.ndarray:
  """Global plane indices along an enlarged axis of ``size``: ``floor(linspace(0, size-1, r+2))``.

  The spacing ``(size - 1) / (r + 1)`` is at least 1 whenever the axis holds a real token, so the
  floors are distinct and exactly ``size - r - 2`` positions stay real.
  """
  return np.floor(np.linspace(0, size - 1, num_registers + 2)).astype(np.int64)


@functools.lru_cache(maxsize=None)
def enclosure_layout(grid: tuple, num_registers: int = 1,
                     enclosure: bool = True) -> EnclosureLayout:
  """The enlarged volume of a token ``grid (L', H', W')`` (SPEC §3), computed once per shape.

  ``num_registers`` (r, the same on every axis) interior register planes; ``enclosure=False``
  gives the plain volume with no global tokens (the ablation of ``use_egt=False``).
  """
  grid = tuple(int(g) for g in grid)
  if len(grid) != 3 or min(grid) < 1:
    raise ValueError(f"enclosure_layout: grid must be three positive ints, got {grid!r}")
  if not isinstance(num_registers, (int, np.integer)) or num_registers < 0:
    raise ValueError(f"enclosure_layout: num_registers must be an int >= 0, got {num_registers!r}")
  if not enclosure:
    shape, planes = grid, ((), (), ())
    kind = np.zeros(shape, np.int8)
    token = -np.ones(shape, np.int32)
  else:
    shape = tuple(n + num_registers + 2 for n in grid)
    planes = tuple(tuple(int(i) for i in register_planes(s, num_registers)) for s in shape)
    kind, token = _classify(shape, planes)
  n_real = int(np.prod(grid))
  real = (kind == REAL).reshape(-1)
  if int(real.sum()) != n_real:  # cannot happen for valid inputs (see register_planes)
    raise ValueError(f"enclosure_layout: {int(real.sum())} real positions for grid {grid}")
  source = np.where(real, np.cumsum(real) - 1, n_real + token.reshape(-1)).astype(np.int32)
  real_positions = np.flatnonzero(real).astype(np.int32)
  if enclosure:
    pl, ph, pw = (np.asarray(p) for p in planes)
    pool = (pl[:, None, None] * shape[1] + ph[None, :, None]) * shape[2] + pw[None, None, :]
    pool_positions = pool.reshape(-1).astype(np.int32)
  else:
    pool_positions = np.zeros((0,), np.int32)
  global_positions = np.flatnonzero(~real).astype(np.int32)
  arrays = [kind, token, source, real_positions, pool_positions, global_positions]
  for a in arrays:
    a.flags.writeable = False
  return EnclosureLayout(grid, shape, planes, *arrays)


def _classify(shape, planes):
  """kind and token id of every position of the enlarged volume."""
  coords = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
  at_start = [c == 0 for c in coords]
  at_end = [c == s - 1 for c, s in zip(coords, shape)]
  boundary = [a | e for a, e in zip(at_start, at_end)]
  side = [e.astype(np.int32) for e in at_end]
  n_bound = sum(b.astype(np.int32) for b in boundary)
  on_plane = np.zeros(shape, bool)
  for axis, idx in enumerate(planes):
    on_plane |= np.isin(coords[axis], idx)

  kind = np.where(n_bound == 3, CORNER, np.where(n_bound == 2, EDGE, np.where(
      n_bound == 1, FACE, np.where(on_plane, REGISTER, REAL)))).astype(np.int8)
  face = sum(np.where(boundary[a], 2 * a + side[a], 0) for a in range(3))
  # Edge: the free axis f (not on the boundary) gives the group 2 - f (W, H, L = 0, 1, 2); the
  # two bounded axes a < b give the position within the group.
  edge = np.zeros(shape, np.int32)
  for free in range(3):
    a, b = [x for x in range(3) if x != free]
    edge = np.where(~boundary[free], 4 * (2 - free) + side[a] + 2 * side[b], edge)
  corner = side[0] + 2 * side[1] + 4 * side[2]
  token = np.select(
      [kind == FACE, kind == EDGE, kind == CORNER, kind == REGISTER],
      [face, NUM_FACES + edge, NUM_FACES + NUM_EDGES + corner,
       np.full(shape, NUM_FACES + NUM_EDGES + NUM_CORNERS)], -1).astype(np.int32)
  return kind, token


# ---- patches ----------------------------------------------------------------------------------


def patchify(video: Array, tubelet: int, patch: int) -> Array:
  """``(b, t, H, W, C) -> (b, L', H', W', P)``, ``P = tubelet·patch²·C`` ordered (t, h, w, C)."""
  b, t, h, w, c = video.shape
  x = video.reshape(b, t // tubelet, tubelet, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, t // tubelet, h // patch, w // patch, tubelet * patch * patch * c)


def unpatchify(patches: Array, tubelet: int, patch: int) -> Array:
  """Inverse of :func:`patchify`: ``(b, L', H', W', P) -> (b, t, H, W, C)``."""
  b, l, h, w, p = patches.shape
  c = p // (tubelet * patch * patch)
  x = patches.reshape(b, l, h, w, tubelet, patch, patch, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, l * tubelet, h * patch, w * patch, c)


# ---- token movement between the layers of a Mamba-3D block ------------------------------------


def reorder(x: Array, shape, src: str, dst: str) -> Array:
  """Full volume ``(b, N, d)`` listed in scan order ``src`` -> listed in ``dst`` (a transpose)."""
  axes = {"l": 0, "h": 1, "w": 2}
  b, _, d = x.shape
  vol = x.reshape(b, *[shape[axes[a]] for a in src], d)
  perm = [1 + src.index(a) for a in dst]
  return vol.transpose(0, *perm, 4).reshape(b, -1, d)


class _Moves:
  """Moves a token sequence ``(b, l, ·)`` into the layout of layer ``j`` of a block.

  Every block enters in reversed LHW order: the last layer of the previous block leaves its
  tokens so, and a stack's input is listed so too, which makes every block the same function.
  Reversals are flips; the order changes LHW -> HWL -> LWH -> LHW go through ``change(x, src,
  dst)``, which takes tokens listed in *reversed* ``src`` order to ``dst`` order.
  """

  _CHANGE = {0: ("lhw", "hwl"), 2: ("hwl", "lwh"), 4: ("lwh", "lhw")}

  def __init__(self, change):
    self.change = change

  def __call__(self, x, j: int):
    if j % 2:
      return jnp.flip(x, axis=1)
    return self.change(x, *self._CHANGE[j])

  def finish(self, x):
    """From the last layer's reversed LHW order back to LHW."""
    return jnp.flip(x, axis=1)


def dense_moves(shape) -> _Moves:
  """The full volume: flip and transpose (what a dense model does)."""
  return _Moves(lambda x, src, dst: reorder(jnp.flip(x, axis=1), shape, src, dst))


@jax.custom_vjp
def permute_tokens(x: Array, index: Array, inverse: Array) -> Array:
  """``x (b, l, d)`` -> ``x[i, index[i, j]]`` for a permutation ``index (b, l)`` whose inverse is
  ``inverse``. The gradient is the inverse gather, not the scatter-add autodiff would emit (no
  atomics, and exact in bfloat16)."""
  return jnp.take_along_axis(x, index[..., None], axis=1)


def _permute_fwd(x, index, inverse):
  return permute_tokens(x, index, inverse), (index, inverse)


def _permute_bwd(res, g):
  index, inverse = res
  return jnp.take_along_axis(g, inverse[..., None], axis=1), None, None


permute_tokens.defvjp(_permute_fwd, _permute_bwd)


def gather_indices(perms: dict, num_visible: int) -> dict:
  """The per-example gathers ``{"src->dst": (index (b, V), inverse (b, V))}`` of the visible
  tokens for each order change, from ``perms`` holding ``(src, dst)`` and its inverse ``(dst,
  src)`` (as ``masking.scan_transforms(..., with_inverse=True)`` gives them)."""
  out = {}
  for src, dst in masking.ORDER_CYCLE:
    # Entering from the *reversed* src list, whose element k is element V-1-k of the list:
    # y[j] = x[V-1-P[j]], so x[k] goes to j = P⁻¹[V-1-k].
    out[f"{src}->{dst}"] = (num_visible - 1 - perms[(src, dst)],
                            jnp.flip(perms[(dst, src)], axis=-1))
  return out


def gather_moves(indices: dict) -> _Moves:
  """Visible tokens only: one gather per order change, with indices from :func:`gather_indices`."""
  return _Moves(lambda x, src, dst: permute_tokens(x, *indices[f"{src}->{dst}"]))


# ---- modules ----------------------------------------------------------------------------------


def _layer_norm(eps, dtype, name):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=partitioned(nn.initializers.ones, "embed"),
                      bias_init=partitioned(nn.initializers.zeros, "embed"))


def _drop_rates(rate: float, n_blocks: int) -> Array:
  """Stochastic depth linear from 0 to ``rate`` over the ``6 · n_blocks`` layers, ``(n_blocks,
  6)`` (the first layer has no branch to drop)."""
  n = 6 * n_blocks
  return jnp.asarray([rate * i / max(n - 1, 1) for i in range(n)], jnp.float32).reshape(-1, 6)


class Mamba3DBlock(nn.Module):
  """One Mamba-3D block, the body of a scanned stack: six unidirectional pre-norm residual
  Mamba layers (LayerNorm, float32 residual), ``layers_0..5``, scanning HWL, reversed HWL, LWH,
  reversed LWH, LHW, reversed LHW, with the tokens moved between them.

  ``carry = (hidden (b, l, dim), residual (b, l, dim) float32)``, entering and leaving in
  reversed LHW order; ``xs``: the six layers' stochastic-depth rates; ``indices``: the visible
  tokens' gathers (:func:`gather_indices`), or None for the full volume of ``shape``.
  """

  dim: int
  cfg: MambaConfig = MambaConfig()
  n_layers: int = 6  # layers in the whole stack (out_proj init scale)
  norm_eps: float = 1e-5
  stochastic_depth: bool = False
  shape: tuple = ()  # the enlarged volume (L+, H+, W+)

  @nn.compact
  def __call__(self, carry, rates, indices, train: bool):
    hidden, residual = carry
    move = dense_moves(self.shape) if indices is None else gather_moves(indices)
    for j in range(len(LAYER_ORDERS)):
      hidden, residual = move(hidden, j), move(residual, j)
      layer = MambaBlock(dim=self.dim, cfg=self.cfg, n_layers=self.n_layers, norm="layer",
                         norm_eps=self.norm_eps, stochastic_depth=self.stochastic_depth,
                         name=f"layers_{j}")
      hidden, residual = layer(hidden, residual, drop_rate=rates[j], train=train)
    return (hidden, residual), None


class Mamba3DStack(nn.Module):
  """``depth`` Mamba-3D blocks as one scan over stacked parameters (``blocks``, leading
  ``layers`` axis). ``(x (b, l, dim) in reversed LHW order, indices) -> residual + hidden``
  ``(b, l, dim)`` float32 in LHW order."""

  dim: int
  depth: int
  cfg: MambaConfig = MambaConfig()
  norm_eps: float = 1e-5
  drop_path_rate: float = 0.0
  shape: tuple = ()
  remat: str = "none"

  @nn.compact
  def __call__(self, x: Array, indices: Optional[dict], *, train: bool = False) -> Array:
    stack = layer_stack(Mamba3DBlock, self.depth, remat=self.remat, num_broadcast=2,
                        static_broadcast=(1,))
    blocks = stack(dim=self.dim, cfg=self.cfg, n_layers=6 * self.depth, norm_eps=self.norm_eps,
                   stochastic_depth=self.drop_path_rate > 0, shape=tuple(self.shape),
                   name="blocks")
    # The stream starts as (hidden 0, residual = tokens), so block 0 is like every other.
    carry = (jnp.zeros(x.shape, self.cfg.dtype), x.astype(jnp.float32))
    (hidden, residual), _ = blocks(carry, _drop_rates(self.drop_path_rate, self.depth), indices,
                                   train)
    return jnp.flip(residual + hidden.astype(jnp.float32), axis=1)


class _VolumeModule(nn.Module):
  """Shared geometry of the encoder and decoder."""

  grid: tuple = (8, 8, 8)
  num_registers: int = 1
  use_egt: bool = True

  @property
  def layout(self) -> EnclosureLayout:
    return enclosure_layout(tuple(self.grid), self.num_registers, self.use_egt)

  def _pos_params(self, dim):
    shape = self.layout.shape
    init = partitioned(nn.initializers.truncated_normal(0.02), None, "embed")
    return [self.param(f"pos_embed_{a}", init, (n, dim)) for a, n in zip("lhw", shape)]

  def pos_table(self) -> Array:
    """Factorised position embeddings summed: ``(N, dim)`` float32, flat LHW."""
    pl, ph, pw = self.pos_embed
    return (pl[:, None, None] + ph[None, :, None] + pw[None, None, :]).reshape(-1, pl.shape[-1])


class EViM3Encoder(_VolumeModule):
  """Patch embedding, enclosure tokens, position embeddings, Mamba-3D blocks, final LayerNorm.

  Parameters: ``patch_embed``, ``face_tokens (6, dim)``, ``edge_tokens (12, dim)``,
  ``corner_tokens (8, dim)``, ``register_token (1, dim)`` (when r > 0), ``pos_embed_{l,h,w}``,
  ``mask_token (dim,)`` (only with ``dense_mask_token``), ``blocks_{i}``, ``norm_f``.
  """

  dim: int = 192
  depth: int = 6
  cfg: MambaConfig = MambaConfig()
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-5
  dense_mask_token: bool = False  # the dense baseline: masked tokens become a mask token
  remat: str = "none"

  @property
  def dtype(self):
    return self.cfg.dtype

  def setup(self):
    d = self.dim
    self.patch_embed = nn.Dense(d, dtype=self.dtype, name="patch_embed",
                                kernel_init=partitioned(torch_linear_init(), None, "embed"),
                                bias_init=partitioned(nn.initializers.zeros, "embed"))
    zeros = partitioned(nn.initializers.zeros, None, "embed")
    if self.use_egt:
      self.face_tokens = self.param("face_tokens", zeros, (NUM_FACES, d))
      self.edge_tokens = self.param("edge_tokens", zeros, (NUM_EDGES, d))
      self.corner_tokens = self.param("corner_tokens", zeros, (NUM_CORNERS, d))
      if self.num_registers > 0:
        self.register_token = self.param("register_token", zeros, (1, d))
    self.pos_embed = self._pos_params(d)
    if self.dense_mask_token:
      self.mask_token = self.param("mask_token", partitioned(
          nn.initializers.truncated_normal(0.02), "embed"), (d,))
    self.stack = Mamba3DStack(d, self.depth, self.cfg, self.norm_eps, self.drop_path_rate,
                              self.layout.shape, self.remat)
    self.norm_f = _layer_norm(self.norm_eps, self.dtype, "norm_f")

  def token_table(self) -> Array:
    """The learned global tokens, rows as in the module docstring: ``(26 or 27, dim)``."""
    rows = [self.face_tokens, self.edge_tokens, self.corner_tokens]
    if self.num_registers > 0:
      rows.append(self.register_token)
    return jnp.concatenate(rows, axis=0)

  def embed(self, patches: Array, positions, hidden: Optional[Array] = None) -> Array:
    """Tokens of the enlarged volume at ``positions``.

    Args:
      patches: ``(b, L'·H'·W', P)`` pixels of the real tokens in LHW order.
      positions: flat LHW positions of the enlarged volume, int ``(b, V)`` per example or a
        static NumPy ``(V,)`` shared by the batch.
      hidden: optional bool ``(b, L'·H'·W')``: real tokens replaced by ``mask_token``.

    Returns:
      ``(b, V, dim)`` float32: patch embedding (or token) + position embedding.
    """
    lay = self.layout
    n_real = lay.num_real
    static = isinstance(positions, np.ndarray)
    src = lay.source[positions] if static else jnp.asarray(lay.source)[positions]
    is_real = src < n_real
    real_idx = jnp.clip(src, 0, n_real - 1)

    def pick(values):  # values (b, n_real, ...) -> at the positions' real indices
      if static:
        return jnp.take(values, real_idx, axis=1)
      idx = real_idx.reshape(real_idx.shape + (1,) * (values.ndim - 2))
      return jnp.take_along_axis(values, idx, axis=1)

    x = self.patch_embed(pick(patches).astype(self.dtype)).astype(jnp.float32)
    if hidden is not None:
      x = jnp.where(pick(hidden)[..., None], self.mask_token.astype(jnp.float32), x)
    if self.use_egt:
      # A one-hot product rather than a gather: thousands of positions share each of the 27
      # tokens, and the gather's gradient would be a scatter-add contending on 27 rows.
      table = self.token_table()
      onehot = jax.nn.one_hot(src - n_real, table.shape[0], dtype=jnp.float32)  # 0 if real
      tokens = jnp.dot(onehot, table, precision=jax.lax.Precision.HIGHEST)
      x = jnp.where(jnp.asarray(is_real)[..., None], x, tokens)
    return x + self.pos_table()[positions]

  def embed_volume(self, patches: Array) -> Array:
    """The whole enlarged volume before the blocks: ``(b, N, dim)`` float32 in LHW order."""
    return self.embed(patches, np.arange(self.layout.num_positions, dtype=np.int32))

  def encode_full(self, patches: Array, hidden: Optional[Array] = None, *, train: bool = False,
                  norm: bool = True):
    """Full-volume encoder: ``patches (b, n_real, P)`` -> ``(b, N, dim)`` in LHW order (after
    ``norm_f`` unless ``norm=False``)."""
    reversed_lhw = np.arange(self.layout.num_positions, dtype=np.int32)[::-1].copy()
    x = self.stack(self.embed(patches, reversed_lhw, hidden), None, train=train)
    return self.norm_f(x) if norm else x

  def encode_visible(self, patches: Array, visible: Array, num_visible: int, *,
                     train: bool = False, norm: bool = True):
    """MAE encoder on the visible tokens of the enlarged volume only.

    Args:
      patches: ``(b, n_real, P)``.
      visible: bool ``(b, L+, H+, W+)``: visible real tokens and every global token.
      num_visible: the static number ``V`` of visible positions per example.
      norm: apply ``norm_f`` to the features.

    Returns:
      ``(features (b, V, dim), positions (b, V))``: features listed in LHW order, and their flat
      LHW positions in the enlarged volume.
    """
    indices, perms = masking.scan_transforms(visible, num_visible, with_inverse=True)
    x = self.embed(patches, jnp.flip(indices["lhw"], axis=1))
    x = self.stack(x, gather_indices(perms, num_visible), train=train)
    return (self.norm_f(x) if norm else x), indices["lhw"]


class EViM3Decoder(_VolumeModule):
  """Pretraining decoder: encoder output -> full volume with mask tokens -> pixels.

  Parameters: ``embed`` (only when ``dim != enc_dim``, ours), ``mask_token (dim,)``,
  ``pos_embed_{l,h,w}``, ``blocks_{i}``, ``norm``, ``pred`` (dim -> P).
  """

  enc_dim: int = 192
  dim: int = 192
  depth: int = 2
  out_dim: int = 32  # P pixels per real token
  cfg: MambaConfig = MambaConfig()
  norm_eps: float = 1e-5
  remat: str = "none"

  @property
  def dtype(self):
    return self.cfg.dtype

  def setup(self):
    d, lay = self.dim, self.layout
    self.embed = (nn.Dense(d, dtype=self.dtype, name="embed",
                           kernel_init=partitioned(torch_linear_init(), "embed", None),
                           bias_init=partitioned(nn.initializers.zeros, None))
                  if d != self.enc_dim else None)
    self.mask_token = self.param("mask_token", partitioned(
        nn.initializers.truncated_normal(0.02), "embed"), (d,))
    self.pos_embed = self._pos_params(d)
    if self.depth:
      self.stack = Mamba3DStack(d, self.depth, self.cfg, self.norm_eps, 0.0, lay.shape,
                                self.remat)
    self.norm = _layer_norm(self.norm_eps, self.dtype, "norm")
    self.pred = nn.Dense(self.out_dim, dtype=self.dtype, name="pred",
                         kernel_init=partitioned(nn.initializers.xavier_uniform(), "embed", None),
                         bias_init=partitioned(nn.initializers.zeros, None))

  def __call__(self, x: Array, source: Optional[Array], masked: Array, *, train: bool = False):
    """Decodes to pixels.

    Args:
      x: encoder output ``(b, V, enc_dim)``.
      source: int ``(b, N)``: for every enlarged position its index in ``x`` (anything at masked
        positions), or None when ``x`` is already the full volume in LHW order (``V = N``).
      masked: bool ``(b, N)``: positions filled with the mask token.

    Returns:
      ``(b, n_real, out_dim)`` float32 predictions for every real token, in LHW order.
    """
    lay = self.layout
    y = x if self.embed is None else self.embed(x)
    y = y.astype(jnp.float32)
    if source is not None:  # back into the volume by a gather: no scatter of features
      y = jnp.take_along_axis(y, jnp.clip(source, 0, y.shape[1] - 1)[..., None], axis=1)
    y = jnp.where(masked[..., None], self.mask_token.astype(jnp.float32), y) + self.pos_table()
    if self.depth:  # (depth 0: a per-token decoder)
      y = self.stack(jnp.flip(y, axis=1), None, train=train)
    y = self.norm(jnp.take(y, lay.real_positions, axis=1))
    return self.pred(y).astype(jnp.float32)


class EViM3Head(nn.Module):
  """``pooled (b, F) -> (b, num_outputs)`` float32, an MLP with SiLU between its layers:
  ``fc1`` (F -> hidden, the release's ``final.final_linear``), ``mlp_0 .. mlp_{layers-2}``
  (hidden -> hidden) and ``fc`` (-> num_outputs, bias initialised to ``bias_init``). The
  release's EF head is ``hidden=512, layers=3`` with ``bias_init`` the training set's mean EF;
  ``hidden=0`` is a linear head (``fc`` only)."""

  num_outputs: int = 1
  hidden: int = 512
  layers: int = 3
  bias_init: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # PyTorch's Linear init, as the release's MLP head: the pooled global tokens vary little
    # between clips at initialisation, and a 0.02-scaled head barely sees them.
    init = partitioned(torch_linear_init(), "embed", None)
    bias = partitioned(nn.initializers.zeros, None)
    dense = lambda n, name, b=bias: nn.Dense(n, dtype=self.dtype, name=name, kernel_init=init,
                                             bias_init=b)
    if self.hidden:
      x = nn.silu(dense(self.hidden, "fc1")(x))
      for k in range(self.layers - 1):
        x = nn.silu(dense(self.hidden, f"mlp_{k}")(x))
    out_bias = partitioned(nn.initializers.constant(self.bias_init), None)
    return dense(self.num_outputs, "fc", out_bias)(x).astype(jnp.float32)


class EViM3(nn.Module):
  """E-ViM³: one module for pretraining (``pretrain_loss``, ``reconstruct``) and fine-tuning
  (``__call__``).

  Parameter tree: ``encoder`` (``EViM3Encoder``) in both, its ``norm_f`` only where it is used
  (fine-tuning, or pretraining with ``pretrain_norm``); ``decoder`` (``EViM3Decoder``) when
  initialised through ``pretrain_loss``; ``head`` (``EViM3Head``) through ``__call__``. The
  defaults are the release's (p4: 12,279,617 parameters fine-tuning, 12,146,912 pretraining:
  the release's 12,147,104 less its encoder mask token, which the visible-token encoder never
  reads).

  The pretraining mask's kind and ratio are fields, because the visible-token encoder needs the
  number of visible tokens as a static shape: ``mask_kind``, ``mask_ratio``, ``time_chain``,
  ``space_chain`` must describe the masks given to ``pretrain_loss`` (as ``masking.batched_mask``
  draws them; the defaults are the paper's STC 2×4×4 at 0.8).
  """

  img_size: int = 112
  num_frames: int = 64
  in_chans: int = 1
  patch: int = 4
  tubelet: int = 2
  dim: int = 192
  depth: int = 6  # Mamba-3D blocks (6 Mamba layers each)
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  num_registers: int = 1  # r_l = r_h = r_w
  use_egt: bool = True  # False: no enclosure, no global tokens (ablation; needs pool="mean")
  decoder_dim: Optional[int] = None  # default: the encoder width, as the release
  decoder_depth: int = 2  # 0: a per-token decoder (tests only: the encoder then learns nothing)
  # Head input: "egt_concat" the 27 tokens where the register planes meet, each normalised,
  # concatenated (the release); "egt" their mean (ours, the paper's text); "egt_all" the mean of
  # all global tokens; "mean" the mean of the real tokens.
  pool: str = "egt_concat"
  num_outputs: int = 1
  head_hidden: Optional[int] = 512  # the head MLP's width (the release's final_dim; None: dim;
  #                                   0: a linear head)
  head_layers: int = 3  # Linear layers after fc1 (the release's EF head: 3, the last is fc)
  head_bias_init: float = 0.0  # initial bias of the output (the release: the training mean EF)
  pretrain_norm: bool = False  # ours: norm_f between encoder and decoder (the release has none)
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-5
  mask_kind: str = "stc"
  mask_ratio: float = 0.8
  time_chain: int = 2
  space_chain: int = 4
  visible_only: bool = True  # False: the dense baseline (masked tokens -> encoder mask token)
  dtype: Dtype = jnp.float32  # compute dtype; parameters and the residual stream stay float32
  scan_backend: str = "auto"
  chunk_size: int = 64  # of the "associative" scan backend
  remat: str = "none"  # per scanned Mamba-3D block: "none" | "full" | "dots" (nn/layers.py, ours)

  @property
  def mamba(self) -> MambaConfig:
    return MambaConfig.of(self)

  # ---- what the trainer asks of a model (see models/registry.py) ------------------------------

  transfer_subtree = "encoder"  # what fine-tuning copies from a pretraining checkpoint

  @property
  def num_layers(self) -> int:
    return self.depth

  @property
  def layer_groups(self) -> dict:
    """Scanned stacks and the global index of their first block (for layer-wise lr decay):
    one id per Mamba-3D block."""
    return {("encoder", "stack", "blocks"): 0}

  def with_pretrain_mask(self, kind: str, ratio: float, **options) -> "EViM3":
    """This model set up for the masks ``masking.batched_mask`` draws with these settings: the
    visible-token encoder needs the number of visible tokens as a static shape."""
    chains = {k: int(options[k]) for k in ("time_chain", "space_chain") if k in options}
    model = self.clone(mask_kind=kind, mask_ratio=float(ratio), **chains)
    model.num_masked  # noqa: B018  (raises on mask settings that do not apply)
    return model

  # ---- static geometry (usable on an unbound module) ------------------------------------------

  @property
  def token_grid(self) -> tuple[int, int, int]:
    """``(L', H', W')`` = ``(num_frames / tubelet, img_size / patch, img_size / patch)``."""
    if self.num_frames % self.tubelet or self.num_frames < self.tubelet:
      raise ValueError(f"EViM3: num_frames={self.num_frames} is not a multiple of "
                       f"tubelet={self.tubelet}")
    if self.img_size % self.patch or self.img_size < self.patch:
      raise ValueError(f"EViM3: img_size={self.img_size} is not a multiple of patch={self.patch}")
    g = self.img_size // self.patch
    return (self.num_frames // self.tubelet, g, g)

  @property
  def layout(self) -> EnclosureLayout:
    return enclosure_layout(self.token_grid, self.num_registers, self.use_egt)

  @property
  def patch_dim(self) -> int:
    return self.tubelet * self.patch * self.patch * self.in_chans

  @property
  def num_masked(self) -> int:
    """Real tokens hidden by every pretraining mask (from the mask fields)."""
    try:
      return masking.num_masked(self.token_grid, self.mask_ratio, self.mask_kind,
                                time_chain=self.time_chain, space_chain=self.space_chain)
    except ValueError as e:
      raise ValueError(f"EViM3: the pretraining mask fields do not fit the token grid: {e} "
                       "(set mask_kind / mask_ratio / time_chain / space_chain)") from None

  @property
  def num_visible(self) -> int:
    """Tokens through the MAE encoder: visible real tokens + all global tokens."""
    return self.layout.num_positions - self.num_masked

  def _check_config(self):
    if self.pool not in POOLS:
      raise ValueError(f"EViM3: pool must be one of {POOLS}, got {self.pool!r}")
    if self.pool != "mean" and not self.use_egt:
      raise ValueError(f"EViM3: pool={self.pool!r} reads the global tokens; with use_egt=False "
                       "use pool='mean'")
    if self.depth < 1 or self.decoder_depth < 0:
      raise ValueError(f"EViM3: depth={self.depth} must be >= 1 and decoder_depth="
                       f"{self.decoder_depth} >= 0")
    if self.num_outputs < 1:
      raise ValueError(f"EViM3: num_outputs={self.num_outputs} must be >= 1")
    if self.head_layers < 1:
      raise ValueError(f"EViM3: head_layers={self.head_layers} must be >= 1")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"EViM3: remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    self.layout  # noqa: B018  (validates the grid)

  # ---- modules --------------------------------------------------------------------------------

  def setup(self):
    self._check_config()
    geo = dict(grid=self.token_grid, num_registers=self.num_registers, use_egt=self.use_egt)
    mamba = dict(cfg=self.mamba, norm_eps=self.norm_eps, remat=self.remat)
    self.encoder = EViM3Encoder(dim=self.dim, depth=self.depth,
                                drop_path_rate=self.drop_path_rate,
                                dense_mask_token=not self.visible_only, **geo, **mamba)
    self.decoder = EViM3Decoder(enc_dim=self.dim, dim=self.decoder_dim or self.dim,
                                depth=self.decoder_depth, out_dim=self.patch_dim, **geo, **mamba)
    hidden = self.dim if self.head_hidden is None else self.head_hidden
    self.head = EViM3Head(num_outputs=self.num_outputs, hidden=hidden, layers=self.head_layers,
                          bias_init=self.head_bias_init, dtype=self.dtype)

  # ---- checks ---------------------------------------------------------------------------------

  def _patches(self, video: Array) -> Array:
    """Checks the video; returns its patches ``(b, n_real, P)`` float32 in LHW order."""
    check_video(video, img_size=self.img_size, in_chans=self.in_chans, who="EViM3")
    if video.shape[1] != self.num_frames:
      raise ValueError(f"EViM3: video has {video.shape[1]} frames, the model expects "
                       f"{self.num_frames} (set num_frames); expected shape "
                       f"(batch, {self.num_frames}, {self.img_size}, {self.img_size}, "
                       f"{self.in_chans})")
    x = patchify(video.astype(jnp.float32), self.tubelet, self.patch)
    return x.reshape(x.shape[0], -1, x.shape[-1])

  def _check_mask(self, mask: Array, batch: int, check_count: bool):
    expected = (batch,) + self.token_grid
    if tuple(mask.shape) != expected or mask.dtype != jnp.bool_:
      raise ValueError(f"EViM3: mask has shape {tuple(mask.shape)} dtype {mask.dtype}, expected "
                       f"bool (batch, L', H', W') = {expected}")
    values = masking.concrete(mask) if check_count and not self.is_initializing() else None
    if values is not None:  # outside jit: the count is checkable here
      counts = values.reshape(batch, -1).sum(-1)
      if not (counts == self.num_masked).all():
        raise ValueError(
            f"EViM3: mask hides {sorted(set(counts.tolist()))} tokens per example, the model "
            f"expects {self.num_masked} (mask_kind={self.mask_kind!r}, "
            f"mask_ratio={self.mask_ratio}, time_chain={self.time_chain}, "
            f"space_chain={self.space_chain}: set them to the pretraining mask config)")

  def _visible_volume(self, mask: Array) -> Array:
    """bool ``(b, L+, H+, W+)``: global tokens and the real tokens ``mask`` leaves visible."""
    lay = self.layout
    b = mask.shape[0]
    src = np.clip(lay.source, 0, lay.num_real - 1)
    real = (lay.kind == REAL).reshape(-1)
    vis = ~mask.reshape(b, -1)[:, src] | ~real
    return vis.reshape((b,) + lay.shape)

  # ---- public API -----------------------------------------------------------------------------

  def features(self, video: Array, *, train: bool = False) -> Array:
    """Full-volume encoder: ``video (b, num_frames, img, img, in_chans)`` -> ``(b, L+, H+, W+,
    dim)`` (the enlarged volume; ``(b, L', H', W', dim)`` with ``use_egt=False``)."""
    x = self.encoder.encode_full(self._patches(video), train=train)
    return x.reshape((x.shape[0],) + self.layout.shape + (x.shape[-1],))

  def __call__(self, video: Array, *, train: bool = False) -> Array:
    """Task output: ``video (b, num_frames, img, img, in_chans)`` float -> ``(b, num_outputs)``
    float32 from the head on the features averaged over the ``pool`` positions."""
    return self.head(self.pool_features(self.encoder.encode_full(self._patches(video),
                                                                 train=train)))

  def pool_features(self, features: Array) -> Array:
    """``features (b, N, dim)`` of the enlarged volume (LHW order) -> float32 ``(b, dim)``, their
    mean over the ``pool`` positions, or ``(b, 27·dim)`` for ``"egt_concat"`` (the tokens in LHW
    order, W fastest, as the release flattens them)."""
    lay = self.layout
    where = {"egt_concat": lay.pool_positions, "egt": lay.pool_positions,
             "egt_all": lay.global_positions, "mean": lay.real_positions}[self.pool]
    picked = jnp.take(features, where, axis=1).astype(jnp.float32)
    if self.pool == "egt_concat":
      return picked.reshape(picked.shape[0], -1)
    return jnp.mean(picked, axis=1)

  def encode_visible(self, video: Array, mask: Array, *, train: bool = False, norm: bool = True):
    """MAE encoder: ``video`` and ``mask`` bool ``(b, L', H', W')`` (True = masked, exactly
    ``num_masked`` per example) -> ``(features (b, V, dim), positions (b, V))``, the visible
    tokens (real visible + all global) in LHW order and their flat enlarged-volume positions
    (after ``norm_f`` unless ``norm=False``, what the release's decoder reads)."""
    patches = self._patches(video)
    self._check_mask(mask, video.shape[0], check_count=True)
    return self.encoder.encode_visible(patches, self._visible_volume(mask), self.num_visible,
                                       train=train, norm=norm)

  def _predict(self, video: Array, mask: Array, train: bool):
    """Decoder predictions ``(b, n_real, P)`` float32, the patches and the flat real mask."""
    patches = self._patches(video)
    b = video.shape[0]
    self._check_mask(mask, b, check_count=self.visible_only)
    hidden_real = mask.reshape(b, -1)
    visible = self._visible_volume(mask)
    masked_full = ~visible.reshape(b, -1)
    norm = self.pretrain_norm
    if self.visible_only:
      feats, _ = self.encoder.encode_visible(patches, visible, self.num_visible, train=train,
                                             norm=norm)
      source = masking.visible_ranks(visible, "lhw")  # position -> index in the LHW list
      pred = self.decoder(feats, source, masked_full, train=train)
    else:
      feats = self.encoder.encode_full(patches, hidden_real, train=train, norm=norm)
      pred = self.decoder(feats, None, masked_full, train=train)
    return pred, patches, hidden_real

  def pretrain_loss(self, video: Array, mask: Array, *, train: bool = True):
    """MAE pretraining loss: MSE between predicted and true pixels of the masked patches.

    Args:
      video: ``(b, num_frames, img, img, in_chans)`` float (already normalised).
      mask: bool ``(b, L', H', W')``, True = masked, as ``masking.batched_mask`` draws it with
        this model's mask fields.
      train: enables stochastic depth (``"dropout"`` RNG when ``drop_path_rate > 0``).

    Returns:
      ``(loss, aux)``: ``aux["loss_rec"]`` (= loss) and ``aux["pred"] (b, L', H', W', P)``.
      Inside ``jit`` a mask with another count than ``num_masked`` gives a NaN loss (a shape
      cannot depend on it; outside ``jit`` it is a ValueError).
    """
    pred, patches, hidden_real = self._predict(video, mask, train)
    err = jnp.mean(jnp.square(pred - patches), axis=-1)  # (b, n_real)
    w = hidden_real.astype(jnp.float32)
    loss = jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)
    if self.visible_only:
      ok = jnp.all(jnp.sum(hidden_real, axis=-1) == self.num_masked)
      loss = jnp.where(ok, loss, jnp.nan)
    pred = pred.reshape((video.shape[0],) + self.token_grid + (self.patch_dim,))
    return loss, {"loss_rec": loss, "pred": pred}

  def reconstruct(self, video: Array, mask: Array) -> Array:
    """``video (b, t, H, W, C)`` -> ``(b, t, H, W, C)`` float32: visible patches from the input,
    masked patches from the decoder (for image summaries)."""
    pred, patches, hidden_real = self._predict(video, mask, False)
    out = jnp.where(hidden_real[..., None], pred, patches)
    out = out.reshape((video.shape[0],) + self.token_grid + (self.patch_dim,))
    return unpatchify(out, self.tubelet, self.patch)


# ---- presets ----------------------------------------------------------------------------------

PRESETS = {
    # The CPU demo and tests: 16 × 32 × 32 grey clips, tubelet 4×4×4 -> 4 × 8 × 8 tokens
    # (7 × 11 × 11 with the EGT); a narrow Mamba (expand 1, d_state 4) and decoder (ours), so a
    # training step at batch 16 takes about a second on 2 CPU cores.
    # Its head averages all global tokens (ours): in a few hundred steps from scratch the 27
    # plane intersections, deep inside runs of global tokens in every scan order, hardly hear
    # the clip (fine-tuning loss on EF did not move in 200 steps; with "egt_all" it fell).
    # Its head is one dim-wide hidden layer (ours), not the release's 512-wide three.
    "tiny": dict(img_size=32, num_frames=16, in_chans=1, patch=4, tubelet=4, dim=32, depth=1,
                 decoder_depth=1, decoder_dim=16, d_state=4, expand=1, pool="egt_all",
                 head_hidden=None, head_layers=1),
    # The paper's echo model: 64 × 112 × 112 grey, tubelet 2×4×4 -> 32 × 28 × 28 tokens.
    "p4": dict(img_size=112, num_frames=64, in_chans=1, patch=4, tubelet=2, dim=192, depth=6,
               decoder_depth=2),
    # Patch 8: 32 × 14 × 14 tokens at 112. STC chains of 2 × 2 × 2 tokens cover the same
    # 4 × 16 × 16 pixels as p4's 2 × 4 × 4 (and 4 does not divide 14).
    "p8": dict(img_size=112, num_frames=64, in_chans=1, patch=8, tubelet=2, dim=192, depth=6,
               decoder_depth=2, space_chain=2),
}


def _build(preset: str, overrides: dict) -> EViM3:
  fields = {f.name for f in dataclasses.fields(EViM3)} - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TypeError(f"evim3_{preset}: unknown field(s) {unknown}; fields are {sorted(fields)}")
  return EViM3(**{**PRESETS[preset], **overrides})


@register("evim3_tiny")
def evim3_tiny(**overrides) -> EViM3:
  """dim 32 (expand 1, d_state 4), 1 Mamba-3D block, a 16-wide 1-block decoder, tubelet
  4×4×4 on 16 × 32 × 32 grey clips, head on all global tokens (the CPU demo and tests)."""
  return _build("tiny", overrides)


@register("evim3_p4")
def evim3_p4(**overrides) -> EViM3:
  """E-ViM³-p4: 64 × 112 × 112 grey, tubelet 2×4×4, dim 192 (``dim=96`` for the small one),
  6 Mamba-3D blocks (36 Mamba layers), decoder 2 blocks."""
  return _build("p4", overrides)


@register("evim3_p8")
def evim3_p8(**overrides) -> EViM3:
  """E-ViM³-p8: as p4 with 8 × 8 patches; STC chains 2 × 2 × 2 tokens (``space_chain=2``: the
  same pixels as p4's chains). Masks drawn with other chains need the matching override."""
  return _build("p8", overrides)
