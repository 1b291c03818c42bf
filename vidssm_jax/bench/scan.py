"""Selective-scan benchmark and check: every backend here, and PyTorch's mamba_ssm beside them.

    python -m vidssm_jax.bench.scan                  # speed table (GPU: the issue's four shapes)
    python -m vidssm_jax.bench.scan --check          # every backend vs a float64 NumPy oracle
    python -m vidssm_jax.bench.scan --sweep          # Pallas kernel variants at (8, 1568, 768, 16)
    python -m vidssm_jax.bench.scan --sweep-segments # the Pallas length split, per table shape
    python -m vidssm_jax.bench.scan --sweep-time-parallel  # the stream forward's block shapes
    python -m vidssm_jax.bench.scan --compile-only   # offline sm_90 compile of the Pallas kernels
                                                     # (CPU, needs the triton package's compiler)

Common flags: ``--shapes b,l,d,n ...``, ``--dtypes float32 bfloat16``, ``--backends ...``.

**Table.** For each shape (b, l, d, n) (on GPU the four generic shapes, then the scans the two
models run: ``GPU_SHAPES``; a fifth entry ``h0`` starts from a given state and runs forward
only, as a live stream does, timed per call over ``STREAM_CHAIN`` calls chained in one program,
and on the PyTorch side in one CUDA graph, since one call is shorter than the host's dispatch)
and dtype, every backend registered for the platform runs
on the same inputs (u, delta, z, B, C, A, D, delta_bias, softplus: the Mamba mixer's call) and
prints the median forward and forward+backward time (a VJP with a random cotangent) and the
fraction of the memory floor they reach: the bytes of the inputs read once plus the outputs
written once (forward+backward: also dy read, the inputs read again and their gradients
written), over the copy bandwidth measured in this process (a large jitted elementwise copy,
bytes read + written). On GPU, PyTorch's ``mamba_ssm`` ``selective_scan_fn`` runs on the same
inputs in the same process, timed with CUDA events: built by ``bench/mamba_ssm_build.py`` into
``$VIDSSM_MAMBA_BUILD`` (or importable as ``mamba_ssm``); when neither works, a pure-PyTorch
reference scan (mamba_ssm's ``selective_scan_ref``) is timed instead and labelled so. The
summary at the end gives, per shape and dtype, the faster of the fused Pallas columns
(``pallas``, ``pallas-s1``) against mamba_ssm and against the associative backend.

**Check.** On the current device, every backend's forward output, final state and gradients of
u, delta, A, B, C, D, z, delta_bias and initial_state against a float64 NumPy oracle (forward
and reverse-mode, written here), on fresh random inputs for the awkward cases of the tests
(lengths 1, 7, 257, 1000; groups 1 and 2; reverse; initial state; with and without D, z,
delta_bias); float32 within 1e-5 and bfloat16 within 2e-2 relative. The fused Pallas kernel
runs with its outputs pre-filled with NaN so a missed element shows.

**Sweep.** Times block-shape variants of the fused Pallas kernel (forward, forward+backward) at
(8, 1568, 768, 16) and prints the best: the numbers to put into its ``DEFAULT_CONFIG``. All
variants compile in parallel threads first.

**Compile only.** Lowers the default and sweep variants of the Pallas forward and backward
kernels (and the time-parallel forward's block shapes at a stream's scan) to Triton IR (Pallas'
GPU lowering) and compiles them for sm_90 with the ``triton`` package's compiler (no GPU
needed), then prints registers, spills and instruction counts per kernel: the cheap way to see
whether a block shape spills before spending GPU time (the time-parallel shapes that spill at
float32 were the slow ones of the H100 sweep: 64 steps of 4 channels on one warp, 21.6 us).

**Time-parallel sweep.** ``--sweep-time-parallel`` times a live stream's chained forward
(``TIME_PARALLEL_SHAPES``) with the serial walk and every time-parallel block shape: the data
behind ``PallasConfig.time_parallel``'s defaults and ``time_parallel_for``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import os
import re
import statistics
import subprocess
import sys
from typing import Optional
import time

import jax
import jax.numpy as jnp
import numpy as np

from vidssm_jax.ops.selective_scan import available_backends, selective_scan

CPU_SHAPES = [(2, 512, 256, 16), (1, 2048, 128, 16), (8, 197, 192, 16)]
# The GPU table: four generic shapes, then the scans the models run (a fifth entry "h0": the
# scan starts from a given state and runs forward only, as a live stream does).
GPU_SHAPES = [
    (8, 1568, 768, 16), (1, 3136, 768, 16), (32, 197, 768, 16), (4, 8192, 1536, 16),
    (1, 197, 768, 16, "h0"),   # EndoMamba-S streaming: one frame's 197 tokens on the state
    (128, 49, 768, 16),        # EndoMamba-S pretraining, spatial (8 clips x 16 frames, 49 kept)
    (8, 784, 768, 16),         # EndoMamba-S pretraining, temporal (16 frames x 49 tokens)
    (4, 13571, 384, 16),       # E-ViM3-p4 encoder (visible tokens + global tokens)
    (4, 33635, 384, 16),       # E-ViM3-p4 decoder (every token + global tokens)
    (8, 5553, 384, 16),        # E-ViM3-p8 encoder
]
SWEEP_SHAPE = (8, 1568, 768, 16)
SEGMENT_SWEEP = (1, 2, 4, 8, 16, 32, 64)  # --sweep-segments: PallasConfig.segments values
FUSED = ("pallas",)  # the fused-kernel backend (--sweep, --compile-only, the summary)
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
STREAM_CHAIN = 32  # scans per timed program in an "h0" row (``_chained_stream``)
_REFERENCE_MAX_ELEMENTS = 1 << 28  # b·l·d·n up to which the pure-PyTorch reference is timed


# --------------------------------------------------------------------------------------------
# Timing and the memory floor
# --------------------------------------------------------------------------------------------


def median_ms(fn, *args, warmup: int = 2, repeats: int = 10, inner: int = 1) -> float:
  """Median wall time of ``fn(*args)`` in ms, after warm-up, synchronising on the result.

  ``inner`` calls are issued back to back per sample (one synchronisation), which hides the
  host's dispatch time behind the device's work for short kernels.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / inner)
  return statistics.median(times)


