# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # E-ViM³: pretrain as a masked autoencoder, fine-tune for ejection fraction
#
# E-ViM³ scans the token volume of an ultrasound clip in six directions with Mamba-3D blocks.
# Here a tiny one is pretrained by Spatial-Temporal Chained masked reconstruction (its encoder
# sees only the visible tokens), then fine-tuned to regress the ejection fraction (EF) of the
# beating left ventricle, and evaluated against predicting the training mean. By default on
# synthetic echocardiography clips (a beating ventricle in an ultrasound fan, labelled with the
# EF of the simulated beat); the data cell shows how to use EchoNet-Dynamic.
#
# Runtime: CPU is enough (about 7 minutes on 2 cores); a Colab GPU or TPU runtime is faster.
# `VIDSSM_SMOKE=1` in the environment runs a tiny setting (CI).

# %% cellView="form"
# @title Install (on Colab) { display-mode: "form" }
REPO_URL = "https://github.com/OWNER/vidssm_jax"  # @param {type:"string"}  where this repo lives

import os
import subprocess
import sys

if "google.colab" in sys.modules:
  if os.environ.get("COLAB_TPU_ADDR"):
    raise RuntimeError("this is the legacy remote TPU runtime; pick a TPU VM runtime (v2-8, v5e)")
  if not os.path.isdir("/content/vidssm_jax"):
    subprocess.run(["git", "clone", "--depth=1", REPO_URL, "/content/vidssm_jax"], check=True)
  # Colab's own jax (CUDA on GPU runtimes, libtpu on TPU runtimes) is kept.
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e",
                  "/content/vidssm_jax[video]", "mediapy", "matplotlib"], check=True)
  sys.path.insert(0, "/content/vidssm_jax")   # the editable install, without a restart

import jax

print("jax", jax.__version__, "| backend", jax.default_backend(), "| devices", jax.device_count())

# %% [markdown]
# ## Data
#
# `DATA = "synthetic"` writes generated clips to `DATA_DIR` (only into an empty folder or one
# that already holds synthetic shards). For EchoNet-Dynamic (manual download after registering
# at Stanford AIMI): put `FileList.csv` and `Videos/` in a Drive folder, set
# `DATA = "echonet"` and `ECHONET_DIR`; the cell converts the videos to shards once (grey,
# 112 × 112; the tfds builder `vidssm_jax.data.tfds.EchonetDynamic` with that folder as
# `manual_dir` is the other route). Already converted shards: `DATA = "shards"` with `DATA_DIR`.

# %%
DATA = "synthetic"  # @param ["synthetic", "echonet", "shards"]
DATA_DIR = "/tmp/vidssm_colab_echo"  # @param {type:"string"}
ECHONET_DIR = "/content/drive/MyDrive/EchoNet-Dynamic"  # @param {type:"string"}
SMOKE = os.environ.get("VIDSSM_SMOKE") == "1"
SMOKE_DIR = os.environ.get("VIDSSM_SMOKE_DIR", "/tmp/vidssm_smoke_echo")  # where the smoke run writes

if DATA == "echonet":
  if "google.colab" in sys.modules:
    from google.colab import drive
    drive.mount("/content/drive")
  DATA_DIR = "/content/echonet_shards"
  subprocess.run([sys.executable, "-m", "vidssm_jax.data.shards", "--videos",
                  f"{ECHONET_DIR}/Videos", "--labels", f"{ECHONET_DIR}/FileList.csv", "--out",
                  DATA_DIR, "--size", "112", "--channels", "1"], check=True)

# %% [markdown]
# ## Config
#
# `configs/evim3.py:demo`, the file `python -m vidssm_jax.main --config=configs/evim3.py:demo`
# reads; with real data use `configs/evim3_ef.py` and the paper's sizes instead.

# %%
import importlib.util
import pathlib

import vidssm_jax

REPO_DIR = pathlib.Path(vidssm_jax.__file__).resolve().parents[1]


def load_config(name, preset=""):
  spec = importlib.util.spec_from_file_location(name, REPO_DIR / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


config = load_config("evim3", "demo")
config.data.dir = DATA_DIR
if DATA != "synthetic":
  config.data.synthetic = ""
PRETRAIN_STEPS = 60  # @param {type:"integer"}
FINETUNE_STEPS = 300  # @param {type:"integer"}
config.pretrain.steps, config.finetune.steps = PRETRAIN_STEPS, FINETUNE_STEPS
if SMOKE:  # a tiny setting for CI: a few steps on a few clips
  config.data.dir = os.path.join(SMOKE_DIR, "data")
  config.data.synthetic_num = 40
  config.pretrain.steps, config.pretrain.image_every = 4, 2
  config.finetune.steps, config.finetune.eval_every = 6, 3
  config.pretrain.batch_size = config.finetune.batch_size = 8
  config.log_every = 2
WORKDIR = os.path.join(SMOKE_DIR, "run") if SMOKE else "/tmp/vidssm_colab_echo_run"
print(config.model_name, dict(config.model))
print("data:", config.data.dir, "| pretrain", config.pretrain.steps, "steps, mask",
      dict(config.pretrain.mask), "| finetune", config.finetune.steps, "steps")

# %% [markdown]
# ## A look at the data
#
# A few training clips, with the EF of each (the label is the beat's ejection fraction: watch
# how much the dark cavity shrinks).

# %%
import shutil

import mediapy
import numpy as np
from vidssm_jax.data import shards, synthetic

if not shutil.which("ffmpeg"):  # mediapy encodes with ffmpeg; the imageio-ffmpeg wheel has one
  import imageio_ffmpeg
  mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())

