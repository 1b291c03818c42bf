"""Ours against the authors' PyTorch release on the same GPU: training step time and memory.

    bash launch/gpu_wheels.sh --mamba-ssm --releases      # here: sdists, wheels, release sources
    python -m vidssm_jax.bench.vs_release                 # on the GPU machine, carrying .whl

Rows (random weights and inputs, one optimizer step each, the median of ``--repeats`` after
warm-up; the optimizer and its settings, AdamW with the release's eps, weight decay and
gradient clipping, are read from the release's own config file, and ours uses the same):

- ``evim3_p4 pretrain``: 4 × 1 × 64 × 112 × 112 grey, STC mask 0.8 (chains 2 × 4 × 4), the
  visible-token encoder and the Mamba-3D decoder, MSE on the masked patches; the release's
  ``pretrain_video_mamba_3d_efficient`` model from ``configs/pretrain_echo_mamba_3d_patch4.yaml``.
- ``evim3_p4 finetune``: the same clip through the full-volume encoder and the EF head, MSE on
  EF; the release's ``echo_dynamic_video_mamba_3d`` from ``finetune_echo_mamba_3d_patch4.yaml``.

Dtype policy on both sides: bfloat16 compute, float32 parameters and optimizer state (the
release's ``amp_mode: bf16`` autocast; ours ``dtype=bfloat16``). The release runs its own fast
path: ``selective_scan_cuda`` and ``causal_conv1d`` compiled for the local GPU from their sdists
(``bench/mamba_ssm_build.py``, inside the run when ``--build`` has no built tree yet), mamba_ssm's
Triton LayerNorm, no EMA (the trainer's EMA update every 5 steps is left out on both sides).

``--sides ours`` then ``--sides release`` with the same ``--results`` file run the two halves in
separate calls (ours needs no build) and print the table with both. Every (row, side) runs in a
fresh subprocess, so each peak memory starts from zero: the release's
``torch.cuda.max_memory_allocated``, ours the device's ``peak_bytes_in_use``. Each row prints
as soon as both sides finish; a side that fails prints its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROWS = {
    # row: (release config file, our registry name, task)
    "evim3_p4_pretrain": ("pretrain_echo_mamba_3d_patch4.yaml", "evim3_p4", "pretrain"),
    "evim3_p4_finetune": ("finetune_echo_mamba_3d_patch4.yaml", "evim3_p4", "finetune"),
}
CLIP = (4, 64, 112, 1)  # batch, frames, size, channels
_MARK = "VS_RELEASE_RESULT "


# --------------------------------------------------------------------------------------------
# The release's recipe, from its own yaml files.

def release_config(release_dir: str, config_file: str) -> dict:
  """The release's config as a nested dict: its default files, then the main file, merged in
  the order its ``config.additional`` names them (later keys overwrite earlier ones)."""
  import yaml

  def read(name):
    path = os.path.join(release_dir, "configs", name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: --evim3 must name the E-ViM3 release checkout "
                              "(bash launch/gpu_wheels.sh --releases puts it in .whl/releases)")
    with open(path) as f:
      return yaml.safe_load(f)

  def merge(base, new):
    for k, v in new.items():
      base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(
          base.get(k), dict) else v
    return base

  main = read(config_file)
  cfg = {}
  for extra in main["config"]["additional"]:
    merge(cfg, read(f"{extra}.yaml"))
  return merge(cfg, main)


def recipe(cfg: dict) -> dict:
  """The optimizer settings both sides use: lr, AdamW eps, weight decay, gradient clip."""
  t = cfg["trainer"]
  opt = t["optimizer"]
  if opt["optimizer_choice"] != "adamw":
    raise ValueError(f"release optimizer {opt['optimizer_choice']!r}; this bench times AdamW")
  return dict(lr=float(opt["lr_default"]), eps=float(opt["adamw_eps"]),
              weight_decay=float(opt["wd_default"]), clip=float(t["max_grad_norm"]),
              amp=cfg["env"]["amp"]["amp_mode"], mask_ratio=cfg["model"].get("mask_prob"))


# --------------------------------------------------------------------------------------------
# Ours.

def ours(row: str, rec: dict, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  from vidssm_jax.bench.scan import median_ms
  from vidssm_jax.bench.train_step import _init, _loss_fn

  _, name, task = ROWS[row]
  from vidssm_jax.models import create_model
  from vidssm_jax.train.experiment import STEP_COMPILER_OPTIONS
  model = create_model(name, dtype=jnp.bfloat16)
  b, t, size, c = CLIP
  video = jax.random.normal(jax.random.key(0), (b, t, size, size, c), jnp.float32)
  if task == "pretrain":
    if rec["mask_ratio"] != model.mask_ratio:
      raise ValueError(f"mask ratio: release {rec['mask_ratio']}, ours {model.mask_ratio}")
    loss, draw = _loss_fn(name, model, None, b)
    params, _ = _init(model, video, draw(jax.random.key(2)), method="pretrain_loss")
  else:
    target = jax.random.uniform(jax.random.key(4), (b, 1), jnp.float32, 10.0, 80.0)
    params, _ = _init(model, video)

    def loss(p, tp, v, r):
      pred = model.apply({"params": p}, v, train=True, rngs={"dropout": r})
      return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))

  tx = optax.chain(optax.clip_by_global_norm(rec["clip"]),
                   optax.adamw(rec["lr"], eps=rec["eps"], weight_decay=rec["weight_decay"]))

  def step(params, opt_state, video, rng):
    value, grads = jax.value_and_grad(loss)(params, None, video, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1), compiler_options=STEP_COMPILER_OPTIONS).lower(
      params, tx.init(params), video, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - start
  state = [params, tx.init(params)]

  def run(video):
    state[0], state[1], value = compiled(state[0], state[1], video, jax.random.key(1))
    return value

  ms = median_ms(run, video, warmup=3, repeats=repeats)
  stats = jax.devices()[0].memory_stats() or {}
  return dict(ms=ms, mem_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30,
              loss=float(run(video)), compile_s=compile_s,
              what=f"jax {jax.__version__} on {jax.default_backend()}, scan backend auto")


# --------------------------------------------------------------------------------------------
# The release.

def _import_release(release_dir: str, build: str, sdists: str):
  """Makes the release's ``src`` package, mamba_ssm and causal_conv1d importable; builds the two
  CUDA extensions into ``build`` first when they are not there. Returns what was loaded."""
  from vidssm_jax.bench import mamba_ssm_build as mb

  import glob

  built = lambda d, name: glob.glob(os.path.join(d, "ext", f"{name}*.so"))
  mamba_dir, conv_dir = os.path.join(build, "mamba"), os.path.join(build, "causal_conv1d")
  if not built(mamba_dir, "selective_scan_cuda"):
    mb.build(os.path.join(sdists, "mamba_ssm-2.3.2.post1.tar.gz"), mamba_dir)
  mb.load(mamba_dir)
  # The release's mamba_inner_interface imports causal_conv1d unconditionally.
  if not built(conv_dir, "causal_conv1d_cuda"):
    mb.build_causal_conv1d(os.path.join(sdists, "causal_conv1d-1.5.0.post8.tar.gz"), conv_dir)
  mb.load_causal_conv1d(conv_dir)
  notes = ["selective_scan_cuda", "causal_conv1d"]
  sys.path.insert(0, os.path.abspath(release_dir))
  return notes


def release(row: str, cfg: dict, rec: dict, repeats: int, release_dir: str, build: str,
            sdists: str) -> dict:
  import torch
  import torch.nn.functional as F

  loaded = _import_release(release_dir, build, sdists)
  from src.utils.misc import ConfigMisc, DistMisc
  DistMisc.setup_for_distributed(True)  # the release's print(..., force=True) needs it
  import src.models  # noqa: F401  (registers every model)
  from src.models.modules.model_base import model_register

  _, _, task = ROWS[row]
  ns = ConfigMisc.nested_dict_to_nested_namespace(cfg)
  model = model_register.get(cfg["model"]["model_choice"])(ns).cuda().train()
  opt = torch.optim.AdamW(model.parameters(), lr=rec["lr"], eps=rec["eps"],
                          weight_decay=rec["weight_decay"])
  b, t, size, c = CLIP
  gen = torch.Generator(device="cuda").manual_seed(0)
  x = torch.randn(b, c, t, size, size, device="cuda", generator=gen)
  target = torch.rand(b, 1, device="cuda", generator=gen) * 70 + 10
  dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[rec["amp"]]

  def step():
    with torch.autocast("cuda", dtype=dtype):
      out = model({"x": x})
      if task == "pretrain":
        loss = F.mse_loss(out["pred_masked"], out["original_masked"])
      else:
        loss = F.mse_loss(out["pred_ef"], target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), rec["clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(3):
    step()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    loss = step()
    end.record()
    torch.cuda.synchronize()
    times.append(begin.elapsed_time(end))
  times.sort()
  return dict(ms=times[len(times) // 2], mem_gib=torch.cuda.max_memory_allocated() / 2**30,
              loss=float(loss), what=f"torch {torch.__version__}, " + " + ".join(loaded))


# --------------------------------------------------------------------------------------------
# The table.

HEADER = (f"{'row':<19} {'side':<8} {'step ms':>9} {'clips/s':>8} {'peak GiB':>9} "
          f"{'ours/release':>13}  notes")


def format_row(row: str, side: str, r: dict, ratio: str = "") -> str:
  if "error" in r:
    return f"{row:<19} {side:<8} failed: {r['error']}"
  return (f"{row:<19} {side:<8} {r['ms']:9.1f} {CLIP[0] / (r['ms'] * 1e-3):8.2f} "
          f"{r['mem_gib']:9.2f} {ratio:>13}  {r['what']}, loss {r['loss']:.4g}")


def ratio(o: dict, r: dict) -> str:
  if "error" in o or "error" in r:
    return "-"
  return f"{o['ms'] / r['ms']:.2f}"


def _child(args) -> None:
  cfg = release_config(args.evim3, ROWS[args.row][0])
  rec = recipe(cfg)
  try:
    if args.child == "ours":
      out = ours(args.row, rec, args.repeats)
    else:
      out = release(args.row, cfg, rec, args.repeats, args.evim3, args.build, args.sdists)
  except Exception as e:  # noqa: BLE001  (reported in the table, the other rows still run)
    import traceback
    traceback.print_exc()
    out = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  print(_MARK + json.dumps(out), flush=True)


def _run_side(args, row: str, side: str) -> dict:
  cmd = [sys.executable, "-m", "vidssm_jax.bench.vs_release", "--child", side, "--row", row,
         "--evim3", args.evim3, "--build", args.build, "--sdists", args.sdists,
         "--repeats", str(args.repeats)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
  for line in proc.stdout.splitlines():
    if line.startswith(_MARK):
      out = json.loads(line[len(_MARK):])
      break
  else:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    out = dict(error=f"exit {proc.returncode}: {tail[0]}")
  if "error" in out:  # the child's own account, for whoever reads the log
    print("\n".join(proc.stderr.strip().splitlines()[-20:]), file=sys.stderr, flush=True)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {tuple(ROWS)}")
  parser.add_argument("--evim3", default=".whl/releases/E-ViM3",
                      help="the E-ViM3 release checkout (never committed)")
  parser.add_argument("--build", default="build/peers",
                      help="where selective_scan_cuda and causal_conv1d are (or get) built")
  parser.add_argument("--sdists", default=".whl/src", help="mamba_ssm and causal_conv1d sdists")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--timeout", type=int, default=900, help="seconds per side")
  parser.add_argument("--sides", default="ours,release",
                      help="which sides to run now (ours first: the release may still be building)")
  parser.add_argument("--results", help="a JSON file that keeps each side's rows between runs, "
                      "so the sides can run in separate calls and still print one table")
  parser.add_argument("--child", choices=("ours", "release"), help=argparse.SUPPRESS)
  parser.add_argument("--row", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    _child(args)
    return
  rows = [r for r in args.rows.split(",") if r]
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    parser.error(f"unknown row(s) {unknown}; choose from {tuple(ROWS)}")
  if not os.path.isdir(os.path.join(args.evim3, "src")):
    parser.error(f"{args.evim3!r} is not the E-ViM3 release checkout (no src/); run "
                 "`bash launch/gpu_wheels.sh --releases` and carry .whl")
  sides = [x for x in args.sides.split(",") if x]
  if not set(sides) <= {"ours", "release"}:
    parser.error(f"--sides {args.sides!r}: a comma list of ours, release")
  results = {}
  if args.results and os.path.exists(args.results):
    with open(args.results) as f:
      results = json.load(f)
  for side in sides:
    for row in rows:
      results.setdefault(row, {})[side] = _run_side(args, row, side)
      print(format_row(row, side, results[row][side]), flush=True)
      if args.results:
        with open(args.results, "w") as f:
          json.dump(results, f, indent=1)
  print(HEADER, flush=True)
  print("-" * len(HEADER), flush=True)
  for row, got in results.items():
    for side in ("release", "ours"):
      if side in got:
        both = "release" in got and side == "ours"
        print(format_row(row, side, got[side], ratio(got["ours"], got["release"]) if both
                         else ""), flush=True)

if __name__ == "__main__":
  main()