def copy_bandwidth_gbs(num_bytes: Optional[int] = None) -> float:
  """Measured device copy bandwidth in GB/s, counting bytes read plus bytes written: a 1 GiB
  (CPU: 128 MiB) jitted elementwise copy, 10 back to back per sample (a single 0.3 ms copy measured only
  1.2 TB/s on an H100, where back-to-back copies reach the ~3 TB/s the card moves)."""
  num_bytes = num_bytes or (1 << 30 if jax.default_backend() == "gpu" else 1 << 27)
  x = jax.random.normal(jax.random.key(0), (num_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda a: a * 1.0001)
  ms = median_ms(copy, x, repeats=5, inner=10)
  return 2 * num_bytes / (ms * 1e-3) / 1e9


def make_inputs(b, l, d, n, dtype, seed=0):
  """The Mamba mixer's scan inputs, random (never zeros: they hide unwritten outputs)."""
  k = jax.random.split(jax.random.key(seed), 8)
  f = lambda key, shape, scale=1.0: (jax.random.normal(key, shape) * scale).astype(dtype)
  return dict(
      u=f(k[0], (b, l, d)), delta=f(k[1], (b, l, d), 0.5), z=f(k[2], (b, l, d)),
      B=f(k[3], (b, l, n)), C=f(k[4], (b, l, n)),
      A=-jnp.exp(jax.random.normal(k[5], (d, n)) * 0.5), D=jax.random.normal(k[6], (d,)),
      delta_bias=jax.random.normal(k[7], (d,)) * 0.1)


def with_initial_state(x, seed=0):
  """``x`` plus a random float32 initial state ``(b, d, n)``."""
  b, _, d = x["u"].shape
  n = x["A"].shape[1]
  h0 = jax.random.normal(jax.random.key(seed + 100), (b, d, n), jnp.float32)
  return {**x, "initial_state": h0}


def _split_shape(shape):
  """((b, l, d, n), has_initial_state) from a table entry."""
  return tuple(shape[:4]), len(shape) > 4 and shape[4] == "h0"


def floor_bytes(b, l, d, n, itemsize):
  """Bytes that must move: (forward, forward+backward).

  Forward reads u, delta, z (b·l·d each), B, C (b·l·n each) and writes y (b·l·d).
  Backward additionally reads dy and writes du, ddelta, dz, dB, dC (the same sizes as the
  inputs; it rereads the inputs too, which we count once more).
  """
  inputs = (3 * b * l * d + 2 * b * l * n) * itemsize
  y = b * l * d * itemsize
  forward = inputs + y
  return forward, forward + (y + inputs + inputs)


def _pallas_config(name: str):
  """The Pallas config behind a table column: the default, or ``pallas-s1``'s (no length split,
  forward or backward)."""
  from vidssm_jax.ops.selective_scan_pallas import DEFAULT_CONFIG
  return dataclasses.replace(DEFAULT_CONFIG, segments=1, bwd_segments=1) \
      if name == "pallas-s1" else DEFAULT_CONFIG


def _scan_fn(backend: str, config=None, final_state: bool = False):
  """``f(x) -> y`` (``final_state``: ``(y, h_last)``) for the mixer's call, through the public
  entry or a Pallas config.

  ``pallas-s1`` is the Pallas backend without the length split (``PallasConfig(segments=1)``),
  timed beside the default (split chosen by shape) so the table shows what the split buys.
  """
  if backend == "pallas-s1":
    backend, config = "pallas", _pallas_config(backend)
  if config is None:
    return lambda x: selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                    x["delta_bias"], delta_softplus=True, backend=backend,
                                    initial_state=x.get("initial_state"),
                                    return_final_state=final_state)
  from vidssm_jax.ops.selective_scan_pallas import selective_scan_pallas as entry
  return lambda x: entry(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                         x["delta_bias"], True, config=config,
                         initial_state=x.get("initial_state"), return_final_state=final_state)


def _chained_stream(fn, k: int = STREAM_CHAIN):
  """``k`` scans in one jitted program, each starting from the state the one before left (as
  a live stream's layers and frames chain them): timed and divided by ``k``, the device time
  of one call without the host's per-call dispatch, which at these sizes is longer than the
  kernel."""
  def run(x):
    h = x["initial_state"]
    for _ in range(k):  # unrolled: an XLA while loop would add a host round trip per step
      _, h = fn({**x, "initial_state": h})
    return h
  return jax.jit(run)


def _jitted_pair(fn, x):
  """(forward, forward+backward) jitted; the backward is a VJP with a random cotangent."""
  dy = jax.random.normal(jax.random.key(1), x["u"].shape, jnp.float32).astype(x["u"].dtype)

  def fwd_bwd(x, dy):
    y, vjp = jax.vjp(fn, x)
    return vjp(dy)[0]

  return jax.jit(fn), jax.jit(fwd_bwd), dy


def _compile_all(jobs, workers=None):
  """Lowers and compiles ``{key: (jitted, args)}`` in parallel threads; ``{key: compiled or
  the exception}``. XLA (and the Pallas kernels' Triton compile inside it) releases the GIL."""
  workers = workers or min(16, os.cpu_count() or 1)

  def build(item):
    key, (fn, args) = item
    try:
      return key, fn.lower(*args).compile()
    except Exception as e:  # a variant that does not compile is reported, not fatal
      return key, e

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return dict(pool.map(build, jobs.items()))


def _short_error(e: Exception) -> str:
  text = f"{type(e).__name__}: {e}".splitlines()[0]
  return text[:100]


# --------------------------------------------------------------------------------------------
# PyTorch peer: mamba_ssm's selective_scan_fn, or a pure-PyTorch reference
# --------------------------------------------------------------------------------------------


def _torch_reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False):
  """mamba_ssm's ``selective_scan_ref``: u, delta, z (b, d, l); B, C (b, n, l); A (d, n)."""
  import torch
  import torch.nn.functional as F
  dtype_in = u.dtype
  u, delta = u.float(), delta.float()
  if delta_bias is not None:
    delta = delta + delta_bias[..., None].float()
  if delta_softplus:
    delta = F.softplus(delta)
  delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
  delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B.float(), u)
  x, ys = A.new_zeros((u.shape[0], u.shape[1], A.shape[1])), []
  for i in range(u.shape[2]):
    x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
    ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i].float()))
  out = torch.stack(ys, dim=2)
  out = out if D is None else out + u * D[:, None]
  out = out if z is None else out * F.silu(z.float())
  return out.to(dtype_in)


