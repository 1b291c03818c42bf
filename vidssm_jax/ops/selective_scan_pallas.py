"""The selective scan as fused Pallas kernels: backend ``"pallas"``.

One program per (batch row, group, block of ``block_d`` channels of that group) keeps its
``(block_d, n)`` float32 state in registers and walks the whole length, one step at a time, in
chunks of ``chunk`` steps:

    forward   u, delta, z (b, l, d)  B, C (b, l, g, n)  A (d, n)  D, delta_bias (d,)  h0 (b, d, n)
              -> y (b, l, d) in u's dtype, h_last (b, d, n) float32,
                 and, under differentiation, h_chunks (b, num_chunks, d, n): the state before
                 every chunk, the only residual besides the inputs.
    backward  inputs, h_chunks, dy (b, l, d), dh_last (b, d, n)
              -> du, ddelta, dz (b, l, d) in the input dtypes, dh0 (b, d, n),
                 per-program partial sums of dB, dC (over the channel blocks of a group), of dA,
                 dD, d delta_bias (over the batch rows), summed in XLA afterwards.

Each step does the discretisation ``dt = softplus(delta + delta_bias)``, the update
``h = exp(dt A) h + dt u B``, the contraction ``<h, C>``, the D skip and (with
``PallasConfig.gate_in_kernel``; by default XLA applies it to y) the z gate in registers, so the
kernels read every input once and write every output once. The backward
walks the chunks from last to first: it recomputes the chunk's ``chunk + 1`` states from the
saved chunk start (kept in registers: ``chunk`` is small), then runs the adjoint
``lam_t = dy_t C_t + exp(dt_{t+1} A) lam_{t+1}`` backwards through them (the algebra of
``_assoc_scan_bwd`` in ``selective_scan.py``, plus the chain rules of D, z, softplus and
delta_bias). ``reverse`` walks the length from the end instead of flipping copies.

The outputs of a chunk (rows of y, du, ddelta, dz, dB, dC) are gathered in ``(block_d, chunk)``
register tiles and written with one store per chunk, so the stores are coalesced. A length that
is not a multiple of ``chunk`` ends in a short tail chunk, unrolled with its own static length,
so no load ever reaches past the end. ``n`` and ``block_d`` are powers of two inside the
kernel (Triton's rule): the wrapper pads ``n`` with zero columns of A, B and C (which leave the
padded states at zero) and shrinks ``block_d`` to a power of two dividing ``d // g``.

Few long rows cannot fill the GPU with such programs; for them the length is split into segments
that run side by side (``PallasConfig.segments``, ``_split_scan``): two light kernels give every
segment's final state from a zero state (forward) and its entering adjoint from a zero adjoint
(backward), short associative scans over the segments carry them, and the kernels above run once
per direction with the carried states. With few rows and no gradient (a live stream), the
forward instead scans blocks of time steps across a program's threads
(``PallasConfig.time_parallel``, ``_forward_tp_kernel``).

On GPU the kernels compile through Pallas' Triton lowering, selected explicitly with Triton
compiler params (the default GPU lowering of recent JAX, Mosaic GPU, rejects these kernels). On
CPU they run in Pallas interpret mode, which is how the tests check them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.extend
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from vidssm_jax.ops.selective_scan import call_backend, skip_and_gate

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PallasConfig:
  """Block shapes and launch parameters of the Pallas kernels.

  Attributes:
    block_d: channels per forward program (a power of two; shrunk to divide ``d // g``);
      ``None``: 32 on four warps; with fewer than about two programs per SM of an H100
      (small batches, live streams) halved down to one warp's worth of state (2 channels at
      n = 16) while that is so, on one warp per 32 state elements; 16 on one warp for the
      segments of a length split with at least 1536 such programs (``forward_block``).
    chunk: steps per chunk (a power of two): outputs are stored once per chunk and the forward
      saves the state before every chunk for the backward, which keeps ``chunk + 1`` states of
      ``(block_d, n)`` in registers.
    num_warps: warps per forward program; ``None``: one per 128 state elements
      (``block_d * n / 128``, within 1 to 4), four elements of the state per thread.
    bwd_block_d: channels per backward program.
    bwd_num_warps: warps per backward program.
    bwd_recompute_decay: recompute exp(dt A) in the backward's reverse sweep instead of keeping
      the chunk's values in registers (more exponentials, fewer registers).
    bwd_fast_math: the backward kernel's exp2, softplus and sigmoid as single PTX approximations
      (``_approx``), as the forward kernels use them; off: libdevice's.
    gate_in_kernel: apply the z gate ``y · silu(z)`` (and its gradients) inside the kernels;
      off (the default): the kernels scan without z and XLA applies the gate to their output
      (in u's dtype) in float32, rounds the product to u's dtype and differentiates it (in
      bfloat16 that rounds y twice and the gate's cotangent once, where the fused gate rounded
      y once). The kernels then lose the z loads, the sigmoid and, in the backward, the
      per-step contraction for dz, while XLA moves y, z and their gradients once more. Offline sm_90 SASS per 8-step chunk of the backward
      at (8, 1568, 768, 16) bf16: 2376 instructions (gate inside, libdevice), 1800 (gate
      inside, fast math), 1512 (both defaults); the forward 776 -> 712. Timed on an H100, bf16
      forward+backward ms, in one run, gate inside + libdevice / fast math only / gate outside
      only / both: (8, 1568, 768, 16) 1.216 / 1.265 / 0.997 / 0.976; (32, 197, 768, 16) 0.542
      / 0.605 / 0.460 / 0.441; (4, 8192, 1536, 16) 6.685 / 6.501 / 5.279 / 4.974;
      (4, 13571, 384, 16) 2.602 / 2.246 / 2.206 / 1.915. Fast math alone does not pay; with the
      gate outside it does (registers per thread 240 -> 168 at the first shape).
    prefetch: the forward issues the loads of the next chunk before the arithmetic of the
      current one (held in registers across the chunk loop), to hide their latency.
    num_stages: Triton software-pipelining depth.
    atomic_dbc: reduce dB and dC over the channel blocks of a group with float32 atomic adds
      (fast, order not deterministic) instead of writing per-block partials summed in XLA
      (deterministic; the default).
    interpret: run in Pallas interpret mode; ``None`` means on CPU only.
    poison_outputs: NaN-fill every output buffer before the kernel runs (aliased inputs), so an
      element the kernel fails to write shows up as NaN (for checks; costs a fill per output).
    pad_min_length: a length of at least this many steps that is not a multiple of ``chunk`` is
      padded with exact identity steps to whole chunks instead of ending in an unrolled tail
      chunk (``_identity_steps``). Measured on an H200: at (4, 13571, 768, 16) bf16 the forward
      + backward compiled in 9.5 s padded against 14.8 s with the tail, and the E-ViM³-p4 step
      was no slower (785 ms against 801 ms); EndoMamba's 196-token frames kept the tail, which
      compiled as fast and ran the step 2% faster (61.8 against 63.0 ms).
    segments: the length-parallel scan: the length is cut into this many segments of whole
      chunks (each a row of the kernels' grid). A light kernel scans every segment from a zero
      state for its final state only, the states entering the segments follow from those and
      the segments' total decays by an associative scan over the segments
      (``_carried_states``), and the forward kernel runs the segments from those states. The
      backward mirrors it: a light kernel sweeps every segment's adjoint from zero, the same
      carry in the opposite order gives the adjoint leaving every segment, and the backward
      kernel runs once (``_split_scan``). About 1.5x the kernel work, ``segments`` times the
      programs: it pays when ``b · d / block_d`` programs cannot fill the GPU (few rows, long
      sequences).
      ``None`` (the default): chosen by shape (``segments_for``, measured on an H200); an int
      forces that many (1: no split). ``python -m vidssm_jax.bench.scan --sweep-segments``
      measures every value per shape.
    segment_min_length: the automatic choice keeps segments at least this long.
    bwd_segments: the backward alone split in this many segments when the forward is not (its
      programs fill the GPU, but the backward kernel's, with their longer serial chain per step,
      do not). The unsplit forward already saves the state before every chunk, so the backward
      kernel can start a segment anywhere: the light adjoints kernel sweeps every segment from a
      zero adjoint (and sums its dt), the carry over the segments gives the adjoint leaving each
      one, and the backward kernel runs on the segments as rows (``_split_backward``). Exact, as
      the full split is. ``None`` (the default): chosen by shape (``backward_segments_for``);
      an int forces that many where the length divides into them (1: no split).
    time_parallel: the undifferentiated forward (inference: a live stream's scans) scans the
      time steps across a program's threads instead of walking them one by one
      (``_forward_tp_kernel``): blocks of ``tp_block_t`` steps, each a block-wide associative
      scan (Triton's ``tt.scan`` with the ``(a, x)`` combine of ``h = a h + x``), the state
      carried from block to block. ``None`` (the default): where the serial walk has too few
      rows to fill the GPU (``time_parallel_for``); a differentiated forward (it must save its
      chunk states) and a reverse scan always walk.
    tp_block_t: steps per block of the time-parallel forward (a power of two, shrunk to the
      length).
    tp_block_d: channels per program of the time-parallel forward (a power of two).
    tp_num_warps: warps per program of the time-parallel forward; ``None``: one per 1024
      elements of a block's ``(tp_block_t, tp_block_d, n)`` state, 32 per thread.
    bc_float32: B and C enter the kernels in float32 (XLA casts them before the kernels; exact,
      and their gradients come back in their own dtype), so the kernels do not convert every
      value they load (one PRMT or SHF instruction each in bf16). Offline (triton 3.6's
      ``ptxas`` for sm_90, the forward at (4, 8192, 1536, 16) bf16): 696 -> 544 SASS
      instructions, 72 -> 128 registers. It lost on the GPU, so it stays off: on one H100 (jax
      0.11.2, stop 31) the forward at that shape took 1.446 against 1.139 ms (``bench.scan
      --sweep``), and of the few-row long forwards only (1, 3136, 768, 16) float32 was not slower
      (0.122 against 0.125 ms); (4, 13571 | 33635, 384, 16) bf16 0.700 / 1.668 against 0.601 /
      1.435 ms.
  """
  block_d: Optional[int] = None
  chunk: int = 8
  num_warps: Optional[int] = None
  bwd_block_d: int = 8
  bwd_num_warps: int = 1
  bwd_recompute_decay: bool = True
  bwd_fast_math: bool = True
  gate_in_kernel: bool = False
  prefetch: bool = True
  num_stages: int = 1
  atomic_dbc: bool = False
  interpret: Optional[bool] = None
  poison_outputs: bool = False
  pad_min_length: int = 1024
  segments: Optional[int] = None
  segment_min_length: int = 128
  bwd_segments: Optional[int] = None
  time_parallel: Optional[bool] = None
  tp_block_t: int = 32
  tp_block_d: int = 8
  tp_num_warps: Optional[int] = None
  bc_float32: bool = False

  def __post_init__(self):
    for name in ("block_d", "chunk", "bwd_block_d", "tp_block_t", "tp_block_d"):
      v = getattr(self, name)
      if v is None and name == "block_d":
        continue
      if not isinstance(v, int) or v < 1 or v & (v - 1):
        raise ValueError(f"PallasConfig.{name} must be a power of two, got {v!r}")
    for name in ("segments", "bwd_segments"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"PallasConfig.{name} must be None or an int >= 1, got {v!r}")
    if not isinstance(self.segment_min_length, int) or self.segment_min_length < 1:
      raise ValueError(f"PallasConfig.segment_min_length must be an int >= 1, got "
                       f"{self.segment_min_length!r}")
    if not isinstance(self.pad_min_length, int) or self.pad_min_length < 0:
      raise ValueError(f"PallasConfig.pad_min_length must be an int >= 0, got "
                       f"{self.pad_min_length!r}")
    if self.time_parallel not in (None, True, False):
      raise ValueError(f"PallasConfig.time_parallel must be None, True or False, got "
                       f"{self.time_parallel!r}")
    for name in ("num_warps", "bwd_num_warps", "num_stages", "tp_num_warps"):
      v = getattr(self, name)
      if v is None and name in ("num_warps", "tp_num_warps"):
        continue
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"PallasConfig.{name} must be a positive int, got {v!r}")


# Tuned on an H100 with `python -m vidssm_jax.bench.scan --sweep` at (8, 1568, 768, 16) float32:
# bwd_block_d 8 took the forward+backward from 2.01 ms (16) to 1.32 ms; the forward's defaults
# (block_d by occupancy, chunk 8, prefetch) were the fastest of the variants tried (0.38 ms).
DEFAULT_CONFIG = PallasConfig()


def _pow2_at_most(x: int) -> int:
  return 1 << (max(x, 1).bit_length() - 1)


def _pow2_at_least(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


_TARGET_PROGRAMS = 264  # two per SM of an H100: what the automatic channel block aims for


def _block_for(dg: int, want: int) -> int:
  """The largest power of two that divides ``dg`` (channels per group) and is at most ``want``."""
  return min(dg & -dg, _pow2_at_most(want))


def forward_block(b: int, d: int, g: int, n: int, config: PallasConfig,
                  split: bool = False) -> tuple[int, int]:
  """(channels, warps) per forward program for (b, d, g, n) under ``config``; ``split``: the
  rows are segments of the length-parallel scan."""
  if config.block_d is not None:
    block = _block_for(d // g, config.block_d)
  elif split and b * (d // 16) >= 2 * _FULL_PROGRAMS:
    # `bench.scan --sweep` on an H200, bf16, forward / forward + backward ms, 16 channels on one
    # warp against the rule below (32 channels on 4 warps): (4, 13571, 384, 16) in 16 segments
    # 0.98 / 2.99 against 1.11 / 3.14, (8, 5553, 384, 16) in 8 segments 0.81 / 2.47 against
    # 0.91 / 2.59; with fewer programs it lost: (1, 3136, 768, 16) in 16 segments (768 programs
    # of 16 channels) 0.20 / 0.53 against 0.15 / 0.46.
    block = _block_for(d // g, 16)
    return block, config.num_warps or 1
  else:
    block = _block_for(d // g, 32)
    while block > max(1, 32 // n) and b * (d // block) < _TARGET_PROGRAMS:
      block //= 2
    if block < 16:
      # Few rows (a live stream's (1, 197, 768) scan): a program's steps are a serial chain
      # of about a hundred instructions, so the scan is as fast as its longest program; smaller
      # programs of one state element per thread run more of them side by side. Measured on an
      # H100 (bf16, from a state, 36 chained calls in one jit, us per scan): 8 channels on one
      # warp 44.7 (the rule before), 8 on two 31.1, 4 on two 28.9, 2 on one 27.4.
      return block, config.num_warps or max(1, min(4, block * n // 32))
  warps = config.num_warps or max(1, min(4, block * n // 128))
  return block, warps


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one kernel instance (hashable: a nondiff argument)."""
  b: int
  l: int
  d: int
  g: int
  n: int  # padded to a power of two
  chunk: int
  fwd_block_d: int
  bwd_block_d: int
  fwd_warps: int
  bwd_warps: int
  num_stages: int
  bwd_recompute_decay: bool
  bwd_fast_math: bool
  prefetch: bool
  atomic_dbc: bool
  interpret: bool
  poison: bool
  has_D: bool
  has_z: bool
  has_bias: bool
  softplus: bool
  reverse: bool
  bwd_segments: int = 1  # the backward's own length split (``PallasConfig.bwd_segments``)
  time_parallel: bool = False  # the undifferentiated forward's kernel (``PallasConfig``)
  tp_block_t: int = 32  # shrunk to a power of two within the length
  tp_block_d: int = 8
  tp_warps: int = 4

  @property
  def num_full(self) -> int:
    return self.l // self.chunk

  @property
  def tail(self) -> int:
    return self.l % self.chunk

  @property
  def num_chunks(self) -> int:
    return math.ceil(self.l / self.chunk)

  def time(self, s):
    """Time index of step ``s`` (steps count in scan order)."""
    return self.l - 1 - s if self.reverse else s

  def tile_start(self, s0):
    """First time index of the full chunk whose first step is ``s0``."""
    return self.l - self.chunk - s0 if self.reverse else s0

  def column(self, j: int) -> int:
    """Column of step ``j`` of a chunk in its time-ordered output tile."""
    return self.chunk - 1 - j if self.reverse else j


def _compiler_params(num_warps: int, num_stages: int):
  # The Triton lowering must be asked for by its params type; jax renamed it over time.
  params = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")
  return params(num_warps=num_warps, num_stages=num_stages)


_LOG2E = math.log2(math.e)


_LN2 = math.log(2.0)


def _approx(op: str, x, fast: bool):
  """``2**x`` (op ``"ex2"``), ``log2 x`` (``"lg2"``) or ``1/x`` (``"rcp"``) of float32 ``x``.

  ``fast``: one PTX ``*.approx.ftz`` instruction each (relative error about 2**-22, subnormals
  flushed), where the libdevice calls that ``jnp.log1p``, ``jnp.exp`` and ``/`` lower to take a
  branchy range reduction or a correctly rounded division; ``False`` (interpret mode, CPU): the
  plain jnp forms.
  """
  if not fast:
    return {"ex2": jnp.exp2, "lg2": jnp.log2, "rcp": lambda v: 1.0 / v}[op](x)
  return plt.elementwise_inline_asm(
      f"{op}.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def _softplus(x, fast: bool):
  """``log(1 + exp(x))``; above 20 it equals x to float32 precision (and exp would overflow).
  Below about -17 the fast form gives 0 for a value under 1e-7 (1 + 2**(x log2 e) rounds to 1)."""
  if not fast:
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))
  e = _approx("ex2", jnp.minimum(x, 20.0) * _LOG2E, fast)
  return jnp.where(x > 20.0, x, _approx("lg2", 1.0 + e, fast) * _LN2)


def _sigmoid(x, fast: bool):
  """``1 / (1 + exp(-x))`` (exactly 0 where exp(-x) overflows to inf)."""
  if not fast:
    return jax.nn.sigmoid(x)
  return _approx("rcp", 1.0 + _approx("ex2", -x * _LOG2E, fast), fast)


def _unpack(refs, names):
  """Names the kernel's refs; ``None`` names are skipped inputs."""
  out, it = {}, iter(refs)
  for name in names:
    if name is not None:
      out[name] = next(it)
  assert next(it, None) is None
  return out


def _input_names(spec: _Spec, *, backward: bool):
  names = ["u", "delta", "A", "B", "C"]
  names += ["h_chunks", "dy", "dh_last"] if backward else ["h0"]
  names += ["D" if spec.has_D else None, "z" if spec.has_z else None,
            "bias" if spec.has_bias else None]
  return names


def _prefilled_outputs(out_shape, inputs, aliases, value):
  """Appends an input filled with ``value`` for every output not yet aliased, aliased to it."""
  taken = set(aliases.values())
  extra = []
  for i, o in enumerate(out_shape):
    if i not in taken:
      aliases[len(inputs) + len(extra)] = i
      extra.append(jnp.full(o.shape, value, o.dtype))
  return inputs + extra, [f"_prefilled{i}" for i in range(len(extra))]


class _Rows:
  """Row loads of one program: (block_d,) slices of (b, l, d) refs, (n,) rows of B and C."""

  def __init__(self, r, spec: _Spec, acc, block_d: int, fast: bool = True):
    self.r, self.spec, self.acc = r, spec, acc
    self.bi, self.gi = pl.program_id(0), pl.program_id(1)
    self.dj = pl.program_id(2)
    self.d0 = self.gi * (spec.d // spec.g) + self.dj * block_d
    self.block_d = block_d
    self.chans = pl.ds(self.d0, block_d)
    self.fast = fast and not spec.interpret  # PTX approximations (``_approx``) on the GPU

  def row(self, name, t):
    """(block_d,) row of a (b, l, d) input at time ``t``."""
    return self.r[name][self.bi, t, self.chans].astype(self.acc)

  def bc(self, name, t):
    """(n,) row of B or C at time ``t``, for this program's group."""
    return self.r[name][self.bi, t, self.gi, :].astype(self.acc)

  def channel_vector(self, name):
    return self.r[name][self.chans].astype(self.acc)

  def dt(self, delta_row, bias):
    """Discretised step, and the pre-softplus value the backward differentiates through."""
    x = delta_row + bias if bias is not None else delta_row
    return (_softplus(x, self.fast) if self.spec.softplus else x), x


# --------------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------------


def _forward_kernel(*refs, spec: _Spec, save: bool, prefilled=()):
  out_names = ["y", "h_last"] + (["h_chunks"] if save else [])
  r = _unpack(refs, _input_names(spec, backward=False) + list(prefilled) + out_names)
  acc = r["h_last"].dtype
  T, bd = spec.chunk, spec.fwd_block_d
  rows = _Rows(r, spec, acc, bd)
  A = r["A"][rows.chans, :].astype(acc)  # (bd, n)
  A2 = A * _LOG2E  # exp(dt A) = exp2(dt A log2 e): one ex2 instead of a range-reduced expf
  D = rows.channel_vector("D") if spec.has_D else None
  bias = rows.channel_vector("bias") if spec.has_bias else None
  cols = lax.broadcasted_iota(jnp.int32, (bd, T), 1)

  def load(t):
    """The inputs of the step at time ``t``, as loaded (not yet upcast)."""
    names = ["u", "delta"] + (["z"] if spec.has_z else [])
    out = {name: r[name][rows.bi, t, rows.chans] for name in names}
    out.update({name: r[name][rows.bi, t, rows.gi, :] for name in ("B", "C")})
    return out

  def step(h, x):
    x = {k: v.astype(acc) for k, v in x.items()}
    dt, _ = rows.dt(x["delta"], bias)
    decay = _approx("ex2", dt[:, None] * A2, rows.fast)
    h = decay * h + (dt * x["u"])[:, None] * x["B"][None, :]
    y = jnp.sum(h * x["C"][None, :], axis=1)
    if D is not None:
      y = y + D * x["u"]
    if spec.has_z:
      y = y * (x["z"] * _sigmoid(x["z"], rows.fast))
    return h, y

  def save_state(k, h):
    if save:
      r["h_chunks"][rows.bi, k, rows.chans, :] = h

  def load_chunk(k):
    return [load(spec.time(k * T + j)) for j in range(T)]

  def full_chunk(k, carry):
    h, inputs = carry
    save_state(k, h)
    if spec.prefetch:
      # The next chunk's loads go out before this chunk's arithmetic, which then hides their
      # latency. (The last chunk reloads itself rather than read past the full chunks.)
      inputs, following = inputs, load_chunk(jnp.minimum(k + 1, spec.num_full - 1))
    else:
      inputs, following = load_chunk(k), inputs
    tile = jnp.zeros((bd, T), acc)
    for j in range(T):
      h, y = step(h, inputs[j])
      tile = jnp.where(cols == spec.column(j), y[:, None], tile)
    s0 = k * T
    r["y"][rows.bi, pl.ds(spec.tile_start(s0), T), rows.chans] = tile.T.astype(r["y"].dtype)
    return h, following

  h = r["h0"][rows.bi, rows.chans, :].astype(acc)
  if spec.num_full:  # (not even traced otherwise: its tile would not fit in a short length)
    first = load_chunk(0) if spec.prefetch else []
    h, _ = lax.fori_loop(0, spec.num_full, full_chunk, (h, first))
  if spec.tail:
    save_state(spec.num_full, h)
    for s in range(spec.num_full * T, spec.l):
      t = spec.time(s)
      h, y = step(h, load(t))
      r["y"][rows.bi, t, rows.chans] = y.astype(r["y"].dtype)
  r["h_last"][rows.bi, rows.chans, :] = h


# ``_forward`` and ``_backward`` are jitted with the spec static, so every call of one kernel
# instance (the six E-ViM³ directions in a block, the layers of an unrolled stack) is traced and
# lowered to Triton once per program instead of once per call.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(spec: _Spec, save: bool, u, delta, A, B, C, D, z, bias, h0):
  acc = h0.dtype
  b, l, d, n = spec.b, spec.l, spec.d, spec.n
  out_shape = [jax.ShapeDtypeStruct((b, l, d), u.dtype), jax.ShapeDtypeStruct((b, d, n), acc)]
  if save:
    out_shape.append(jax.ShapeDtypeStruct((b, spec.num_chunks, d, n), acc))
  inputs = [x for x in (u, delta, A, B, C, h0, D, z, bias) if x is not None]
  aliases, prefilled = {}, ()
  if spec.poison:
    inputs, prefilled = _prefilled_outputs(out_shape, inputs, aliases, jnp.nan)
  if spec.time_parallel and not save:
    kernel, name = _forward_tp_kernel, "selective_scan_fwd_tp"
    block_d, warps = spec.tp_block_d, spec.tp_warps
    _register_recurrence_lowering()
  else:
    kernel = functools.partial(_forward_kernel, save=save)
    name, block_d, warps = "selective_scan_fwd", spec.fwd_block_d, spec.fwd_warps
  return pl.pallas_call(
      functools.partial(kernel, spec=spec, prefilled=tuple(prefilled)),
      out_shape=out_shape,
      grid=(b, spec.g, spec.d // spec.g // block_d),
      compiler_params=_compiler_params(warps, spec.num_stages),
      interpret=spec.interpret,
      input_output_aliases=aliases,
      name=name,
  )(*inputs)


# --------------------------------------------------------------------------------------------
# Time-parallel forward kernel (``PallasConfig.time_parallel``: few rows, no gradient)
# --------------------------------------------------------------------------------------------

# ``h_t = a_t h_{t-1} + x_t`` along one axis of a block, as one Triton ``tt.scan``: each thread
# combines its own steps, then the threads of a warp and the warps of the program combine their
# partial results, the way ``mamba_ssm`` scans a chunk of time steps across a block's threads.
# Pallas lowers only ``cumsum`` to ``tt.scan``, so the pair scan is a primitive of its own with a
# Triton lowering rule, registered when a GPU kernel first needs it (interpret mode, on CPU,
# runs ``lax.associative_scan`` with the same combine instead).
_recurrence_p = jax.extend.core.Primitive("selective_scan_recurrence")
_recurrence_p.multiple_results = True
_recurrence_p.def_abstract_eval(lambda a, x, *, axis: (a, x))


def _combine(earlier, later):
  """The pair ``(a, x)`` of two consecutive pieces of ``h = a h + x``, applied in order."""
  return earlier[0] * later[0], later[0] * earlier[1] + later[1]


def _recurrence(a, x, *, axis: int, interpret: bool):
  """The states ``h`` along ``axis`` of ``a, x`` from ``h = 0`` before the first step."""
  if interpret:
    return lax.associative_scan(_combine, (a, x), axis=axis)[1]
  return _recurrence_p.bind(a, x, axis=axis)[1]


@functools.cache
def _register_recurrence_lowering():
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  from jax._src.lib.triton import dialect as tt
  from jax._src.pallas.triton import lowering

  def lower(ctx, a, x, *, axis):
    del ctx
    op = tt.ScanOp([a, x], axis)
    element = ir.RankedTensorType(a.type).element_type
    body = op.regions[0].blocks.append(element, element, element, element)
    with ir.InsertionPoint.at_block_begin(body):
      a1, x1, a2, x2 = body.arguments
      tt.scan_return([arith.mulf(a1, a2), arith.addf(arith.mulf(a2, x1), x2)])
    op.verify()
    return list(op.result)

  lowering.register_lowering(_recurrence_p)(lower)


def _forward_tp_kernel(*refs, spec: _Spec, prefilled=()):
  """``_forward_kernel`` (no saved states, ``reverse=False``) over blocks of ``tp_block_t``
  steps: a block's ``(T, block_d, n)`` decays and inputs at once, its states by one block-wide
  scan, its outputs by one contraction with C, its last state carried to the next block. A
  length that is not a multiple of ``T`` ends in a block that starts ``T`` steps before the end:
  its steps already done are identity steps (dt = 0) and are not stored again."""
  r = _unpack(refs, _input_names(spec, backward=False) + list(prefilled) + ["y", "h_last"])
  acc = r["h_last"].dtype
  T, bd = spec.tp_block_t, spec.tp_block_d  # T: at most the length, a power of two
  rows = _Rows(r, spec, acc, bd)
  A2 = r["A"][rows.chans, :].astype(acc) * _LOG2E  # (bd, n)
  D = rows.channel_vector("D") if spec.has_D else None
  bias = rows.channel_vector("bias") if spec.has_bias else None
  step = lax.broadcasted_iota(jnp.int32, (T, 1), 0)

  def block(t0, h, fresh: int):
    """Steps ``t0 .. t0 + T - 1`` from the state ``h`` before them, of which the last
    ``fresh`` are new (static); returns the state after them."""
    times = pl.ds(t0, T)
    u = r["u"][rows.bi, times, rows.chans].astype(acc)  # (T, bd)
    dt, _ = rows.dt(r["delta"][rows.bi, times, rows.chans].astype(acc), bias)
    new = step >= T - fresh
    if fresh < T:
      dt = jnp.where(new, dt, 0.0)
    B = r["B"][rows.bi, times, rows.gi, :].astype(acc)  # (T, n)
    C = r["C"][rows.bi, times, rows.gi, :].astype(acc)
    a = _approx("ex2", dt[:, :, None] * A2[None], rows.fast)  # (T, bd, n)
    x = (dt * u)[:, :, None] * B[:, None, :]
    x = jnp.where(step[:, :, None] == 0, x + a * h[None], x)
    states = _recurrence(a, x, axis=0, interpret=spec.interpret)
    y = jnp.sum(states * C[:, None, :], axis=2)  # (T, bd)
    if D is not None:
      y = y + D[None] * u
    if spec.has_z:
      z = r["z"][rows.bi, times, rows.chans].astype(acc)
      y = y * (z * _sigmoid(z, rows.fast))
    y = y.astype(r["y"].dtype)
    if fresh < T:
      plt.store(r["y"].at[rows.bi, times, rows.chans], y, mask=jnp.broadcast_to(new, y.shape))
    else:
      r["y"][rows.bi, times, rows.chans] = y
    return jnp.sum(jnp.where(step[:, :, None] == T - 1, states, 0.0), axis=0)

  h = r["h0"][rows.bi, rows.chans, :].astype(acc)
  full = spec.l // T
  h = lax.fori_loop(0, full, lambda k, h: block(k * T, h, T), h)
  if spec.l % T:
    h = block(spec.l - T, h, spec.l % T)
  r["h_last"][rows.bi, rows.chans, :] = h


# --------------------------------------------------------------------------------------------
# Backward kernel
# --------------------------------------------------------------------------------------------


def _backward_kernel(*refs, spec: _Spec, prefilled=()):
  out_names = ["du", "ddelta", "dz" if spec.has_z else None, "dB", "dC", "dA",
               "dD" if spec.has_D else None, "dbias" if spec.has_bias else None, "dh0"]
  in_names = _input_names(spec, backward=True)
  if spec.atomic_dbc:  # zero-filled dB, dC buffers come in aliased to the outputs
    in_names += ["dB_zeros", "dC_zeros"]
  r = _unpack(refs, in_names + list(prefilled) + out_names)
  acc = r["dh0"].dtype
  T, bd = spec.chunk, spec.bwd_block_d
  # PTX approximations or libdevice: PallasConfig.bwd_fast_math (measured there).
  rows = _Rows(r, spec, acc, bd, fast=spec.bwd_fast_math)
  A = r["A"][rows.chans, :].astype(acc)
  A2 = A * _LOG2E
  A2x2 = A2 * 2.0
  D = rows.channel_vector("D") if spec.has_D else None
  bias = rows.channel_vector("bias") if spec.has_bias else None
  cols = lax.broadcasted_iota(jnp.int32, (bd, T), 1)
  trows = lax.broadcasted_iota(jnp.int32, (T, spec.n), 0)

  def recompute(k, s0, length):
    """Loads a chunk's rows and recomputes its states h_{-1}, h_0, ..., h_{length-1} from the
    saved chunk start. Returns the states and, per step, what the reverse sweep reuses."""
    h = r["h_chunks"][rows.bi, k, rows.chans, :].astype(acc)
    states, steps = [h], []
    for j in range(length):
      t = spec.time(s0 + j)
      u = rows.row("u", t)
      dt, x = rows.dt(rows.row("delta", t), bias)
      Bt = rows.bc("B", t)
      a = _approx("ex2", dt[:, None] * A2, rows.fast)
      h = a * h + (dt * u)[:, None] * Bt[None, :]
      states.append(h)
      steps.append((t, u, dt, x, Bt, a))
    return states, steps

  def adjoint_step(carry, step, h_prev, h):
    """One step of the reverse sweep; returns the carry and this step's output rows."""
    mu, dA, dD, dbias = carry
    t, u, dt, x, Bt, a = step
    if spec.bwd_recompute_decay:
      # Written differently from the recompute's exp2(dt A2) (exactly equal: powers of two) so
      # that the compiler cannot merge the two and must not keep `a` alive across the chunk.
      a = _approx("ex2", (dt * 0.5)[:, None] * A2x2, rows.fast)
    Ct = rows.bc("C", t)
    dy = rows.row("dy", t)
    out = {}
    if spec.has_z:
      z = rows.row("z", t)
      sz = _sigmoid(z, rows.fast)
      y = jnp.sum(h * Ct[None, :], axis=1)
      if D is not None:
        y = y + D * u
      out["dz"] = dy * y * sz * (1.0 + z * (1.0 - sz))
      dy = dy * (z * sz)
    lam = mu + dy[:, None] * Ct[None, :]
    out["dC"] = jnp.sum(h * dy[:, None], axis=0)
    da = lam * h_prev * a  # d loss / d (dt * A), elementwise
    lam_b = jnp.sum(lam * Bt[None, :], axis=1)
    ddt = jnp.sum(da * A, axis=1) + lam_b * u
    out["du"] = lam_b * dt
    out["dB"] = jnp.sum(lam * (dt * u)[:, None], axis=0)
    dA = dA + da * dt[:, None]
    if D is not None:
      out["du"] = out["du"] + dy * D
      dD = dD + dy * u
    out["ddelta"] = ddt * _sigmoid(x, rows.fast) if spec.softplus else ddt
    if bias is not None:
      dbias = dbias + out["ddelta"]
    return (a * lam, dA, dD, dbias), out

  chan_outs = ["du", "ddelta"] + (["dz"] if spec.has_z else [])

  def store_dbc(name, value, t_index):
    """value: (T, n) tile at times pl.ds(..) or an (n,) row at one time."""
    if spec.atomic_dbc:
      if isinstance(t_index, int):  # interpret mode's atomic_add wants traced indices
        t_index = jnp.asarray(t_index, jnp.int32)
      plt.atomic_add(r[name], (rows.bi, t_index, rows.gi, slice(None)), value)
    else:
      r[name][rows.bi, t_index, rows.gi, rows.dj, :] = value

  def full_chunk(i, carry):
    k = spec.num_full - 1 - i
    s0 = k * T
    states, steps = recompute(k, s0, T)
    tiles = {name: jnp.zeros((bd, T), acc) for name in chan_outs}
    bc_tiles = {name: jnp.zeros((T, spec.n), acc) for name in ("dB", "dC")}
    for j in reversed(range(T)):
      carry, out = adjoint_step(carry, steps[j], states[j], states[j + 1])
      c = spec.column(j)
      for name in chan_outs:
        tiles[name] = jnp.where(cols == c, out[name][:, None], tiles[name])
      for name in ("dB", "dC"):
        bc_tiles[name] = jnp.where(trows == c, out[name][None, :], bc_tiles[name])
    times = pl.ds(spec.tile_start(s0), T)
    for name in chan_outs:
      r[name][rows.bi, times, rows.chans] = tiles[name].T.astype(r[name].dtype)
    for name in ("dB", "dC"):
      store_dbc(name, bc_tiles[name], times)
    return carry

  carry = (r["dh_last"][rows.bi, rows.chans, :].astype(acc), jnp.zeros((bd, spec.n), acc),
           jnp.zeros((bd,), acc), jnp.zeros((bd,), acc))
  if spec.tail:  # the tail chunk comes last in scan order, so first here
    s0 = spec.num_full * T
    states, steps = recompute(spec.num_full, s0, spec.tail)
    for j in reversed(range(spec.tail)):
      t = steps[j][0]
      carry, out = adjoint_step(carry, steps[j], states[j], states[j + 1])
      for name in chan_outs:
        r[name][rows.bi, t, rows.chans] = out[name].astype(r[name].dtype)
      for name in ("dB", "dC"):
        store_dbc(name, out[name], t)
  if spec.num_full:
    carry = lax.fori_loop(0, spec.num_full, full_chunk, carry)
  mu, dA, dD, dbias = carry
  r["dA"][rows.bi, rows.chans, :] = dA
  if spec.has_D:
    r["dD"][rows.bi, rows.chans] = dD
  if spec.has_bias:
    r["dbias"][rows.bi, rows.chans] = dbias
  r["dh0"][rows.bi, rows.chans, :] = mu


@functools.partial(jax.jit, static_argnums=(0,))
def _backward(spec: _Spec, res, dy, dh_last):
  u, delta, A, B, C, D, z, bias, h_chunks = res
  acc = h_chunks.dtype
  b, l, d, g, n = spec.b, spec.l, spec.d, spec.g, spec.n
  nblocks = d // g // spec.bwd_block_d
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, acc)
  dbc_shape = (b, l, g, n) if spec.atomic_dbc else (b, l, g, nblocks, n)
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct(delta.shape, delta.dtype)]
  if spec.has_z:
    out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
  out_shape += [f32(*dbc_shape), f32(*dbc_shape), f32(b, d, n)]
  if spec.has_D:
    out_shape.append(f32(b, d))
  if spec.has_bias:
    out_shape.append(f32(b, d))
  out_shape.append(f32(b, d, n))
  inputs = [x for x in (u, delta, A, B, C, h_chunks, dy.astype(u.dtype), dh_last.astype(acc),
                        D, z, bias) if x is not None]
  aliases, prefilled = {}, ()
  if spec.atomic_dbc:
    first_dbc_out = 3 if spec.has_z else 2
    aliases = {len(inputs): first_dbc_out, len(inputs) + 1: first_dbc_out + 1}
    inputs += [jnp.zeros(dbc_shape, acc), jnp.zeros(dbc_shape, acc)]
  if spec.poison:
    inputs, prefilled = _prefilled_outputs(out_shape, inputs, aliases, jnp.nan)
  outs = pl.pallas_call(
      functools.partial(_backward_kernel, spec=spec, prefilled=tuple(prefilled)),
      out_shape=out_shape,
      grid=(b, g, nblocks),
      compiler_params=_compiler_params(spec.bwd_warps, spec.num_stages),
      interpret=spec.interpret,
      input_output_aliases=aliases,
      name="selective_scan_bwd",
  )(*inputs)
  outs = list(outs)
  du, ddelta = outs.pop(0), outs.pop(0)
  dz = outs.pop(0) if spec.has_z else None
  dB, dC, dA = outs.pop(0), outs.pop(0), outs.pop(0)
  dD = outs.pop(0).sum(0) if spec.has_D else None
  dbias = outs.pop(0).sum(0) if spec.has_bias else None
  dh0 = outs.pop(0)
  if not spec.atomic_dbc:
    dB, dC = dB.sum(3), dC.sum(3)
  return du, ddelta, dA.sum(0), dB, dC, dD, dz, dbias, dh0


# --------------------------------------------------------------------------------------------
# The length-parallel scan's two light kernels (``PallasConfig.segments``)
# --------------------------------------------------------------------------------------------


def _prefetched_chunks(spec: _Spec, load_chunk, body, carry, *, backwards: bool):
  """Runs ``body(k, carry, inputs) -> carry`` over the ``spec.num_full`` chunks (last to first
  when ``backwards``), with each chunk's loads issued before the arithmetic of the one before,
  as the forward kernel does with ``prefetch``."""
  last = spec.num_full - 1

  def chunk(i, state):
    carry, inputs = state
    k = last - i if backwards else i
    following = load_chunk(jnp.maximum(k - 1, 0) if backwards else jnp.minimum(k + 1, last))
    return body(k, carry, inputs), following

  first = load_chunk(last if backwards else 0)
  return lax.fori_loop(0, spec.num_full, chunk, (carry, first))[0]


def _states_kernel(*refs, spec: _Spec, prefilled=()):
  """Every row's scan from a zero state, keeping only its final state and ``sum dt``."""
  r = _unpack(refs, ["u", "delta", "A", "B", "bias" if spec.has_bias else None, *prefilled,
                     "h_last", "dt_sum"])
  acc = r["h_last"].dtype
  T, bd = spec.chunk, spec.fwd_block_d
  rows = _Rows(r, spec, acc, bd)
  A2 = r["A"][rows.chans, :].astype(acc) * _LOG2E
  bias = rows.channel_vector("bias") if spec.has_bias else None

  def load_chunk(k):
    times = [spec.time(k * T + j) for j in range(T)]
    return [(rows.row("u", t), rows.row("delta", t), rows.bc("B", t)) for t in times]

  def body(k, carry, inputs):
    h, dt_sum = carry
    for u, delta, B in inputs:
      dt, _ = rows.dt(delta, bias)
      h = _approx("ex2", dt[:, None] * A2, rows.fast) * h + (dt * u)[:, None] * B[None, :]
      dt_sum = dt_sum + dt
    return h, dt_sum

  zeros = (jnp.zeros((bd, spec.n), acc), jnp.zeros((bd,), acc))
  h, dt_sum = _prefetched_chunks(spec, load_chunk, body, zeros, backwards=False)
  r["h_last"][rows.bi, rows.chans, :] = h
  r["dt_sum"][rows.bi, rows.chans] = dt_sum


def _adjoints_kernel(*refs, spec: _Spec, with_dt_sum: bool, prefilled=()):
  """Every row's adjoint sweep from a zero adjoint at its end, keeping only the adjoint of the
  state it starts from: ``mu = exp(dt_t A) (mu + dy_eff_t C_t)``, last step to first, with
  ``dy_eff = dy · z sigmoid(z)`` (the z gate; the D skip does not reach the state); and with
  ``with_dt_sum`` the row's ``sum dt`` (the backward-only split has no states kernel for it)."""
  r = _unpack(refs, ["delta", "A", "C", "dy", "z" if spec.has_z else None,
                     "bias" if spec.has_bias else None, *prefilled, "mu",
                     "dt_sum" if with_dt_sum else None])
  acc = r["mu"].dtype
  T, bd = spec.chunk, spec.fwd_block_d
  rows = _Rows(r, spec, acc, bd)
  A2 = r["A"][rows.chans, :].astype(acc) * _LOG2E
  bias = rows.channel_vector("bias") if spec.has_bias else None

  def load_chunk(k):
    times = [spec.time(k * T + j) for j in range(T)]
    return [(rows.row("delta", t), rows.bc("C", t), rows.row("dy", t),
             rows.row("z", t) if spec.has_z else None) for t in times]

  def body(k, carry, inputs):
    mu, dt_sum = carry
    for delta, C, dy, z in reversed(inputs):
      dt, _ = rows.dt(delta, bias)
      if z is not None:
        dy = dy * (z * _sigmoid(z, rows.fast))
      mu = _approx("ex2", dt[:, None] * A2, rows.fast) * (mu + dy[:, None] * C[None, :])
      if with_dt_sum:
        dt_sum = dt_sum + dt
    return mu, dt_sum

  zeros = (jnp.zeros((bd, spec.n), acc), jnp.zeros((bd,), acc))
  mu, dt_sum = _prefetched_chunks(spec, load_chunk, body, zeros, backwards=True)
  r["mu"][rows.bi, rows.chans, :] = mu
  if with_dt_sum:
    r["dt_sum"][rows.bi, rows.chans] = dt_sum


@functools.partial(jax.jit, static_argnums=(0,))
def _segment_states(spec: _Spec, u, delta, A, B, bias):
  """(final state from zero (b, d, n), sum of dt (b, d)) of every row, in float32."""
  acc = A.dtype
  out_shape = [jax.ShapeDtypeStruct((spec.b, spec.d, spec.n), acc),
               jax.ShapeDtypeStruct((spec.b, spec.d), acc)]
  inputs = [x for x in (u, delta, A, B, bias) if x is not None]
  return _call(_states_kernel, spec, out_shape, inputs, name="selective_scan_states")


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("with_dt_sum",))
def _segment_adjoints(spec: _Spec, delta, A, C, dy, z, bias, with_dt_sum: bool = False):
  """The adjoint of every row's starting state under a zero adjoint at its end (b, d, n); with
  ``with_dt_sum`` also the row's sum of dt (b, d)."""
  out_shape = [jax.ShapeDtypeStruct((spec.b, spec.d, spec.n), A.dtype)]
  if with_dt_sum:
    out_shape.append(jax.ShapeDtypeStruct((spec.b, spec.d), A.dtype))
  inputs = [x for x in (delta, A, C, dy, z, bias) if x is not None]
  kernel = functools.partial(_adjoints_kernel, with_dt_sum=with_dt_sum)
  out = _call(kernel, spec, out_shape, inputs, name="selective_scan_adjoints")
  return tuple(out) if with_dt_sum else out[0]


def _call(kernel, spec: _Spec, out_shape, inputs, *, name):
  """A light kernel over the forward's grid of (row, group, channel block) programs."""
  assert spec.tail == 0 and spec.num_full >= 1, "segments are whole chunks"
  aliases, prefilled = {}, ()
  if spec.poison:
    inputs, prefilled = _prefilled_outputs(out_shape, inputs, aliases, jnp.nan)
  return pl.pallas_call(
      functools.partial(kernel, spec=spec, prefilled=tuple(prefilled)), out_shape=out_shape,
      grid=(spec.b, spec.g, spec.d // spec.g // spec.fwd_block_d),
      compiler_params=_compiler_params(spec.fwd_warps, spec.num_stages),
      interpret=spec.interpret, input_output_aliases=aliases, name=name,
  )(*inputs)


# --------------------------------------------------------------------------------------------
# custom_vjp and the backend entry
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_scan(spec, u, delta, A, B, C, D, z, bias, h0):
  return tuple(_forward(spec, False, u, delta, A, B, C, D, z, bias, h0))


def _fused_scan_fwd(spec, u, delta, A, B, C, D, z, bias, h0):
  y, h_last, h_chunks = _forward(spec, True, u, delta, A, B, C, D, z, bias, h0)
  return (y, h_last), (u, delta, A, B, C, D, z, bias, h_chunks)


def _fused_scan_bwd(spec, res, cotangents):
  dy, dh_last = cotangents
  if spec.bwd_segments > 1:
    return _cast_grads(res[:8], _split_backward(spec, spec.bwd_segments, res, dy, dh_last))
  return _cast_grads(res[:8], _backward(spec, res, dy, dh_last))


def _split_backward(spec, segments, res, dy, dh_last):
  """``_backward`` of an unsplit forward, run on ``segments`` segments of the length as rows
  (``PallasConfig.bwd_segments``) by ``_segments_backward``, each segment from the forward's
  saved chunk states. Returns ``_backward``'s gradients in the whole scan's shapes."""
  u, delta, A, B, C, D, z, bias, h_chunks = res
  b, l, d = u.shape
  seg_len = l // segments
  rows = lambda x: None if x is None else x.reshape(b * segments, seg_len, *x.shape[2:])
  # The chunk states are in scan order: in reverse the last segment's chunks come first.
  h_seg = h_chunks.reshape(b, segments, seg_len // spec.chunk, *h_chunks.shape[2:])
  h_seg = (h_seg[:, ::-1] if spec.reverse else h_seg).reshape(-1, *h_seg.shape[2:])
  row_res = (rows(u), rows(delta), A, rows(B), rows(C), D, rows(z), bias, h_seg)
  rspec = dataclasses.replace(spec, b=b * segments, l=seg_len, bwd_segments=1)
  du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _segments_backward(rspec, segments, row_res,
                                                                  rows(dy), dh_last)
  whole = lambda x: None if x is None else x.reshape(b, l, *x.shape[2:])
  return (whole(du), whole(ddelta), dA, whole(dB), whole(dC), dD, whole(dz), dbias, dh0)


def _cast_grads(inputs, grads):
  """The backward kernel's gradients in the dtypes of ``inputs`` (u ... bias) and the state's."""
  *grads, dh0 = grads
  u, delta, A, B, C, D, z, bias = inputs
  du, ddelta, dA, dB, dC, dD, dz, dbias = grads
  cast = lambda g, x: None if x is None else g.astype(x.dtype)
  return (du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), cast(dz, z),
          cast(dbias, bias), dh0.astype(A.dtype))


_fused_scan.defvjp(_fused_scan_fwd, _fused_scan_bwd)


def pallas_backend(u, delta, A, B, C, D, z, delta_bias, h0, *, delta_softplus, reverse,
                   chunk_size=None, config: Optional[PallasConfig] = None):
  """The ``"pallas"`` backend (contract in ``selective_scan.py``'s module docstring).

  Args:
    u, delta: ``(b, l, d)``; A: ``(d, n)``; B, C: ``(b, l, g, n)``; D, delta_bias: ``(d,)`` or
      None; z: ``(b, l, d)`` or None; h0: ``(b, d, n)`` in the state dtype.
    delta_softplus, reverse: as in ``selective_scan``.
    chunk_size: unused (the associative backend's knob); block shapes come from ``config``.
    config: block shapes and launch parameters; ``DEFAULT_CONFIG`` when None.

  Returns:
    ``y`` ``(b, l, d)`` in ``u``'s dtype and the last state ``(b, d, n)`` in ``h0``'s dtype.
  """
  del chunk_size
  config = config or DEFAULT_CONFIG
  gate = None
  if z is not None and not config.gate_in_kernel:
    z, gate = None, z
  b, l, d = u.shape
  g, n = B.shape[2], B.shape[3]
  n_pad = _pow2_at_least(n)
  if n_pad != n:  # zero columns of A, B, C: the padded states stay zero and add nothing
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_pad - n)])
    A, B, C, h0 = pad(A), pad(B), pad(C), pad(h0)
  if config.bc_float32:
    B, C = B.astype(h0.dtype), C.astype(h0.dtype)
  scan = functools.partial(_whole_scan, config)
  segments = segments_for(b, l, d, config, u.dtype)
  if segments > 1:
    scan = functools.partial(_segmented_scan, config, segments)
  y, h_last = scan(u, delta, A, B, C, D, z, delta_bias, h0, softplus=bool(delta_softplus),
                   reverse=bool(reverse))
  if gate is not None:  # y · silu(z) in at least float32, rounded to y's dtype
    acc = jnp.promote_types(y.dtype, jnp.float32)
    y = skip_and_gate(y.astype(acc), u, None, gate).astype(y.dtype)
  return y, h_last[..., :n]


