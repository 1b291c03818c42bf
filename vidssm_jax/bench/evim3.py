"""E-ViM³ pretraining step: the visible-token MAE encoder against a dense encoder, same mask.

    python -m vidssm_jax.bench.evim3                    # GPU: evim3_p4, 64 × 112 × 112 grey, bf16
    python -m vidssm_jax.bench.evim3 --batch 2 --dim 96
    python -m vidssm_jax.bench.evim3 --tiny             # CPU smoke run: evim3_tiny on 8 × 32 × 32,
                                                        # float32, compiled unoptimised (times are
                                                        # not meaningful)

Each row is one full jitted pretraining step (forward, backward, optax AdamW update; the STC mask,
2×4×4 chains at ratio 0.8, is drawn inside the step as the trainer does), median of ``--repeats``
after warm-up, synchronised with ``jax.block_until_ready``:

- ``(a) mae``: the MAE encoder on the visible tokens only (visible real + all global tokens),
  moved between scan orders by gathers; the Mamba-3D decoder on the full volume;
- ``(b) dense``: the same mask through the full-volume encoder, masked tokens replaced by a
  learned mask token (as a dense model would), the same decoder;
- ``(c) no_egt``: no Enclosure Global Tokens (``use_egt=False``, ``pool="mean"``): the MAE
  encoder on the visible real tokens only.

Every variant runs in a fresh subprocess, so the device's ``peak_bytes_in_use`` (GPU) starts
from zero; the table also gives XLA's compiled estimate ``temp + arguments + outputs - aliased``
(``compiled MiB``), which is what the CPU has. The parent process never touches a device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

VARIANTS = {
    "a": ("(a) mae: visible tokens", dict(visible_only=True)),
    "b": ("(b) dense: full volume + mask token", dict(visible_only=False)),
    "c": ("(c) no_egt: visible real tokens", dict(visible_only=True, use_egt=False, pool="mean")),
}
RATIO, CHAINS = 0.8, dict(time_chain=2, space_chain=4)


def _count(tree) -> int:
  import jax
  import numpy as np
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def run_variant(key: str, args) -> dict:
  """Times one variant in this process; returns a JSON-able row."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from vidssm_jax import masking
  from vidssm_jax.bench.scan import median_ms
  from vidssm_jax.models import create_model
  from vidssm_jax.train.sharding import fast_init_rng

  dtype = jnp.dtype(args.dtype or ("float32" if args.tiny else "bfloat16"))
  overrides = dict(VARIANTS[key][1], dtype=dtype, mask_kind="stc", mask_ratio=RATIO, **CHAINS,
                   scan_backend=args.scan_backend)
  if args.dim:
    overrides["dim"] = args.dim
  if args.tiny:  # 8 × 32 × 32 clips: 4 × 8 × 8 tokens, 7 × 11 × 11 with the enclosure
    overrides.update(num_frames=8, img_size=32)
  model = create_model(args.preset, **overrides)
  grid, b = model.token_grid, args.batch
  video = jax.random.normal(jax.random.key(0), (b, model.num_frames, model.img_size,
                                                model.img_size, model.in_chans), jnp.float32)
  draw = lambda rng: masking.batched_mask(rng, b, grid, RATIO, kind="stc", **CHAINS)
  mask0 = jnp.zeros((b,) + grid, bool)
  # The CPU smoke run compiles with XLA's backend optimisations off: it only checks that the
  # bench runs, and compiling dominates its time.
  options = {"xla_backend_optimization_level": 0} if args.tiny else None
  init = lambda k: nn.meta.unbox(model.init(k, video, mask0, method="pretrain_loss"))["params"]
  with fast_init_rng():
    params = jax.jit(init).lower(jax.random.key(1)).compile(options)(jax.random.key(1))
  tx = optax.adamw(1e-4, weight_decay=0.05)

  def step(params, opt_state, video, rng):
    def loss_fn(p):
      return model.apply({"params": p}, video, draw(rng), method="pretrain_loss")[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, tx.init(params)]
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*state, video,
                                                       jax.random.key(2)).compile(options)
  mem = compiled.memory_analysis()
  est = None
  if mem is not None:
    est = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
           - mem.alias_size_in_bytes)
  losses = []

  def run(video):
    state[0], state[1], loss = compiled(state[0], state[1], video, jax.random.key(2))
    losses.append(loss)
    return loss

  ms = median_ms(run, video, warmup=1 if args.tiny else 2, repeats=args.repeats)
  stats = jax.devices()[0].memory_stats() or {}
  lay = model.layout
  row = dict(key=key, name=VARIANTS[key][0], ms=ms, peak=stats.get("peak_bytes_in_use"),
             compiled=est, loss=float(losses[-1]),
             tokens=lay.num_positions if key == "b" else model.num_visible,
             volume=lay.num_positions, params=_count(params),
             device=jax.devices()[0].device_kind, jax=jax.__version__, dtype=dtype.name,
             clip=[model.num_frames, model.img_size, model.img_size, model.in_chans])
  if key == "a":  # parameter counts of the preset (pretraining and fine-tuning trees)
    fine = jax.eval_shape(lambda: model.init(jax.random.key(0), video))["params"]
    row["counts"] = dict(encoder=_count(params["encoder"]), decoder=_count(params["decoder"]),
                         head=_count(nn.meta.unbox(fine)["head"]))
  return row