def torch_peer():
  """``(selective_scan_fn, label)``: mamba_ssm's CUDA kernel if it can be loaded, else the
  pure-PyTorch reference; ``(None, reason)`` without PyTorch or CUDA."""
  try:
    import torch
  except ImportError:
    return None, "PyTorch not installed"
  if not torch.cuda.is_available():
    return None, "PyTorch sees no CUDA device"
  reasons = []
  build_dir = os.environ.get("VIDSSM_MAMBA_BUILD")
  if build_dir:
    try:
      from vidssm_jax.bench.mamba_ssm_build import load
      return load(build_dir), "mamba_ssm CUDA"
    except Exception as e:
      reasons.append(f"$VIDSSM_MAMBA_BUILD={build_dir}: {_short_error(e)}")
  try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    return selective_scan_fn, "mamba_ssm CUDA"
  except Exception as e:
    reasons.append(f"import mamba_ssm: {_short_error(e)}")
  print("mamba_ssm unavailable (" + "; ".join(reasons) + ")")
  return _torch_reference_scan, "torch reference (mamba_ssm not built)"


def torch_times(fn, x, dy, repeats=10, forward_only=False, chain=1):
  """(forward ms, forward+backward ms or None) of a PyTorch scan on the same inputs, timed with
  CUDA events. (mamba_ssm's selective_scan_fn takes no initial state: a row with one times the
  peer from zero, the same work but for reading one state.) ``chain`` > 1: the forward is
  ``chain`` calls captured in one CUDA graph, replayed and divided by ``chain`` (the device time
  of a call without the host's launch cost, as ``_chained_stream`` times ours); where capture
  fails, ``chain`` calls in a loop."""
  import torch
  to_t = lambda a, t=True: torch.from_numpy(np.ascontiguousarray(
      np.asarray(a.astype(jnp.float32)).transpose(0, 2, 1) if t else np.asarray(a, np.float32)
  )).cuda()
  dtype = torch.bfloat16 if x["u"].dtype == jnp.bfloat16 else torch.float32
  args = dict(u=to_t(x["u"]).to(dtype), delta=to_t(x["delta"]).to(dtype),
              A=to_t(x["A"], False), B=to_t(x["B"]).to(dtype), C=to_t(x["C"]).to(dtype),
              D=to_t(x["D"], False), z=to_t(x["z"]).to(dtype),
              delta_bias=to_t(x["delta_bias"], False))
  dout = to_t(dy).to(dtype)
  for a in args.values():
    a.requires_grad_(True)
  leaves = list(args.values())
  fwd = lambda: fn(**args, delta_softplus=True)
  fwd_bwd = lambda: torch.autograd.grad(fwd(), leaves, dout)

  def median(f):
    for _ in range(2):
      f()
    times = []
    for _ in range(repeats):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      f()
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end))
    return statistics.median(times)

  with torch.no_grad():
    f_ms = median(fwd) if chain == 1 else median(_torch_chain(fwd, chain)) / chain
  return f_ms, None if forward_only else median(fwd_bwd)


def _torch_chain(fn, k):
  """A callable running ``fn`` ``k`` times: one CUDA graph replay, or a plain loop where the
  graph cannot be captured."""
  import torch
  try:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture requires
      for _ in range(3):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
      for _ in range(k):
        fn()
    return graph.replay
  except Exception as e:
    print(f"CUDA graph capture failed ({_short_error(e)}); timing {k} calls in a loop")
    return lambda: [fn() for _ in range(k)]


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def run_table(shapes, dtypes, backends, *, with_torch: bool):
  bandwidth = copy_bandwidth_gbs()
  peer, peer_label = torch_peer() if with_torch else (None, "skipped (no GPU, or --no-torch)")
  print(f"memory floor uses the copy bandwidth measured here: {bandwidth:.1f} GB/s "
        "(bytes read + written by a large jitted elementwise copy)")
  print(f"PyTorch peer: {peer_label}")
  # Every program compiles first, in parallel; then each is timed alone.
  inputs, jobs = {}, {}
  for dtype in dtypes:
    for shape in shapes:
      dims, h0 = _split_shape(shape)
      x = make_inputs(*dims, dtype)
      x = with_initial_state(x) if h0 else x
      for backend in backends:
        fwd, fb, dy = _jitted_pair(_scan_fn(backend), x)
        if h0:  # a stream runs forward only, chained from state to state
          fwd = _chained_stream(_scan_fn(backend, final_state=True))
        jobs[(shape, dtype, backend, "f")] = (fwd, (x,))
        if not h0:
          jobs[(shape, dtype, backend, "fb")] = (fb, (x, dy))
      inputs[(shape, dtype)] = (x, dy)
  start = time.perf_counter()
  compiled = _compile_all(jobs)
  print(f"{len(jobs)} programs compiled in {time.perf_counter() - start:.0f} s")
  inner = 10 if jax.default_backend() == "gpu" else 1
  results = {}  # (shape, dtype, backend) -> (fwd ms, fb ms) or an error string
  for dtype in dtypes:
    for shape in shapes:
      x, dy = inputs[(shape, dtype)]
      forward_only = _split_shape(shape)[1]
      for backend in backends:
        f = compiled[(shape, dtype, backend, "f")]
        fb = None if forward_only else compiled[(shape, dtype, backend, "fb")]
        if isinstance(f, Exception) or isinstance(fb, Exception):
          results[(shape, dtype, backend)] = _short_error(f if isinstance(f, Exception) else fb)
          continue
        chain = STREAM_CHAIN if forward_only else 1
        results[(shape, dtype, backend)] = (
            median_ms(f, x, inner=inner) / chain,
            None if fb is None else median_ms(fb, x, dy, inner=inner))
      if peer is not None:
        if peer is _torch_reference_scan and math.prod(shape[:4]) > _REFERENCE_MAX_ELEMENTS:
          # Its (b, d, l, n) intermediates and Python loop over l take minutes and gigabytes.
          results[(shape, dtype, "torch")] = "skipped: too large for the pure-PyTorch reference"
        else:
          try:
            results[(shape, dtype, "torch")] = torch_times(
                peer, x, dy, repeats=3 if peer is _torch_reference_scan else 10,
                forward_only=forward_only, chain=STREAM_CHAIN if forward_only else 1)
          except Exception as e:
            results[(shape, dtype, "torch")] = _short_error(e)
      _print_rows(shape, dtype, backends + (["torch"] if peer else []), results, bandwidth,
                  peer_label)
  _print_summary(shapes, dtypes, backends, results, peer_label)


