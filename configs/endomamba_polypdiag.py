"""EndoMamba-S fine-tuned for PolypDiag clip classification (normal / abnormal), scored by F1.

Paper: F1 95.0. Reads PolypDiag shards (``python -m vidssm_jax.data.shards --videos ...``):

    python -m vidssm_jax.main --config=configs/endomamba_polypdiag.py --workdir=/tmp/polypdiag \
        --config.data.dir=/data/polypdiag_shards --config.finetune.init_from=/tmp/endomamba/pretrain/checkpoints

Preset ``:synthetic`` fine-tunes a tiny EndoMamba from scratch on 400 synthetic colonoscopy
clips (8 × 32 × 32; label: are there polyps on the wall) written to ``data.dir`` if missing, and
prints test accuracy and F1 on 60 videos beside the majority-class baseline's. On our 2-core
machine, in 4 minutes: test accuracy 0.917 and F1 0.930 against the baseline's 0.633 and
0.776 (it always says "polyp", the commoner class of the training split).

    python -m vidssm_jax.main --config=configs/endomamba_polypdiag.py:synthetic --workdir=/tmp/polyp
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import endomamba  # noqa: E402  (the shared EndoMamba settings)


def get_config(arg: str = ""):
  if arg not in ("", "synthetic"):
    raise ValueError(f"configs/endomamba_polypdiag.py: unknown preset {arg!r}; use '' or "
                     "'synthetic'")
  c = endomamba.get_config("tiny" if arg == "synthetic" else "")
  c.mode = "finetune,evaluate"
  c.data.num_frames = 8 if arg == "synthetic" else 16
  c.finetune.update(dict(task="classification", head="clip", label_key="polyp", num_classes=2,
                         select_metric="f1", select_mode="max",
                         steps=250 if arg == "synthetic" else 3_000, eval_every=100))
  if arg == "synthetic":
    # Its own folder (the pretraining preset's 64 clips would leave 10 test videos), and, from
    # scratch in a few hundred CPU steps, a larger batch and learning rate than the paper's
    # fine-tuning: at lr 1e-4 and batch 8 the loss stays at ln 2 for 300 steps.
    c.data.update(dict(dir="/tmp/vidssm_demo_polypdiag", synthetic_num=400))
    c.finetune.batch_size = 16
    c.finetune.optim.update(dict(lr=3e-3, warmup_steps=10))
  return c