def _worker_cmd(key, args):
  cmd = [sys.executable, "-m", "vidssm_jax.bench.evim3", "--worker", key, "--preset", args.preset,
         "--batch", str(args.batch), "--repeats", str(args.repeats),
         "--scan-backend", args.scan_backend]
  for flag, value in (("--dim", args.dim), ("--dtype", args.dtype)):
    if value:
      cmd += [flag, str(value)]
  return cmd + (["--tiny"] if args.tiny else [])


def _mib(x):
  return f"{x / 2**20:,.1f}" if x is not None else "n/a"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="evim3_tiny in float32 (CPU smoke run)")
  parser.add_argument("--preset", default=None, help="default evim3_p4 (evim3_tiny with --tiny)")
  parser.add_argument("--batch", type=int, default=None, help="default 4 (1 with --tiny)")
  parser.add_argument("--dim", type=int, default=None, help="encoder width override (e.g. 96)")
  parser.add_argument("--dtype", default=None,
                      help="compute dtype (default bfloat16; float32 with --tiny)")
  parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 10; tiny 2)")
  parser.add_argument("--variants", default="abc", help="which of a, b, c to run")
  parser.add_argument("--scan-backend", default=None,
                      help="selective_scan backend (default auto; reference with --tiny)")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.preset = args.preset or ("evim3_tiny" if args.tiny else "evim3_p4")
  args.batch = args.batch or (1 if args.tiny else 4)
  args.repeats = args.repeats or (2 if args.tiny else 10)
  args.scan_backend = args.scan_backend or ("reference" if args.tiny else "auto")

  if args.worker:
    print("ROW " + json.dumps(run_variant(args.worker, args)), flush=True)
    return

  rows = []
  for key in args.variants:
    if key not in VARIANTS:
      parser.error(f"--variants: unknown variant {key!r}; choose from {''.join(VARIANTS)}")
    proc = subprocess.run(_worker_cmd(key, args), capture_output=True, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = [l for l in proc.stdout.splitlines() if l.startswith("ROW ")]
    if proc.returncode != 0 or not line:
      last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
      rows.append(dict(key=key, name=VARIANTS[key][0], error=last[:160]))
      continue
    rows.append(json.loads(line[0][4:]))
  _print_table(args, rows)


def _print_table(args, rows):
  ok = [r for r in rows if "error" not in r]
  if ok:
    r0 = ok[0]
    t, h, w, c = r0["clip"]
    print(f"device: {r0['device']}; jax {r0['jax']}; {args.preset}"
          f"{f' dim {args.dim}' if args.dim else ''}; clip {t}×{h}×{w}×{c}, batch {args.batch}, "
          f"compute {r0['dtype']}; STC 2×4×4 at {RATIO}; one step = forward + backward + AdamW")
  header = (f"{'variant':<38} {'tokens/clip':>11} {'step ms':>9} {'peak MiB':>10} "
            f"{'compiled MiB':>12} {'params':>11}")
  print(header)
  print("-" * len(header))
  for r in rows:
    if "error" in r:
      print(f"{r['name']:<38} failed: {r['error']}")
      continue
    print(f"{r['name']:<38} {r['tokens']:>11,} {r['ms']:9.2f} {_mib(r['peak']):>10} "
          f"{_mib(r['compiled']):>12} {r['params']:>11,}")
  by = {r["key"]: r for r in ok}
  if "a" in by:
    vol = by["a"]["volume"]
    print(f"enlarged volume: {vol:,} positions per clip; peak MiB = device peak_bytes_in_use "
          "(fresh process per variant), compiled MiB = XLA temp + arguments + outputs - aliased")
    if "b" in by:
      a, b = by["a"], by["b"]
      mem = lambda k: (a[k], b[k]) if a[k] and b[k] else None
      parts = [f"time {b['ms'] / a['ms']:.2f}×", f"tokens {b['tokens'] / a['tokens']:.2f}×"]
      for k, label in (("peak", "peak memory"), ("compiled", "compiled memory")):
        if mem(k):
          parts.append(f"{label} {b[k] / a[k]:.2f}×")
      print("ratios (b)/(a): " + ", ".join(parts))
    if "counts" in by["a"]:
      n = by["a"]["counts"]
      print(f"{args.preset} parameters: encoder {n['encoder']:,} + head {n['head']:,} = "
            f"{n['encoder'] + n['head']:,} (fine-tuning); encoder + decoder {n['decoder']:,} = "
            f"{n['encoder'] + n['decoder']:,} (pretraining)")


if __name__ == "__main__":
  main()