def _print_rows(shape, dtype, names, results, bandwidth, peer_label):
  (b, l, d, n), _ = _split_shape(shape)
  fwd_bytes, fb_bytes = floor_bytes(b, l, d, n, jnp.dtype(dtype).itemsize)
  floor = lambda nbytes: nbytes / (bandwidth * 1e9) * 1e3
  print(f"\n{str(shape):<22} {jnp.dtype(dtype).name}: floor fwd {floor(fwd_bytes):.4f} ms, "
        f"fwd+bwd {floor(fb_bytes):.4f} ms")
  print(f"  {'backend':<40} {'fwd ms':>9} {'fwd %floor':>10} {'f+b ms':>9} {'f+b %floor':>10}")
  for name in names:
    r = results.get((shape, dtype, name))
    label = peer_label if name == "torch" else name
    if name in ("pallas", "pallas-s1"):
      from vidssm_jax.ops.selective_scan_pallas import segments_for
      label = f"{name} (segments {segments_for(b, l, d, _pallas_config(name), dtype)})"
    if isinstance(r, str):
      print(f"  {label:<40} failed: {r}")
    elif r is not None:
      f_ms, fb_ms = r
      backward = (f"{'-':>9} {'-':>10}" if fb_ms is None else
                  f"{fb_ms:9.3f} {100 * floor(fb_bytes) / fb_ms:9.1f}%")
      print(f"  {label:<40} {f_ms:9.3f} {100 * floor(fwd_bytes) / f_ms:9.1f}% {backward}",
            flush=True)


def _print_summary(shapes, dtypes, backends, results, peer_label):
  fused = [b for b in backends if b in FUSED + ("pallas-s1",)]
  if not fused:
    return
  print(f"\nsummary: best fused column vs {peer_label} and vs associative (ratios < 1: ours "
        "faster)")
  print(f"  {'shape':<22} {'dtype':<9} {'fwd':>16} {'f+b':>16} {'/torch f':>9} "
        f"{'/torch fb':>9} {'/assoc f':>9} {'/assoc fb':>9}")
  for dtype in dtypes:
    for shape in shapes:
      times = {b: results.get((shape, dtype, b)) for b in fused}
      times = {b: t for b, t in times.items() if isinstance(t, tuple)}
      if not times:
        continue
      bf = min(times, key=lambda b: times[b][0])
      bfb = min(times, key=lambda b: times[b][1] or 0.0)
      f, fb = times[bf][0], times[bfb][1]
      ratio = lambda a, ref: (f"{a / ref:9.2f}" if isinstance(ref, (int, float)) and a is not None
                              else f"{'-':>9}")
      peer = results.get((shape, dtype, "torch"))
      assoc = results.get((shape, dtype, "associative"))
      peer = peer if isinstance(peer, tuple) else (None, None)
      assoc = assoc if isinstance(assoc, tuple) else (None, None)
      fb_text = f"{'-':>7} {'':<8}" if fb is None else f"{fb:7.3f} {bfb:<8}"
      print(f"  {str(shape):<22} {jnp.dtype(dtype).name:<9} {f:7.3f} {bf:<8} {fb_text} "
            f"{ratio(f, peer[0])} {ratio(fb, peer[1])} {ratio(f, assoc[0])} "
            f"{ratio(fb, assoc[1])}")


# --------------------------------------------------------------------------------------------
# The check: a float64 NumPy oracle, forward and reverse mode
# --------------------------------------------------------------------------------------------


def numpy_scan_and_vjp(x, *, reverse, dy, dh):
  """y, h_last and the gradients of <y, dy> + <h_last, dh>, in float64 (softplus on).

  ``x``: dict of the public entry's arguments (B, C with or without the group axis).
  """
  f64 = lambda k: None if x.get(k) is None else np.asarray(x[k], np.float64)
  u, delta, A, B, C, D, z, bias, h0 = map(f64, GRAD_NAMES)
  b, l, d = u.shape
  n = A.shape[1]
  B4, C4 = (B[:, :, None], C[:, :, None]) if B.ndim == 3 else (B, C)
  g = B4.shape[2]
  group = np.arange(d) // (d // g)
  pre = delta + (0 if bias is None else bias)
  dt = np.logaddexp(pre, 0.0)
  order = list(range(l - 1, -1, -1)) if reverse else list(range(l))
  h = np.zeros((b, d, n)) if h0 is None else h0.copy()
  before, after, y_scan = {}, {}, np.zeros((b, l, d))
  for t in order:
    before[t] = h
    h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B4[:, t][:, group]
    after[t] = h
    y_scan[:, t] = np.sum(h * C4[:, t][:, group], -1)
  y_pre = y_scan + (0 if D is None else u * D)
  y = y_pre if z is None else y_pre * z / (1 + np.exp(-z))
  h_last = h
  grads = {}
  dy = np.asarray(dy, np.float64)
  if z is not None:
    sz = 1 / (1 + np.exp(-z))
    grads["z"] = dy * y_pre * sz * (1 + z * (1 - sz))
    dy = dy * z * sz
  du = np.zeros_like(u) if D is None else dy * D
  ddt = np.zeros_like(u)
  dA, dB4, dC4 = np.zeros_like(A), np.zeros_like(B4), np.zeros_like(C4)
  lam = np.asarray(dh, np.float64).copy()
  for t in reversed(order):
    Bt, Ct = B4[:, t][:, group], C4[:, t][:, group]
    lam = lam + dy[:, t, :, None] * Ct
    a = np.exp(dt[:, t, :, None] * A)
    da = lam * before[t] * a
    ddt[:, t] = np.sum(da * A, -1) + np.sum(lam * Bt, -1) * u[:, t]
    du[:, t] += np.sum(lam * Bt, -1) * dt[:, t]
    dA += np.sum(da * dt[:, t, :, None], 0)
    for gi in range(g):
      chans = group == gi
      dB4[:, t, gi] = np.sum(lam[:, chans] * (dt[:, t] * u[:, t])[:, chans, None], 1)
      dC4[:, t, gi] = np.sum(after[t][:, chans] * dy[:, t, chans, None], 1)
    lam = a * lam
  ddelta = ddt / (1 + np.exp(-pre))
  grads.update(u=du, delta=ddelta, A=dA, B=dB4.reshape(B.shape), C=dC4.reshape(C.shape))
  if D is not None:
    grads["D"] = np.sum(dy * u, (0, 1))
  if bias is not None:
    grads["delta_bias"] = np.sum(ddelta, (0, 1))
  if h0 is not None:
    grads["initial_state"] = lam
  return y, h_last, grads


