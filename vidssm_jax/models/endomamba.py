"""EndoMamba (SPEC §2): a video Mamba whose clip forward and live frame-by-frame stream agree.

Data flow for ``video: (b, t, h, w, c)`` with ``n = (img_size / patch_size)²`` patches a frame
(``n + 1`` tokens with the cls token):

    patch_embed       16×16 patches of every frame -> (b, t, n, dim)
    + cls token       optional, prepended to every frame -> (b, t, n+1, dim)
    + pos_embed       learned, spatial, shared by all frames
    + time embedding  sinusoidal, by the absolute frame index, on patch tokens (not the cls token,
                      as in the release)
    blocks[0:S]       bidirectional Mamba, each frame alone: (b·t, n+1, dim)
    blocks[S:depth]   causal Mamba over the clip flattened time-major: (b, t·(n+1), dim)
    norm_f            RMSNorm -> features (b, t, n+1, dim)

Because spatial blocks never look across frames and the temporal blocks are causal, the clip can
be processed a frame (or a chunk of frames) at a time: ``init_state`` / ``step`` /
``forward_chunk`` carry each temporal block's conv and SSM state plus the frame counter, so a step
costs the same whatever came before it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vidssm_jax.models.registry import register
from vidssm_jax.models.vit import ViTStack, vit_layer_norm
from vidssm_jax.nn.layers import REMAT_POLICIES, RMSNorm, layer_stack, make_norm, partitioned
from vidssm_jax.nn.mamba import (BiMambaMixer, MambaBlock, MambaConfig, MambaMixer, SSMBranch,
                                 a_log_init, symmetric_uniform, torch_linear_init)
from vidssm_jax.nn.video import (IMAGENET_MEAN, IMAGENET_STD, check_video, patchify,
                                 sinusoidal_embedding, sinusoidal_table, unpatchify)

Array = jax.Array
Dtype = Any

INTERMEDIATES = ("mixer", "residual")
WEIGHT_INITS = ("release", "mamba")


class PatchEmbed(nn.Module):
  """``p × p`` patches of frames to tokens: ``(N, H, W, C) -> (N, H/p · W/p, dim)`` in ``dtype``.

  The release's ``Conv2d(C, dim, p, stride=p)`` with ``nn.Conv``'s parameters (``kernel (p, p,
  C, dim)``, ``bias (dim,)``, the same initialisation), computed as one GEMM of the flattened
  patches (``patchify`` orders a patch's pixels ``(p, p, C)``, as the kernel is laid out). The
  same sum as the strided convolution, which on a GPU goes to cuDNN: for one 224² frame of a live
  stream that took 56 µs of a 1 ms frame on an H100 (`bench.profile --stream`, stop 31); as a
  GEMM the frame went from 0.991 to 0.858 ms back to back and 1.30-1.50 to 1.14 ms synced (one
  run, both steps; README, "The patch embedding as a GEMM").
  """

  dim: int
  patch_size: int
  dtype: Dtype
  kernel_init: Any
  bias_init: Any

  @nn.compact
  def __call__(self, frames: Array) -> Array:
    n, h, w, c = frames.shape
    p = self.patch_size
    kernel = self.param("kernel", self.kernel_init, (p, p, c, self.dim))
    bias = self.param("bias", self.bias_init, (self.dim,))
    patches = patchify(frames[:, None], p)[:, 0]  # (N, H/p · W/p, p·p·C)
    y = jnp.dot(patches.astype(self.dtype), kernel.reshape(p * p * c, self.dim).astype(self.dtype))
    return y + bias.astype(self.dtype)


def release_normal():
  """The release's ``trunc_normal_(std=0.02)``: truncated at ±2 absolute (±100 std)."""
  return nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)


# ---- the release's initialisation of the Mamba blocks (weight_init="release") ------------------
# After Mamba's init the release re-initialises every Linear: kernels N(0, 0.02²), biases 0 (so
# dt_proj's bias, Mamba's softplus⁻¹(dt), becomes 0), then out_proj again U(±1/√fan_in)/√depth.
# The conv, A_log and D keep Mamba's init. nn/mamba.py hard-codes Mamba's initialisers, so these
# subclasses build the same parameters (names, shapes, axes) with the release's.


class ReleaseInitBranch(SSMBranch):
  """``SSMBranch`` with the release's init: ``x_proj`` and ``dt_proj`` N(0, 0.02²), dt bias 0."""

  def setup(self):
    d, n, r, k = self.d_inner, self.cfg.d_state, self.dt_rank, self.cfg.d_conv
    self.conv_weight = self.param(
        "conv_weight", partitioned(symmetric_uniform(k**-0.5), "conv", "mlp"), (k, d))
    self.conv_bias = self.param("conv_bias", partitioned(symmetric_uniform(k**-0.5), "mlp"), (d,))
    self.x_proj = nn.Dense(r + 2 * n, use_bias=False, dtype=self.cfg.dtype, name="x_proj",
                           kernel_init=partitioned(release_normal(), "mlp", None))
    self.dt_proj_kernel = self.param("dt_proj_kernel",
                                     partitioned(release_normal(), "rank", "mlp"), (r, d))
    self.dt_bias = self.param("dt_bias", partitioned(nn.initializers.zeros, "mlp"), (d,))
    self.A_log = self.param("A_log", partitioned(a_log_init, "mlp", "state"), (d, n))
    self.D = self.param("D", partitioned(nn.initializers.ones, "mlp"), (d,))


