"""E-ViM³-p4 fine-tuned for ejection-fraction regression on EchoNet-Dynamic from a pretraining
checkpoint (SPEC §3: MSE loss, EMA on, selected by validation MAE; paper MAE 3.54, R² 0.85).

    python -m vidssm_jax.main --config=configs/evim3_ef.py --workdir=/tmp/evim3_ef \
        --config.data.dir=/data/echonet_shards --config.finetune.init_from=/tmp/evim3/pretrain/checkpoints
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import evim3  # noqa: E402  (the shared E-ViM³ settings)


def get_config(arg: str = ""):
  c = evim3.get_config(arg)
  c.mode = "finetune,evaluate"
  return c