# (length, groups, reverse, initial state, D / z / delta_bias), as in the tests.
CHECK_CASES = [(1, 1, False, False, True), (1, 2, True, True, True), (7, 1, False, True, False),
               (7, 2, True, False, True), (257, 1, True, True, True), (257, 2, False, False, False),
               (1000, 1, False, True, True), (1000, 2, True, True, True)]
# bfloat16: reverse cases, and one forward from a state (a live stream's time-parallel forward).
BF16_CHECK_CASES = [CHECK_CASES[1], CHECK_CASES[4], CHECK_CASES[7], (197, 2, False, True, True)]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def _case_name(case, n):
  l, g, reverse, h0, extras = case
  return f"l{l}-g{g}-n{n}" + ("-rev" if reverse else "") + ("-h0" if h0 else "") + (
      "-DzB" if extras else "")


def _check_inputs(case, n, d, dtype, seed):
  l, g, reverse, h0, extras = case
  rng = np.random.default_rng(seed)
  b = 2
  x = dict(u=rng.normal(size=(b, l, d)), delta=rng.normal(size=(b, l, d)) * 0.5 - 1.0,
           A=-np.exp(rng.normal(size=(d, n)) * 0.5), B=rng.normal(size=(b, l, g, n)),
           C=rng.normal(size=(b, l, g, n)))
  if g == 1 and seed % 2:  # also the (b, l, n) form of B and C
    x["B"], x["C"] = x["B"][:, :, 0], x["C"][:, :, 0]
  if extras:
    x.update(D=rng.normal(size=(d,)), z=rng.normal(size=(b, l, d)),
             delta_bias=rng.normal(size=(d,)) * 0.3)
  if h0:
    x["initial_state"] = rng.normal(size=(b, d, n))
  x = {k: jnp.asarray(v, dtype) for k, v in x.items()}
  dy = jnp.asarray(rng.normal(size=(b, l, d)), dtype)
  dh = jnp.asarray(rng.normal(size=(b, d, n)), jnp.float32)
  return x, dy, dh


def _check_fn(backend, names, reverse):
  """jit-able f(args, dy, dh) -> (y, h, grads) through the backend (Pallas: outputs prefilled
  with NaN)."""
  if backend == "pallas":
    from vidssm_jax.ops import selective_scan_pallas as m
    config = dataclasses.replace(m.DEFAULT_CONFIG, poison_outputs=True)
    scan = lambda **kw: m.selective_scan_pallas(**kw, config=config)
  else:
    scan = lambda **kw: selective_scan(**kw, backend=backend)

  def run(args, dy, dh):
    f = lambda *a: scan(**dict(zip(names, a)), delta_softplus=True, reverse=reverse,
                        return_final_state=True)
    (y, h), vjp = jax.vjp(f, *args)
    # The undifferentiated forward runs its own kernel (``PallasConfig.time_parallel``).
    y_alone, h_alone = f(*args)
    return y, h, vjp((dy, dh)), y_alone, h_alone

  return jax.jit(run)


def run_check(backends, dtypes, *, d=64, seed=0, cases=None):
  """Prints one row per (backend, dtype, case) and a PASS/FAIL summary; returns #failures."""
  print(f"check: every backend vs a float64 NumPy oracle: y, h_last and the gradients of "
        f"{', '.join(GRAD_NAMES)}; batch 2, {d} channels; tolerance "
        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items()) + " (relative)")
  jobs, inputs = {}, {}
  for bi, backend in enumerate(backends):
    for dtype in dtypes:
      name = jnp.dtype(dtype).name
      default = CHECK_CASES if name == "float32" else BF16_CHECK_CASES
      for ci, case in enumerate(cases or default):
        n = 16 if ci % 2 else 5  # the real state size, and one that needs padding
        key = (backend, name, _case_name(case, n))
        x, dy, dh = _check_inputs(case, n, d, dtype, seed + 1000 * bi + 10 * ci + len(name))
        names = [k for k in GRAD_NAMES if k in x]
        args = [x[k] for k in names]
        jobs[key] = (_check_fn(backend, names, case[2]), (args, dy, dh))
        inputs[key] = (x, names, dy, dh, case[2])
  compiled = _compile_all(jobs)
  print(f"{'backend':<12} {'dtype':<9} {'case':<26} {'worst rel err':>14} {'(output)':<16} result")
  failures = []
  for key, fn in compiled.items():
    x, names, dy, dh, reverse = inputs[key]
    tol = TOLERANCE[key[1]]
    if isinstance(fn, Exception):
      worst, what = math.inf, _short_error(fn)
    else:
      y, h, grads, y_alone, h_alone = fn(*jobs[key][1])
      ref_y, ref_h, ref_grads = numpy_scan_and_vjp(x, reverse=reverse, dy=dy, dh=dh)
      errs = {"y": _rel_err(y, ref_y), "h_last": _rel_err(h, ref_h),
              "y (no grad)": _rel_err(y_alone, ref_y), "h (no grad)": _rel_err(h_alone, ref_h)}
      errs.update({f"d{k}": _rel_err(g, ref_grads[k]) for k, g in zip(names, grads)})
      what = max(errs, key=errs.get)
      worst = errs[what]
    ok = worst <= tol
    if not ok:
      failures.append(key)
    print(f"{key[0]:<12} {key[1]:<9} {key[2]:<26} {worst:14.2e} {'(' + what + ')':<16} "
          f"{'PASS' if ok else 'FAIL'}")
  for key in failures:
    print("FAIL:", *key)
  print(f"summary: {len(compiled) - len(failures)}/{len(compiled)} PASS on "
        f"{jax.devices()[0].device_kind} ({', '.join(backends)})")
  return len(failures)


