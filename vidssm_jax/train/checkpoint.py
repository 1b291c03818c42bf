"""Checkpoints with orbax: the train state and the data-iterator state, saved together.

Two managers under ``<workdir>/checkpoints``:

    latest/<step>/   the last ``keep`` checkpoints, for resuming (saved asynchronously)
    best/<step>/     the single best by the configured metric (fine-tuning model selection)

Each checkpoint holds ``state`` (step, params, optimizer state, EMA params) and ``data`` (the grain
iterator's state, one small JSON per host), so a resumed run continues with exactly the next
batch. Restoring reads arrays straight into the current mesh's shardings. orbax writes to a
temporary directory and renames it when complete, so a killed save never looks like a checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

from vidssm_jax.train.state import TrainState


def _state_tree(state: TrainState) -> dict:
  tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
  if state.ema_params is not None:
    tree["ema_params"] = state.ema_params
  return tree


def _abstract(tree, shardings) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """Saves and restores ``(TrainState, data iterator)`` under ``directory``."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: Optional[str] = None,
               best_mode: str = "min", async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self.latest = ocp.CheckpointManager(
        os.path.join(self.directory, "latest"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))
    self.best = None
    if best_metric:
      self.best = ocp.CheckpointManager(
          os.path.join(self.directory, "best"),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_fn=lambda m: m[best_metric], best_mode=best_mode,
              keep_checkpoints_without_metrics=False, enable_async_checkpointing=False))

  def _args(self, state, data_iter):
    items = {"state": ocp.args.StandardSave(_state_tree(state))}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return ocp.args.Composite(**items)

  def save(self, state: TrainState, data_iter=None, *, force: bool = False) -> None:
    step = int(jax.device_get(state.step))
    self.latest.save(step, args=self._args(state, data_iter), force=force)

  def save_best(self, state: TrainState, metrics: dict) -> bool:
    """Saves when ``metrics[best_metric]`` beats the best so far; returns whether it did."""
    if self.best is None:
      return False
    step = int(jax.device_get(state.step))
    before = self.best.best_step()
    self.best.save(step, args=self._args(state, None),
                   metrics={k: float(v) for k, v in metrics.items()})
    self.best.wait_until_finished()
    return self.best.best_step() != before

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def restore(self, state: TrainState, state_shardings: TrainState, data_iter=None, *,
              which: str = "latest", step: Optional[int] = None) -> TrainState:
    """Restores into the structure and shardings of ``state`` (and ``data_iter`` in place)."""
    manager = self.latest if which == "latest" else self.best
    if manager is None:
      raise ValueError(f"no {which!r} checkpoints are kept (set a best metric)")
    step = step if step is not None else (manager.latest_step() if which == "latest"
                                          else manager.best_step())
    if step is None:
      raise FileNotFoundError(f"no {which} checkpoint in {manager.directory}")
    target = _abstract(_state_tree(state), _state_tree(state_shardings))
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None and which == "latest":
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))["state"]
    return state.replace(step=restored["step"], params=restored["params"],
                         opt_state=restored["opt_state"],
                         ema_params=restored.get("ema_params", state.ema_params))

  def restore_params(self, *, which: str = "latest", use_ema: bool = False):
    """Only the params (or EMA params) of the newest/best checkpoint, e.g. to start a
    fine-tuning run from pretraining. Returns a dict tree like the saved params."""
    manager = self.latest if which == "latest" else self.best
    step = manager.latest_step() if which == "latest" else manager.best_step()
    if step is None:
      raise FileNotFoundError(f"no {which} checkpoint in {manager.directory}")
    key = "ema_params" if use_ema else "params"
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"][key]

  def wait(self) -> None:
    self.latest.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    if self.best is not None:
      self.best.close()
