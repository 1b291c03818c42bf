"""Selective-scan benchmark: backend × shape → median forward / forward+backward time.

    python -m vidssm_jax.bench.scan                      # default shapes for this platform
    python -m vidssm_jax.bench.scan --shapes 8,1568,768,16 --dtype bfloat16

For each shape (b, l, d, n) it times every backend registered for the platform on the same
inputs (u, delta, z, B, C, D, delta_bias, softplus, as the Mamba mixer calls it) and prints the
median time, and the achieved bandwidth as a fraction of the memory floor: the bytes of the inputs
read once plus the outputs written once, over the device's bandwidth. On CPU the bandwidth is
measured in this process with a large device copy; on GPU it is measured the same way (a
device-to-device copy, bytes read + written), so the fraction is against what this machine can
really move.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vidssm_jax.ops.selective_scan import available_backends, selective_scan

CPU_SHAPES = [(2, 512, 256, 16), (1, 2048, 128, 16), (8, 197, 192, 16)]
GPU_SHAPES = [(8, 1568, 768, 16), (1, 3136, 768, 16), (32, 197, 768, 16), (4, 8192, 1536, 16)]


def median_ms(fn, *args, warmup: int = 2, repeats: int = 10) -> float:
  """Median wall time of ``fn(*args)`` in ms, after warm-up, synchronising on the result."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def copy_bandwidth_gbs(num_bytes: int = 1 << 28) -> float:
  """Measured device copy bandwidth in GB/s, counting bytes read plus bytes written."""
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda a: a * 1.0001)
  ms = median_ms(copy, x, repeats=5)
  return 2 * num_bytes / (ms * 1e-3) / 1e9


def make_inputs(b, l, d, n, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 8)
  f = lambda key, shape, scale=1.0: (jax.random.normal(key, shape) * scale).astype(dtype)
  return dict(
      u=f(k[0], (b, l, d)), delta=f(k[1], (b, l, d), 0.5), z=f(k[2], (b, l, d)),
      B=f(k[3], (b, l, n)), C=f(k[4], (b, l, n)),
      A=-jnp.exp(jax.random.normal(k[5], (d, n)) * 0.5), D=jax.random.normal(k[6], (d,)),
      delta_bias=jax.random.normal(k[7], (d,)) * 0.1)


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


def bench_shape(shape, dtype, backends, bandwidth):
  b, l, d, n = shape
  x = make_inputs(b, l, d, n, dtype)
  rows = []
  for backend in backends:
    def fwd(x):
      return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                            x["delta_bias"], delta_softplus=True, backend=backend)

    def loss(x):
      return jnp.sum(fwd(x).astype(jnp.float32))

    f_ms = median_ms(jax.jit(fwd), x)
    fb_ms = median_ms(jax.jit(jax.grad(loss)), x)
    fwd_bytes, fb_bytes = floor_bytes(b, l, d, n, jnp.dtype(dtype).itemsize)
    fwd_floor_ms = fwd_bytes / (bandwidth * 1e9) * 1e3
    fb_floor_ms = fb_bytes / (bandwidth * 1e9) * 1e3
    rows.append((shape, backend, f_ms, fb_ms, fwd_floor_ms / f_ms, fb_floor_ms / fb_ms,
                 fwd_floor_ms))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="*", default=None,
                      help="b,l,d,n tuples; default depends on the platform")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--backends", nargs="*", default=None,
                      help="default: every backend registered for this platform")
  args = parser.parse_args(argv)

  platform = jax.default_backend()
  shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes
            else (GPU_SHAPES if platform == "gpu" else CPU_SHAPES))
  backends = args.backends or available_backends()
  dtype = jnp.dtype(args.dtype)
  bandwidth = copy_bandwidth_gbs()
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({platform}, {jax.device_count()} device(s)); "
        f"jax {jax.__version__}; dtype {dtype.name}")
  print(f"memory floor uses the copy bandwidth measured here: {bandwidth:.1f} GB/s "
        "(bytes read + written by a large jitted elementwise copy)")
  header = (f"{'shape (b, l, d, n)':<22} {'backend':<12} {'fwd ms':>9} {'fwd+bwd ms':>11} "
            f"{'fwd %floor':>10} {'f+b %floor':>10} {'floor ms':>9}")
  print(header)
  print("-" * len(header))
  for shape in shapes:
    for s, backend, f_ms, fb_ms, f_frac, fb_frac, floor_ms in bench_shape(
        shape, dtype, backends, bandwidth):
      print(f"{str(s):<22} {backend:<12} {f_ms:9.3f} {fb_ms:11.3f} {100 * f_frac:9.1f}% "
            f"{100 * fb_frac:9.1f}% {floor_ms:9.4f}")


if __name__ == "__main__":
  main()