def _rel_err(actual, expected) -> float:
  """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere counts as infinite.

  An expected value that is exactly zero (dA of a length-1 scan from a zero state: there is no
  earlier state to decay) is compared in absolute terms, ‖actual‖: float32 rounding leaves
  ~1e-7 there, which a relative error would blow up to ~1e23.
  """
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  if a.shape != e.shape or not np.all(np.isfinite(a)):
    return math.inf
  norm = np.linalg.norm(e)
  return float(np.linalg.norm(a - e) / norm) if norm > 0 else float(np.linalg.norm(a))


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def sweep_variants():
  """(label, config) pairs of the Pallas kernel: the default first, then a handful around it."""
  from vidssm_jax.ops.selective_scan_pallas import DEFAULT_CONFIG as base
  changes = [dict(), dict(block_d=32, num_warps=4), dict(block_d=64, num_warps=4),
             dict(block_d=16, num_warps=1), dict(block_d=16, num_warps=2),
             dict(block_d=8, num_warps=1), dict(block_d=4, num_warps=1),
             dict(block_d=2, num_warps=1), dict(chunk=4), dict(chunk=16), dict(bwd_block_d=4),
             dict(bwd_block_d=16, bwd_num_warps=2),
             dict(prefetch=False), dict(bwd_block_d=32, bwd_num_warps=4),
             dict(bwd_recompute_decay=False),
             dict(atomic_dbc=True), dict(bwd_block_d=8, atomic_dbc=True),
             dict(bwd_fast_math=False), dict(gate_in_kernel=True),
             dict(gate_in_kernel=True, bwd_fast_math=False), dict(bc_float32=True)]
  out = []
  for change in changes:
    label = ",".join(f"{k}={v}" for k, v in change.items()) or "default"
    out.append((label, dataclasses.replace(base, **change)))
  return out


# The config fields the forward kernel depends on: variants equal in these share its timing.
_FORWARD_FIELDS = ("block_d", "num_warps", "chunk", "prefetch", "num_stages", "gate_in_kernel",
                   "bc_float32")


def run_sweep(backends, dtypes, shape=SWEEP_SHAPE):
  for dtype in dtypes:
    x = make_inputs(*shape, dtype)
    jobs, forward_of = {}, {}
    for backend in [b for b in backends if b in FUSED]:
      seen = {}
      for label, config in sweep_variants():
        fwd, fb, dy = _jitted_pair(_scan_fn(backend, config), x)
        fields = tuple(getattr(config, f) for f in _FORWARD_FIELDS)
        forward_of[(backend, label)] = seen.setdefault(fields, label)
        if forward_of[(backend, label)] == label:  # a forward not timed yet
          jobs[(backend, label, "f")] = (fwd, (x,))
        jobs[(backend, label, "fb")] = (fb, (x, dy))
    start = time.perf_counter()
    compiled = _compile_all(jobs)
    print(f"\nsweep at {shape} {jnp.dtype(dtype).name}: {len(jobs)} programs compiled in "
          f"{time.perf_counter() - start:.0f} s (a variant that changes only the backward "
          "shares the forward time of the first variant with the same forward)")
    print(f"  {'backend':<8} {'variant':<44} {'fwd ms':>9} {'f+b ms':>9}")
    times, best = {}, {}
    for (backend, label), fwd_label in forward_of.items():
      for mode in ("f", "fb"):
        key = (backend, fwd_label if mode == "f" else label, mode)
        if key not in times:
          fn = compiled[key]
          times[key] = (_short_error(fn) if isinstance(fn, Exception)
                        else median_ms(fn, *jobs[key][1], inner=10))
      row = [times[(backend, fwd_label, "f")], times[(backend, label, "fb")]]
      print(f"  {backend:<8} {label:<44} " + " ".join(
          f"{v:9.3f}" if isinstance(v, float) else f"failed: {v}" for v in row))
      for value, mode_name in zip(row, ("fwd", "f+b")):
        if isinstance(value, float) and value < best.get((backend, mode_name), (math.inf,))[0]:
          best[(backend, mode_name)] = (value, label)
    for (backend, mode_name), (ms, label) in sorted(best.items()):
      print(f"  best {backend} {mode_name}: {ms:.3f} ms with {label}")


def run_segment_sweep(shapes, dtypes, values=SEGMENT_SWEEP, backward_only: bool = False):
  """Times the Pallas backend at every ``PallasConfig.segments`` in ``values`` per shape; marks
  the automatic choice (``segments_for``) and the fastest: the data behind ``_SPLIT_PROGRAMS``.
  ``backward_only``: the forward unsplit and ``PallasConfig.bwd_segments`` at each value
  instead (forward + backward only; ``backward_segments_for``'s data)."""
  from vidssm_jax.ops.selective_scan_pallas import (DEFAULT_CONFIG, backward_segments_for,
                                                    segments_for)
  field = "bwd_segments" if backward_only else "segments"
  for dtype in dtypes:
    jobs, inputs = {}, {}
    for shape in shapes:
      dims, h0 = _split_shape(shape)
      x = make_inputs(*dims, dtype)
      x = with_initial_state(x) if h0 else x
      for value in values:
        if dims[1] // value < DEFAULT_CONFIG.chunk:
          continue
        config = dataclasses.replace(DEFAULT_CONFIG, **{field: value},
                                     **({"segments": 1} if backward_only else {}))
        fwd, fb, dy = _jitted_pair(_scan_fn("pallas", config), x)
        if not backward_only:
          jobs[(shape, value, "f")] = (fwd, (x,))
        if not h0:
          jobs[(shape, value, "fb")] = (fb, (x, dy))
    start = time.perf_counter()
    compiled = _compile_all(jobs)
    print(f"\n{field} sweep, {jnp.dtype(dtype).name}: {len(jobs)} programs compiled in "
          f"{time.perf_counter() - start:.0f} s; ms (* automatic choice, < fastest)", flush=True)
    for shape in shapes:
      dims, _ = _split_shape(shape)
      auto = (backward_segments_for(*dims[:3], DEFAULT_CONFIG) if backward_only
              else segments_for(*dims[:3], DEFAULT_CONFIG, dtype))
      row = {}
      for (s_, value, mode), fn in compiled.items():
        if s_ == shape:
          row[(value, mode)] = (_short_error(fn) if isinstance(fn, Exception)
                                else median_ms(fn, *jobs[(s_, value, mode)][1], inner=10))
      for mode in ("f", "fb"):
        cells = {v: t for (v, m), t in row.items() if m == mode}
        if not cells:
          continue
        numbers = {v: t for v, t in cells.items() if isinstance(t, float)}
        best = min(numbers, key=numbers.get) if numbers else None
        text = " ".join(
            f"{v}{'*' if v == auto else ''}{'<' if v == best else ''}:"
            + (f"{t:.3f}" if isinstance(t, float) else "failed") for v, t in sorted(cells.items()))
        print(f"  {str(shape):<26} {'fwd' if mode == 'f' else 'f+b':<4} {text}", flush=True)


