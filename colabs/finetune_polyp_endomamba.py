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
# # Fine-tune EndoMamba for polyp diagnosis (clip classification)
#
# EndoMamba (bidirectional Mamba scans inside each frame, causal scans across frames) learns to
# tell colonoscopy clips with polyps from clips without, the PolypDiag task. By default it runs
# on synthetic colonoscopy clips (a camera moving through a textured tunnel; pale domes on the
# wall are the polyps), so it needs no download; the data cell shows how to use PolypDiag.
#
# Runtime: CPU is enough (about 4 minutes on 2 cores); a Colab GPU or TPU runtime is faster.
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
# that already holds synthetic shards). For PolypDiag (253 videos, manual download behind the
# link in the `tianyu0207/weakly-polyp` README): unzip it to a Drive folder with `videos/` and
# `splits/{train,val}.txt`, set `DATA = "polypdiag"` and `POLYPDIAG_DIR` to it; the cell builds
# the tfds dataset (`vidssm_jax.data.tfds.PolypDiag`, manual_dir = that folder) once and converts
# it to our shards. Already converted shards: `DATA = "shards"` with `DATA_DIR` naming them.

# %%
DATA = "synthetic"  # @param ["synthetic", "polypdiag", "shards"]
DATA_DIR = "/tmp/vidssm_colab_polyp"  # @param {type:"string"}
POLYPDIAG_DIR = "/content/drive/MyDrive/PolypDiag"  # @param {type:"string"}
SMOKE = os.environ.get("VIDSSM_SMOKE") == "1"
SMOKE_DIR = os.environ.get("VIDSSM_SMOKE_DIR", "/tmp/vidssm_smoke_polyp")  # where the smoke run writes

if DATA == "polypdiag":
  if "google.colab" in sys.modules:
    from google.colab import drive
    drive.mount("/content/drive")
  DATA_DIR = "/content/polypdiag_shards"
  subprocess.run([sys.executable, "-m", "vidssm_jax.data.tfds.convert", "--dataset",
                  "polyp_diag/112", "--data_dir", "/content/tfds", "--manual_dir", POLYPDIAG_DIR,
                  "--out", DATA_DIR], check=True)

# %% [markdown]
# ## Config
#
# `configs/endomamba_polypdiag.py:synthetic`, the same file the command line reads
# (`python -m vidssm_jax.main --config=configs/endomamba_polypdiag.py:synthetic`); any field can
# be changed here.

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


config = load_config("endomamba_polypdiag", "synthetic")
config.data.dir = DATA_DIR
if DATA != "synthetic":
  config.data.synthetic = ""
STEPS = 250  # @param {type:"integer"}
config.finetune.steps = STEPS
if SMOKE:  # a tiny setting for CI: a few steps on a few clips
  config.data.dir = os.path.join(SMOKE_DIR, "data")
  config.data.synthetic_num = 40
  config.finetune.steps = 6
  config.finetune.eval_every = 3
  config.log_every = 2
WORKDIR = os.path.join(SMOKE_DIR, "run") if SMOKE else "/tmp/vidssm_colab_polyp_run"
print(config.model_name, dict(config.model))
print("data:", config.data.dir, "| steps:", config.finetune.steps,
      "| batch:", config.finetune.batch_size, "| lr:", config.finetune.optim.lr)

# %% [markdown]
# ## Train and evaluate
#
# `experiment.run` writes the shards if needed, fine-tunes with a progress bar (validation F1
# every `eval_every` steps picks the best checkpoint), and evaluates the best checkpoint on the
# test split. Re-running the cell resumes from the last checkpoint.

# %%
import json
import time

from vidssm_jax.train import experiment

start = time.time()
result = experiment.run(config, WORKDIR)
print(f"{time.time() - start:.0f} s")
print(json.dumps(result, indent=1))

# %% [markdown]
# ## Results
#
# The test metrics beside what always answering the training split's majority class would
# score, and the loss curve.

