"""Mamba v1 mixers (SPEC §1): ``MambaMixer`` (causal, streams) and ``BiMambaMixer`` (Vim v2).

Data flow of one direction, for ``x: (b, l, dim)`` and ``D_inner = expand * dim``:

    in_proj:   dim -> 2 D_inner          (x, z; no bias)
    conv1d:    depthwise causal, k = d_conv, with bias, then silu
    x_proj:    D_inner -> dt_rank + 2 N  (dt, B, C; no bias)
    dt_proj:   dt_rank -> D_inner        (its bias is the scan's delta_bias, softplus after)
    scan:      selective_scan(x, dt, A = -exp(A_log), B, C, D, z)
    out_proj:  D_inner -> dim            (no bias)

The bidirectional mixer shares ``in_proj`` and ``out_proj``; a second branch with its own
conv, x_proj, dt_proj, A_log and D runs on the flipped sequence, and the two outputs are summed
(halved with ``divide_out``) before ``out_proj``.

Every Mamba setting but the width lives in one frozen ``MambaConfig``, built once by a model and
passed down whole. ``MambaBlock`` is the pre-norm residual block the models stack.

Under a mesh (``jax.sharding.use_abstract_mesh``, as the trainer traces its step) the selective
scan runs inside ``shard_map``: each device scans its own batch shard (mesh axes ``data``,
``fsdp``) and channel shard (``tensor``). A fused kernel is a custom call XLA cannot partition;
without this it would gather its inputs and scan the whole batch on every device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vidssm_jax.nn.layers import drop_path, make_norm, partitioned
from vidssm_jax.ops import causal_conv1d, causal_conv1d_step, selective_scan, selective_scan_step
from vidssm_jax.ops.selective_scan import DEFAULT_CHUNK_SIZE, available_backends, native_length

Array = jax.Array
Dtype = Any


def torch_linear_init(scale: float = 1.0):
  """PyTorch's default Linear/Conv init, U(±1/sqrt(fan_in)), times ``scale``."""
  return nn.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform")


def symmetric_uniform(bound: float):
  """U(-bound, bound)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dt_bias_init(dt_min: float, dt_max: float, dt_floor: float):
  """softplus⁻¹(dt) with dt = exp(U(log dt_min, log dt_max)) clamped below at dt_floor."""

  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init


def a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real: A_log[d, n] = log(n + 1)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


BATCH_MESH_AXES = ("data", "fsdp")
CHANNEL_MESH_AXIS = "tensor"


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """The Mamba settings of a model, passed whole to every mixer (the width comes separately).

  ``d_state`` N, ``d_conv`` conv taps, ``expand`` (D_inner = expand · dim), ``dt_rank`` (None:
  ceil(dim / 16)), ``dtype`` the compute dtype (parameters and the scan state stay float32),
  ``scan_backend`` and ``chunk_size`` of ``ops.selective_scan``.
  """

  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: Optional[int] = None
  dtype: Any = jnp.float32
  scan_backend: str = "auto"
  chunk_size: int = DEFAULT_CHUNK_SIZE

  def __post_init__(self):
    check_scan_backend(self.scan_backend)
    for name in ("d_state", "d_conv", "expand", "chunk_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"MambaConfig: {name} must be a positive int, got {value!r}")


  @classmethod
  def of(cls, module) -> "MambaConfig":
    """The config of a model that declares the Mamba settings as its own fields (EndoMamba,
    E-ViM³, VideoMamba declare them flat, so that ``--config.model.d_state=...`` reaches them)."""
    return cls(**{f.name: getattr(module, f.name) for f in dataclasses.fields(cls)
                  if hasattr(module, f.name)})


def check_scan_backend(name: str) -> None:
  """Raises a one-line ValueError unless ``name`` is ``"auto"`` or a registered backend."""
  names = ["auto"] + available_backends()
  if name not in names:
    raise ValueError(f"scan_backend {name!r} is not one of {names} (set model.scan_backend)")


def _mesh_spec(mesh, size: int, axes) -> Optional[tuple]:
  """The mesh axes among ``axes`` that exist in ``mesh`` and whose product divides ``size``."""
  names = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
  total = math.prod(mesh.shape[a] for a in names)
  return names if names and size % total == 0 else None


def sharded_selective_scan(u, delta, A, B, C, D, z, delta_bias, *, initial_state=None, **kwargs):
  """``ops.selective_scan`` (``return_final_state=True``) on each device's local shard when
  traced under a mesh, else directly. Shapes as ``selective_scan``; B, C ``(b, l, n)`` or, with
  groups, ``(b, l, g, n)`` (then the channels must not be sharded: see ``channels_sharded``)."""
  mesh = jax.sharding.get_abstract_mesh()
  scan = lambda *a: selective_scan(*a[:8], delta_softplus=True, initial_state=a[8],
                                   return_final_state=True, **kwargs)
  h0 = initial_state
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return scan(u, delta, A, B, C, D, z, delta_bias, h0)
  bt = _mesh_spec(mesh, u.shape[0], BATCH_MESH_AXES)
  ch = _mesh_spec(mesh, u.shape[-1], (CHANNEL_MESH_AXIS,))
  ch = ch[0] if ch else None
  seq, vec = P(bt, None, ch), P(ch)
  if h0 is None:
    h0 = jnp.zeros(u.shape[:1] + A.shape, jnp.float32)
  in_specs = (seq, seq, P(ch, None), P(bt), P(bt), vec, seq, vec, P(bt, ch, None))
  return jax.shard_map(scan, mesh=mesh, in_specs=in_specs, out_specs=(seq, P(bt, ch, None)),
                       check_vma=False)(u, delta, A, B, C, D, z, delta_bias, h0)


def local_scan_shape(b: int, d: int) -> tuple[int, int]:
  """``(rows, channels)`` of the scan each device runs under ``sharded_selective_scan`` now."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return b, d
  shards = lambda size, axes: math.prod(mesh.shape[a]
                                        for a in (_mesh_spec(mesh, size, axes) or ()))
  return b // shards(b, BATCH_MESH_AXES), d // shards(d, (CHANNEL_MESH_AXIS,))