TIME_PARALLEL_SHAPES = [(1, 197, 768, 16, "h0"), (1, 197, 1536, 16, "h0"),
                        (4, 197, 1536, 16, "h0"), (16, 197, 768, 16, "h0")]


def time_parallel_variants():
  """(label, config): the serial walk, then the time-parallel forward's block shapes."""
  from vidssm_jax.ops.selective_scan_pallas import DEFAULT_CONFIG as base
  out = [("walk", dataclasses.replace(base, time_parallel=False))]
  for t in (16, 32, 64):
    for bd, warps in ((2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4), (16, 8), (32, 8)):
      config = dataclasses.replace(base, time_parallel=True, tp_block_t=t, tp_block_d=bd,
                                   tp_num_warps=warps)
      out.append((f"tp t={t} d={bd} w={warps}", config))
  return out


def run_time_parallel_sweep(shapes, dtypes):
  """Times a live stream's chained forward (``_chained_stream``) with the serial walk and every
  time-parallel block shape: the data behind ``PallasConfig.time_parallel``'s defaults."""
  from vidssm_jax.ops.selective_scan_pallas import DEFAULT_CONFIG, time_parallel_for
  for dtype in dtypes:
    jobs = {}
    for shape in shapes:
      dims, _ = _split_shape(shape)
      x = with_initial_state(make_inputs(*dims, dtype))
      for label, config in time_parallel_variants():
        jobs[(shape, label)] = (_chained_stream(_scan_fn("pallas", config, final_state=True)),
                                (x,))
    start = time.perf_counter()
    compiled = _compile_all(jobs)
    print(f"\ntime-parallel sweep, {jnp.dtype(dtype).name}: {len(jobs)} programs compiled in "
          f"{time.perf_counter() - start:.0f} s; us per scan, {STREAM_CHAIN} chained",
          flush=True)
    for shape in shapes:
      dims, _ = _split_shape(shape)
      auto = time_parallel_for(dims[0], dims[2], False, DEFAULT_CONFIG)
      times = {}
      for (s_, label), fn in compiled.items():
        if s_ == shape:
          times[label] = (_short_error(fn) if isinstance(fn, Exception) else
                          1e3 * median_ms(fn, *jobs[(s_, label)][1], inner=10) / STREAM_CHAIN)
          value = times[label]
          print(f"  {str(shape):<26} {label:<22} "
                + (f"{value:8.1f}" if isinstance(value, float) else f"failed: {value}"),
                flush=True)
      numbers = {k: v for k, v in times.items() if isinstance(v, float)}
      if numbers:
        best = min(numbers, key=numbers.get)
        print(f"  {str(shape):<26} best {best} {numbers[best]:.1f} us; walk "
              f"{numbers.get('walk', math.nan):.1f} us; automatic: "
              f"{'time-parallel' if auto else 'walk'}", flush=True)


# --------------------------------------------------------------------------------------------
# Offline compile for sm_90 (no GPU): registers, spills, instruction counts
# --------------------------------------------------------------------------------------------


def _ptx_stats(ptx: str) -> dict:
  import triton
  ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
  with open("/tmp/_vidssm_scan.ptx", "w") as f:
    f.write(ptx)
  report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", "/tmp/_vidssm_scan.ptx", "-o",
                           "/tmp/_vidssm_scan.cubin"], capture_output=True, text=True).stderr
  num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else -1
  return dict(regs=num(r"Used (\d+) registers"), spill=num(r"(\d+) bytes spill stores"),
              ex2=ptx.count("ex2.approx"), shfl=ptx.count("shfl.sync"),
              bar=ptx.count("bar.sync"), lines=ptx.count("\n"))