class _ReleaseInitMixer:
  """Mixin for the two mixers: ``in_proj`` N(0, 0.02²), release-initialised branches."""

  def _branch(self, name):
    return ReleaseInitBranch(d_inner=self.d_inner,
                             dt_rank=self.cfg.dt_rank or math.ceil(self.dim / 16), cfg=self.cfg,
                             name=name)

  def _projections(self):
    dtype = self.cfg.dtype
    in_proj = nn.Dense(2 * self.d_inner, use_bias=False, dtype=dtype, name="in_proj",
                       kernel_init=partitioned(release_normal(), "embed", "mlp"))
    out_proj = nn.Dense(self.dim, use_bias=False, dtype=dtype, name="out_proj",
                        kernel_init=partitioned(torch_linear_init(self.n_layers**-0.5),
                                                "mlp", "embed"))
    return in_proj, out_proj


class ReleaseInitMixer(_ReleaseInitMixer, MambaMixer):
  pass


class ReleaseInitBiMixer(_ReleaseInitMixer, BiMambaMixer):
  pass


class EndoMambaLayer(MambaBlock):
  """One block of a scanned EndoMamba stack (the body of ``layer_stack``).

  ``carry = (hidden, residual, taps)``: the stream ``(B, L, dim)`` and the intermediate maps
  being collected; ``xs = (index, drop_rate, cache)``: the block's global index, its
  stochastic-depth rate and its streaming cache (None for a fresh clip). Returns ``(carry,
  cache)``. ``tap_layers`` are the global indices whose output lands in ``taps``: the mixer's
  output ``hidden`` (``tap="mixer"``) or the residual stream ``residual + hidden``
  (``tap="residual"``).
  """

  tap_layers: tuple = ()
  tap: str = "mixer"
  weight_init: str = "release"  # "release" | "mamba" (EndoMamba.weight_init)

  def setup(self):
    if self.weight_init == "mamba":
      return super().setup()
    self.norm_layer = make_norm(self.norm, self.norm_eps)
    if self.bidirectional:
      self.mixer = ReleaseInitBiMixer(dim=self.dim, cfg=self.cfg, n_layers=self.n_layers,
                                      divide_out=self.divide_out)
    else:
      self.mixer = ReleaseInitMixer(dim=self.dim, cfg=self.cfg, n_layers=self.n_layers)

  def __call__(self, carry, xs, train: bool):
    hidden, residual, taps = carry
    index, rate, cache = xs
    if cache is None:
      hidden, residual = self.forward(hidden, residual, rate, train)
    else:
      hidden, residual, cache = self.forward_chunk(hidden, residual, cache)
    if taps:
      out = hidden.astype(jnp.float32)
      if self.tap == "residual":
        out = out + residual
      taps = tuple(jnp.where(index == k, out, tap) for k, tap in zip(self.tap_layers, taps))
    return (hidden, residual, taps), cache


