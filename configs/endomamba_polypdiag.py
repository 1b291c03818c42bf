"""EndoMamba-S fine-tuned for PolypDiag clip classification (normal / abnormal), scored by F1.

Paper: F1 95.0. Reads PolypDiag shards (``python -m vidssm_jax.data.shards --videos ...``) or,
with ``:synthetic``, synthetic endoscopy clips whose label is whether polyps appear.

    python -m vidssm_jax.main --config=configs/endomamba_polypdiag.py --workdir=/tmp/polypdiag \
        --config.data.dir=/data/polypdiag_shards --config.finetune.init_from=/tmp/endomamba/pretrain/checkpoints
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import endomamba  # noqa: E402  (the shared EndoMamba settings)


def get_config(arg: str = ""):
  c = endomamba.get_config("tiny" if arg == "synthetic" else "")
  c.mode = "finetune,evaluate"
  c.data.num_frames = 8 if arg == "synthetic" else 16
  c.finetune.update(dict(task="classification", head="clip", label_key="polyp", num_classes=2,
                         select_metric="f1", select_mode="max",
                         steps=200 if arg == "synthetic" else 3_000, eval_every=100))
  return c
