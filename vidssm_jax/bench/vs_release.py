"""Ours against the authors' PyTorch releases on the same GPU: training steps and live streaming.

    bash launch/gpu_wheels.sh --mamba-ssm --releases      # here: sdists, wheels, release sources
    python -m vidssm_jax.bench.vs_release                 # on the GPU machine, carrying .whl
    python -m vidssm_jax.bench.vs_release --rows endomamba_s_stream_T16,endomamba_s_stream_b16

Rows (random weights and inputs; the median of ``--repeats`` steps after warm-up):

- ``evim3_p4_pretrain``: 4 × 1 × 64 × 112 × 112 grey, STC mask 0.8 (chains 2 × 4 × 4), the
  visible-token encoder and the Mamba-3D decoder, MSE on the masked patches; the release's
  ``pretrain_video_mamba_3d_efficient`` model from ``configs/pretrain_echo_mamba_3d_patch4.yaml``.
- ``evim3_p4_finetune``: the same clip through the full-volume encoder and the EF head, MSE on
  EF; the release's ``echo_dynamic_video_mamba_3d`` from ``finetune_echo_mamba_3d_patch4.yaml``.
  Both E-ViM3 rows take the optimizer settings (AdamW eps, weight decay, gradient clip) from the
  release's own config file, and ours uses the same.
- ``endomamba_s_pretrain``: EndoMamba-S pretraining, 8 × 16 × 224² RGB, tube mask 0.75, the
  visible-token encoder and the 4-block transformer decoder, MSE on the per-patch normalised
  pixels of the masked patches. The release's ``pretrain_endomamba_small_patch16_224``
  (``video_sm/models/modeling_pretrain.py``) with the defaults of its
  ``run_endomamba_pretraining.py`` (AdamW eps and weight decay, no gradient clip, lr scaled by
  batch / 256), masks from its ``TubeMaskingGenerator``, targets as its
  ``engine_for_pretraining.py`` makes them; ours ``endomamba_small_pretrain``. No teacher on
  either side: the alignment term is off (the release names its teacher on the command line and
  ships none).
- ``endomamba_s_stream_T16`` / ``endomamba_s_stream_T128``: live streaming at batch 1, 224²: the
  latency of one frame after T frames of history. The release's ``endomamba_small(
  return_last_state=True, with_head=False)`` called per frame as its ``tests/endomamba_demo.py``
  does, ``y, params = model(frame, inference_params=params); params.seqlen_offset += 1`` (the 12
  temporal blocks' conv and SSM states ride in ``params.key_value_memory_dict``); ours
  ``model.apply(variables, frame, state, method="step")``, jitted. The features (no head).
- ``endomamba_s_stream_b16``: 16 concurrent streams batched into each step, T = 16.
  Each stream row runs T frames one at a time, then times ``--frames`` more (wall time, each
  synchronised on its output), every step continuing from the state the previous one returned.

Dtype policy on both sides: bfloat16 compute, float32 parameters, optimizer state and scan state
(the releases' bf16 autocast, ours ``dtype=bfloat16``; EndoMamba's own pretraining script uses
fp16 autocast with a GradScaler, bf16 here on both sides). The releases run their own fast paths:
E-ViM3 mamba_ssm 2.3.2's ``selective_scan_cuda`` and ``causal_conv1d`` 1.5.0.post8, EndoMamba its
own forks of both (its scan takes an initial state), each compiled for the local GPU
(``bench/mamba_ssm_build.py``, inside the run when ``--build`` has no built tree yet), and
mamba_ssm's Triton RMSNorm; no EMA (the E-ViM3 trainer's EMA update every 5 steps is left out
on both sides). Each side's weight decay applies to every parameter.

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
import statistics
import subprocess
import sys
import time
import types

EVIM3_ROWS = {
    # row: (release config file, our registry name, task)
    "evim3_p4_pretrain": ("pretrain_echo_mamba_3d_patch4.yaml", "evim3_p4", "pretrain"),
    "evim3_p4_finetune": ("finetune_echo_mamba_3d_patch4.yaml", "evim3_p4", "finetune"),
}
ENDOMAMBA_ROWS = {
    # row: (task, batch, frames: the clip (pretrain) or the history before the timed frames)
    "endomamba_s_pretrain": ("pretrain", 8, 16),
    "endomamba_s_stream_T16": ("stream", 1, 16),
    "endomamba_s_stream_T128": ("stream", 1, 128),
    "endomamba_s_stream_b16": ("stream", 16, 16),
}
ROWS = {**EVIM3_ROWS, **ENDOMAMBA_ROWS}
CLIP = (4, 64, 112, 1)  # the E-ViM3 rows: batch, frames, size, channels
ENDOMAMBA_SCRIPT = ("videomamba", "video_sm", "run_endomamba_pretraining.py")
_MARK = "VS_RELEASE_RESULT "


# --------------------------------------------------------------------------------------------
# The releases' recipes: E-ViM3's from its yaml files, EndoMamba's from its script's defaults.

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


def script_defaults(path: str) -> dict:
  """``{name: default}`` of every ``parser.add_argument("--name", default=...)`` in a script
  whose default is a literal, read from its syntax tree (the script is not run)."""
  import ast

  with open(path) as f:
    tree = ast.parse(f.read(), path)
  out = {}
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
            and node.args and isinstance(node.args[0], ast.Constant)):
      continue
    flag = str(node.args[0].value)
    default = [k.value for k in node.keywords if k.arg == "default"]
    if flag.startswith("--") and default:
      try:
        out[flag[2:]] = ast.literal_eval(default[0])
      except ValueError:
        pass
  return out


def endomamba_recipe(release_dir: str, batch: int) -> dict:
  """EndoMamba's pretraining settings, the defaults of its ``run_endomamba_pretraining.py``:
  the model, AdamW's betas, eps and weight decay, the gradient clip (None: none), the lr scaled
  by ``batch / 256`` as its ``main`` does, the mask ratio, decoder depth and drop path."""
  path = os.path.join(release_dir, *ENDOMAMBA_SCRIPT)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --endomamba must name the EndoMamba release "
                            "checkout (bash launch/gpu_wheels.sh --releases puts it in "
                            ".whl/releases)")
  d = script_defaults(path)
  for key, want in (("opt", "adamw"), ("mask_type", "tube"), ("normlize_target", True)):
    if d[key] != want:
      raise ValueError(f"release {key}={d[key]!r}; this bench times {key}={want!r}")
  return dict(model=d["model"], lr=d["lr"] * batch / 256, eps=d["opt_eps"],
              betas=tuple(d["opt_betas"] or (0.9, 0.999)), weight_decay=d["weight_decay"],
              clip=d["clip_grad"], mask_ratio=d["mask_ratio"], decoder_depth=d["decoder_depth"],
              drop_path=d["drop_path"])


# --------------------------------------------------------------------------------------------
# Ours.

def _jax_peak_gib() -> float:
  """The device's peak memory in use so far, GiB (NaN where it keeps no statistics, e.g. CPU)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use", float("nan")) / 2**30


