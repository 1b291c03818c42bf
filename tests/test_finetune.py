"""finetune.mean_baseline: the trivial scores the fine-tuned models are printed beside."""

import ml_collections
import numpy as np
import pytest

from vidssm_jax.train import finetune as ft


def _task(**kw):
  return ml_collections.ConfigDict({"task": "classification", "num_classes": 2, **kw})


def test_majority_baseline_predicts_the_training_majority_for_every_video():
  train = np.array([1, 1, 1, 0, 0])            # majority: 1
  test = np.array([1, 0, 1, 1, 0, 0, 0, 1])    # 4 positives of 8
  b = ft.mean_baseline(_task(), train, test)
  assert b["accuracy"] == pytest.approx(0.5)
  assert b["f1"] == pytest.approx(2 * 0.5 * 1.0 / (0.5 + 1.0))   # precision 0.5, recall 1
  b = ft.mean_baseline(_task(), 1 - train, test)                  # majority 0: no positives
  assert b["accuracy"] == pytest.approx(0.5) and b["f1"] == pytest.approx(0.0)
  b = ft.mean_baseline(_task(num_classes=3), np.array([2, 2, 0]), np.array([2, 1, 0, 2]))
  assert b["accuracy"] == pytest.approx(0.5)


def test_mean_baseline_for_regression_and_other_tasks():
  t = ml_collections.ConfigDict(dict(task="regression", target_mean=0.0, target_std=1.0))
  b = ft.mean_baseline(t, np.array([40.0, 60.0]), np.array([50.0, 70.0]))
  assert b["mae"] == pytest.approx(10.0)
  with pytest.raises(ValueError, match="regression and classification only"):
    ft.mean_baseline(_task(task="phase", num_classes=7), np.zeros(3), np.zeros(3))