if DATA == "synthetic":
  clips = [synthetic.echo_clip(config.seed, i, 32, 96) for i in range(4)]
  mediapy.show_videos({f"EF {c['ef']:.0f}%": c["video"][..., 0] for c in clips}, fps=12,
                      codec="gif", height=160)

# %% [markdown]
# ## Pretrain, fine-tune, evaluate
#
# One call runs the stages of `config.mode` with progress bars: it writes the shards if needed,
# pretrains (masked reconstruction), fine-tunes from the pretrained encoder (validation MAE picks
# the best checkpoint) and evaluates that checkpoint on the test split. Re-running the cell
# resumes from the last checkpoints.

# %%
import json
import time

from vidssm_jax.train import experiment

start = time.time()
result = experiment.run(config, WORKDIR)
print(f"{time.time() - start:.0f} s")
print(json.dumps(result, indent=1))

# %% [markdown]
# ## Loss curves and reconstructions

# %%
import matplotlib.pyplot as plt


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for ax, stage in zip(axes, ("pretrain", "finetune")):
  rows = [r for r in read_jsonl(os.path.join(WORKDIR, stage, "metrics.jsonl")) if "loss" in r]
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
  ax.set_title(f"{stage} loss"); ax.set_xlabel("step")
axes[0].set_ylabel("normalised-pixel MSE"); axes[1].set_ylabel("MSE (standardised EF)")
val = [r for r in read_jsonl(os.path.join(WORKDIR, "finetune", "metrics.jsonl")) if "eval/mae" in r]
axes[2].plot([r["step"] for r in val], [r["eval/mae"] for r in val], "o-", label="val MAE")
axes[2].axhline(result["test/baseline_mean_mae"], ls=":", c="grey", label="predict-the-mean (test)")
axes[2].set_title("validation MAE (EF points)"); axes[2].set_xlabel("step"); axes[2].legend()
plt.tight_layout(); plt.show()

# The pretraining stage writes input / masked / reconstruction grids as PNGs.
samples = sorted(pathlib.Path(WORKDIR, "pretrain", "samples").glob("*.png"))
if samples:
  latest = max(int(p.stem.rsplit("_", 1)[1]) for p in samples)
  shown = [p for p in samples if p.stem.endswith(f"_{latest:07d}")]
  fig, axes = plt.subplots(len(shown), 1, figsize=(12, 2.2 * len(shown)), squeeze=False)
  for ax, p in zip(axes[:, 0], shown):
    ax.imshow(plt.imread(p), cmap="gray"); ax.set_title(p.stem); ax.axis("off")
  plt.tight_layout(); plt.show()

# %% [markdown]
# ## Predicted vs true EF
#
# The best fine-tuning checkpoint on every test video (clips of a video averaged, as in
# EchoNet's protocol), against the line of perfect predictions.

# %%
from vidssm_jax.data import pipeline
from vidssm_jax.models import create_model
from vidssm_jax.train.checkpoint import Checkpointer

f = config.finetune
ckpt = Checkpointer(os.path.join(WORKDIR, "finetune", "checkpoints"), async_save=False,
                    best_metric=f.select_metric, best_mode=f.select_mode)
use_ema = bool(config.evaluate.get("use_ema") and config.finetune.get("ema_decay"))
params = ckpt.restore_params(which="best" if ckpt.best.best_step() is not None else "latest",
                             use_ema=use_ema)   # the weights the evaluation scored
ckpt.close()
overrides = {k: v for k, v in config.model.to_dict().items() if k != "dtype"}
model = create_model(config.model_name, num_outputs=f.num_outputs, **overrides)
predict = jax.jit(lambda p, v: model.apply({"params": p}, v))
by_video, truth = {}, {}
for batch in pipeline.make_dataset(config.data.dir, "test", num_frames=config.data.num_frames,
                                   stride=config.data.stride, image_size=config.data.image_size,
                                   batch_size=f.batch_size, train=False, seed=0, num_workers=0,
                                   num_clips=config.data.eval_clips):
  ef = np.asarray(predict(params, batch["video"]))[:, 0] * f.target_std + f.target_mean
  for vid, e, t, ok in zip(batch["video_id"], ef, batch[f.label_key], batch["valid"]):
    if ok:
      by_video.setdefault(int(vid), []).append(e)
      truth[int(vid)] = float(t)
pred = np.array([np.mean(by_video[v]) for v in truth])
true = np.array(list(truth.values()))
mae = np.abs(pred - true).mean()
train_mean = shards.read_labels(config.data.dir, "train", f.label_key).mean()
fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.scatter(true, pred, s=14, alpha=0.7, label=f"E-ViM³: MAE {mae:.1f}")
lo, hi = min(true.min(), pred.min()) - 2, max(true.max(), pred.max()) + 2
ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="perfect")
ax.axhline(train_mean, c="grey", ls=":",
           label=f"predict the mean: MAE {result['test/baseline_mean_mae']:.1f}")
ax.set_xlabel("true EF (%)"); ax.set_ylabel("predicted EF (%)"); ax.legend(fontsize=8)
ax.set_title(f"test split, {len(true)} videos, R² {result['test/r2']:.2f}")
plt.show()