def _jax_step_row(loss, params, tx, video, repeats: int) -> dict:
  """Compiles one optimizer step of ``loss(params, None, video, rng)`` (params and optimizer
  state donated) and times it: median ms, peak memory, the loss, compile seconds, batch."""
  import jax
  import optax

  from vidssm_jax.bench.scan import median_ms
  from vidssm_jax.train.experiment import STEP_COMPILER_OPTIONS

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
  return dict(ms=ms, mem_gib=_jax_peak_gib(), loss=float(run(video)), compile_s=compile_s,
              batch=int(video.shape[0]))


def ours(row: str, rec: dict, repeats: int, remat: str = "full") -> dict:
  """Our E-ViM3 row: ``evim3_p4`` pretraining or EF fine-tuning, with the release's recipe and
  ``remat`` per scanned block."""
  import jax
  import jax.numpy as jnp
  import optax

  from vidssm_jax.bench.train_step import _init, _loss_fn
  from vidssm_jax.models import create_model

  _, name, task = EVIM3_ROWS[row]
  model = create_model(name, dtype=jnp.bfloat16, remat=remat)
  b, t, size, c = CLIP
  video = jax.random.normal(jax.random.key(0), (b, t, size, size, c), jnp.float32)
  if task == "pretrain":
    if rec["mask_ratio"] != model.mask_ratio:
      raise ValueError(f"mask ratio: release {rec['mask_ratio']}, ours {model.mask_ratio}")
    loss, draw = _loss_fn(name, model, None, b)
    params, _ = _init(model, video, draw(jax.random.key(2)), method="pretrain_loss")
  else:
    loss, _ = _loss_fn(name + "+ef", model, None, b)
    params, _ = _init(model, video)

  tx = optax.chain(optax.clip_by_global_norm(rec["clip"]),
                   optax.adamw(rec["lr"], eps=rec["eps"], weight_decay=rec["weight_decay"]))
  out = _jax_step_row(loss, params, tx, video, repeats)
  out["what"] = f"jax {jax.__version__} on {jax.default_backend()}, scan backend auto, remat {remat}"
  return out


