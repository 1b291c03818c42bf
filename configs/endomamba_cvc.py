"""EndoMamba-S fine-tuned for polyp segmentation on CVC (Endo-FM's "CVC-12K" benchmark, which
reads CVC-ClinicDB sequences; SPEC §4), scored by Dice. Paper: Dice 85.4.

    python -m vidssm_jax.main --config=configs/endomamba_cvc.py --workdir=/tmp/cvc \
        --config.data.dir=/data/cvc_shards --config.finetune.init_from=/tmp/endomamba/pretrain/checkpoints
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import endomamba  # noqa: E402


def get_config(arg: str = ""):
  c = endomamba.get_config("tiny" if arg == "synthetic" else "")
  c.mode = "finetune,evaluate"
  c.finetune.update(dict(task="segmentation", head="segmentation", label_key="mask",
                         num_classes=2, select_metric="dice", select_mode="max",
                         steps=200 if arg == "synthetic" else 3_000, eval_every=100))
  return c
