"""The outer training loop: progress bar, metric writers, evaluation, checkpoints, preemption.

``run_loop`` drives any jitted ``step_fn(state, batch, rng) -> (state, metrics)``:

- a ``tqdm`` progress bar (steps/s, loss, ETA), host 0 only;
- scalars to ``<workdir>/metrics.jsonl`` (one JSON object per write, easy to read back) and to
  TensorBoard event files (``tensorboardX``, pure Python); images (frame grids) to TensorBoard
  and as PNG files under ``<workdir>/samples/``;
- periodic evaluation through ``eval_fn(state) -> dict`` and best-checkpoint selection;
- checkpoints every ``ckpt_every`` steps; SIGTERM / SIGUSR1 (SLURM pre-emption) save a
  checkpoint and return cleanly;
- a non-finite loss stops the run with :class:`NonFiniteLossError`, without saving, so the last
  good checkpoint stays the newest.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Callable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from vidssm_jax.train.sharding import put_batch


class NonFiniteLossError(RuntimeError):
  pass


class MetricWriter:
  """Scalars and images: JSON lines always, TensorBoard when tensorboardX is installed.

  Same method names as clu's metric writers (which need TensorFlow, so we do not use them).
  """

  def __init__(self, logdir: str, *, prefix: str = "", enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.prefix = prefix
    self.path = os.path.join(logdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(logdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # optional, pure Python
        self._tb = SummaryWriter(os.path.join(logdir, "tensorboard"))
      except ImportError:
        self._tb = None

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {f"{self.prefix}{k}": float(v) for k, v in scalars.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)

  def write_images(self, step: int, images: dict) -> None:
    """images: name -> float array (H, W, C) in [0, 1]. Each is also saved as
    ``<logdir>/samples/<name>_<step>.png``, to look at without TensorBoard."""
    if not self.enabled:
      return
    from PIL import Image

    samples = os.path.join(os.path.dirname(self.path), "samples")
    os.makedirs(samples, exist_ok=True)
    for k, v in images.items():
      v = np.clip(np.asarray(v, np.float32), 0.0, 1.0)
      Image.fromarray((v * 255).round().astype(np.uint8)).save(
          os.path.join(samples, f"{self.prefix}{k}_{int(step):07d}.png".replace("/", "_")))
      if self._tb is not None:
        self._tb.add_image(f"{self.prefix}{k}", v, step, dataformats="HWC")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()


def read_metrics(logdir: str) -> list[dict]:
  """The JSON lines written by :class:`MetricWriter`."""
  path = os.path.join(logdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class PreemptionGuard:
  """Turns SIGTERM / SIGUSR1 into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGUSR1):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside a notebook worker)
        pass
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run_loop(*, step_fn: Callable, state, data_iter, mesh, total_steps: int, rng,
             checkpointer=None, writer: Optional[MetricWriter] = None, log_every: int = 10,
             ckpt_every: int = 0, eval_every: int = 0, eval_fn: Optional[Callable] = None,
             image_fn: Optional[Callable] = None, image_every: int = 0, desc: str = "train"):
  """Runs ``step_fn`` from ``state.step`` to ``total_steps``; returns ``(state, status)`` with
  status ``"done"`` or ``"preempted"``."""
  start = int(jax.device_get(state.step))
  bar = tqdm(total=total_steps, initial=start, desc=desc, mininterval=1.0, dynamic_ncols=True,
             disable=jax.process_index() != 0)
  status = "done"
  last_time, last_step = time.perf_counter(), start
  with PreemptionGuard() as guard:
    for step in range(start, total_steps):
      batch = put_batch(next(data_iter), mesh)
      state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
      done = step + 1
      is_ckpt = ckpt_every and done % ckpt_every == 0
      if done % log_every == 0 or done == total_steps or is_ckpt:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(values["loss"]):
          bar.close()
          raise NonFiniteLossError(
              f"{desc}: loss is {values['loss']} at step {done}; stopping. The last good "
              f"checkpoint is step {checkpointer.latest_step() if checkpointer else None}. "
              "Lower the learning rate or check the data.")
        now = time.perf_counter()
        values["steps_per_s"] = (done - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, done
        if writer:
          writer.write_scalars(done, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
      bar.update(1)
      if image_fn is not None and image_every and done % image_every == 0 and writer:
        writer.write_images(done, image_fn(state, batch))
      if eval_fn is not None and eval_every and (done % eval_every == 0 or done == total_steps):
        eval_metrics = eval_fn(state)
        if writer:
          writer.write_scalars(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
        if checkpointer:
          checkpointer.save_best(state, eval_metrics)
      if checkpointer and is_ckpt:
        checkpointer.save(state, data_iter)
      if guard.requested:
        status = "preempted"
        break
  bar.close()
  if checkpointer:
    checkpointer.save(state, data_iter, force=True)
    checkpointer.wait()
  if writer:
    writer.flush()
  return state, status