def ours_endomamba_pretrain(rec: dict, repeats: int, batch: int = 8, frames: int = 16,
                            dtype=None, remat: str = "full", **overrides) -> dict:
  """Our EndoMamba-S pretraining step (``endomamba_small_pretrain``, no teacher) with the
  release's recipe; ``overrides`` (``create_model``'s) shrink the model for tests."""
  import jax
  import jax.numpy as jnp
  import optax

  from vidssm_jax.bench.train_step import _init, _loss_fn
  from vidssm_jax.models import create_model

  model = create_model("endomamba_small_pretrain", dtype=dtype or jnp.bfloat16,
                       num_frames=frames, remat=remat, **overrides)
  if rec["mask_ratio"] != model.mask_ratio:
    raise ValueError(f"mask ratio: release {rec['mask_ratio']}, ours {model.mask_ratio}")
  size, c = model.backbone.img_size, model.backbone.in_chans
  video = jax.random.normal(jax.random.key(0), (batch, frames, size, size, c), jnp.float32)
  loss, draw = _loss_fn("endomamba_s", model, None, batch)  # a tube mask, drawn in the step
  params, _ = _init(model, video, draw(jax.random.key(2)), method="pretrain_loss")
  b1, b2 = rec["betas"]
  tx = optax.adamw(rec["lr"], b1=b1, b2=b2, eps=rec["eps"], weight_decay=rec["weight_decay"])
  if rec["clip"]:
    tx = optax.chain(optax.clip_by_global_norm(rec["clip"]), tx)
  out = _jax_step_row(loss, params, tx, video, repeats)
  out["what"] = (f"jax {jax.__version__} on {jax.default_backend()}, scan backend auto, remat "
                 f"{remat}, no teacher")
  return out


def ours_endomamba_stream(batch: int, history: int, frames: int, dtype=None,
                          **overrides) -> dict:
  """Our EndoMamba-S live stream of ``batch`` streams: ``history`` jitted ``step`` calls from
  ``init_state``, then the median wall time of ``frames`` more, each continuing from the state
  the previous one returned. ``overrides`` (``create_model``'s) shrink the model for tests."""
  import jax
  import jax.numpy as jnp

  from vidssm_jax.bench.scan import median_ms
  from vidssm_jax.bench.stream import _init as init_variables
  from vidssm_jax.bench.stream import live_stream
  from vidssm_jax.models import create_model

  model = create_model("endomamba_small", dtype=dtype or jnp.bfloat16, **overrides)
  one, _, _ = live_stream(model, init_variables(model, model.img_size), batch)
  start = time.perf_counter()
  jax.block_until_ready(one())
  compile_s = time.perf_counter() - start
  for _ in range(history - 1):
    jax.block_until_ready(one())
  ms = median_ms(one, warmup=0, repeats=frames)
  out, _ = one()
  return dict(ms=ms, mem_gib=_jax_peak_gib(), batch=batch, compile_s=compile_s,
              feature_mean=float(jnp.mean(jnp.abs(out.astype(jnp.float32)))),
              what=f"jax {jax.__version__} on {jax.default_backend()}, jitted step compiled "
                   f"for the weights (live_step), scan "
                   f"backend auto, T={history}")