# %%
import matplotlib.pyplot as plt


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


rows = read_jsonl(os.path.join(WORKDIR, "finetune", "metrics.jsonl"))
train = [r for r in rows if "loss" in r]
val = [r for r in rows if "eval/f1" in r]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
ax1.axhline(0.693, ls=":", c="grey", label="chance (ln 2)")
ax1.set_xlabel("step"); ax1.set_ylabel("cross-entropy"); ax1.legend()
ax1.set_title("fine-tuning loss")
ax2.plot([r["step"] for r in val], [r["eval/f1"] for r in val], "o-", label="val F1")
ax2.plot([r["step"] for r in val], [r["eval/accuracy"] for r in val], "s-", label="val accuracy")
ax2.set_ylim(0, 1); ax2.set_xlabel("step"); ax2.legend(); ax2.set_title("validation")
plt.tight_layout(); plt.show()

names = ["accuracy", "f1"]
model_scores = [result[f"test/{k}"] for k in names]
base_scores = [result[f"test/baseline_majority_{k}"] for k in names]
print(f"test ({result['test/num_videos']} videos): accuracy {model_scores[0]:.3f}, F1 "
      f"{model_scores[1]:.3f} | majority-class baseline: accuracy {base_scores[0]:.3f}, F1 "
      f"{base_scores[1]:.3f}")
fig, ax = plt.subplots(figsize=(5, 3))
xs = range(len(names))
ax.bar([x - 0.2 for x in xs], model_scores, 0.4, label="EndoMamba")
ax.bar([x + 0.2 for x in xs], base_scores, 0.4, label="majority class")
ax.set_xticks(list(xs), names); ax.set_ylim(0, 1); ax.legend(loc="lower right")
ax.set_title(f"test split, {result['test/num_videos']} videos")
plt.show()

# %% [markdown]
# ## Look at the test clips
#
# The best checkpoint's predictions on test clips, shown as videos with `mediapy`: the title
# is the true label and the predicted polyp probability.

# %%
import shutil

import mediapy
import numpy as np
from vidssm_jax.data import pipeline
from vidssm_jax.models import create_model
from vidssm_jax.train.checkpoint import Checkpointer

if not shutil.which("ffmpeg"):  # mediapy encodes with ffmpeg; the imageio-ffmpeg wheel has one
  import imageio_ffmpeg
  mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())

ckpt = Checkpointer(os.path.join(WORKDIR, "finetune", "checkpoints"), async_save=False,
                    best_metric=config.finetune.select_metric, best_mode="max")
use_ema = bool(config.evaluate.get("use_ema") and config.finetune.get("ema_decay"))
params = ckpt.restore_params(which="best" if ckpt.best.best_step() is not None else "latest",
                             use_ema=use_ema)   # the weights the evaluation scored
ckpt.close()
overrides = {k: v for k, v in config.model.to_dict().items() if k != "dtype"}
model = create_model(config.model_name, head="clip", num_classes=2, **overrides)
batches = pipeline.make_dataset(config.data.dir, "test", num_frames=config.data.num_frames,
                                stride=config.data.stride, image_size=config.data.image_size,
                                batch_size=8, train=False, seed=0, num_workers=0)
batch = next(iter(batches))
logits = jax.jit(lambda p, v: model.apply({"params": p}, v))(params, batch["video"])
probs = np.asarray(jax.nn.softmax(logits)[:, 1])
# The pipeline normalised the frames with the dataset's mean and std; undo it for display.
mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
clips = np.clip(np.asarray(batch["video"]) * std + mean, 0, 1)
clips = clips.repeat(4, axis=2).repeat(4, axis=3)   # 32² frames, enlarged 4× without blurring
titles = [f"#{i} {'polyp' if y else 'normal'} | p(polyp)={p:.2f}"
          for i, (y, p) in enumerate(zip(batch["polyp"], probs))]
mediapy.show_videos(dict(zip(titles, clips)), fps=6, codec="gif", columns=4)