class EndoMamba(nn.Module):
  """EndoMamba backbone. ``__call__(video (b, t, H, W, C)) -> features (b, t, tokens, dim)``.

  ``tokens = (img_size // patch_size)² (+1 with the cls token, first)``. Parameters:
  ``patch_embed``, ``pos_embed (tokens, dim)``, ``cls_token (dim,)``, ``spatial_blocks`` (the
  first ``num_spatial_layers`` blocks, bidirectional, stacked on a leading ``layers`` axis),
  ``temporal_blocks`` (the rest, causal, stacked), ``norm_f``.
  """

  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  num_frames: int = 16  # the usual clip length; any length runs (the time embedding is sinusoidal)
  dim: int = 384
  depth: int = 24
  num_spatial_layers: Optional[int] = None  # default depth // 2
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  use_cls_token: bool = True
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-5
  divide_out: bool = False  # EndoMamba's release sums the two directions
  dtype: Dtype = jnp.float32  # compute dtype; parameters, residual and scan state stay float32
  scan_backend: str = "auto"
  chunk_size: int = 64  # of the "associative" scan backend
  remat: str = "none"  # per scanned block: "none" | "full" | "dots" (nn/layers.py, ours)
  unroll_layers: bool = False  # the block stacks as straight-line code (ours; ``layer_stack``)
  # What ``return_intermediates`` returns after blocks depth//3, 2·depth//3 and depth-1:
  # "mixer" (the release's get_features(): the block's mixer output, before the residual add
  # and without a norm) or "residual" (ours: the residual stream after the block, the input of
  # the next block's norm, so the last one is what norm_f normalises).
  intermediates: str = "mixer"
  # Initialisation: "release" (after Mamba's init the release re-draws every Linear N(0, 0.02²)
  # with zero bias, so dt_proj's bias is 0; patch-embed bias U(±1/√fan_in)) or "mamba" (ours:
  # Mamba's init throughout, dt bias softplus⁻¹(dt), patch-embed bias 0). ``create_model`` takes
  # it as ``init=``.
  weight_init: str = "release"

  # ---- static geometry (usable on an unbound module) ----------------------------------------

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @property
  def num_tokens(self) -> int:
    return self.num_patches + int(self.use_cls_token)

  @property
  def n_spatial(self) -> int:
    s = self.depth // 2 if self.num_spatial_layers is None else self.num_spatial_layers
    if not 0 <= s <= self.depth:
      raise ValueError(f"EndoMamba: num_spatial_layers={s} must lie in [0, depth={self.depth}]")
    return s

  @property
  def d_inner(self) -> int:
    return self.expand * self.dim

  @property
  def mamba(self) -> MambaConfig:
    return MambaConfig.of(self)

  @property
  def intermediate_layers(self) -> tuple[int, int, int]:
    """Blocks after which intermediate features are taken (as in the release)."""
    return (self.depth // 3, 2 * self.depth // 3, self.depth - 1)

  # ---- what the trainer asks of a model (see models/registry.py) ----------------------------

  transfer_subtree = "backbone"  # what fine-tuning copies from a pretraining checkpoint

  @property
  def num_layers(self) -> int:
    return self.depth

  @property
  def layer_groups(self) -> dict:
    """Scanned stacks and the global index of their first block (for layer-wise lr decay)."""
    return {("spatial_blocks",): 0, ("temporal_blocks",): self.n_spatial}

  def adapt_pretrained(self, pretrained: dict, params: dict):
    """Backbone params for fine-tuning from a pretraining checkpoint's backbone, as the
    release loads one (video_sm/models/endomamba.py:load_state_dict): every leaf of ``params``
    (this model's initial params) whose path exists in ``pretrained`` with the same shape is
    copied; the others keep their init. Its pretraining encoder has no cls token and 196
    position embeddings, so a fine-tuning model with a cls token keeps its initial ``cls_token``
    and ``pos_embed``. Returns ``(params, kept)``, ``kept`` the ``/``-joined paths not copied."""
    flat_init = traverse_util.flatten_dict(params)
    flat_old = traverse_util.flatten_dict(pretrained)
    out, kept = {}, []
    for path, new in flat_init.items():
      old = flat_old.get(path)
      if old is not None and tuple(np.shape(old)) == tuple(np.shape(new)):
        out[path] = old
      else:
        out[path] = new
        kept.append("/".join(path))
    return traverse_util.unflatten_dict(out), kept

  def drop_rates(self) -> np.ndarray:
    """Stochastic depth as the release: block i drops the previous block's output at rate
    ``linspace(0, rate, depth)[i - 1]`` (block 0 has nothing to drop: its branch is zero)."""
    return np.array([0.0] + [self.drop_path_rate * i / max(self.depth - 1, 1)
                             for i in range(self.depth - 1)], np.float32)

  def _check_config(self):
    if self.img_size % self.patch_size:
      raise ValueError(f"EndoMamba: img_size={self.img_size} is not a multiple of "
                       f"patch_size={self.patch_size}")
    if self.dim % 2:
      raise ValueError(f"EndoMamba: dim={self.dim} must be even (sinusoidal time embedding)")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"EndoMamba: remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.weight_init not in WEIGHT_INITS:
      raise ValueError(f"EndoMamba: init must be one of {WEIGHT_INITS}, got {self.weight_init!r}")
    if self.intermediates not in INTERMEDIATES:
      raise ValueError(f"EndoMamba: intermediates must be one of {INTERMEDIATES}, got "
                       f"{self.intermediates!r}")

  # ---- parameters ---------------------------------------------------------------------------

  def setup(self):
    self._check_config()
    p, release = self.patch_size, self.weight_init == "release"
    bias_init = (symmetric_uniform((self.in_chans * p * p)**-0.5) if release
                 else nn.initializers.zeros)
    self.patch_embed = PatchEmbed(
        self.dim, p, self.dtype, name="patch_embed",
        kernel_init=partitioned(torch_linear_init(), None, None, None, "embed"),
        bias_init=partitioned(bias_init, "embed"))
    pos_init = release_normal() if release else nn.initializers.truncated_normal(0.02)
    self.pos_embed = self.param("pos_embed", partitioned(pos_init, None, "embed"),
                                (self.num_tokens, self.dim))
    if self.use_cls_token:
      self.cls_token = self.param("cls_token", partitioned(nn.initializers.zeros, "embed"),
                                  (self.dim,))
    s = self.n_spatial
    stochastic = self.drop_path_rate > 0
    kw = dict(dim=self.dim, cfg=self.mamba, n_layers=self.depth, norm="rms",
              norm_eps=self.norm_eps, stochastic_depth=stochastic, tap=self.intermediates,
              weight_init=self.weight_init)
    taps = self.intermediate_layers
    if s:
      self.spatial_blocks = layer_stack(EndoMambaLayer, s, remat=self.remat, num_broadcast=1,
                                        static_broadcast=(0,), unroll=self.unroll_layers)(
          bidirectional=True, divide_out=self.divide_out,
          tap_layers=tuple(k for k in taps if k < s), **kw)
    if self.depth - s:
      self.temporal_blocks = layer_stack(EndoMambaLayer, self.depth - s, remat=self.remat,
                                         num_broadcast=1, static_broadcast=(0,),
                                         unroll=self.unroll_layers)(
          tap_layers=tuple(k for k in taps if k >= s), **kw)
    self.norm_f = RMSNorm(eps=self.norm_eps, dtype=self.dtype, name="norm_f")

  # ---- pieces -------------------------------------------------------------------------------

  def embed(self, video: Array, first_frame: Array) -> Array:
    """``video (b, t, H, W, C)``, ``first_frame (b,)`` int -> tokens ``(b, t, tokens, dim)`` f32."""
    b, t, h, w, c = video.shape
    x = self.patch_embed(video.reshape(b * t, h, w, c))
    x = x.reshape(b, t, self.num_patches, self.dim).astype(jnp.float32)
    frames = first_frame[:, None] + jnp.arange(t, dtype=first_frame.dtype)  # (b, t)
    x = x + sinusoidal_embedding(frames, self.dim)[:, :, None]  # patch tokens only
    if self.use_cls_token:
      cls = jnp.broadcast_to(self.cls_token, (b, t, 1, self.dim))
      x = jnp.concatenate([cls, x], axis=2)
    return x + self.pos_embed

  def _blocks(self, x: Array, caches, train: bool, return_intermediates: bool = False):
    """Runs both stacks on tokens ``(b, t, m, dim)``; ``caches`` None (a fresh clip) or the
    stacked temporal caches. Returns ``(features, intermediates, new_caches)``."""
    b, t, m, d = x.shape
    s, rates = self.n_spatial, jnp.asarray(self.drop_rates())
    index = jnp.arange(self.depth)
    # The stream starts as (hidden 0, residual = tokens), so block 0 is like every other.
    residual = x.reshape(b * t, m, d).astype(jnp.float32)
    hidden = jnp.zeros(residual.shape, self.dtype)
    taps = {}

    def run(stack, hidden, residual, lo, hi, caches):
      wanted = stack.tap_layers if return_intermediates else ()
      carry = (hidden, residual, tuple(jnp.zeros_like(residual) for _ in wanted))
      (hidden, residual, got), caches = stack(carry, (index[lo:hi], rates[lo:hi], caches), train)
      taps.update({k: v.reshape(b, t, m, d) for k, v in zip(wanted, got)})
      return hidden, residual, caches

    if s:
      hidden, residual, _ = run(self.spatial_blocks, hidden, residual, 0, s, None)
    hidden, residual = hidden.reshape(b, t * m, d), residual.reshape(b, t * m, d)
    new_caches = None
    if self.depth - s:
      hidden, residual, new_caches = run(self.temporal_blocks, hidden, residual, s, self.depth,
                                         caches)
    out = self.norm_f(residual + hidden.astype(jnp.float32)).reshape(b, t, m, d)
    return out, [taps[k] for k in self.intermediate_layers] if return_intermediates else [], \
        new_caches

  # ---- public API ---------------------------------------------------------------------------

  def __call__(self, video: Array, *, train: bool = False, return_intermediates: bool = False):
    """Whole-clip forward.

    Args:
      video: ``(b, t, img_size, img_size, in_chans)`` float (ImageNet-normalised), any ``t``.
      train: enables stochastic depth (needs the ``"dropout"`` RNG when ``drop_path_rate > 0``).
      return_intermediates: also return the three intermediate maps.

    Returns:
      ``features (b, t, tokens, dim)`` in ``dtype``; with ``return_intermediates``,
      ``(features, [f1, f2, f3])``, each ``(b, t, tokens, dim)`` float32, taken after blocks
      ``depth//3``, ``2·depth//3`` and ``depth-1``: the mixer output (``intermediates="mixer"``,
      the release) or the residual stream (``"residual"``).
    """
    check_video(video, img_size=self.img_size, in_chans=self.in_chans)
    x = self.embed(video, jnp.zeros((video.shape[0],), jnp.int32))
    out, taps, _ = self._blocks(x, None, train, return_intermediates)
    return (out, taps) if return_intermediates else out

  def _cache_shapes(self, batch_size: int) -> dict:
    n = self.depth - self.n_spatial
    return {"conv": (n, batch_size, self.d_conv - 1, self.d_inner),
            "ssm": (n, batch_size, self.d_inner, self.d_state)}

  def init_state(self, batch_size: int) -> dict:
    """The streaming state before the first frame (works on an unbound module).

    Returns ``{"frame": (b,) int32, "caches": {"conv": (n_t, b, d_conv-1, D_inner),
    "ssm": (n_t, b, D_inner, d_state)}}``, all zeros, float32: the caches of the ``n_t``
    temporal (causal) blocks stacked on a leading axis, ``D_inner = expand * dim``. ``frame`` is
    the index of the next frame of each stream.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"EndoMamba.init_state: batch_size must be a positive int, got {batch_size!r}")
    return {"frame": jnp.zeros((batch_size,), jnp.int32),
            "caches": {k: jnp.zeros(v, jnp.float32)
                       for k, v in self._cache_shapes(batch_size).items()}}

  def check_state(self, state, batch_size: int) -> None:
    """Raises a ValueError unless ``state`` is shaped like ``init_state(batch_size)``."""
    if not isinstance(state, dict) or set(state) != {"frame", "caches"}:
      raise ValueError("EndoMamba: state must be the dict from init_state(batch_size) "
                       f"(keys 'frame', 'caches'), got {type(state).__name__}")
    frame = state["frame"]
    got_b = frame.shape[0] if getattr(frame, "ndim", 0) == 1 else None
    if got_b != batch_size:
      raise ValueError(f"EndoMamba: state was made for batch size {got_b}, the frames have batch "
                       f"size {batch_size} (call init_state({batch_size}))")
    caches = state["caches"]
    for key, shape in self._cache_shapes(batch_size).items():
      got = tuple(caches[key].shape) if isinstance(caches, dict) and key in caches else "missing"
      if got != shape:
        raise ValueError(f"EndoMamba: state['caches'][{key!r}] has shape {got}, expected "
                         f"{shape} = (temporal blocks, batch, ...) from init_state({batch_size}) "
                         "(a state from another model?)")

  def forward_chunk(self, video: Array, state: dict):
    """Continues a stream with a chunk of frames.

    ``video (b, t, H, W, C)`` and ``state`` from ``init_state(b)`` or a previous call ->
    ``(features (b, t, tokens, dim), state)``. Each temporal block consumes the chunk's tokens as
    one sequence continuing from its cache. Inference only (no stochastic depth).
    """
    check_video(video, img_size=self.img_size, in_chans=self.in_chans)
    self.check_state(state, video.shape[0])
    x = self.embed(video, state["frame"])
    out, _, caches = self._blocks(x, state["caches"], False)
    if caches is None:  # no temporal blocks
      caches = state["caches"]
    return out, {"frame": state["frame"] + video.shape[1], "caches": caches}

  def step(self, frame: Array, state: dict):
    """One live frame: ``frame (b, H, W, C)`` -> ``(features (b, tokens, dim), state)``.

    Equal to position ``state["frame"]`` of the whole-clip forward; the cost does not depend on
    how many frames came before. Use as ``model.apply(variables, frame, state, method="step")``.
    """
    check_video(frame, img_size=self.img_size, in_chans=self.in_chans, ndim=4)
    out, state = self.forward_chunk(frame[:, None], state)
    return out[:, 0], state


# ---- presets ----------------------------------------------------------------------------------

SIZES = {
    "tiny": dict(dim=192, depth=24),
    "small": dict(dim=384, depth=24),
    "middle": dict(dim=576, depth=32),
}


def _backbone_fields(overrides: dict) -> dict:
  """``create_model`` overrides -> EndoMamba fields (``init=`` is the field ``weight_init``:
  a Flax module cannot have a field named ``init``)."""
  if "init" in overrides:
    overrides["weight_init"] = overrides.pop("init")
  return overrides


def _build(size: str, overrides: dict) -> nn.Module:
  overrides = _backbone_fields(overrides)
  head = overrides.pop("head", None)
  head_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in _HEAD_KEYS}
  backbone = EndoMamba(**{**SIZES[size], **overrides})
  if head is None:
    if head_kwargs:
      raise ValueError(f"endomamba_{size}: {sorted(head_kwargs)} need head='clip'|'phase'|"
                       "'segmentation'")
    return backbone
  from vidssm_jax.models.heads import build_with_head  # heads import this module
  return build_with_head(backbone, head, **head_kwargs)


_HEAD_KEYS = ("num_classes", "pool", "head_dropout", "decoder_dim")


@register("endomamba_tiny")
def endomamba_tiny(**overrides) -> nn.Module:
  """dim 192, depth 24 (~7M parameters). ``head=`` adds a task head (see ``models.heads``)."""
  return _build("tiny", overrides)


@register("endomamba_small")
def endomamba_small(**overrides) -> nn.Module:
  """dim 384, depth 24: the paper's model (~24.46M parameters at 224×224)."""
  return _build("small", overrides)


@register("endomamba_middle")
def endomamba_middle(**overrides) -> nn.Module:
  """dim 576, depth 32."""
  return _build("middle", overrides)


# ---- pretraining (SPEC §2 "Pretraining") --------------------------------------------------------


TARGET_NORMS = ("channel", "patch")


def patch_statistics(patches: Array, channels: int, per_channel: bool):
  """Mean and unbiased std of each patch ``(..., p·p·C)`` (pixels as ``(p, p, C)``), over its
  ``p·p`` pixels per colour channel or over all ``p·p·C`` values; both broadcast to the input."""
  if per_channel:
    x = patches.reshape(*patches.shape[:-1], -1, channels)  # (..., p·p, C)
    mean, std = jnp.mean(x, -2, keepdims=True), jnp.sqrt(jnp.var(x, -2, keepdims=True, ddof=1))
    tile = lambda a: jnp.broadcast_to(a, x.shape).reshape(patches.shape)
    return tile(mean), tile(std)
  return (jnp.mean(patches, -1, keepdims=True),
          jnp.sqrt(jnp.var(patches, -1, keepdims=True, ddof=1)))


def normalised_patch_targets(video: Array, patch_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             per_channel: bool = True) -> Array:
  """Per-patch normalised pixel targets ``(b, t, n, p·p·C)`` float32 from a video normalised
  with ``mean`` / ``std`` (per channel): undo that normalisation, then ``(x - m) / (s + 1e-6)``
  with the mean and unbiased std of each patch, per colour channel (the release) or over the
  whole patch (VideoMAE's ``per_channel=False``)."""
  pixels = video.astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)
  x = patchify(pixels, patch_size)
  m, s = patch_statistics(x, video.shape[-1], per_channel)
  return (x - m) / (s + 1e-6)