# --------------------------------------------------------------------------------------------
# The releases: timing on the torch side.

def _cuda_event_ms(step, repeats: int, warmup: int = 3):
  """Median GPU time of ``step()`` in ms between CUDA events, after ``warmup`` calls; and the
  last call's result."""
  import torch

  for _ in range(warmup):
    step()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    out = step()
    end.record()
    torch.cuda.synchronize()
    times.append(begin.elapsed_time(end))
  return statistics.median(times), out


def _wall_ms(step, repeats: int):
  """Median wall time of ``step()`` in ms, the GPU synchronised around each call; and the last
  call's result (a stream's latency as its caller sees it)."""
  import torch

  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = step()
    torch.cuda.synchronize()
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times), out


# --------------------------------------------------------------------------------------------
# The E-ViM3 release.

def _build_evim3_peers(build: str, sdists: str) -> tuple:
  """Builds mamba_ssm's and causal_conv1d's CUDA extensions into ``build/mamba`` and
  ``build/causal_conv1d`` unless there; returns the two folders."""
  import glob

  from vidssm_jax.bench import mamba_ssm_build as mb

  built = lambda d, name: glob.glob(os.path.join(d, "ext", f"{name}*.so"))
  mamba_dir, conv_dir = os.path.join(build, "mamba"), os.path.join(build, "causal_conv1d")
  if not built(mamba_dir, "selective_scan_cuda"):
    mb.build(os.path.join(sdists, "mamba_ssm-2.3.2.post1.tar.gz"), mamba_dir)
  if not built(conv_dir, "causal_conv1d_cuda"):
    mb.build_causal_conv1d(os.path.join(sdists, "causal_conv1d-1.5.0.post8.tar.gz"), conv_dir)
  return mamba_dir, conv_dir


def build_peers(args, rows) -> None:
  """Builds the releases' CUDA extensions once, before the rows, so that no row's ``--timeout``
  has to cover a build of several minutes. A failure prints one line; the rows then report it."""
  from vidssm_jax.bench import mamba_ssm_build as mb

  start = time.perf_counter()
  print(f"building the releases' CUDA extensions under {args.build} where missing ...",
        flush=True)
  try:
    if set(rows) & set(EVIM3_ROWS):
      _build_evim3_peers(args.build, args.sdists)
    if set(rows) & set(ENDOMAMBA_ROWS):
      mb.build_fork(args.endomamba, os.path.join(args.build, "endomamba"))
  except Exception as e:  # noqa: BLE001  (each release row fails with its own account)
    print(f"building failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
          "the release rows will say why", flush=True)
    return
  print(f"built in {time.perf_counter() - start:.0f} s", flush=True)


def _import_release(release_dir: str, build: str, sdists: str):
  """Makes the release's ``src`` package, mamba_ssm and causal_conv1d importable; builds the two
  CUDA extensions into ``build`` first when they are not there. Returns what was loaded."""
  from vidssm_jax.bench import mamba_ssm_build as mb

  mamba_dir, conv_dir = _build_evim3_peers(build, sdists)
  mb.load(mamba_dir)
  # The release's mamba_inner_interface imports causal_conv1d unconditionally.
  mb.load_causal_conv1d(conv_dir)
  notes = ["selective_scan_cuda", "causal_conv1d"]
  sys.path.insert(0, os.path.abspath(release_dir))
  return notes


def release(row: str, cfg: dict, rec: dict, repeats: int, release_dir: str, build: str,
            sdists: str) -> dict:
  """The E-ViM3 release's row: its model class from its config, one AdamW step under autocast."""
  import torch
  import torch.nn.functional as F

  loaded = _import_release(release_dir, build, sdists)
  from src.utils.misc import ConfigMisc, DistMisc
  DistMisc.setup_for_distributed(True)  # the release's print(..., force=True) needs it
  import src.models  # noqa: F401  (registers every model)
  from src.models.modules.model_base import model_register

  _, _, task = EVIM3_ROWS[row]
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
    return _torch_update(model, opt, loss, rec["clip"])

  ms, loss = _cuda_event_ms(step, repeats)
  return dict(ms=ms, mem_gib=torch.cuda.max_memory_allocated() / 2**30, loss=float(loss),
              batch=b, what=f"torch {torch.__version__}, " + " + ".join(loaded))


