"""The EndoMamba speed table: per-frame latency and FPS against memory length T, in one run.

For each memory length T (frames of history the prediction for a new frame depends on):

  (a) EndoMamba ``step``: one new frame, the state carrying the T frames before it;
  (b) EndoMamba recompute: the whole T-frame window re-run for every new frame;
  (c) a video ViT of similar size re-running its T-frame window (space-time attention);

plus the throughput of ``--streams`` concurrent streams batched into one ``step``. Batch 1,
jitted functions, warm-up calls, ``jax.block_until_ready``, the median of ``--repeats`` calls.

    python -m vidssm_jax.bench.stream                 # the paper's setting (GPU): 224², bf16
    python -m vidssm_jax.bench.stream --small         # a tiny config that runs in a minute on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vidssm_jax.models import create_model
from vidssm_jax.stream import live_step
from vidssm_jax.train.sharding import fast_init_rng

PAPER_FPS = 47.0  # EndoMamba's reported streaming speed


def _median_seconds(fn, *, repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _count(variables) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(variables["params"])))


def _frames(key, batch, t, size):
  return jax.random.normal(key, (batch, t, size, size, 3), jnp.float32)


# --fold-params: live_step's two parts together, apart, or neither (fold_params, unroll_layers)
FOLD_VARIANTS = {"on": (True, True), "off": (False, False), "constants": (True, False),
                 "unrolled": (False, True)}


def live_stream(model, variables, batch: int, state=None, fold_params: str = "on"):
  """``batch`` live streams as every benchmark times them: ``(advance, frame, step)``.

  ``step`` is ``vidssm_jax.stream.live_step`` (jitted; ``fold_params`` one of
  ``FOLD_VARIANTS``: "on" compiles it for these variables); ``advance()`` runs it on one fixed
  random ``frame (batch, H, W, 3)`` continuing from the state the call before returned
  (``state`` first, else ``init_state``) and returns ``(features, state)``.
  """
  fold, unroll = FOLD_VARIANTS[fold_params]
  step = live_step(model, variables, fold_params=fold, unroll_layers=unroll)
  frame = _frames(jax.random.key(2), batch, 1, model.img_size)[:, 0]
  box = {"state": model.init_state(batch) if state is None else state}

  def advance():
    out, box["state"] = step(frame, box["state"])
    return out, box["state"]

  return advance, frame, step


def _stream_after(model, variables, memory: int, batch: int, fold_params: str = "on"):
  """``live_stream``'s ``advance`` for ``batch`` streams that have already seen ``memory``
  frames (one ``forward_chunk`` call gives their state)."""
  chunk = jax.jit(lambda v, x, s: model.apply(v, x, s, method="forward_chunk"))
  _, state = chunk(variables, _frames(jax.random.key(1), batch, memory, model.img_size),
                   model.init_state(batch))
  return live_stream(model, variables, batch, state, fold_params)[0]


def bench_step(model, variables, memory: int, batch: int, *, repeats: int, warmup: int,
               fold_params: str = "on") -> float:
  """Seconds per ``step`` of ``batch`` streams with ``memory`` frames already seen."""
  advance = _stream_after(model, variables, memory, batch, fold_params)
  return _median_seconds(lambda: advance()[0], repeats=repeats, warmup=warmup)


def bench_back_to_back(model, variables, memory: int, *, frames: int = 60, repeats: int = 5,
                       fold_params: str = "on") -> float:
  """Seconds per frame of a batch-1 stream with ``frames`` steps issued back to back and one
  synchronisation: the device's rate, with the host's dispatch hidden behind it."""
  advance = _stream_after(model, variables, memory, 1, fold_params)

  def run():
    for _ in range(frames):
      out = advance()[0]
    return out

  return _median_seconds(run, repeats=repeats, warmup=1) / frames


def bench_window(model, variables, memory: int, *, repeats: int, warmup: int) -> float:
  """Seconds to re-run a whole ``memory``-frame window (batch 1)."""
  forward = jax.jit(model.apply)
  clip = _frames(jax.random.key(3), 1, memory, model.img_size)
  return _median_seconds(lambda: forward(variables, clip), repeats=repeats, warmup=warmup)


def _init(model, size):
  with fast_init_rng():
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1, size, size, 3)))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m vidssm_jax.bench.stream", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="endomamba_small")
  p.add_argument("--vit", default="vit_s", help="the video ViT baseline (vit_s or vit_b)")
  p.add_argument("--memory", type=int, nargs="+", default=[16, 32, 64, 128])
  p.add_argument("--img-size", type=int, default=224)
  p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                 help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
  p.add_argument("--streams", type=int, default=16, help="concurrent streams batched in one step")
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--scan-backend", default="auto")
  p.add_argument("--vit-attention", default=None, help="jax.nn.dot_product_attention "
                 "implementation for the ViT (None: XLA, or 'cudnn')")
  p.add_argument("--no-baselines", action="store_true",
                 help="time EndoMamba's step only (no recompute or ViT columns)")
  p.add_argument("--time-parallel", choices=["auto", "on", "off"], default="auto",
                 help="the Pallas scan's time-parallel forward (PallasConfig.time_parallel)")
  p.add_argument("--fold-params", choices=list(FOLD_VARIANTS), default="on",
                 help="compile the step for the weights (vidssm_jax.stream.live_step): on, off, "
                      "or one of its two parts (the variables as constants; the stacks unrolled)")
  p.add_argument("--small", action="store_true",
                 help="tiny models (img 64, dim 64, depth 4 / 2), T in 4 8 16, 4 streams: for CPU")
  args = p.parse_args(argv)

  if args.time_parallel != "auto":
    from vidssm_jax.ops import selective_scan_pallas as pallas
    pallas.DEFAULT_CONFIG = dataclasses.replace(pallas.DEFAULT_CONFIG,
                                                time_parallel=args.time_parallel == "on")
  platform = jax.default_backend()
  dtype = jnp.dtype(args.dtype or ("float32" if platform == "cpu" else "bfloat16"))
  mamba_kw = dict(img_size=args.img_size, dtype=dtype, scan_backend=args.scan_backend)
  vit_kw = dict(img_size=args.img_size, dtype=dtype, attention_impl=args.vit_attention)
  memory, streams, repeats = args.memory, args.streams, args.repeats
  fold = args.fold_params
  if args.small:
    mamba_kw.update(img_size=64, dim=64, depth=4)
    vit_kw.update(img_size=64, dim=64, depth=2, num_heads=4)
    memory, streams, repeats = [4, 8, 16], 4, min(repeats, 10)
  size = mamba_kw["img_size"]

  mamba = create_model(args.model, **mamba_kw)
  vit = create_model(args.vit, **vit_kw)
  mvars, vvars = _init(mamba, size), _init(vit, size)
  print(f"device: {jax.devices()[0].device_kind} ({platform}); compute {dtype.name}; "
        f"{size}×{size}; batch 1; median of {repeats}; step compiled for the weights "
        f"(fold_params): {args.fold_params}")
  print(f"command: python -m vidssm_jax.bench.stream {' '.join(argv or sys.argv[1:])}".rstrip())
  print(f"parameters: {args.model} {_count(mvars) / 1e6:.2f}M, {args.vit} "
        f"{_count(vvars) / 1e6:.2f}M")

  rows = []
  for t in memory:
    step_s = bench_step(mamba, mvars, t, 1, repeats=repeats, warmup=args.warmup, fold_params=fold)
    window_s = vit_s = float("nan")
    if not args.no_baselines:
      window_s = bench_window(mamba, mvars, t, repeats=repeats, warmup=args.warmup)
      vit_s = bench_window(vit, vvars, t, repeats=max(3, repeats // 3), warmup=1)
    rows.append((t, step_s, window_s, vit_s))

  head = (f"{'T':>5} | {'EndoMamba step':>22} | {'EndoMamba recompute':>22} | "
          f"{args.vit + ' recompute':>22}")
  print(head)
  print(f"{'':>5} | {'ms/frame':>10} {'FPS':>11} | {'ms/frame':>10} {'FPS':>11} | "
        f"{'ms/frame':>10} {'FPS':>11}")
  print("-" * len(head))
  for t, a, b, c in rows:
    print(f"{t:>5} | " + " | ".join(f"{s * 1e3:>10.2f} {1 / s:>11.1f}" for s in (a, b, c)))
  steps = [r[1] for r in rows]
  flat = max(steps) / min(steps)
  step_fps = 1 / statistics.median(steps)
  print(f"step flatness (slowest/fastest over T): {flat:.2f} (target ≤ 1.1)")
  b2b = bench_back_to_back(mamba, mvars, memory[0], fold_params=fold)
  print(f"step at batch 1, 60 frames issued back to back (T = {memory[0]}): {b2b * 1e3:.3f} ms "
        f"per frame ({1 / b2b:.0f} FPS; the synced step above adds the host's dispatch)")
  print(f"step at batch 1: {step_fps:.0f} FPS = {step_fps / PAPER_FPS:.1f}× the paper's "
        f"{PAPER_FPS:.0f} FPS (target ≥ 10×; meaningful at 224² on GPU)")
  batched = bench_step(mamba, mvars, memory[0], streams, repeats=repeats, warmup=args.warmup,
                       fold_params=fold)
  print(f"{streams} concurrent streams, one batched step: {batched * 1e3:.2f} ms per step, "
        f"{streams / batched:.0f} frames/s in total ({1 / batched:.0f} FPS per stream)")
  return {"rows": rows, "flatness": flat, "batched_s": batched, "streams": streams}


if __name__ == "__main__":
  main()
