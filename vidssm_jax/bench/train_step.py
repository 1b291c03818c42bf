"""Pretraining step throughput: EndoMamba-S, E-ViM³ and the ViT-S baseline, side by side.

    python -m vidssm_jax.bench.train_step                  # GPU: 16 × 224 × 224, bf16
    python -m vidssm_jax.bench.train_step --small          # CPU smoke run at 8 × 32 × 32

Each row is one full optimizer step (forward, backward, AdamW update), jitted, median of
repeats after warm-up:

- ``endomamba_s``: tube masking at 0.75, visible-token encoder, transformer decoder, plus the
  frozen ViT-S teacher's forward for L_align (as in pretraining);
- ``evim3``: STC masking at 0.8, visible-token MAE encoder and Mamba-3D decoder (``--evim3``
  picks the preset; the default ``evim3_p8`` keeps 8·28·28 tokens at 16 × 224 × 224);
- ``vit_s``: the video ViT-S on the full clip (VideoMAE-style models see every token of a
  full clip when not masked), with a regression loss on its features: the dense baseline.

Model FLOPs come from XLA's cost analysis of the compiled step; MFU divides the achieved
FLOP/s by the device's dense bf16 peak (H100 SXM: 989 TFLOP/s datasheet; ``--peak-tflops``).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vidssm_jax.bench.scan import median_ms
from vidssm_jax.models import create_model
from vidssm_jax.train.pretrain import draw_mask, token_grid
from vidssm_jax.train.state import count_params


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def make_step(loss_fn, params):
  tx = optax.adamw(1e-4, weight_decay=0.05)

  def step(params, opt_state, video, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, video, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), tx.init(params)


def bench_model(name, loss_fn, params, video, tokens, peak_tflops, repeats):
  params = jax.tree.map(jnp.copy, params)  # the step donates its params; the caller keeps its own
  step, opt_state = make_step(loss_fn, params)
  rng = jax.random.key(1)
  compiled = step.lower(params, opt_state, video, rng).compile()
  flops = _flops(compiled)
  state = [params, opt_state]

  def run(video):
    state[0], state[1], loss = compiled(state[0], state[1], video, rng)
    return loss

  ms = median_ms(run, video, warmup=2, repeats=repeats)
  b = video.shape[0]
  tflops = flops / (ms * 1e-3) / 1e12
  return dict(model=name, params=count_params(params), ms=ms, clips=b / (ms * 1e-3),
              tokens=b * tokens / (ms * 1e-3), tflops=tflops,
              mfu=tflops / peak_tflops if peak_tflops else float("nan"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="tiny models and clips (CPU)")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--evim3", default="evim3_p8")
  parser.add_argument("--peak-tflops", type=float, default=989.0)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--scan-backend", default="auto", help="selective_scan backend of the "
                      "Mamba models (auto: the fused kernel on GPU)")
  args = parser.parse_args(argv)

  if args.small:
    t, size, b, dtype = 8, 32, args.batch or 2, jnp.float32
    endo_kw = dict(img_size=32, patch_size=8, depth=4, dim=32, num_frames=t)
    vit_kw = dict(img_size=32, patch_size=8, dim=32, depth=2, num_heads=2)
    evim_kw = dict(img_size=32, num_frames=t, in_chans=3, dim=32, depth=1, patch=8, tubelet=2,
                   time_chain=2, space_chain=2)
  else:
    t, size, b, dtype = 16, 224, args.batch or 8, jnp.bfloat16
    endo_kw, vit_kw, evim_kw = dict(num_frames=t), {}, dict(img_size=224, num_frames=t, in_chans=3)
  video = jax.random.normal(jax.random.key(0), (b, t, size, size, 3), jnp.float32)
  rows = []

  # E-ViM³: visible-token MAE pretraining.
  evim = create_model(args.evim3 if not args.small else "evim3_tiny", dtype=dtype,
                      scan_backend=args.scan_backend, **evim_kw)
  # The mask the model was built for (its visible-token count is a static shape).
  mask_cfg = ml_collections.ConfigDict(dict(kind=evim.mask_kind, ratio=evim.mask_ratio,
                                            time_chain=evim.time_chain,
                                            space_chain=evim.space_chain))
  grid = token_grid(evim)
  mask = draw_mask(jax.random.key(2), b, grid, mask_cfg)
  p_evim = nn.meta.unbox(evim.init(jax.random.key(3), video, mask, method="pretrain_loss"))["params"]
  loss_evim = lambda p, v, r: evim.apply({"params": p}, v, draw_mask(r, b, grid, mask_cfg),
                                         method="pretrain_loss")[0]
  n_tokens = grid[0] * grid[1] * grid[2]
  rows.append(bench_model(f"{args.evim3 if not args.small else 'evim3_tiny'} (mask 0.8)",
                          loss_evim, p_evim, video, n_tokens, args.peak_tflops, args.repeats))

  # ViT-S teacher / baseline.
  vit = create_model("vit_s", dtype=dtype, **vit_kw)
  p_vit = nn.meta.unbox(vit.init(jax.random.key(4), video))["params"]
  loss_vit = lambda p, v, r: jnp.mean(jnp.square(vit.apply({"params": p}, v).astype(jnp.float32)))
  feats = jax.eval_shape(lambda: vit.apply({"params": p_vit}, video))
  vit_tokens = int(feats.size // (feats.shape[0] * feats.shape[-1]))
  rows.append(bench_model("vit_s (full clip)", loss_vit, p_vit, video, vit_tokens,
                          args.peak_tflops, args.repeats))

  # EndoMamba-S: tube-masked pretraining with the frozen ViT-S teacher.
  endo_name = "endomamba_tiny_pretrain" if args.small else "endomamba_small_pretrain"
  endo = create_model(endo_name, dtype=dtype, scan_backend=args.scan_backend, **endo_kw)
  tube = ml_collections.ConfigDict(dict(kind="tube", ratio=0.75))
  egrid = token_grid(endo)
  emask = draw_mask(jax.random.key(5), b, egrid, tube)
  teacher_feats = vit.apply({"params": p_vit}, video)
  teacher_feats = teacher_feats.reshape(b, -1, teacher_feats.shape[-1])
  p_endo = nn.meta.unbox(endo.init(jax.random.key(6), video, emask, teacher_features=teacher_feats,
                                   method="pretrain_loss"))["params"]

  def loss_endo(p, v, r):
    t_feats = jax.lax.stop_gradient(vit.apply({"params": p_vit}, v))
    t_feats = t_feats.reshape(v.shape[0], -1, t_feats.shape[-1])
    return endo.apply({"params": p}, v, draw_mask(r, b, egrid, tube), teacher_features=t_feats,
                      alpha=0.25, method="pretrain_loss")[0]

  rows.append(bench_model(f"{endo_name} (+teacher)", loss_endo, p_endo, video,
                          egrid[0] * egrid[1] * egrid[2], args.peak_tflops, args.repeats))

  dev = jax.devices()[0]
  print(f"device: {dev.device_kind}; jax {jax.__version__}; clip {t}×{size}×{size}×3, batch {b}, "
        f"compute {jnp.dtype(dtype).name}; MFU against {args.peak_tflops:.0f} TFLOP/s")
  header = (f"{'model':<34} {'params':>11} {'step ms':>9} {'clips/s':>9} {'tokens/s':>11} "
            f"{'TFLOP/s':>8} {'MFU':>6}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['model']:<34} {r['params']:>11,} {r['ms']:9.2f} {r['clips']:9.2f} "
          f"{r['tokens']:11,.0f} {r['tflops']:8.2f} {100 * r['mfu']:5.1f}%")


if __name__ == "__main__":
  main()
