"""Evaluation metrics of the benchmarks in SPEC §4, on NumPy arrays (host side).

Every function takes predictions and targets for a whole evaluation set (already gathered from
the devices) and returns a Python float.

    regression (EchoNet EF):       mae, rmse, r2
    classification (PolypDiag):    accuracy, f1 (binary, positive class 1, or macro)
    segmentation (CVC):            dice (per image, then averaged)
    surgical phase (Cholec80):     video_accuracy, jaccard (per phase per video, averaged)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _flat(x) -> np.ndarray:
  return np.asarray(x, np.float64).reshape(-1)


def _check_same_length(pred, target, name):
  if len(pred) != len(target):
    raise ValueError(f"{name}: {len(pred)} predictions but {len(target)} targets")


def mae(pred, target) -> float:
  pred, target = _flat(pred), _flat(target)
  _check_same_length(pred, target, "mae")
  return float(np.mean(np.abs(pred - target)))


def rmse(pred, target) -> float:
  pred, target = _flat(pred), _flat(target)
  _check_same_length(pred, target, "rmse")
  return float(np.sqrt(np.mean((pred - target) ** 2)))


def r2(pred, target) -> float:
  """Coefficient of determination 1 - SS_res / SS_tot (0 for predicting the mean)."""
  pred, target = _flat(pred), _flat(target)
  _check_same_length(pred, target, "r2")
  ss_tot = np.sum((target - target.mean()) ** 2)
  return float(1.0 - np.sum((target - pred) ** 2) / max(ss_tot, 1e-12))


def accuracy(pred_labels, labels) -> float:
  pred_labels, labels = np.asarray(pred_labels).reshape(-1), np.asarray(labels).reshape(-1)
  _check_same_length(pred_labels, labels, "accuracy")
  return float(np.mean(pred_labels == labels))


def f1(pred_labels, labels, average: str = "binary", num_classes: int | None = None) -> float:
  """F1 score; ``average="binary"`` scores class 1, ``"macro"`` averages over classes."""
  pred_labels, labels = np.asarray(pred_labels).reshape(-1), np.asarray(labels).reshape(-1)
  _check_same_length(pred_labels, labels, "f1")

  def f1_of(c):
    tp = np.sum((pred_labels == c) & (labels == c))
    fp = np.sum((pred_labels == c) & (labels != c))
    fn = np.sum((pred_labels != c) & (labels == c))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)

  if average == "binary":
    return float(f1_of(1))
  if average == "macro":
    k = num_classes or int(max(pred_labels.max(initial=0), labels.max(initial=0)) + 1)
    return float(np.mean([f1_of(c) for c in range(k)]))
  raise ValueError(f"f1: average must be 'binary' or 'macro', got {average!r}")


def dice(pred_masks, masks, eps: float = 1e-8) -> float:
  """Mean over images of 2|P∩G| / (|P| + |G|); an image with both empty scores 1.

  pred_masks, masks: boolean or {0,1} arrays ``(num_images, H, W)``.
  """
  p = np.asarray(pred_masks).astype(bool).reshape(len(pred_masks), -1)
  g = np.asarray(masks).astype(bool).reshape(len(masks), -1)
  _check_same_length(p, g, "dice")
  inter = np.sum(p & g, 1)
  total = np.sum(p, 1) + np.sum(g, 1)
  per_image = np.where(total == 0, 1.0, 2 * inter / np.maximum(total, eps))
  return float(np.mean(per_image))


def video_accuracy(pred_labels: Sequence, labels: Sequence) -> float:
  """Cholec80 protocol: frame accuracy within each video, averaged over videos.

  pred_labels, labels: sequences (one per video) of per-frame integer labels.
  """
  _check_same_length(pred_labels, labels, "video_accuracy")
  return float(np.mean([accuracy(p, t) for p, t in zip(pred_labels, labels)]))


def jaccard(pred_labels: Sequence, labels: Sequence, num_classes: int) -> float:
  """Cholec80 protocol: per video, the Jaccard index |P∩G| / |P∪G| of each phase present in the
  ground truth, averaged over those phases, then over videos."""
  _check_same_length(pred_labels, labels, "jaccard")
  per_video = []
  for p, t in zip(pred_labels, labels):
    p, t = np.asarray(p).reshape(-1), np.asarray(t).reshape(-1)
    scores = []
    for c in range(num_classes):
      if not np.any(t == c):
        continue
      inter = np.sum((p == c) & (t == c))
      union = np.sum((p == c) | (t == c))
      scores.append(inter / union)
    per_video.append(np.mean(scores))
  return float(np.mean(per_video))