class MAEDecoder(nn.Module):
  """The small transformer decoder: visible tokens + mask tokens -> pixels of masked patches.

  ``(x_vis (b, V, enc_dim), pos_vis (b, V), pos_mask (b, M)) -> (b, M, out_dim)`` float32, where
  ``pos_*`` index the ``T·N`` positions of the clip (time-major).
  """

  dim: int = 192
  depth: int = 4
  num_heads: int = 3
  out_dim: int = 768
  num_positions: int = 16 * 196
  dtype: Dtype = jnp.float32
  remat: str = "none"
  k_bias: bool = False  # False: q and v biases only (the release); True: one qkv bias (ours)

  @nn.compact
  def __call__(self, x_vis: Array, pos_vis: Array, pos_mask: Array, *, train: bool = False):
    x = nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name="embed",
                 kernel_init=partitioned(nn.initializers.xavier_uniform(), "embed", None))(x_vis)
    mask_token = self.param("mask_token", partitioned(nn.initializers.truncated_normal(0.02), None),
                            (self.dim,))
    b, m = pos_mask.shape
    x = jnp.concatenate([x, jnp.broadcast_to(mask_token, (b, m, self.dim)).astype(x.dtype)], 1)
    # The release's table is float64 NumPy cast to float32: float32 angles of 3,136 positions
    # put its predictions 1.3e-5 off the release's at 16 frames (5.5e-7 with this table).
    table = jnp.asarray(sinusoidal_table(self.num_positions, self.dim), jnp.float32)
    x = x + jnp.take(table, jnp.concatenate([pos_vis, pos_mask], 1), axis=0)
    x = ViTStack(self.dim, self.depth, self.num_heads, dtype=self.dtype, remat=self.remat,
                 k_bias=self.k_bias, name="stack")(x, train=train)
    x = vit_layer_norm(1e-6, self.dtype, "norm")(x[:, -m:])
    head = nn.Dense(self.out_dim, dtype=self.dtype, name="head",
                    kernel_init=partitioned(nn.initializers.xavier_uniform(), None, None),
                    bias_init=partitioned(nn.initializers.zeros, None))
    return head(x).astype(jnp.float32)


