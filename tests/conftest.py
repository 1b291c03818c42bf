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


# Compile time dominates the small programs of the tests on CPU: skip XLA's backend optimisations.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(fn, *args):
  """``fn`` jitted and compiled for ``args`` without backend optimisations (tiny test programs
  run about as fast and compile several times faster)."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)
