"""The selective scan as hand-written Triton kernels called through jax_triton: backend
``"triton"`` (GPU only).

The design is the one of mamba_ssm's CUDA kernel, parallel over time inside a chunk, where the
Pallas backend is sequential over time: one program per (batch row, group, block of
``block_d`` channels) walks the length in chunks of ``chunk`` steps; for each chunk it loads
``(chunk, block_d)`` tiles of u, delta, z (and dy), and for every state index ``n`` in turn
(a loop, not unrolled: the kernels stay small and compile in seconds) runs a parallel scan over
the chunk with ``tl.associative_scan`` on the affine maps ``h -> exp(dt A_n) h + dt u B_n``, the
chunk's carry-in state applied afterwards. The ``(block_d, n)`` state between chunks stays in
registers.

    forward   u, delta, z (b, l, d)  B, C (b, l, g, n)  A (d, n)  D, delta_bias (d,)  h0 (b, d, n)
              -> y (b, l, d) in u's dtype, h_last (b, d, n) float32
                 [+ h_chunks (b, num_chunks, d, n), the state before every chunk]
    backward  inputs, h_chunks, dy, dh_last
              -> du, ddelta, dz (b, l, d), dh0 (b, d, n), and partial sums of dB, dC (per
                 channel block of a group) and of dA, dD, d delta_bias (per batch row), summed
                 in XLA.

The backward walks chunks of ``bwd_chunk`` steps from last to first (``bwd_chunk`` divides the
forward's saving interval ``chunk``; a chunk's start state is the saved one advanced over the
earlier backward chunks of its saved chunk). It recomputes a chunk's states with the same scan, then
runs the adjoint ``lam_t = dy_t C_t + a_{t+1} lam_{t+1}`` as a reverse ``tl.associative_scan``
(``a_{t+1}`` from the delta tile loaded one row later); ``a_t h_{t-1}`` is ``h_t - dt_t u_t B_t``
so no shifted state is needed. A parallel scan does a few times the arithmetic of the sequential
walk (``log`` levels of shuffles per element), but spreads each chunk over ``chunk x block_d``
threads, so small batches still fill the GPU; ``"auto"`` takes whichever backend measures
faster (``selective_scan.py``).

``jax_triton`` and ``triton`` are imported on the first call only: ``jax_triton`` refuses to
import without a GPU jaxlib. ``triton_kernels()`` returns the ``@triton.jit`` kernels themselves,
for the offline compile check in ``vidssm_jax.bench.scan --compile-only``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from vidssm_jax.ops.selective_scan import call_backend

Array = jax.Array
_TARGET_PROGRAMS = 264  # two per SM of an H100: how many programs the channel block aims for


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Block shapes and launch parameters of the Triton kernels.

  Attributes:
    block_d: channels per program (a power of two); ``None`` picks the largest one in
      ``[min_block_d, 32]`` that still gives about two programs per SM.
    chunk: forward steps per tile (a power of two).
    bwd_chunk: backward steps per tile; must divide ``chunk`` (the saved states are per
      forward chunk; the backward restarts from them).
    num_warps, bwd_num_warps: warps per forward / backward program.
    num_stages: Triton software-pipelining depth.
    min_block_d: the smallest channel block ``None`` may pick.
    atomic_dbc: reduce dB and dC across channel blocks with float32 atomics (not
      deterministic) instead of per-block partials summed in XLA.
    zero_outputs: zero-fill every output before the kernel runs (jax_triton's
      ``zeroed_outputs``), for checks: an element the kernel fails to write then reads 0, far
      from the (random, nonzero) expected value. (A NaN fill would need aliased inputs, which
      jax_triton passes to the kernel as extra pointer parameters.)
  """
  block_d: Optional[int] = None
  chunk: int = 32
  bwd_chunk: int = 16
  num_warps: int = 1
  bwd_num_warps: int = 1
  num_stages: int = 2
  min_block_d: int = 4
  atomic_dbc: bool = False
  zero_outputs: bool = False

  def __post_init__(self):
    for name in ("block_d", "chunk", "bwd_chunk", "min_block_d"):
      v = getattr(self, name)
      if v is None and name == "block_d":
        continue
      if not isinstance(v, int) or v < 1 or v & (v - 1):
        raise ValueError(f"TritonConfig.{name} must be a power of two, got {v!r}")
    if self.chunk % self.bwd_chunk:
      raise ValueError(f"TritonConfig.bwd_chunk ({self.bwd_chunk}) must divide chunk "
                       f"({self.chunk})")


# Tuned on an H100 with `python -m vidssm_jax.bench.scan --sweep` at (8, 1568, 768, 16) float32:
# one warp per program took the forward+backward from 3.83 ms (4 warps) to 2.63 ms.
DEFAULT_CONFIG = TritonConfig()