def _torch_update(model, opt, loss, clip):
  """The releases' optimizer step: backward, the gradient-norm clip (none when ``clip`` is 0 or
  None), AdamW, gradients dropped. Returns ``loss``."""
  import torch
  loss.backward()
  if clip:
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
  opt.step()
  opt.zero_grad(set_to_none=True)
  return loss


# --------------------------------------------------------------------------------------------
# The EndoMamba release.

def endomamba_import_paths(release_dir: str) -> dict:
  """Where the EndoMamba release's code is found, as its own scripts find it: ``path`` for the
  front of ``sys.path`` (``video_sm/``, whose ``models`` package its pretraining model imports;
  ``videomamba/``, for ``_mamba`` and ``video_sm``; its own ``causal_conv1d`` package) and
  ``packages``, registered without their ``__init__.py``: ``_mamba.mamba_ssm``, whose
  ``__init__`` imports the language-model code and through it transformers' generation classes
  (gone in transformers 5), and ``ops``, the ``_mamba/mamba_ssm/ops`` that its mamba_simple.py
  imports from its author's own path (where that import fails, the fast path is None)."""
  root = os.path.join(os.path.abspath(release_dir), "videomamba")
  mamba = os.path.join(root, "_mamba")
  return dict(path=[os.path.join(root, "video_sm"), root, os.path.join(root, "causal-conv1d")],
              packages={"_mamba": mamba, "_mamba.mamba_ssm": os.path.join(mamba, "mamba_ssm"),
                        "ops": os.path.join(mamba, "mamba_ssm", "ops")})


def _bare_package(name: str, path: str) -> None:
  """Registers package ``name`` at folder ``path`` without running its ``__init__.py`` (unless
  it is registered there already; another package of that name is replaced)."""
  if getattr(sys.modules.get(name), "__path__", None) == [path]:
    return
  pkg = types.ModuleType(name)
  pkg.__path__ = [path]
  sys.modules[name] = pkg
  parent, _, child = name.rpartition(".")
  if parent:
    setattr(sys.modules[parent], child, pkg)


def _import_endomamba_release(release_dir: str, build: str) -> list:
  """Builds the release's own ``selective_scan_cuda`` and ``causal_conv1d_cuda`` into
  ``build/endomamba`` when they are not there and makes its code importable
  (``endomamba_import_paths``). Returns what was loaded, for the table."""
  from vidssm_jax.bench import mamba_ssm_build as mb

  exts = mb.build_fork(release_dir, os.path.join(build, "endomamba"))
  where = endomamba_import_paths(release_dir)
  sys.path[:0] = [p for p in exts + where["path"] if p not in sys.path]
  for name, path in where["packages"].items():
    _bare_package(name, path)
  import causal_conv1d_cuda
  import selective_scan_cuda
  for module, ext in zip((selective_scan_cuda, causal_conv1d_cuda), exts, strict=True):
    if os.path.dirname(os.path.abspath(module.__file__)) != os.path.abspath(ext):
      raise ImportError(f"{module.__name__} came from {module.__file__}, not from {ext}")
  from _mamba.mamba_ssm.modules import mamba_simple
  missing = [n for n in ("mamba_inner_fn", "mamba_inner_fn_no_out_proj", "RMSNorm")
             if getattr(mamba_simple, n, None) is None]
  if missing:
    raise ImportError(f"the release's mamba_simple.py found no {missing} in `ops`")
  return ["its selective_scan_cuda (initial-state scan) + causal_conv1d_cuda 1.0.0"]


