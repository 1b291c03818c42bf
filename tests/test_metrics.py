"""Each metric against a direct NumPy (or hand) computation on random data."""

import numpy as np
import pytest

from vidssm_jax import metrics


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def test_regression_metrics(rng):
  t = rng.uniform(20, 80, 101)
  p = t + rng.normal(0, 5, 101)
  assert metrics.mae(p, t) == pytest.approx(np.abs(p - t).mean())
  assert metrics.rmse(p, t) == pytest.approx(np.sqrt(((p - t) ** 2).mean()))
  expected_r2 = 1 - ((t - p) ** 2).sum() / ((t - t.mean()) ** 2).sum()
  assert metrics.r2(p, t) == pytest.approx(expected_r2)
  assert metrics.r2(np.full_like(t, t.mean()), t) == pytest.approx(0.0, abs=1e-12)
  assert metrics.r2(t, t) == pytest.approx(1.0)


def test_classification_metrics(rng):
  y = rng.integers(0, 2, 200)
  p = np.where(rng.random(200) < 0.8, y, 1 - y)
  tp, fp, fn = np.sum((p == 1) & (y == 1)), np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1))
  precision, recall = tp / (tp + fp), tp / (tp + fn)
  assert metrics.f1(p, y) == pytest.approx(2 * precision * recall / (precision + recall))
  assert metrics.accuracy(p, y) == pytest.approx(np.mean(p == y))
  y3, p3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
  per_class = []
  for c in range(3):
    tp = np.sum((p3 == c) & (y3 == c))
    per_class.append(2 * tp / (np.sum(p3 == c) + np.sum(y3 == c)))
  assert metrics.f1(p3, y3, average="macro") == pytest.approx(np.mean(per_class))


def test_dice(rng):
  g = rng.random((5, 16, 16)) < 0.3
  p = rng.random((5, 16, 16)) < 0.3
  expected = np.mean([2 * np.sum(a & b) / (a.sum() + b.sum()) for a, b in zip(p, g)])
  assert metrics.dice(p, g) == pytest.approx(expected)
  assert metrics.dice(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))) == 1.0
  assert metrics.dice(g, g) == pytest.approx(1.0)


def test_phase_metrics_per_video(rng):
  videos = [rng.integers(0, 4, n) for n in (30, 50)]
  preds = [np.where(rng.random(len(v)) < 0.7, v, rng.integers(0, 4, len(v))) for v in videos]
  assert metrics.video_accuracy(preds, videos) == pytest.approx(
      np.mean([np.mean(p == v) for p, v in zip(preds, videos)]))
  jac = []
  for p, v in zip(preds, videos):
    jac.append(np.mean([np.sum((p == c) & (v == c)) / np.sum((p == c) | (v == c))
                        for c in range(4) if np.any(v == c)]))
  assert metrics.jaccard(preds, videos, 4) == pytest.approx(np.mean(jac))


def test_length_mismatch_is_an_error():
  with pytest.raises(ValueError, match="3 predictions but 2 targets"):
    metrics.mae([1, 2, 3], [1, 2])
