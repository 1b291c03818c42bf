"""Pretraining step of each model: compile time, step time, throughput and memory, per remat policy.

    python -m vidssm_jax.bench.train_step                 # GPU: the paper shapes, bf16
    python -m vidssm_jax.bench.train_step --small         # CPU smoke run on tiny models
    python -m vidssm_jax.bench.train_step --depth-scaling # CPU: compile time against depth

Rows (one full AdamW step: forward, backward, update, jitted, the mask drawn inside):

- ``endomamba_s+teacher``: EndoMamba-S pretraining, 8×16×224², tube mask 0.75, visible-token
  encoder, transformer decoder, plus the frozen ViT-S teacher's forward for L_align;
- ``endomamba_s``: the same without the teacher;
- ``evim3_p4``: E-ViM³-p4, 4×64×112² grey, STC mask 0.8, visible-token encoder and decoder;
- ``evim3_p4+ef``: E-ViM³-p4 fine-tuning: every token through the encoder, the EF head, a squared
  error against a fixed random EF per clip (``bench.vs_release``'s fine-tuning row, ours);
- ``evim3_p8``: E-ViM³-p8 at 8×16×224² RGB;
- ``vit_s``: the video ViT-S on the full 8×16×224² clip (a regression loss on its features).

Columns: ``init s`` (the jitted init, compiled and run), ``lower s`` and ``compile s`` of the
step (their sum is the wait before the first step), the median step time, clips/s, and the
step's device memory from XLA's memory analysis of the compiled program (arguments + outputs +
temporaries - donated aliases). Each row prints as soon as its model finishes; a model that
fails prints its error and the others still run.
"""

from __future__ import annotations

import argparse
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vidssm_jax import masking
from vidssm_jax.bench.scan import median_ms
from vidssm_jax.models import create_model
from vidssm_jax.train.experiment import STEP_COMPILER_OPTIONS
from vidssm_jax.train.sharding import fast_init_rng
from vidssm_jax.train.state import count_params

MODELS = ("endomamba_s+teacher", "endomamba_s", "evim3_p4", "evim3_p4+ef", "evim3_p8", "vit_s")


def _shapes(small: bool) -> dict:
  """Per model: (registry name, create_model overrides, (b, t, size, channels))."""
  if small:
    endo = dict(img_size=32, patch_size=8, depth=4, dim=32, num_frames=8)
    return {
        "endomamba_s": ("endomamba_tiny_pretrain", endo, (2, 8, 32, 3)),
        "evim3_p4": ("evim3_tiny", {}, (2, 16, 32, 1)),
        "evim3_p8": ("evim3_tiny", dict(num_frames=8, patch=8, tubelet=2, in_chans=3,
                                        time_chain=2, space_chain=2), (2, 8, 32, 3)),
        "vit_s": ("vit_s", dict(img_size=32, patch_size=8, dim=32, depth=2, num_heads=2),
                  (2, 8, 32, 3)),
    }
  return {
      "endomamba_s": ("endomamba_small_pretrain", dict(num_frames=16), (8, 16, 224, 3)),
      "evim3_p4": ("evim3_p4", {}, (4, 64, 112, 1)),
      "evim3_p8": ("evim3_p8", dict(img_size=224, num_frames=16, in_chans=3), (8, 16, 224, 3)),
      "vit_s": ("vit_s", {}, (8, 16, 224, 3)),
  }


def _loss_fn(name: str, model, teacher, b: int):
  """``loss(params, teacher_params, video, rng)`` and ``draw(rng)``, the pretraining mask (None
  for the ViT and fine-tuning, which see every token)."""
  if name.endswith("+ef"):  # EF regression: a fixed target per clip, 10-80 (%)
    target = jax.random.uniform(jax.random.key(4), (b, 1), jnp.float32, 10.0, 80.0)
    return lambda p, tp, v, r: jnp.mean(jnp.square(model.apply(
        {"params": p}, v, train=True, rngs={"dropout": r}).astype(jnp.float32) - target)), None
  if name.startswith("vit"):
    return lambda p, tp, v, r: jnp.mean(jnp.square(
        model.apply({"params": p}, v).astype(jnp.float32))), None
  grid = model.token_grid
  kind = "tube" if name.startswith("endomamba") else model.mask_kind
  options = ({} if kind == "tube" else dict(time_chain=model.time_chain,
                                             space_chain=model.space_chain))
  ratio = model.mask_ratio
  draw = lambda r: masking.batched_mask(r, b, grid, ratio, kind=kind, **options)

  def loss(p, tp, v, r):
    kwargs = {}
    if teacher is not None:
      feats = jax.lax.stop_gradient(teacher.apply({"params": tp}, v))
      kwargs = dict(teacher_features=feats.reshape(b, -1, feats.shape[-1]), alpha=0.25)
    return model.apply({"params": p}, v, draw(r), method="pretrain_loss", rngs={"dropout": r},
                       **kwargs)[0]

  return loss, draw


def _init(module, *args, **kwargs):
  """Jitted init; returns (params, seconds)."""
  start = time.perf_counter()
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(3)}
  with fast_init_rng():
    params = jax.jit(lambda: nn.meta.unbox(module.init(rngs, *args, **kwargs))["params"])()
    jax.block_until_ready(params)
  return params, time.perf_counter() - start


def _memory_gib(compiled) -> float:
  m = compiled.memory_analysis()
  if m is None:
    return float("nan")
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2**30