def _load_source(path: str, name: str):
  """The module in file ``path``, without importing the package around it."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _release_targets(videos, mask, patch: int):
  """The release's pretraining targets (``engine_for_pretraining.py``, ``normlize_target``):
  the pixels un-normalised, each patch normalised per colour channel by its mean and unbiased
  std, the masked patches ``(b, masked, p·p·3)``."""
  import torch
  from einops import rearrange
  from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

  shape = (1, -1, 1, 1, 1)
  mean = torch.as_tensor(IMAGENET_DEFAULT_MEAN, device=videos.device).view(shape)
  std = torch.as_tensor(IMAGENET_DEFAULT_STD, device=videos.device).view(shape)
  x = rearrange(videos * std + mean, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c",
                p0=1, p1=patch, p2=patch)
  x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, unbiased=True, keepdim=True).sqrt()
                                            + 1e-6)
  x = rearrange(x, "b n p c -> b n (p c)")
  return x[mask].reshape(x.shape[0], -1, x.shape[-1])


def _release_endomamba_inputs(model, rec: dict, release_dir: str, batch: int, frames: int):
  """A random clip ``(b, 3, t, H, W)`` and the release's tube masks for it, ``(b, t·n)`` bool."""
  import numpy as np
  import torch

  masks = _load_source(os.path.join(release_dir, "videomamba", "video_sm", "datasets",
                                    "masking_generator.py"), "endomamba_masking_generator")
  patch, size = model.encoder.patch_embed.patch_size[0], model.encoder.patch_embed.img_size[0]
  gen = torch.Generator(device="cuda").manual_seed(0)
  videos = torch.randn(batch, 3, frames, size, size, device="cuda", generator=gen)
  np.random.seed(0)
  tube = masks.TubeMaskingGenerator((frames, size // patch, size // patch), rec["mask_ratio"])
  mask = torch.from_numpy(np.stack([tube() for _ in range(batch)])).cuda()
  return videos, mask.flatten(1).to(torch.bool)


def release_endomamba_pretrain(rec: dict, repeats: int, release_dir: str, build: str,
                               batch: int = 8, frames: int = 16) -> dict:
  """The EndoMamba release's pretraining step: its model, masks and targets, bf16 autocast, the
  engine's MSE, AdamW with its script's settings."""
  import torch
  import torch.nn.functional as F

  loaded = _import_endomamba_release(release_dir, build)
  import models.modeling_pretrain as release_models  # video_sm/models, as its script imports it

  model = getattr(release_models, rec["model"])(
      num_frames=frames, drop_path_rate=rec["drop_path"], decoder_depth=rec["decoder_depth"],
      use_checkpoint=False).cuda().train()
  opt = torch.optim.AdamW(model.parameters(), lr=rec["lr"], betas=rec["betas"], eps=rec["eps"],
                          weight_decay=rec["weight_decay"])
  videos, mask = _release_endomamba_inputs(model, rec, release_dir, batch, frames)
  patch = model.encoder.patch_embed.patch_size[0]

  def step():
    with torch.no_grad():
      labels = _release_targets(videos, mask, patch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
      pred, _ = model(videos, mask, 1)  # the engine's tubelet_size
      loss = F.mse_loss(pred, labels)
    return _torch_update(model, opt, loss, rec["clip"])

  ms, loss = _cuda_event_ms(step, repeats)
  return dict(ms=ms, mem_gib=torch.cuda.max_memory_allocated() / 2**30, loss=float(loss),
              batch=batch, what=f"torch {torch.__version__}, {loaded[0]}, bf16 autocast, "
                                "no teacher")


def _inference_params(max_seqlen: int, batch: int):
  """The release's ``InferenceParams`` (``_mamba/mamba_ssm/utils/generation.py``) and a note.
  That module imports transformers' ``GreedySearchDecoderOnlyOutput``, which transformers 5
  removed; then a namespace with the same fields (its model reads ``seqlen_offset`` and
  ``key_value_memory_dict``)."""
  try:
    from _mamba.mamba_ssm.utils.generation import InferenceParams
    return InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch), "its InferenceParams"
  except Exception:  # noqa: BLE001  (ImportError, or transformers' lazy import failing)
    return types.SimpleNamespace(max_seqlen=max_seqlen, max_batch_size=batch, seqlen_offset=0,
                                 batch_size_offset=0, key_value_memory_dict={},
                                 lengths_per_sample=None), "InferenceParams' fields"


def release_endomamba_stream(batch: int, history: int, frames: int, release_dir: str,
                             build: str) -> dict:
  """The EndoMamba release streaming ``batch`` streams frame by frame through its
  ``inference_params`` path: ``history`` frames, then the median wall time of ``frames`` more."""
  import torch

  loaded = _import_endomamba_release(release_dir, build)
  import video_sm.models.endomamba as release_model

  model = release_model.endomamba_small(pretrained=False, return_last_state=True,
                                        with_head=False).cuda().eval()
  params, note = _inference_params(history + frames + 1, batch)
  gen = torch.Generator(device="cuda").manual_seed(0)
  frame = torch.randn(batch, 3, 1, model.img_size, model.img_size, device="cuda", generator=gen)

  @torch.inference_mode()
  def one():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      out, _ = model(frame, inference_params=params)  # (b, 1, 197, 384) features
    params.seqlen_offset += 1
    return out

  for _ in range(history):
    one()
  ms, out = _wall_ms(one, frames)
  return dict(ms=ms, mem_gib=torch.cuda.max_memory_allocated() / 2**30, batch=batch,
              feature_mean=float(out.float().abs().mean()),
              what=f"torch {torch.__version__}, {loaded[0]}, bf16 autocast, {note}, T={history}")


# --------------------------------------------------------------------------------------------
# The table.

HEADER = (f"{'row':<23} {'side':<8} {'ms':>9} {'per s':>9} {'peak GiB':>9} "
          f"{'ours/release':>13}  notes")
LEGEND = ("ms: one training step, or one frame of every stream (stream rows); per s: clips/s, "
          "or frames/s of all streams; ours/release < 1: ours is faster")


def _batch(row: str, r: dict) -> int:
  if "batch" in r:
    return r["batch"]
  return ENDOMAMBA_ROWS[row][1] if row in ENDOMAMBA_ROWS else CLIP[0]


def format_row(row: str, side: str, r: dict, ratio: str = "") -> str:
  if "error" in r:
    return f"{row:<23} {side:<8} failed: {r['error']}"
  check = (f"loss {r['loss']:.4g}" if "loss" in r
           else f"mean |feature| {r.get('feature_mean', float('nan')):.4g}")
  per_s = _batch(row, r) / (r["ms"] * 1e-3)
  return (f"{row:<23} {side:<8} {r['ms']:9.2f} {per_s:9.1f} {r['mem_gib']:9.2f} "
          f"{ratio:>13}  {r['what']}, {check}")


def ratio(o: dict, r: dict) -> str:
  if "error" in o or "error" in r:
    return "-"
  return f"{o['ms'] / r['ms']:.2f}"


def _measure(args) -> dict:
  """Row ``args.row`` on side ``args.child``, in this process."""
  ours_side = args.child == "ours"
  if args.row in EVIM3_ROWS:
    cfg = release_config(args.evim3, EVIM3_ROWS[args.row][0])
    rec = recipe(cfg)
    if ours_side:
      return ours(args.row, rec, args.repeats, args.remat)
    return release(args.row, cfg, rec, args.repeats, args.evim3, args.build, args.sdists)
  task, batch, t = ENDOMAMBA_ROWS[args.row]  # t: the clip's frames, or a stream's history
  if task == "pretrain":
    rec = endomamba_recipe(args.endomamba, batch)
    if ours_side:
      return ours_endomamba_pretrain(rec, args.repeats, batch, t, remat=args.remat)
    return release_endomamba_pretrain(rec, args.repeats, args.endomamba, args.build, batch, t)
  if ours_side:
    return ours_endomamba_stream(batch, t, args.frames)
  return release_endomamba_stream(batch, t, args.frames, args.endomamba, args.build)


def _child(args) -> None:
  try:
    out = _measure(args)
  except Exception as e:  # noqa: BLE001  (reported in the table, the other rows still run)
    import traceback
    traceback.print_exc()
    out = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  print(_MARK + json.dumps(out), flush=True)


def _run_side(args, row: str, side: str) -> dict:
  cmd = [sys.executable, "-m", "vidssm_jax.bench.vs_release", "--child", side, "--row", row,
         "--evim3", args.evim3, "--endomamba", args.endomamba, "--build", args.build,
         "--sdists", args.sdists, "--repeats", str(args.repeats), "--frames", str(args.frames),
         "--remat", args.remat]
  try:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return dict(error=f"timed out after {args.timeout} s (--timeout; a release's first run also "
                      "builds its CUDA extensions under --build)")
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


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {tuple(ROWS)}")
  p.add_argument("--evim3", default=".whl/releases/E-ViM3",
                 help="the E-ViM3 release checkout (never committed)")
  p.add_argument("--endomamba", default=".whl/releases/EndoMamba",
                 help="the EndoMamba release checkout (never committed)")
  p.add_argument("--build", default="build/peers",
                 help="where the releases' CUDA extensions are (or get) built")
  p.add_argument("--sdists", default=".whl/src", help="mamba_ssm and causal_conv1d sdists")
  p.add_argument("--repeats", type=int, default=10, help="timed steps of a training row")
  p.add_argument("--frames", type=int, default=50, help="timed frames of a stream row")
  p.add_argument("--timeout", type=int, default=900, help="seconds per side")
  p.add_argument("--remat", default="full", choices=("none", "full", "dots"),
                 help="our training rows' rematerialisation per scanned block: full (the default) "
                      "saves only each block's input, which took our steps below the releases' "
                      "memory at about the same speed on an H200 (README, train_step)")
  p.add_argument("--sides", default="ours,release",
                 help="which sides to run now (ours first: the release may still be building)")
  p.add_argument("--results", help="a JSON file that keeps each side's rows between runs, "
                 "so the sides can run in separate calls and still print one table")
  p.add_argument("--build-only", action="store_true",
                 help="build the releases' CUDA extensions for --rows under --build and stop "
                      "(minutes; on a machine with a per-command limit, run this first)")
  p.add_argument("--child", choices=("ours", "release"), help=argparse.SUPPRESS)
  p.add_argument("--row", help=argparse.SUPPRESS)
  return p


def _check_args(parser, args) -> tuple:
  """The rows and sides asked for; a one-line error for a bad name or a missing checkout."""
  rows = [r for r in args.rows.split(",") if r]
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    parser.error(f"unknown row(s) {unknown}; choose from {tuple(ROWS)}")
  fix = "run `bash launch/gpu_wheels.sh --releases` and carry .whl"
  if set(rows) & set(EVIM3_ROWS) and not os.path.isdir(os.path.join(args.evim3, "src")):
    parser.error(f"{args.evim3!r} is not the E-ViM3 release checkout (no src/); {fix}")
  if set(rows) & set(ENDOMAMBA_ROWS) and not os.path.isdir(
      os.path.join(args.endomamba, "videomamba", "_mamba")):
    parser.error(f"{args.endomamba!r} is not the EndoMamba release checkout (no "
                 f"videomamba/_mamba/); {fix}")
  sides = [x for x in args.sides.split(",") if x]
  if not set(sides) <= {"ours", "release"}:
    parser.error(f"--sides {args.sides!r}: a comma list of ours, release")
  return rows, sides


def print_table(results: dict) -> None:
  print(HEADER, flush=True)
  print(LEGEND, flush=True)
  print("-" * len(HEADER), flush=True)
  for row, got in results.items():
    for side in ("release", "ours"):
      if side in got:
        both = "release" in got and side == "ours"
        print(format_row(row, side, got[side], ratio(got["ours"], got["release"]) if both
                         else ""), flush=True)


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  if args.child:
    _child(args)
    return
  rows, sides = _check_args(parser, args)
  if args.build_only:
    build_peers(args, rows)
    return
  results = {}
  if args.results and os.path.exists(args.results):
    with open(args.results) as f:
      results = json.load(f)
  for side in sides:
    if side == "release":
      build_peers(args, rows)
    for row in rows:
      results.setdefault(row, {})[side] = _run_side(args, row, side)
      print(format_row(row, side, results[row][side]), flush=True)
      if args.results:
        with open(args.results, "w") as f:
          json.dump(results, f, indent=1)
  print_table(results)


if __name__ == "__main__":
  main()