def _pow2_at_least(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


def choose_block_d(b: int, d: int, g: int, config: TritonConfig) -> int:
  """Channels per program: a power of two dividing ``d // g`` (see ``TritonConfig.block_d``)."""
  dg = d // g
  largest = dg & -dg  # the largest power of two dividing the channels of a group
  if config.block_d is not None:
    return min(largest, config.block_d)
  block = min(largest, 32)
  while block > config.min_block_d and b * (d // block) < _TARGET_PROGRAMS:
    block //= 2
  return block


# --------------------------------------------------------------------------------------------
# The kernels (built on first use: importing triton is deferred)
# --------------------------------------------------------------------------------------------


@functools.cache
def triton_kernels():
  """Returns ``(forward_kernel, backward_kernel)``, the ``@triton.jit`` functions (importing
  triton on the first call)."""
  from vidssm_jax.ops import _triton_kernels
  return _triton_kernels.forward_kernel, _triton_kernels.backward_kernel


# --------------------------------------------------------------------------------------------
# Host side: kernel launches, custom_vjp, the backend entry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one kernel instance (hashable: a nondiff argument)."""
  b: int
  l: int
  d: int
  g: int
  n: int  # padded to a power of two
  block_d: int
  chunk: int
  bwd_chunk: int
  num_warps: int
  bwd_num_warps: int
  num_stages: int
  atomic_dbc: bool
  zero_outputs: bool
  has_D: bool
  has_z: bool
  has_bias: bool
  softplus: bool
  reverse: bool

  @property
  def grid(self):
    return (self.b, self.g, self.d // self.g // self.block_d)

  @property
  def num_chunks(self) -> int:
    return math.ceil(self.l / self.chunk)

  def constexprs(self):
    return dict(L=self.l, DIM=self.d, G=self.g, N=self.n, BLOCK_D=self.block_d,
                HAS_D=self.has_D, HAS_Z=self.has_z, HAS_BIAS=self.has_bias,
                SOFTPLUS=self.softplus, REVERSE=self.reverse)


def _jax_triton():
  try:
    import jax_triton
  except ImportError as e:  # also raised by jax_triton itself without a GPU jaxlib
    raise ValueError("selective_scan backend 'triton' needs jax_triton and a GPU jaxlib "
                     f"(pip install 'vidssm_jax[gpu]'): {e}") from e
  return jax_triton


def _placeholder():
  # A pointer the kernel never reads, for an absent optional input (D, z, delta_bias).
  return jnp.zeros((1,), jnp.float32)


def _forward(spec: _Spec, save: bool, u, delta, A, B, C, D, z, bias, h0):
  jt = _jax_triton()
  forward_kernel, _ = triton_kernels()
  b, l, d, n = spec.b, spec.l, spec.d, spec.n
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_shape = [jax.ShapeDtypeStruct((b, l, d), u.dtype), f32(b, d, n),
               f32(b, spec.num_chunks, d, n) if save else f32(1)]
  opt = lambda x: _placeholder() if x is None else x
  y, h_last, h_chunks = jt.triton_call(
      u, delta, A, B, C, opt(D), opt(z), opt(bias), h0,
      kernel=forward_kernel, out_shape=out_shape, grid=spec.grid, name="selective_scan_fwd",
      num_warps=spec.num_warps, num_stages=spec.num_stages,
      zeroed_outputs=tuple(range(len(out_shape))) if spec.zero_outputs else (),
      CHUNK=spec.chunk, SAVE=save,
      **spec.constexprs())
  return y, h_last, h_chunks


def _backward(spec: _Spec, res, dy, dh_last):
  jt = _jax_triton()
  _, backward_kernel = triton_kernels()
  u, delta, A, B, C, D, z, bias, h_chunks = res
  b, l, d, g, n = spec.b, spec.l, spec.d, spec.g, spec.n
  nblocks = d // g // spec.block_d
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  dbc = f32(b, l, g, n) if spec.atomic_dbc else f32(b, l, g, nblocks, n)
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct(delta.shape, delta.dtype),
               jax.ShapeDtypeStruct(z.shape, z.dtype) if z is not None else f32(1),
               dbc, dbc, f32(b, d, n), f32(b, d), f32(b, d), f32(b, d, n)]
  opt = lambda x: _placeholder() if x is None else x
  outs = jt.triton_call(
      u, delta, A, B, C, opt(D), opt(z), opt(bias), h_chunks, dy.astype(u.dtype),
      dh_last.astype(jnp.float32),
      kernel=backward_kernel, out_shape=out_shape, grid=spec.grid, name="selective_scan_bwd",
      num_warps=spec.bwd_num_warps, num_stages=spec.num_stages,
      zeroed_outputs=(tuple(range(len(out_shape))) if spec.zero_outputs
                      else (3, 4) if spec.atomic_dbc else ()),
      CHUNK=spec.bwd_chunk, SAVED_CHUNK=spec.chunk, ATOMIC_DBC=spec.atomic_dbc,
      **spec.constexprs())
  du, ddelta, dz, dB, dC, dA, dD, dbias, dh0 = outs
  if not spec.atomic_dbc:
    dB, dC = dB.sum(3), dC.sum(3)
  return (du, ddelta, dA.sum(0), dB, dC, dD.sum(0) if spec.has_D else None,
          dz if spec.has_z else None, dbias.sum(0) if spec.has_bias else None, dh0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_scan(spec, u, delta, A, B, C, D, z, bias, h0):
  y, h_last, _ = _forward(spec, False, u, delta, A, B, C, D, z, bias, h0)
  return y, h_last


def _fused_scan_fwd(spec, u, delta, A, B, C, D, z, bias, h0):
  y, h_last, h_chunks = _forward(spec, True, u, delta, A, B, C, D, z, bias, h0)
  return (y, h_last), (u, delta, A, B, C, D, z, bias, h_chunks)


def _fused_scan_bwd(spec, res, cotangents):
  dy, dh_last = cotangents
  du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = _backward(spec, res, dy, dh_last)
  u, delta, A, B, C, D, z, bias, _ = res
  cast = lambda g, x: None if x is None else g.astype(x.dtype)
  return (du, ddelta, cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), cast(dz, z),
          cast(dbias, bias), dh0)


_fused_scan.defvjp(_fused_scan_fwd, _fused_scan_bwd)


def make_spec(u, B, D, z, delta_bias, *, delta_softplus, reverse, config: TritonConfig) -> _Spec:
  """The static description of a call (shapes as in :func:`triton_backend`)."""
  b, l, d = u.shape
  g, n = B.shape[2], B.shape[3]
  return _Spec(
      b=b, l=l, d=d, g=g, n=_pow2_at_least(n), block_d=choose_block_d(b, d, g, config),
      chunk=config.chunk, bwd_chunk=config.bwd_chunk, num_warps=config.num_warps,
      bwd_num_warps=config.bwd_num_warps, num_stages=config.num_stages,
      atomic_dbc=config.atomic_dbc, zero_outputs=config.zero_outputs, has_D=D is not None,
      has_z=z is not None, has_bias=delta_bias is not None, softplus=bool(delta_softplus),
      reverse=bool(reverse))


def triton_backend(u, delta, A, B, C, D, z, delta_bias, h0, *, delta_softplus, reverse,
                   chunk_size=None, config: Optional[TritonConfig] = None):
  """The ``"triton"`` backend (contract in ``selective_scan.py``'s module docstring).

  Args:
    u, delta: ``(b, l, d)``; A: ``(d, n)``; B, C: ``(b, l, g, n)``; D, delta_bias: ``(d,)`` or
      None; z: ``(b, l, d)`` or None; h0: ``(b, d, n)`` float32.
    delta_softplus, reverse: as in ``selective_scan``.
    chunk_size: unused (the associative backend's knob); block shapes come from ``config``.
    config: block shapes and launch parameters; ``DEFAULT_CONFIG`` when None.

  Returns:
    ``y`` ``(b, l, d)`` in ``u``'s dtype and the last state ``(b, d, n)`` float32.
  """
  del chunk_size
  if h0.dtype != jnp.float32:
    raise ValueError(f"selective_scan backend 'triton' computes in float32; u has dtype "
                     f"{u.dtype} (use backend 'pallas' or 'associative' for float64)")
  config = config or DEFAULT_CONFIG
  spec = make_spec(u, B, D, z, delta_bias, delta_softplus=delta_softplus, reverse=reverse,
                   config=config)
  n = B.shape[3]
  if spec.n != n:  # zero columns of A, B, C: the padded states stay zero and add nothing
    pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, spec.n - n)])
    A, B, C, h0 = pad(A), pad(B), pad(C), pad(h0)
  vec = lambda x: None if x is None else x.astype(jnp.float32)
  y, h_last = _fused_scan(spec, u, delta, A.astype(jnp.float32), B, C, vec(D), z,
                          vec(delta_bias), h0)
  return y, h_last[..., :n]


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, *, reverse=False, initial_state=None,
                          return_final_state=False, config: Optional[TritonConfig] = None):
  """``selective_scan(..., backend="triton")`` with explicit kernel ``config`` (for sweeps).

  Same arguments, shapes and results as :func:`vidssm_jax.ops.selective_scan`.
  """
  return call_backend(functools.partial(triton_backend, config=config), u, delta, A, B, C, D, z,
                      delta_bias, delta_softplus, reverse=reverse, initial_state=initial_state,
                      return_final_state=return_final_state)
