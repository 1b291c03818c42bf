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
# # EndoMamba on a live feed: per-frame phase recognition, one frame at a time
#
# EndoMamba's temporal scans are causal, so a video can be run one frame at a time with a
# carried state, at the same cost for every frame however long the feed has run: what an
# endoscope in the operating room needs. This notebook fine-tunes a tiny EndoMamba with the
# per-frame phase head (the Cholec80 task, here on synthetic endoscopy videos whose phases
# change the scene: motion, irrigation haze, an instrument, bleeding), writes a new video to an
# mp4 file, streams it through `vidssm_jax.stream.StreamingRunner` frame by frame, and draws the
# phase probabilities beside each frame as the video plays.
#
# Runtime: CPU is enough (about 5 minutes on 2 cores). `VIDSSM_SMOKE=1` runs a tiny setting (CI).

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
# ## Data and config
#
# Synthetic endoscopy videos with per-frame phases by default (written to `DATA_DIR`, only into
# an empty folder or one of synthetic shards). For Cholec80 (registration at CAMMA): convert
# the videos (1 fps) and their phase annotations to shards with
# `python -m vidssm_jax.data.shards --videos ... --labels ...`, set `DATA_DIR` to them and
# `SYNTHETIC = False`; the config file `configs/endomamba_cholec80.py` holds the phase names.
# `VIDEO` is the video to stream: a generated one by default, or any mp4 (e.g. on Drive).

# %%
import importlib.util
import pathlib

import vidssm_jax

DATA_DIR = "/tmp/vidssm_colab_phase"  # @param {type:"string"}
SYNTHETIC = True  # @param {type:"boolean"}
VIDEO = ""  # @param {type:"string"}
STEPS = 250  # @param {type:"integer"}
SMOKE = os.environ.get("VIDSSM_SMOKE") == "1"
SMOKE_DIR = os.environ.get("VIDSSM_SMOKE_DIR", "/tmp/vidssm_smoke_stream")  # where the smoke run writes
REPO_DIR = pathlib.Path(vidssm_jax.__file__).resolve().parents[1]


