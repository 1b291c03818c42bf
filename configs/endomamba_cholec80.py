"""EndoMamba-S fine-tuned for online surgical phase recognition on Cholec80 (7 phases, 1 fps,
videos 1–40 train / 41–80 test), with the causal per-frame phase head, scored by video-level
accuracy and Jaccard. Paper: accuracy 83.0, Jaccard 56.5.

    python -m vidssm_jax.main --config=configs/endomamba_cholec80.py --workdir=/tmp/cholec80 \
        --config.data.dir=/data/cholec80_shards --config.finetune.init_from=/tmp/endomamba/pretrain/checkpoints
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import endomamba  # noqa: E402

# Fixed name -> id map (SPEC §4; never file order).
PHASES = ("Preparation", "CalotTriangleDissection", "ClippingCutting", "GallbladderDissection",
          "GallbladderRetraction", "CleaningCoagulation", "GallbladderPackaging")


def get_config(arg: str = ""):
  c = endomamba.get_config("tiny" if arg == "synthetic" else "")
  c.mode = "finetune,evaluate"
  c.data.num_frames = 8 if arg == "synthetic" else 32
  c.finetune.class_names = list(PHASES)
  c.finetune.update(dict(task="phase", head="phase", label_key="phase", num_classes=7,
                         select_metric="video_accuracy", select_mode="max",
                         steps=200 if arg == "synthetic" else 5_000, eval_every=100))
  return c