def _make_spec(config: PallasConfig, b, l, d, g, n, D, z, bias, softplus, reverse,
               split=False) -> _Spec:
  interpret = config.interpret
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  fwd_block_d, fwd_warps = forward_block(b, d, g, n, config, split)
  bwd_segments = 1 if split else backward_segments_for(b, l, d, config)
  time_parallel = not split and time_parallel_for(b, d, reverse, config)
  tp_block_t = min(config.tp_block_t, _pow2_at_most(l))
  tp_block_d = _block_for(d // g, config.tp_block_d)
  return _Spec(
      b=b, l=l, d=d, g=g, n=n, chunk=config.chunk, fwd_block_d=fwd_block_d,
      bwd_block_d=_block_for(d // g, config.bwd_block_d),
      fwd_warps=fwd_warps, bwd_warps=config.bwd_num_warps, num_stages=config.num_stages,
      bwd_recompute_decay=config.bwd_recompute_decay, bwd_fast_math=config.bwd_fast_math,
      prefetch=config.prefetch,
      atomic_dbc=config.atomic_dbc, interpret=bool(interpret), poison=config.poison_outputs,
      has_D=D is not None, has_z=z is not None, has_bias=bias is not None, softplus=softplus,
      reverse=reverse, bwd_segments=bwd_segments, time_parallel=time_parallel,
      tp_block_t=tp_block_t, tp_block_d=tp_block_d,
      tp_warps=config.tp_num_warps or max(1, min(8, tp_block_t * tp_block_d * n // 1024)))


# The time-parallel forward (``time_parallel_for``) where the serial walk's programs shrink below
# 16 channels to fill the GPU (``forward_block``): b · d under 16 · _TARGET_PROGRAMS. Measured on
# an H100 (jax 0.11.2, bf16, `python -m vidssm_jax.bench.scan --sweep-time-parallel`, us per scan
# from a state, 32 chained): (1, 197, 768) walk 16.6, time-parallel 9.2 with the defaults
# (blocks of 32 steps, 8 channels, 4 warps; the best of 24 block shapes was within 0.1 us);
# (1, 197, 1536) 21.6 against 12.2 (best 11.7 with 4 channels on 2 warps); with more rows the
# walk won: (4, 197, 1536) 25.8 against 27.1 at best, (16, 197, 768) 35.6 against 50.3.
_TIME_PARALLEL_BELOW = 16 * _TARGET_PROGRAMS


def time_parallel_for(b: int, d: int, reverse: bool, config: PallasConfig) -> bool:
  """Whether the undifferentiated forward of a ``(b, ·, d)`` scan scans time across threads
  (``PallasConfig.time_parallel``; never in reverse)."""
  if reverse:
    return False
  if config.time_parallel is not None:
    return config.time_parallel
  return b * d < _TIME_PARALLEL_BELOW


def _vector(x, dtype):
  return None if x is None else x.astype(dtype)


def _whole_scan(config, u, delta, A, B, C, D, z, bias, h0, *, softplus, reverse):
  """One kernel program per (row, channel block) walks the whole length."""
  b, l, d = u.shape
  g, n = B.shape[2], B.shape[3]
  acc = h0.dtype
  steps = _identity_steps(l, config, softplus, bias)
  if steps:
    pad = functools.partial(_pad_length, steps, reverse)
    u, z, B, C = pad(u), pad(z), pad(B), pad(C)
    delta = pad(delta, -jnp.inf if softplus else 0.0)
  spec = _make_spec(config, b, l + steps, d, g, n, D, z, bias, softplus, reverse)
  y, h_last = _fused_scan(spec, u, delta, A.astype(acc), B, C, _vector(D, acc), z,
                          _vector(bias, acc), h0)
  if steps:
    y = y[:, steps:] if reverse else y[:, :l]
  return y, h_last


# The automatic length split (``segments_for``), from `python -m vidssm_jax.bench.scan
# --sweep-segments --segments 1 2 4 8 16 32 64 128` on an H200 (bf16 and float32, forward and
# forward + backward): shapes with at least _FULL_PROGRAMS programs of 8 channels (b · d / 8)
# were fastest unsplit, (8, 784 | 1568, 768) and (4, 8192, 1536), where 2 segments cost 1.4-1.9x;
# below it the fastest split gave about _SPLIT_PROGRAMS programs: 16 segments at (4, 13571 |
# 33635, 384) (forward + backward 10.2 -> 4.5 and 25.6 -> 10.7 ms bf16), 8 at (8, 5553, 384),
# 16-32 at (1, 3136, 768) (3.19 -> 0.71-0.65 ms). Segments of fewer than 128 steps lost: a
# stream's (1, 197, 768) scan took 0.076 ms in 2 segments against 0.059 ms in one.
_FULL_PROGRAMS = 768
_SPLIT_PROGRAMS = 3072
# In float32 the split pays up to half as many programs. On one H100 (jax 0.11.2, stop 31,
# `bench.scan --sweep-segments --dtypes float32`, forward / forward + backward ms), the split
# below 1536 programs against the one below 3072: (4, 13571, 384) 8 segments 0.782 / 2.323
# against 16 0.921 / 2.438; (4, 33635, 384) 8: 1.838 / 5.572 against 16: 2.124 / 5.860;
# (8, 5553, 384) 4: 0.631 / 1.892 against 8: 0.735 / 1.998; (1, 3136, 768) 16 either way
# (0.118 / 0.324; 8 segments 0.119 / 0.396). In bfloat16 the 3072 held: (4, 13571 | 33635, 384)
# forward in 8 segments 0.705 / 1.681 against 0.601 / 1.435 ms in 16.
_SPLIT_PROGRAMS_FLOAT32 = 1536


def segments_for(b: int, l: int, d: int, config: PallasConfig, dtype=None) -> int:
  """Segments of the length-parallel scan for a ``(b, l, d)`` scan under ``config`` (1: none).

  Automatic (``config.segments=None``): none when ``b · d / 8`` programs reach
  ``_FULL_PROGRAMS``; otherwise doubles while ``b · segments · d / 8`` stays under
  ``_SPLIT_PROGRAMS`` (``_SPLIT_PROGRAMS_FLOAT32`` for 4-byte inputs, ``dtype`` of u; ``None``:
  2-byte) and every segment keeps at least ``config.segment_min_length`` steps. The float32
  choice is the 2-byte one halved or the same, so a length native to the one is to the other.
  """
  if config.segments is not None:
    return config.segments
  programs = b * max(d // 8, 1)
  segments = 1
  if programs >= _FULL_PROGRAMS:
    return segments
  wide = dtype is not None and jnp.dtype(dtype).itemsize >= 4
  most = _SPLIT_PROGRAMS_FLOAT32 if wide else _SPLIT_PROGRAMS
  while (programs * segments < most
         and l // (2 * segments) >= config.segment_min_length):
    segments *= 2
  return segments


# The backward-only split (``backward_segments_for``), measured on an H100 (jax 0.11.2) with
# `bench.scan`'s timing of the forward + backward (`--sweep-segments --backward-only` sweeps
# it), all variants in one run, ms bf16 / float32, unsplit -> split:
# (8, 784, 768) in 2 segments 0.520 -> 0.451 / 0.581 -> 0.486; (8, 1568, 768) in 2 or 4
# 1.001 -> 0.868 / 1.114 -> 0.925; (4, 8192, 1536) in 2, 4 or 8 5.03 -> 4.22-4.26 / 5.61 ->
# 4.56-4.64. (The forward stays unsplit there: split, it was slower, 1.27-1.51 against 1.14 ms
# at (4, 8192, 1536) bf16.) Segments of fewer steps than this were not measured.
_BWD_SEGMENT_MIN_LENGTH = 384


def backward_segments_for(b: int, l: int, d: int, config: PallasConfig) -> int:
  """Segments of the backward of an unsplit ``(b, l, d)`` scan (1: none).

  ``config.bwd_segments`` if set, else doubles while ``b · d / bwd_block_d · segments`` programs
  stay under ``_SPLIT_PROGRAMS`` and every segment keeps ``_BWD_SEGMENT_MIN_LENGTH`` steps;
  then halves until the length divides into segments of whole chunks.
  """
  segments = config.bwd_segments
  if segments is None:
    programs, segments = b * max(d // config.bwd_block_d, 1), 1
    while (programs * segments < _SPLIT_PROGRAMS
           and l // (2 * segments) >= _BWD_SEGMENT_MIN_LENGTH):
      segments *= 2
  while segments > 1 and l % (segments * config.chunk):
    segments //= 2
  return segments


def _segment_length(l: int, segments: int, chunk: int) -> int:
  """Steps per segment of an ``l``-step scan split in ``segments``: whole chunks."""
  seg_len = -(-l // segments)
  return seg_len + -seg_len % chunk


def native_length(b: int, l: int, d: int, config: Optional[PallasConfig] = None) -> int:
  """The smallest length ``>= l`` that ``pallas_backend`` scans without padding its inputs (the
  backend registry's ``native_length``): whole segments of whole chunks when it splits the
  length, whole chunks from ``pad_min_length`` steps, else ``l`` (its tail chunk is unrolled)."""
  config = config or DEFAULT_CONFIG
  length = l
  for _ in range(4):  # a longer length may take more segments: settle on a fixed point
    segments = segments_for(b, length, d, config)
    if segments > 1:
      new = segments * _segment_length(l, segments, config.chunk)
    else:  # the whole scan's identity-step padding (a softplus scan; the models' case)
      new = l + _identity_steps(l, config, softplus=True, delta_bias=None)
    if new == length:
      break
    length = new
  return length


def _segmented_scan(config, segments, u, delta, A, B, C, D, z, bias, h0, *, softplus, reverse):
  """The length-parallel scan (``PallasConfig.segments``): ``segments`` rows per batch row."""
  b, l, d = u.shape
  g, n = B.shape[2], B.shape[3]
  acc = h0.dtype
  if bias is not None and not softplus:
    # dt = delta + bias: folded into delta, so that a padded delta of 0 is the identity step.
    delta, bias = delta.astype(acc) + bias.astype(acc), None
  seg_len = _segment_length(l, segments, config.chunk)  # whole chunks: no unrolled tail
  steps = segments * seg_len - l
  pad = functools.partial(_pad_length, steps, reverse)
  u, z, B, C = pad(u), pad(z), pad(B), pad(C)
  delta = pad(delta, -jnp.inf if softplus else 0.0)
  rows = lambda x: None if x is None else x.reshape(b * segments, seg_len, *x.shape[2:])
  spec = _make_spec(config, b * segments, seg_len, d, g, n, D, z, bias, softplus, reverse,
                    split=True)
  y, h_last = _split_scan(spec, segments, rows(u), rows(delta), A.astype(acc), rows(B), rows(C),
                          _vector(D, acc), rows(z), _vector(bias, acc), h0)
  y = y.reshape(b, segments * seg_len, d)
  y = y[:, steps:] if reverse else y[:, :l]
  return y, h_last


# The split scan on rows of segments, ``(b · segments, seg_len, ...)``:
#   forward   1. every segment from a zero state, final state and total decay only (light kernel);
#             2. the state entering every segment (``_carried_states``, an associative scan over
#                the segments);
#             3. every segment from its entering state: y, and under differentiation its chunk
#                states, which are then the true states of the whole scan.
#   backward  1. every segment's adjoint sweep from a zero adjoint at its end, the adjoint of its
#                entering state only (light kernel);
#             2. the adjoint leaving every segment: the same carry, run in the opposite order,
#                from dh_last;
#             3. the backward kernel on every segment with that adjoint as its dh_last: the
#                gradients, exact, because every segment sees the true states and adjoints.
# Pass 1 of either direction reads a part of the inputs and writes (b, d, n) per segment, which
# is what makes the split cheap.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _split_scan(spec, segments, u, delta, A, B, C, D, z, bias, h0):
  y, h_last, _ = _split_forward(spec, segments, False, u, delta, A, B, C, D, z, bias, h0)
  return y, h_last


def _split_forward(spec, segments, save, u, delta, A, B, C, D, z, bias, h0):
  """y rows, the whole scan's final state (b, d, n), and the backward's extra residuals."""
  split = lambda v: v.reshape(spec.b // segments, segments, *v.shape[1:])
  h_local, dt_sum = _segment_states(spec, u, delta, A, B, bias)
  decay = jnp.exp(A * dt_sum[..., None])  # each segment's total decay (padded steps: dt = 0)
  h_in = _carried_states(split(decay), split(h_local), h0, spec.reverse)
  y, h_last, *h_chunks = _forward(spec, save, u, delta, A, B, C, D, z, bias,
                                  h_in.reshape(h_local.shape))
  return y, split(h_last)[:, 0 if spec.reverse else -1], (decay, *h_chunks)


def _split_scan_fwd(spec, segments, u, delta, A, B, C, D, z, bias, h0):
  y, h_last, (decay, h_chunks) = _split_forward(spec, segments, True, u, delta, A, B, C, D, z,
                                                bias, h0)
  return (y, h_last), ((u, delta, A, B, C, D, z, bias, h_chunks), decay)


def _split_scan_bwd(spec, segments, res, cotangents):
  res, decay = res
  dy, dh_last = cotangents
  return _cast_grads(res[:8], _segments_backward(spec, segments, res, dy, dh_last, decay))


def _segments_backward(spec, segments, res, dy, dh_last, decay=None):
  """``_backward`` on rows that are ``segments`` consecutive segments of each scan (backward
  steps 1-3 above): each segment's adjoint sweep from zero (light kernel), the adjoint leaving
  every segment (the carry over the segments), then the backward kernel once. ``decay``: each
  segment's total decay ``(rows, d, n)``; None: from the sums of dt the light kernel returns
  (the backward-only split, which ran no states kernel). The last gradient is the whole scan's
  ``dh0``, ``(rows / segments, d, n)``."""
  u, delta, A, B, C, D, z, bias, h_chunks = res
  dy = dy.astype(u.dtype)
  split = lambda v: v.reshape(spec.b // segments, segments, *v.shape[1:])
  if decay is None:
    mu_local, dt_sum = _segment_adjoints(spec, delta, A, C, dy, z, bias, with_dt_sum=True)
    decay = jnp.exp(A * dt_sum[..., None])
  else:
    mu_local = _segment_adjoints(spec, delta, A, C, dy, z, bias)
  dh_out = _carried_states(split(decay), split(mu_local), dh_last.astype(A.dtype),
                           not spec.reverse)
  *grads, dh0 = _backward(spec, res, dy, dh_out.reshape(mu_local.shape))
  return (*grads, split(dh0)[:, -1 if spec.reverse else 0])


_split_scan.defvjp(_split_scan_fwd, _split_scan_bwd)


def _carried_states(decay, h_local, h0, reverse: bool):
  """States entering each segment, ``(b, S, d, n)``: segment ``s`` (in scan order) maps an
  entering state ``h`` to ``decay[s] · h + h_local[s]``; the first one enters with ``h0``."""
  if reverse:  # scan order runs from the last segment to the first
    decay, h_local = decay[:, ::-1], h_local[:, ::-1]

  def compose(first, then):
    (a1, b1), (a2, b2) = first, then
    return a2 * a1, a2 * b1 + b2

  total_decay, total_local = lax.associative_scan(compose, (decay, h_local), axis=1)
  h_out = total_decay * h0[:, None] + total_local  # the state leaving each segment
  h_in = jnp.concatenate([h0[:, None], h_out[:, :-1]], axis=1)
  return h_in[:, ::-1] if reverse else h_in


def _identity_steps(l: int, config: PallasConfig, softplus: bool, delta_bias) -> int:
  """Steps that round ``l`` up to whole chunks, where padding is asked for and exact.

  A length that is not a multiple of ``chunk`` ends in a tail chunk that the kernels unroll
  step by step, which Triton can compile slowly (``PallasConfig.pad_min_length``). A padded
  step with ``dt = 0`` (``delta = -inf`` under softplus, or ``0`` without a bias) and
  ``u = B = C = 0`` leaves the state, the adjoint and every parameter gradient unchanged.
  Without softplus but with a bias no finite pad gives exactly ``dt = 0``: the tail stays.
  """
  if l < config.pad_min_length or (not softplus and delta_bias is not None):
    return 0
  return -l % config.chunk


def _pad_length(steps: int, reverse: bool, x, value=0.0):
  """``x (b, l, ...)`` padded with ``steps`` steps of ``value`` after the scan's last step (at
  the end, or at the start when ``reverse``); None stays None, and no steps no copy."""
  if x is None or steps == 0:
    return x
  where = (steps, 0) if reverse else (0, steps)
  return jnp.pad(x, [(0, 0), where] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def selective_scan_pallas(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, *, reverse=False, initial_state=None,
                          return_final_state=False, config: Optional[PallasConfig] = None):
  """``selective_scan(..., backend="pallas")`` with explicit kernel ``config`` (for sweeps).

  Same arguments, shapes and results as :func:`vidssm_jax.ops.selective_scan`.
  """
  return call_backend(functools.partial(pallas_backend, config=config), u, delta, A, B, C, D, z,
                      delta_bias, delta_softplus, reverse=reverse, initial_state=initial_state,
                      return_final_state=return_final_state)