def load_config(name, preset=""):
  spec = importlib.util.spec_from_file_location(name, REPO_DIR / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


config = load_config("endomamba_cholec80", "synthetic")
config.data.dir = DATA_DIR
if not SYNTHETIC:
  config.data.synthetic = ""
config.finetune.steps = STEPS
if SMOKE:  # a tiny setting for CI: a few steps on a few clips
  config.data.dir = os.path.join(SMOKE_DIR, "data")
  config.data.synthetic_num = 24
  config.finetune.steps, config.finetune.eval_every = 6, 3
  config.log_every = 2
WORKDIR = os.path.join(SMOKE_DIR, "run") if SMOKE else "/tmp/vidssm_colab_phase_run"
print(config.model_name, dict(config.model), "| phases:", config.data.synthetic or "from data")

# %% [markdown]
# ## Fine-tune the phase head (with the backbone), then evaluate
#
# Training runs on short clips; the model it produces is causal over time, so it can run on a
# video of any length, one frame at a time.

# %%
import json
import time

from vidssm_jax.train import experiment

start = time.time()
result = experiment.run(config, WORKDIR)
print(f"{time.time() - start:.0f} s")
print(json.dumps(result, indent=1))

# %% [markdown]
# ## Stream a video, one frame at a time
#
# A fresh synthetic video (never seen in training), written to mp4 and decoded back frame by
# frame as a camera feed would arrive. `StreamingRunner` runs one jitted `step` per frame
# (resize and ImageNet normalisation inside) and carries the state.

# %%
import numpy as np
from vidssm_jax.data import synthetic
from vidssm_jax.data.video_io import encode_video
from vidssm_jax.models import create_model
from vidssm_jax.stream import StreamingRunner, read_video
from vidssm_jax.train.checkpoint import Checkpointer

f = config.finetune
names = list(f.get("class_names") or synthetic.PHASES)
if SYNTHETIC:
  names = list(synthetic.PHASES)   # the synthetic videos' phases (the config names Cholec80's)
true_phase = None
if not VIDEO:
  clip = synthetic.endoscopy_clip(seed=12345, index=0, num_frames=48 if SMOKE else 160, size=96)
  VIDEO = "/tmp/vidssm_stream_demo.mp4"
  encode_video(VIDEO, clip["video"], fps=synthetic.ENDOSCOPY_FPS)
  true_phase = clip["phase"]

ckpt = Checkpointer(os.path.join(WORKDIR, "finetune", "checkpoints"), async_save=False,
                    best_metric=f.select_metric, best_mode=f.select_mode)
use_ema = bool(config.evaluate.get("use_ema") and config.finetune.get("ema_decay"))
params = ckpt.restore_params(which="best" if ckpt.best.best_step() is not None else "latest",
                             use_ema=use_ema)   # the weights the evaluation scored
ckpt.close()
overrides = {k: v for k, v in config.model.to_dict().items() if k != "dtype"}
model = create_model(config.model_name, head="phase", num_classes=f.num_classes, **overrides)
runner = StreamingRunner(model, {"params": params}, head=jax.nn.softmax)

frames, probs, seconds = [], [], []
for frame, p in zip(read_video(VIDEO), runner.run_video(VIDEO)):
  frames.append(frame)
  probs.append(p)
  seconds.append(time.perf_counter())
frames, probs = np.stack(frames), np.stack(probs)
per_frame_ms = 1000 * np.diff(seconds[5:]).mean()
print(f"{len(frames)} frames streamed, {per_frame_ms:.1f} ms a frame after warm-up")
if true_phase is not None:
  acc = (probs.argmax(-1) == true_phase).mean()
  majority = np.bincount(true_phase).max() / len(true_phase)
  print(f"per-frame accuracy on this video {acc:.2f} (its most frequent phase: {majority:.2f})")

# %% [markdown]
# ## The video with its per-frame predictions
#
# Each frame beside the bar chart of the phase probabilities the model gave it, computed
# from that frame and the carried state only (the true phase in the title when known).

# %%
import shutil

import matplotlib.pyplot as plt
import mediapy

if not shutil.which("ffmpeg"):  # mediapy encodes with ffmpeg; the imageio-ffmpeg wheel has one
  import imageio_ffmpeg
  mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())


def render(frame, p, t):
  fig, (a, b) = plt.subplots(1, 2, figsize=(6.4, 2.6), dpi=80,
                             gridspec_kw={"width_ratios": [1, 1.4]})
  a.imshow(frame); a.axis("off")
  a.set_title(f"frame {t}" + (f" | true: {names[true_phase[t]]}" if true_phase is not None else ""),
              fontsize=9)
  colours = ["tab:green" if true_phase is not None and k == true_phase[t] else "tab:blue"
             for k in range(len(p))]
  b.barh(range(len(p)), p, color=colours); b.set_xlim(0, 1)
  b.set_yticks(range(len(p)), names, fontsize=8); b.invert_yaxis()
  b.set_title(f"predicted: {names[int(np.argmax(p))]}", fontsize=9)
  fig.tight_layout()
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return image


every = 1 if SMOKE else 2
movie = np.stack([render(frames[t], probs[t], t) for t in range(0, len(frames), every)])
mediapy.show_video(movie, fps=synthetic.ENDOSCOPY_FPS / every, codec="gif")

# %% [markdown]
# ## The whole video at a glance
#
# Phase probabilities over time (stacked), with the true phase as the strip underneath.

# %%
fig, (ax, strip) = plt.subplots(2, 1, figsize=(11, 3.6), sharex=True,
                                gridspec_kw={"height_ratios": [4, 1]})
colours = plt.cm.tab10(np.arange(len(names)))
ax.stackplot(np.arange(len(probs)), probs.T, colors=colours, labels=names)
ax.set_ylim(0, 1); ax.set_ylabel("p(phase)"); ax.legend(fontsize=7, ncol=4, loc="upper right")
ax.set_title("streamed phase probabilities")
if true_phase is not None:
  strip.imshow(colours[true_phase][None], aspect="auto", extent=(0, len(probs), 0, 1))
  strip.set_yticks([]); strip.set_ylabel("true")
strip.set_xlabel("frame")
plt.tight_layout(); plt.show()