def build_step(label: str, remat: str, small: bool, dtype, scan_backend: str) -> dict:
  """One model's compiled AdamW step: ``run(video) -> loss`` (it updates its own state), the
  ``video``, the ``compiled`` program, its parameters and the init / lower / compile seconds.
  XLA compiles it with the training steps' options (``STEP_COMPILER_OPTIONS``)."""
  base = label.split("+")[0]
  registry_name, overrides, (b, t, size, c) = _shapes(small)[base]
  kw = dict(dtype=dtype, remat=remat, **overrides)
  if not base.startswith("vit"):
    kw["scan_backend"] = scan_backend
  model = create_model(registry_name, **kw)
  video = jax.random.normal(jax.random.key(0), (b, t, size, size, c), jnp.float32)
  teacher, teacher_params = None, None
  if label.endswith("+teacher"):
    vit_name, vit_kw, _ = _shapes(small)["vit_s"]
    teacher = create_model(vit_name, dtype=dtype, **vit_kw)
    teacher_params, _ = _init(teacher, video)
  loss, draw = _loss_fn(label, model, teacher, b)
  if draw is None:
    params, init_s = _init(model, video)
  else:
    mask = draw(jax.random.key(2))
    init_kwargs = {}
    if teacher is not None:
      feats = jax.eval_shape(lambda: teacher.apply({"params": teacher_params}, video))
      init_kwargs["teacher_features"] = jnp.zeros((b, feats.size // (b * feats.shape[-1]),
                                                   feats.shape[-1]), jnp.float32)
    params, init_s = _init(model, video, mask, method="pretrain_loss", **init_kwargs)

  tx = optax.adamw(1e-4, weight_decay=0.05)

  def step(params, opt_state, teacher_params, video, rng):
    value, grads = jax.value_and_grad(loss)(params, teacher_params, video, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = tx.init(params)
  rng = jax.random.key(1)
  start = time.perf_counter()
  jitted = jax.jit(step, donate_argnums=(0, 1), compiler_options=STEP_COMPILER_OPTIONS)
  lowered = jitted.lower(params, opt_state, teacher_params, video, rng)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  state = [params, opt_state]

  def run(video):
    state[0], state[1], value = compiled(state[0], state[1], teacher_params, video, rng)
    return value

  return dict(run=run, video=video, compiled=compiled, params=params, init_s=init_s,
              lower_s=lower_s, compile_s=compile_s)


def bench_row(label: str, remat: str, small: bool, dtype, scan_backend: str, repeats: int):
  s = build_step(label, remat, small, dtype, scan_backend)
  video = s["video"]
  ms = median_ms(s["run"], video, warmup=2, repeats=repeats)
  return dict(model=label, remat=remat, params=count_params(s["params"]), init_s=s["init_s"],
              lower_s=s["lower_s"], compile_s=s["compile_s"], ms=ms,
              clips=video.shape[0] / (ms * 1e-3), mem_gib=_memory_gib(s["compiled"]),
              loss=float(s["run"](video)))


HEADER = (f"{'model':<22} {'remat':<5} {'params':>11} {'init s':>7} {'lower s':>8} "
          f"{'compile s':>10} {'to step s':>10} {'step ms':>9} {'clips/s':>8} {'mem GiB':>8}")


def print_row(r: dict) -> None:
  wait = r["init_s"] + r["lower_s"] + r["compile_s"]
  print(f"{r['model']:<22} {r['remat']:<5} {r['params']:>11,} {r['init_s']:7.1f} "
        f"{r['lower_s']:8.1f} {r['compile_s']:10.1f} {wait:10.1f} {r['ms']:9.2f} "
        f"{r['clips']:8.2f} {r['mem_gib']:8.2f}", flush=True)


def depth_scaling(depths=(6, 24)) -> None:
  """Compile time of an EndoMamba gradient against depth (the scanned stacks keep it flat)."""
  video = jnp.zeros((1, 4, 32, 32, 3), jnp.float32)
  print(f"{'depth':>5} {'lower s':>8} {'compile s':>10} {'total s':>8}", flush=True)
  totals = {}
  for depth in depths:
    model = create_model("endomamba_tiny", img_size=32, patch_size=8, dim=64, depth=depth,
                         scan_backend="reference")
    params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), video))
                            ["params"])
    loss = lambda p, v: jnp.mean(model.apply({"params": p}, v).astype(jnp.float32) ** 2)
    start = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(params, video)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
    totals[depth] = lower_s + compile_s
    print(f"{depth:>5} {lower_s:8.2f} {compile_s:10.2f} {totals[depth]:8.2f}", flush=True)
  print(f"depth {depths[-1]} / depth {depths[0]}: {totals[depths[-1]] / totals[depths[0]]:.2f}x")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny models and clips (CPU)")
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
  parser.add_argument("--remat", default="none,full", help="comma list of none, full, dots")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--scan-backend", default="auto", help="selective_scan backend of the "
                      "Mamba models (auto: the fused kernel on GPU)")
  parser.add_argument("--depth-scaling", action="store_true",
                      help="only time the compile of an EndoMamba gradient at depth 6 and 24")
  args = parser.parse_args(argv)
  if args.depth_scaling:
    depth_scaling()
    return
  models = [m for m in args.models.split(",") if m]
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    parser.error(f"unknown model(s) {unknown}; choose from {MODELS}")
  dtype = jnp.float32 if args.small else jnp.bfloat16
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}; jax {jax.__version__}; compute {jnp.dtype(dtype).name}; "
        f"scan backend {args.scan_backend}", flush=True)
  print(HEADER, flush=True)
  print("-" * len(HEADER), flush=True)
  for remat in args.remat.split(","):
    for label in models:
      try:
        print_row(bench_row(label, remat, args.small, dtype, args.scan_backend, args.repeats))
      except Exception as e:  # noqa: BLE001  (one failing model must not hide the others)
        print(f"{label:<22} {remat:<5} failed: {type(e).__name__}: {str(e).splitlines()[0]}",
              flush=True)
        traceback.print_exc()
      jax.clear_caches()


if __name__ == "__main__":
  main()