def channels_sharded(d: int) -> bool:
  """Whether a scan over ``d`` channels traced now would be split over the channel mesh axis."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and _mesh_spec(mesh, d, (CHANNEL_MESH_AXIS,)) is not None


class SSMBranch(nn.Module):
  """One scan direction: conv1d → silu → x_proj → dt_proj → selective scan (with z gate).

  ``x, z: (b, l, D_inner) -> y: (b, l, D_inner)``.
  """

  d_inner: int
  dt_rank: int
  cfg: MambaConfig = MambaConfig()
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4

  def setup(self):
    d, n, r, k = self.d_inner, self.cfg.d_state, self.dt_rank, self.cfg.d_conv
    self.conv_weight = self.param(
        "conv_weight", partitioned(symmetric_uniform(k**-0.5), "conv", "mlp"), (k, d))
    self.conv_bias = self.param(
        "conv_bias", partitioned(symmetric_uniform(k**-0.5), "mlp"), (d,))
    self.x_proj = nn.Dense(r + 2 * n, use_bias=False, dtype=self.cfg.dtype, name="x_proj",
                           kernel_init=partitioned(torch_linear_init(), "mlp", None))
    self.dt_proj_kernel = self.param(
        "dt_proj_kernel",
        partitioned(symmetric_uniform(r**-0.5), "rank", "mlp"), (r, d))
    self.dt_bias = self.param(
        "dt_bias", partitioned(dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), "mlp"),
        (d,))
    self.A_log = self.param("A_log", partitioned(a_log_init, "mlp", "state"), (d, n))
    self.D = self.param("D", partitioned(nn.initializers.ones, "mlp"), (d,))

  def _ssm_inputs(self, x):
    """x: (..., D_inner) after the conv -> dt (..., D_inner), B, C (..., N)."""
    r, n = self.dt_rank, self.cfg.d_state
    x_dbl = self.x_proj(x)
    dt, B, C = jnp.split(x_dbl, [r, r + n], axis=-1)
    return dt @ self.dt_proj_kernel.astype(self.cfg.dtype), B, C

  def __call__(self, x: Array, z: Array, conv_state=None, ssm_state=None):
    """Returns ``(y, (conv_state, ssm_state))`` after the sequence; states may start as None."""
    x, conv_state = causal_conv1d(x, self.conv_weight, self.conv_bias, "silu", initial_state=conv_state,
                                  return_final_state=True)
    dt, B, C = self._ssm_inputs(x)
    y, ssm_state = sharded_selective_scan(
        x, dt, -jnp.exp(self.A_log), B, C, self.D, z, self.dt_bias, initial_state=ssm_state,
        backend=self.scan_backend(), chunk_size=self.cfg.chunk_size)
    return y, (conv_state, ssm_state)

  def scan_sequence(self, x: Array, z: Array) -> Array:
    """``__call__`` from the zero state, ``y`` only. The sequence runs at the scan backend's
    native length (``ops.selective_scan.native_length``: whole chunks and segments for the fused
    kernels), padded at its end before the conv, and the extra steps' outputs are dropped: the
    pad then fuses into the ops that make the scan's inputs, where the kernels would otherwise
    pad a copy of each input (and of the cotangent) per call. Exact: the padded steps come after
    every real one, so they change no real output, and their outputs' zero cotangents add
    nothing to any gradient."""
    b, l, d = x.shape
    rows, channels = local_scan_shape(b, d)
    length = native_length(rows, l, channels, self.scan_backend())
    if length != l:
      pad = lambda v: jnp.pad(v, ((0, 0), (0, length - l), (0, 0)))
      x, z = pad(x), pad(z)
    y, _ = self(x, z)
    return y[:, :l]

  def scan_backend(self) -> str:
    # Initialisation only needs shapes: it never lowers a fused kernel (the parameters do not
    # depend on the backend, and the unused forward of a jitted init is dead code).
    return "reference" if self.is_initializing() else self.cfg.scan_backend

  def step(self, x_t: Array, z_t: Array, conv_state: Array, ssm_state: Array):
    """One token: ``x_t, z_t: (b, D_inner)``; returns ``(y_t, (conv_state, ssm_state))``."""
    x_t, conv_state = causal_conv1d_step(conv_state, x_t, self.conv_weight, self.conv_bias, "silu")
    dt, B, C = self._ssm_inputs(x_t)
    y_t, ssm_state = selective_scan_step(
        ssm_state, x_t, dt, -jnp.exp(self.A_log), B, C, self.D, z_t, self.dt_bias,
        delta_softplus=True)
    return y_t, (conv_state, ssm_state)


class _MixerBase(nn.Module):
  """Shared fields and projections of the two mixers."""

  dim: int
  cfg: MambaConfig = MambaConfig()
  n_layers: int = 1  # out_proj is scaled by 1/sqrt(n_layers) at init (prenorm residual rescale)

  @property
  def d_inner(self) -> int:
    return self.cfg.expand * self.dim

  @property
  def d_state(self) -> int:
    return self.cfg.d_state

  @property
  def d_conv(self) -> int:
    return self.cfg.d_conv

  def _branch(self, name):
    return SSMBranch(d_inner=self.d_inner, dt_rank=self.cfg.dt_rank or math.ceil(self.dim / 16),
                     cfg=self.cfg, name=name)

  def _projections(self):
    dtype = self.cfg.dtype
    in_proj = nn.Dense(2 * self.d_inner, use_bias=False, dtype=dtype, name="in_proj",
                       kernel_init=partitioned(torch_linear_init(), "embed", "mlp"))
    out_proj = nn.Dense(self.dim, use_bias=False, dtype=dtype, name="out_proj",
                        kernel_init=partitioned(torch_linear_init(self.n_layers**-0.5),
                                                "mlp", "embed"))
    return in_proj, out_proj

  def _check(self, x, rank, what):
    if x.ndim != rank or x.shape[-1] != self.dim:
      raise ValueError(f"{type(self).__name__}: input has shape {tuple(x.shape)}, expected "
                       f"{what} with dim = {self.dim}")


class MambaMixer(_MixerBase):
  """Causal Mamba v1 mixer. ``__call__``: ``(b, l, dim) -> (b, l, dim)``.

  Streaming: ``init_cache(batch_size)`` gives ``{"conv": (b, d_conv-1, D_inner),
  "ssm": (b, D_inner, N)}`` (float32); ``step(x_t, cache)`` advances one token ``(b, dim)``;
  ``forward_chunk(x, cache)`` runs a sequence continuing from ``cache``. Running a sequence
  token by token, or in pieces, equals running it whole.
  """

  def setup(self):
    self.in_proj, self.out_proj = self._projections()
    self.ssm = self._branch("ssm")

  def __call__(self, x: Array) -> Array:
    self._check(x, 3, "(batch, length, dim)")
    x_in, z = jnp.split(self.in_proj(x), 2, axis=-1)
    return self.out_proj(self.ssm.scan_sequence(x_in, z))

  def init_cache(self, batch_size: int) -> dict:
    return {
        "conv": jnp.zeros((batch_size, self.d_conv - 1, self.d_inner), jnp.float32),
        "ssm": jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32),
    }

  def _check_cache(self, cache, batch):
    expected = {"conv": (batch, self.d_conv - 1, self.d_inner),
                "ssm": (batch, self.d_inner, self.d_state)}
    for key, shape in expected.items():
      if key not in cache or tuple(cache[key].shape) != shape:
        got = tuple(cache[key].shape) if key in cache else "missing"
        raise ValueError(f"MambaMixer: cache[{key!r}] has shape {got}, expected {shape} "
                         f"(from init_cache({batch}))")

  def forward_chunk(self, x: Array, cache: dict):
    """``x: (b, l, dim)`` continuing from ``cache``; returns ``(y, cache)``."""
    self._check(x, 3, "(batch, length, dim)")
    self._check_cache(cache, x.shape[0])
    x_in, z = jnp.split(self.in_proj(x), 2, axis=-1)
    y, (conv, ssm) = self.ssm(x_in, z, cache["conv"], cache["ssm"])
    return self.out_proj(y), {"conv": conv.astype(jnp.float32), "ssm": ssm}

  def step(self, x_t: Array, cache: dict):
    """``x_t: (b, dim)``; returns ``(y_t, cache)``."""
    self._check(x_t, 2, "(batch, dim)")
    self._check_cache(cache, x_t.shape[0])
    x_in, z = jnp.split(self.in_proj(x_t), 2, axis=-1)
    y, (conv, ssm) = self.ssm.step(x_in, z, cache["conv"], cache["ssm"])
    return self.out_proj(y), {"conv": conv.astype(jnp.float32), "ssm": ssm}


# BiMambaMixer fuses its two directions by default below this many batch rows × channels: 264
# programs of 32 channels, where the fused kernel's few-row programs start to pay. Measured on an
# H100 (EndoMamba-S, bf16, `bench.vs_release`, fused against apart): a live stream at batch 1
# 2.18 against 2.34 ms a frame, but 16 streams 5.06 against 4.40 ms and the pretraining step
# (128 rows) 58.7 against 57.8 ms.
FUSE_BELOW_ROW_CHANNELS = 264 * 32


class BiMambaMixer(_MixerBase):
  """Bidirectional Mamba mixer (Vision Mamba "v2"). ``(b, l, dim) -> (b, l, dim)``.

  The backward branch runs on the flipped sequence (its own conv, x_proj, dt_proj, A_log, D);
  its output is flipped back and added to the forward output before the shared ``out_proj``.
  ``divide_out`` halves the sum (Vision Mamba's option; EndoMamba's release sums).
  """

  divide_out: bool = False
  # Run both directions as one conv and one selective scan of 2·D_inner channels in two groups
  # (the backward branch's channels on the flipped sequence): the same arithmetic as two
  # separate branches, in half the kernel launches, so with few rows the two scans fill the GPU
  # side by side instead of one after the other. ``None`` (the default): only when
  # ``batch · D_inner`` is below ``FUSE_BELOW_ROW_CHANNELS`` (a live stream); True / False:
  # always / never. The branches also run apart when the channels are sharded over the
  # ``tensor`` mesh axis.
  fuse_directions: Optional[bool] = None

  def setup(self):
    self.in_proj, self.out_proj = self._projections()
    self.ssm = self._branch("ssm")
    self.ssm_b = self._branch("ssm_b")

  def __call__(self, x: Array) -> Array:
    self._check(x, 3, "(batch, length, dim)")
    x_in, z = jnp.split(self.in_proj(x), 2, axis=-1)
    fuse = self.fuse_directions
    if fuse is None:
      fuse = x.shape[0] * self.d_inner < FUSE_BELOW_ROW_CHANNELS
    if fuse and not channels_sharded(2 * self.d_inner):
      y = self._both_directions(x_in, z)
    else:
      y_f = self.ssm.scan_sequence(x_in, z)
      y_b = self.ssm_b.scan_sequence(jnp.flip(x_in, 1), jnp.flip(z, 1))
      y = y_f + jnp.flip(y_b, 1)
    if self.divide_out:
      y = y / 2
    return self.out_proj(y)

  def _both_directions(self, x: Array, z: Array) -> Array:
    """``x, z (b, l, D)`` -> ``y_f + flip(y_b)`` ``(b, l, D)``, both branches in one conv and one
    grouped scan over the channels ``[forward | backward on the flipped sequence]``."""
    (b, l, d), branches = x.shape, (self.ssm, self.ssm_b)
    both = lambda v: jnp.concatenate([v, jnp.flip(v, 1)], axis=-1)  # (b, l, 2D)
    cat = lambda name, axis=0: jnp.concatenate([getattr(s, name) for s in branches], axis=axis)
    xc = causal_conv1d(both(x), cat("conv_weight", 1), cat("conv_bias"), "silu")
    if self.is_initializing():  # nn.Dense creates its kernel on its first call
      for s in branches:
        s.x_proj(xc[..., :d])
    dt, B, C = self._both_ssm_inputs(xc.reshape(b, l, 2, d))
    y, _ = sharded_selective_scan(
        xc, dt, -jnp.exp(cat("A_log")), B, C, cat("D"), both(z), cat("dt_bias"),
        backend=self.ssm.scan_backend(), chunk_size=self.cfg.chunk_size)
    return y[..., :d] + jnp.flip(y[..., d:], 1)

  def _both_ssm_inputs(self, xc: Array):
    """``xc (b, l, 2, D)`` (the two branches' conv outputs) -> ``dt (b, l, 2D)``, ``B, C (b, l,
    2, N)``: each branch's ``_ssm_inputs`` as one batched x_proj and one batched dt_proj over
    the branch axis (two GEMMs instead of four, and no concatenation of their outputs)."""
    branches, dtype = (self.ssm, self.ssm_b), self.cfg.dtype
    r, n = branches[0].dt_rank, self.cfg.d_state
    w_x = jnp.stack([nn.meta.unbox(s.x_proj.variables["params"]["kernel"])
                     for s in branches]).astype(dtype)  # (2, D, r + 2N)
    w_dt = jnp.stack([s.dt_proj_kernel for s in branches]).astype(dtype)  # (2, r, D)
    x_dbl = jnp.einsum("blkd,kde->blke", xc.astype(dtype), w_x)  # (b, l, 2, r + 2N)
    dt = jnp.einsum("blkr,krd->blkd", x_dbl[..., :r], w_dt)
    b, l = xc.shape[:2]
    return dt.reshape(b, l, -1), x_dbl[..., r:r + n], x_dbl[..., r + n:]


class MambaBlock(nn.Module):
  """Pre-norm residual block around a Mamba mixer, as in Mamba / Vision Mamba (SPEC §1).

      residual = residual + drop_path(hidden)
      hidden   = mixer(norm(residual))

  The residual stream is float32 whatever the compute dtype. A stack starts from
  ``hidden = 0, residual = tokens`` (so every block, the first included, is the same function)
  and ends with ``norm_f(residual + hidden)``. ``bidirectional`` picks ``BiMambaMixer``;
  ``norm`` is ``"rms"`` (EndoMamba) or ``"layer"`` (E-ViM³). Parameters: ``norm``, ``mixer``.
  """

  dim: int
  cfg: MambaConfig = MambaConfig()
  n_layers: int = 1
  bidirectional: bool = False
  divide_out: bool = False
  norm: str = "rms"
  norm_eps: float = 1e-5
  stochastic_depth: bool = False  # drop_rate is applied in training only when set

  def setup(self):
    self.norm_layer = make_norm(self.norm, self.norm_eps)
    if self.bidirectional:
      self.mixer = BiMambaMixer(dim=self.dim, cfg=self.cfg, n_layers=self.n_layers,
                                divide_out=self.divide_out)
    else:
      self.mixer = MambaMixer(dim=self.dim, cfg=self.cfg, n_layers=self.n_layers)

  def _pre(self, hidden, residual, drop_rate, train):
    if train and self.stochastic_depth:
      hidden = drop_path(self.make_rng("dropout"), hidden, drop_rate)
    residual = residual + hidden.astype(jnp.float32)
    return self.norm_layer(residual), residual

  def forward(self, hidden: Array, residual: Array, drop_rate=0.0, train: bool = False):
    """``hidden (b, l, dim)`` in the compute dtype, ``residual (b, l, dim)`` float32 -> the new
    ``(hidden, residual)``."""
    normed, residual = self._pre(hidden, residual, drop_rate, train)
    return self.mixer(normed), residual

  def __call__(self, hidden: Array, residual: Array, *, drop_rate=0.0, train: bool = False):
    return self.forward(hidden, residual, drop_rate, train)

  def forward_chunk(self, hidden: Array, residual: Array, cache: dict):
    """A chunk ``(b, l, dim)`` continuing from ``cache`` (causal mixer only); returns
    ``(hidden, residual, cache)``."""
    normed, residual = self._pre(hidden, residual, 0.0, False)
    out, cache = self.mixer.forward_chunk(normed, cache)
    return out, residual, cache

  def step(self, hidden_t: Array, residual_t: Array, cache: dict):
    """One token ``(b, dim)``; returns ``(hidden_t, residual_t, cache)``."""
    normed, residual_t = self._pre(hidden_t, residual_t, 0.0, False)
    out, cache = self.mixer.step(normed, cache)
    return out, residual_t, cache