def _compile_ttir(text: str, num_warps: int, num_stages: int) -> dict:
  import tempfile
  import triton
  from triton.backends.compiler import GPUTarget
  with tempfile.NamedTemporaryFile("w", suffix=".ttir", delete=False) as f:
    f.write(text)
  kernel = triton.compile(f.name, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
  return _ptx_stats(kernel.asm["ptx"])


def pallas_ttir(config, shape, dtype=jnp.float32, grad: bool = True):
  """The Triton IR of the Pallas forward and backward kernels for ``shape``, lowered for CUDA
  on this machine (jax.export), as ``[(name, text)]``; ``grad=False``: the undifferentiated
  forward alone (the time-parallel kernel where ``config`` picks it). Uses a private hook of
  jax's Pallas Triton lowering to read the IR text; fails loudly if that hook moves."""
  from jax._src.pallas.triton import lowering
  from vidssm_jax.ops.selective_scan_pallas import selective_scan_pallas
  captured = []
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  b, l, d, n = shape
  config = dataclasses.replace(config, interpret=False)
  S = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  args = (S(b, l, d), S(b, l, d), S(d, n), S(b, l, n), S(b, l, n), S(d), S(b, l, d), S(d))

  def loss(*a):
    return jnp.sum(selective_scan_pallas(*a, True, config=config).astype(jnp.float32))

  lowering.lower_jaxpr_to_triton_module = capture
  try:
    jax.export.export(
        jax.jit(jax.grad(loss, tuple(range(8))) if grad else loss), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)
  finally:
    lowering.lower_jaxpr_to_triton_module = original
  return list(zip(["fwd", "bwd"], captured))


def run_compile_only(backends, shape=SWEEP_SHAPE):
  from vidssm_jax.ops.selective_scan_pallas import forward_block
  print(f"offline sm_90 compile at {shape} float32 (triton's ptxas): registers per thread, "
        "spill bytes, and ex2 / shfl / bar.sync counts in the PTX")
  print(f"  {'backend':<8} {'variant':<40} {'kernel':<4} {'regs':>5} {'spill':>6} {'ex2':>5} "
        f"{'shfl':>6} {'bar':>5} {'ptx lines':>9}")
  for backend in [b for b in backends if b in FUSED]:
    for label, config in sweep_variants():
      try:
        fwd_warps = forward_block(shape[0], shape[2], 1, shape[3], config)[1]
        stats = [(name, _compile_ttir(text, warps, config.num_stages))
                 for (name, text), warps in zip(pallas_ttir(config, shape),
                                                (fwd_warps, config.bwd_num_warps))]
      except Exception as e:
        print(f"  {backend:<8} {label:<40} failed: {_short_error(e)}")
        continue
      for name, s in stats:
        _print_compiled(backend, label, name, s)
  _compile_time_parallel(TIME_PARALLEL_SHAPES[0][:4])


def _print_compiled(backend: str, label: str, kernel: str, s: dict) -> None:
  print(f"  {backend:<8} {label:<40} {kernel:<4} {s['regs']:5d} {s['spill']:6d} "
        f"{s['ex2']:5d} {s['shfl']:6d} {s['bar']:5d} {s['lines']:9d}")


def _compile_time_parallel(shape):
  """The time-parallel forward's block shapes (``time_parallel_variants``) compiled offline."""
  from vidssm_jax.ops.selective_scan_pallas import _make_spec
  b, l, d, n = shape
  print(f"the time-parallel forward at {shape} float32, no gradient")
  for label, config in time_parallel_variants()[1:]:
    try:
      warps = _make_spec(config, b, l, d, 1, n, 1, 1, 1, True, False).tp_warps
      (_, text), = pallas_ttir(config, shape, grad=False)
      s = _compile_ttir(text, warps, config.num_stages)
    except Exception as e:
      print(f"  {'pallas':<8} {label:<40} failed: {_short_error(e)}")
      continue
    _print_compiled("pallas", label, "fwd", s)


# --------------------------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--check", action="store_true", help="compare every backend to the oracle")
  mode.add_argument("--sweep", action="store_true",
                    help="time block-shape variants of the Pallas kernel")
  mode.add_argument("--sweep-segments", action="store_true",
                    help="time the Pallas length split (PallasConfig.segments) per shape")
  mode.add_argument("--sweep-time-parallel", action="store_true",
                    help="time the time-parallel forward's block shapes on stream scans")
  mode.add_argument("--compile-only", action="store_true",
                    help="compile the Pallas kernels for sm_90 offline (needs the triton "
                         "package's compiler, no GPU)")
  parser.add_argument("--shapes", nargs="*", default=None,
                      help="b,l,d,n tuples; default depends on the platform and mode")
  parser.add_argument("--dtypes", nargs="*", default=None, choices=["float32", "bfloat16"],
                      help="default: both (the check and table), float32 (the sweep)")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="one dtype (same as --dtypes X)")
  parser.add_argument("--backends", nargs="*", default=None,
                      help="default: every backend here (the table leaves out 'reference' "
                           "on GPU, where it takes minutes at these shapes)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer column")
  parser.add_argument("--backward-only", action="store_true",
                      help="--sweep-segments: split the backward alone (bwd_segments)")
  parser.add_argument("--segments", nargs="*", type=int, default=None,
                      help=f"--sweep-segments values (default {' '.join(map(str, SEGMENT_SWEEP))})")
  args = parser.parse_args(argv)
  # JAX must leave GPU memory for PyTorch's peer column in the same process.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.7")

  platform = jax.default_backend()
  parse = lambda specs: [tuple(int(v) if v.isdigit() else v for v in s.split(","))
                         for s in specs]
  dtypes = args.dtypes or ([args.dtype] if args.dtype else None)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({platform}, {jax.device_count()} device(s)); "
        f"jax {jax.__version__}")
  if args.compile_only:
    backends = args.backends or list(FUSED)
    shape = parse(args.shapes)[0] if args.shapes else SWEEP_SHAPE
    run_compile_only(backends, shape)
    return 0
  if args.check:
    backends = args.backends or available_backends()
    return 1 if run_check(backends, dtypes or ["float32", "bfloat16"]) else 0
  if args.sweep_segments:
    run_segment_sweep(parse(args.shapes) if args.shapes else GPU_SHAPES,
                      dtypes or ["bfloat16"], tuple(args.segments or SEGMENT_SWEEP),
                      backward_only=args.backward_only)
    return 0
  if args.sweep_time_parallel:
    run_time_parallel_sweep(parse(args.shapes) if args.shapes else TIME_PARALLEL_SHAPES,
                            dtypes or ["bfloat16"])
    return 0
  if args.sweep:
    backends = args.backends or [b for b in available_backends() if b in FUSED]
    if not backends:
      print("no fused backend runs here (pass --backends pallas to sweep it in interpret mode)")
      return 0
    shape = parse(args.shapes)[0] if args.shapes else SWEEP_SHAPE
    run_sweep(backends, dtypes or ["float32"], shape)
    return 0
  shapes = parse(args.shapes) if args.shapes else (GPU_SHAPES if platform == "gpu" else CPU_SHAPES)
  backends = args.backends or [b for b in available_backends()
                               if not (platform == "gpu" and b == "reference")]
  run_table(shapes, dtypes or ["float32", "bfloat16"], backends,
            with_torch=platform == "gpu" and not args.no_torch)
  return 0


if __name__ == "__main__":
  sys.exit(main())
