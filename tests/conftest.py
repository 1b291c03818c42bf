"""Shared test helpers."""

import contextlib

import jax
import numpy as np


def x64():
  """A context in which JAX computes in float64 (for jax.test_util.check_grads)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # older JAX
  return enable_x64()


def rel_err(actual, expected) -> float:
  """‖actual − expected‖ / ‖expected‖ in float64."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


@contextlib.contextmanager
def no_op():
  yield
