"""Entry point: ``python -m vidssm_jax.main --config=configs/evim3.py[:preset] --workdir=DIR``.

    --config.some.field=value     override any config field (unknown fields are an error)
    --mode=pretrain,finetune      override config.mode (pretrain, finetune, evaluate, stream)
    --multihost                   call jax.distributed.initialize() (TPU pods, SLURM)
    --debug                       show full tracebacks instead of one-line errors

Bad settings (unknown model, task or field; missing data; a batch the mesh cannot split) end
the run with one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_MODE = flags.DEFINE_string("mode", None, "Overrides config.mode.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Initialise jax.distributed.")
_DEBUG = flags.DEFINE_bool("debug", False, "Full tracebacks on errors.")
_VIDEO = flags.DEFINE_string("video", None, "mode=stream: the video file to run.")
_OUTPUT = flags.DEFINE_string("output", None, "mode=stream: CSV of per-frame predictions.")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    _fail("--config is required, e.g. --config=configs/evim3.py:demo")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  # Imported here so that `--help` and flag errors do not pay for importing JAX.
  from vidssm_jax.train import experiment, sharding

  sharding.maybe_initialize_distributed(_MULTIHOST.value)
  if _MODE.value:
    with config.unlocked():
      config.mode = _MODE.value
  start = time.time()
  try:
    if config.mode == "stream":
      from vidssm_jax import stream
      stream.run_from_config(config, _VIDEO.value, _OUTPUT.value, workdir=_WORKDIR.value)
      return
    result = experiment.run(config, _WORKDIR.value)
  except (experiment.ConfigError, ValueError, FileNotFoundError, KeyError) as e:
    if _DEBUG.value:
      raise
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  if result:
    print(json.dumps(result, indent=2))
    split = config.evaluate.split
    n = result.get(f"{split}/num_videos")
    on = f" (on {n} {split} videos)" if n else ""
    if f"{split}/mae" in result and f"{split}/baseline_mean_mae" in result:
      print(f"{split} MAE {result[f'{split}/mae']:.2f} vs predict-the-mean baseline "
            f"{result[f'{split}/baseline_mean_mae']:.2f}{on}")
    if f"{split}/accuracy" in result and f"{split}/baseline_majority_accuracy" in result:
      print(f"{split} accuracy {result[f'{split}/accuracy']:.3f}, F1 {result[f'{split}/f1']:.3f} "
            f"vs majority-class baseline accuracy "
            f"{result[f'{split}/baseline_majority_accuracy']:.3f}, "
            f"F1 {result[f'{split}/baseline_majority_f1']:.3f}{on}")
  print(f"done in {time.time() - start:.0f} s; metrics in {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main)
