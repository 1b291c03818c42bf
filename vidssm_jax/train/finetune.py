"""Fine-tuning: one jitted step per task, and evaluation with the benchmark metrics.

Tasks (``config.finetune.task``) and what the model returns for a batch ``video (b, t, h, w, c)``:

    regression       (b, 1)            EF; trained on standardised targets, MSE
    classification   (b, K)            clip label, cross-entropy
    phase            (b, t, K)         per-frame label, cross-entropy over frames
    segmentation     (b, t, h, w, K)   per-pixel label, cross-entropy over pixels

Evaluation averages predictions over the clips of a video when the batches carry ``video_id``
(EchoNet's all-clips protocol), then computes the metrics of ``vidssm_jax.metrics``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vidssm_jax import metrics as M
from vidssm_jax.train.sharding import put_batch
from vidssm_jax.train.state import TrainState

TASKS = ("regression", "classification", "phase", "segmentation")


def check_task(task_config) -> None:
  if task_config.task not in TASKS:
    raise ValueError(f"unknown fine-tuning task {task_config.task!r}; choose one of {TASKS}")


def task_loss(task_config, outputs, labels) -> jax.Array:
  task = task_config.task
  outputs = outputs.astype(jnp.float32)
  if task == "regression":
    target = (labels.astype(jnp.float32) - task_config.target_mean) / task_config.target_std
    return jnp.mean((outputs[..., 0] - target) ** 2)
  # classification / phase / segmentation: integer labels, logits on the last axis.
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(outputs, labels.astype(jnp.int32)))


def make_finetune_step(model, task_config, *, ema_decay: float = 0.0, ema_every: int = 1):
  """``step(state, batch, rng) -> (state, metrics)`` (the caller jits it with shardings)."""
  label_key = task_config.label_key

  def step(state: TrainState, batch: dict, rng):
    def loss_fn(params):
      out = model.apply({"params": params}, batch["video"], train=True, rngs={"dropout": rng})
      return task_loss(task_config, out, batch[label_key])

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads, ema_decay=ema_decay, ema_every=ema_every)
    return state, {"loss": loss}

  return step


def to_predictions(task_config, outputs: np.ndarray) -> np.ndarray:
  """Model outputs -> predictions in label units (EF in %, or class probabilities)."""
  outputs = np.asarray(outputs, np.float32)
  if task_config.task == "regression":
    return outputs[..., 0] * task_config.target_std + task_config.target_mean
  e = np.exp(outputs - outputs.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def collect_predictions(predict: Callable, params, batches, mesh, task_config):
  """Runs ``predict`` over an evaluation iterable; returns per-video (preds, labels) lists.

  Clips of the same ``video_id`` are averaged (probabilities for classification). Batches may
  carry ``valid`` (0 for padding examples), which are dropped.
  """
  label_key = task_config.label_key
  by_video_pred, by_video_label, order = defaultdict(list), {}, []
  for i, host_batch in enumerate(batches):
    video = put_batch({"video": host_batch["video"]}, mesh)["video"]
    out = np.asarray(jax.device_get(predict(params, video)))
    preds = to_predictions(task_config, out)
    valid = np.asarray(host_batch.get("valid", np.ones(len(preds), bool))).astype(bool)
    ids = host_batch.get("video_id")
    for j in np.nonzero(valid)[0]:
      vid = ids[j].item() if ids is not None else (i, j)
      vid = vid.decode() if isinstance(vid, bytes) else vid
      if vid not in by_video_label:
        order.append(vid)
        by_video_label[vid] = np.asarray(host_batch[label_key][j])
      by_video_pred[vid].append(preds[j])
  preds = [np.mean(by_video_pred[v], axis=0) for v in order]
  labels = [by_video_label[v] for v in order]
  return preds, labels


def compute_metrics(task_config, preds, labels) -> dict:
  task = task_config.task
  if not preds:
    raise ValueError("evaluation saw no examples; is the evaluation split empty?")
  if task == "regression":
    p, t = np.asarray(preds), np.asarray(labels, np.float64)
    return {"mae": M.mae(p, t), "rmse": M.rmse(p, t), "r2": M.r2(p, t)}
  if task == "classification":
    p = np.argmax(np.stack(preds), -1)
    t = np.asarray(labels).reshape(-1)
    avg = "binary" if task_config.num_classes == 2 else "macro"
    return {"accuracy": M.accuracy(p, t), "f1": M.f1(p, t, average=avg,
                                                       num_classes=task_config.num_classes)}
  if task == "phase":
    p = [np.argmax(x, -1) for x in preds]
    return {"video_accuracy": M.video_accuracy(p, labels),
            "jaccard": M.jaccard(p, labels, task_config.num_classes)}
  if task == "segmentation":
    p = np.concatenate([np.argmax(x, -1).reshape(-1, *x.shape[-3:-1]) for x in preds]) == 1
    t = np.concatenate([np.asarray(x).reshape(-1, *x.shape[-2:]) for x in labels]) == 1
    return {"dice": M.dice(p, t)}
  raise ValueError(f"unknown task {task!r}")


def mean_baseline(task_config, train_labels, test_labels) -> dict:
  """Metrics of predicting the training mean (regression) or the training split's majority
  class (classification) for every test video: the score a model has to beat."""
  if task_config.task == "regression":
    mean = float(np.mean(train_labels))
    return compute_metrics(task_config, [mean] * len(test_labels), test_labels)
  if task_config.task == "classification":
    counts = np.bincount(np.asarray(train_labels, np.int64).reshape(-1),
                         minlength=task_config.num_classes)
    probs = np.eye(task_config.num_classes)[int(np.argmax(counts))]
    return compute_metrics(task_config, [probs] * len(test_labels), test_labels)
  raise ValueError("the trivial baseline is defined for regression and classification only")