class EndoMambaPretrainer(nn.Module):
  """VideoMAE-style pretraining of EndoMamba with tube masking and teacher feature alignment.

  Params: ``backbone`` (an ``EndoMamba``, loadable as is into fine-tuning), ``decoder``
  (``MAEDecoder``) and ``align_proj`` (only when ``teacher_dim`` differs from the backbone's
  width). ``pretrain_loss(video, mask, teacher_features=None, alpha=0.25)`` is the entry point;
  ``__call__`` is the same (for ``init``).
  """

  backbone: EndoMamba
  decoder_dim: int = 192
  decoder_depth: int = 4
  decoder_heads: int = 3
  mask_ratio: float = 0.75  # masked patches per frame = int(mask_ratio · n), as VideoMAE's tube mask
  teacher_dim: Optional[int] = None  # default: the backbone's width (no projection)
  num_frames: int = 16  # positions of the decoder's sinusoidal table are computed, any T runs
  # The per-channel mean and std the input video was normalised with (the data pipeline's, from
  # the shards' index.json: train/experiment.py sets them), undone for the pixel targets.
  pixel_mean: tuple = IMAGENET_MEAN
  pixel_std: tuple = IMAGENET_STD
  # Pixel targets normalised per patch "channel" (the release: each colour channel over its p·p
  # pixels) or "patch" (ours before: over all p·p·C values, as VideoMAE).
  target_norm: str = "channel"

  transfer_subtree = "backbone"

  def with_pixel_statistics(self, mean, std) -> "EndoMambaPretrainer":
    """This model for videos normalised as ``(x - mean) / std`` per channel (index.json)."""
    c = self.backbone.in_chans
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != c or len(std) != c:
      raise ValueError(f"EndoMambaPretrainer: pixel statistics have {len(mean)} / {len(std)} "
                       f"channels, the model expects {c} (set in_chans)")
    return self.clone(pixel_mean=mean, pixel_std=std)

  @property
  def num_masked(self) -> int:
    return int(self.mask_ratio * self.backbone.num_patches)

  @property
  def in_chans(self) -> int:
    return self.backbone.in_chans

  @property
  def num_layers(self) -> int:
    return self.backbone.depth

  @property
  def layer_groups(self) -> dict:
    return {("backbone",) + k: v for k, v in self.backbone.layer_groups.items()}

  def with_pretrain_mask(self, kind: str, ratio: float, **options) -> "EndoMambaPretrainer":
    """This model set up for the pretraining masks ``masking.batched_mask`` draws with these
    settings (only tube masks: the visible tokens of every frame must be the same)."""
    if kind != "tube":
      raise ValueError(f"EndoMamba pretraining takes tube masks, got mask kind {kind!r} "
                       "(set pretrain.mask.kind='tube')")
    return self.clone(mask_ratio=float(ratio))

  @property
  def token_grid(self) -> tuple[int, int, int]:
    """``(frames, H/p, W/p)``: the grid a pretraining mask is drawn on (a tube mask)."""
    return (self.num_frames, self.backbone.grid_size, self.backbone.grid_size)

  def setup(self):
    bb = self.backbone
    if self.target_norm not in TARGET_NORMS:
      raise ValueError(f"EndoMambaPretrainer: target_norm must be one of {TARGET_NORMS}, got "
                       f"{self.target_norm!r}")
    self.decoder = MAEDecoder(self.decoder_dim, self.decoder_depth, self.decoder_heads,
                              out_dim=bb.patch_size**2 * bb.in_chans,
                              num_positions=self.num_frames * bb.num_patches, dtype=bb.dtype,
                              remat=bb.remat)
    if self.teacher_dim is not None and self.teacher_dim != bb.dim:
      self.align_proj = nn.Dense(self.teacher_dim, dtype=bb.dtype,
                                 kernel_init=partitioned(nn.initializers.xavier_uniform(),
                                                         "embed", None),
                                 bias_init=partitioned(nn.initializers.zeros, None))
    else:
      self.align_proj = None

  def _check_mask(self, video, mask):
    bb = self.backbone
    b, t = video.shape[:2]
    g = bb.grid_size
    if mask.shape != (b, t, g, g) or mask.dtype != jnp.bool_:
      raise ValueError(f"EndoMambaPretrainer: mask has shape {tuple(mask.shape)} dtype {mask.dtype},"
                       f" expected bool (batch, time, grid, grid) = {(b, t, g, g)}")
    # Concrete: check what jit cannot (not at init, which only needs shapes: trainers init with
    # an all-visible placeholder mask).
    if not isinstance(mask, jax.core.Tracer) and not self.is_initializing():
      m = np.asarray(mask).reshape(b, t, g * g)
      if not (m == m[:, :1]).all():
        raise ValueError("EndoMambaPretrainer: mask must be a tube mask (the same spatial "
                         "positions masked in every frame)")
      counts = m[:, 0].sum(-1)
      if not (counts == self.num_masked).all():
        raise ValueError(f"EndoMambaPretrainer: mask hides {counts.tolist()} patches per frame, "
                         f"expected int(mask_ratio · {g * g}) = {self.num_masked} "
                         f"(mask_ratio={self.mask_ratio})")

  def encode_visible(self, video: Array, mask: Array, *, train: bool = False):
    """Encoder on visible tokens only. Returns ``(features (b, t, V, dim), vis_idx (b, V),
    mask_idx (b, M))`` with ``V + M = n`` patches per frame (cls tokens dropped from features)."""
    bb = self.backbone
    check_video(video, img_size=bb.img_size, in_chans=bb.in_chans, who="EndoMambaPretrainer")
    self._check_mask(video, mask)
    b, t = video.shape[:2]
    n, n_cls, m_count = bb.num_patches, int(bb.use_cls_token), self.num_masked
    order = jnp.argsort(mask[:, 0].reshape(b, n), axis=-1, stable=True)  # visible first, in order
    vis_idx, mask_idx = order[:, : n - m_count], order[:, n - m_count:]
    x = bb.embed(video, jnp.zeros((b,), jnp.int32))  # (b, t, n_cls + n, d)
    vis = jnp.take_along_axis(x[:, :, n_cls:], vis_idx[:, None, :, None], axis=2)
    x = jnp.concatenate([x[:, :, :n_cls], vis], axis=2)
    out, _, _ = bb._blocks(x, None, train)
    return out[:, :, n_cls:], vis_idx, mask_idx

  def pretrain_loss(self, video: Array, mask: Array, teacher_features: Optional[Array] = None,
                    alpha: float = 0.25, *, train: bool = True):
    """``L = MSE(pred, target) on masked patches + alpha · mean(1 - cos(student, teacher))``.

    Args:
      video: ``(b, t, H, W, C)`` normalised with ``pixel_mean`` / ``pixel_std``.
      mask: bool ``(b, t, H/p, W/p)``, True = masked; a tube mask with ``int(mask_ratio·n)``
        masked patches per frame.
      teacher_features: ``(b, t·n, teacher_dim)`` (per-frame tokens, time-major) or
        ``(b, t/2·n, teacher_dim)`` (2-frame tubelets: compared with the student's features
        averaged over each frame pair), or None (no alignment term).
      alpha: weight of the alignment term.

    Returns:
      ``(loss, aux)``; aux: ``loss_rec``, ``loss_align``, ``pred`` and ``target``
      ``(b, t·M, p·p·C)`` in the same order (frame-major, masked positions ascending).
    """
    bb = self.backbone
    if teacher_features is not None:
      self._teacher_frames(teacher_features, video.shape[0], video.shape[1])
    feats, vis_idx, mask_idx = self.encode_visible(video, mask, train=train)
    b, t, v, d = feats.shape
    n = bb.num_patches
    frame_offset = (jnp.arange(t) * n)[None, :, None]
    pos_vis = (frame_offset + vis_idx[:, None]).reshape(b, t * v)
    pos_mask = (frame_offset + mask_idx[:, None]).reshape(b, -1)
    pred = self.decoder(feats.reshape(b, t * v, d), pos_vis, pos_mask, train=train)
    targets = normalised_patch_targets(video, bb.patch_size, self.pixel_mean, self.pixel_std,
                                       self.target_norm == "channel")
    target = jnp.take_along_axis(targets, mask_idx[:, None, :, None],
                                 axis=2).reshape(b, -1, pred.shape[-1])
    loss_rec = jnp.mean((pred - target) ** 2)

    student = feats.astype(jnp.float32)
    if self.align_proj is not None and (teacher_features is not None or self.is_initializing()):
      student = self.align_proj(student).astype(jnp.float32)
    if teacher_features is None:
      loss_align = jnp.zeros((), jnp.float32)
    else:
      loss_align = self._align_loss(student, vis_idx, teacher_features)
    loss = loss_rec + alpha * loss_align
    return loss, {"loss_rec": loss_rec, "loss_align": loss_align, "pred": pred, "target": target}

  def reconstruct(self, video: Array, mask: Array) -> Array:
    """The clip as the decoder sees it, for summaries: visible patches from ``video``, masked
    ones predicted. ``video (b, t, H, W, C)`` normalised with ``pixel_mean`` / ``pixel_std`` ->
    ``(b, t, H, W, C)`` in the same normalisation (each predicted patch is given the mean and std
    of the true patch, as ``target_norm`` computes them, since the decoder predicts
    per-patch-normalised pixels)."""
    bb = self.backbone
    feats, vis_idx, mask_idx = self.encode_visible(video, mask)
    b, t, v, d = feats.shape
    n, p, c = bb.num_patches, bb.patch_size, bb.in_chans
    frame_offset = (jnp.arange(t) * n)[None, :, None]
    pred = self.decoder(feats.reshape(b, t * v, d), (frame_offset + vis_idx[:, None]).reshape(b, -1),
                        (frame_offset + mask_idx[:, None]).reshape(b, -1))
    pred = pred.reshape(b, t, -1, p * p * c)
    mean_c, std_c = jnp.asarray(self.pixel_mean), jnp.asarray(self.pixel_std)
    pixels = patchify(video.astype(jnp.float32) * std_c + mean_c, p)  # (b, t, n, p·p·C) in [0, 1]
    true = jnp.take_along_axis(pixels, mask_idx[:, None, :, None], axis=2)
    mean, std = patch_statistics(true, c, self.target_norm == "channel")
    rows, frames = jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None]
    pixels = pixels.at[rows, frames, mask_idx[:, None, :]].set(pred * (std + 1e-6) + mean)
    video_out = unpatchify(pixels, p, bb.grid_size, bb.grid_size)
    return (video_out - mean_c) / std_c

  def _teacher_frames(self, teacher, b, t) -> int:
    """Checks ``teacher (b, t·n or t/2·n, teacher_dim)``; returns its number of frames."""
    n, dt = self.backbone.num_patches, self.teacher_dim or self.backbone.dim
    if teacher.ndim != 3 or teacher.shape[0] != b or teacher.shape[-1] != dt:
      raise ValueError(f"EndoMambaPretrainer: teacher_features have shape {tuple(teacher.shape)}, "
                       f"expected (batch, t·n, teacher_dim) = {(b, t * n, dt)} (set teacher_dim "
                       "for a teacher of another width)")
    if teacher.shape[1] == t * n:
      return t
    if t % 2 == 0 and teacher.shape[1] == t // 2 * n:
      return t // 2
    raise ValueError(f"EndoMambaPretrainer: teacher_features have {teacher.shape[1]} tokens, "
                     f"expected t·n = {t * n} (or t/2·n = {t // 2 * n} for 2-frame tubelets)")

  def _align_loss(self, student, vis_idx, teacher):
    """Mean ``1 - cos`` between student ``(b, t, V, dt)`` and the teacher at visible positions."""
    b, t, v, dt = student.shape
    n = self.backbone.num_patches
    if self._teacher_frames(teacher, b, t) != t:  # 2-frame tubelets: average pairs (ours)
      student = student.reshape(b, t // 2, 2, v, dt).mean(2)
      t = t // 2
    teacher = jax.lax.stop_gradient(teacher.reshape(b, t, n, dt).astype(jnp.float32))
    teacher = jnp.take_along_axis(teacher, vis_idx[:, None, :, None], axis=2)
    cos = jnp.sum(student * teacher, -1) / (
        jnp.linalg.norm(student, axis=-1) * jnp.linalg.norm(teacher, axis=-1) + 1e-8)
    return jnp.mean(1.0 - cos)

  def __call__(self, video, mask, teacher_features=None, alpha: float = 0.25, *, train=True):
    return self.pretrain_loss(video, mask, teacher_features, alpha, train=train)


DECODER = {"tiny": dict(decoder_dim=128, decoder_heads=2), "small": dict(decoder_dim=192,
           decoder_heads=3), "middle": dict(decoder_dim=384, decoder_heads=6)}
_PRETRAIN_KEYS = ("decoder_dim", "decoder_depth", "decoder_heads", "mask_ratio", "teacher_dim",
                  "pixel_mean", "pixel_std", "target_norm")
# The release's pretraining encoder: no cls token (196 position embeddings) and drop path 0.1
# (its default, which the pretraining script's flag never reaches). Overridable as any field.
PRETRAIN_BACKBONE = dict(use_cls_token=False, drop_path_rate=0.1)


def _build_pretrainer(size: str, overrides: dict) -> EndoMambaPretrainer:
  overrides = _backbone_fields(overrides)
  kw = {**DECODER[size], **{k: overrides.pop(k) for k in list(overrides) if k in _PRETRAIN_KEYS}}
  backbone = EndoMamba(**{**SIZES[size], **PRETRAIN_BACKBONE, **overrides})
  return EndoMambaPretrainer(backbone=backbone, num_frames=backbone.num_frames, **kw)


@register("endomamba_tiny_pretrain")
def endomamba_tiny_pretrain(**overrides) -> nn.Module:
  return _build_pretrainer("tiny", overrides)


@register("endomamba_small_pretrain")
def endomamba_small_pretrain(**overrides) -> nn.Module:
  """The paper's pretraining model: small encoder, 192-wide 4-block decoder, ViT-S teacher."""
  return _build_pretrainer("small", overrides)


@register("endomamba_middle_pretrain")
def endomamba_middle_pretrain(**overrides) -> nn.Module:
  return _build_pretrainer("middle", overrides)
