"""causal_conv1d against a float64 NumPy loop; streaming step; gradients; input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import rel_err, x64
from vidssm_jax.ops import causal_conv1d, causal_conv1d_step


def numpy_causal_conv1d(x, weight, bias=None, silu=False, state=None):
  x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
  b, l, d = x.shape
  k = weight.shape[0]
  past = np.zeros((b, k - 1, d)) if state is None else np.asarray(state, np.float64)
  xp = np.concatenate([past, x], 1)
  y = np.zeros((b, l, d))
  for t in range(l):
    for j in range(k):
      y[:, t] += weight[j] * xp[:, t + j]  # xp[t + j] is x_{t - k + 1 + j}
  if bias is not None:
    y += np.asarray(bias, np.float64)
  if silu:
    y = y / (1 + np.exp(-y))
  return y


@pytest.mark.parametrize("l,k,bias,silu,state", [
    (1, 4, True, True, False), (7, 4, False, False, True), (33, 2, True, False, True),
    (257, 4, True, True, True), (5, 1, True, True, False)])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (jnp.bfloat16, 2e-2)], ids=["f32", "bf16"])
def test_matches_numpy(l, k, bias, silu, state, dtype, tol):
  rng = np.random.default_rng(l * k)
  d = 5
  x = jnp.asarray(rng.normal(size=(3, l, d)), dtype)
  w = jnp.asarray(rng.normal(size=(k, d)), dtype)
  b = jnp.asarray(rng.normal(size=(d,)), dtype) if bias else None
  s = jnp.asarray(rng.normal(size=(3, k - 1, d)), dtype) if state else None
  y, final = causal_conv1d(x, w, b, "silu" if silu else None, initial_state=s,
                           return_final_state=True)
  assert y.dtype == dtype and y.shape == x.shape
  assert rel_err(y, numpy_causal_conv1d(x, w, b, silu, s)) <= tol
  full = np.concatenate([np.zeros((3, k - 1, d)) if s is None else np.asarray(s, np.float64),
                         np.asarray(x, np.float64)], 1)
  np.testing.assert_array_equal(np.asarray(final, np.float64), full[:, full.shape[1] - (k - 1):])


def test_step_and_halves_equal_whole():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 19, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
  whole = causal_conv1d(x, w, b, "silu")
  state = jnp.zeros((2, 3, 6))
  ys = []
  for t in range(19):
    y_t, state = causal_conv1d_step(state, x[:, t], w, b, "silu")
    ys.append(y_t)
  assert rel_err(jnp.stack(ys, 1), whole) <= 1e-6
  y1, s1 = causal_conv1d(x[:, :8], w, b, "silu", return_final_state=True)
  y2 = causal_conv1d(x[:, 8:], w, b, "silu", initial_state=s1)
  assert rel_err(jnp.concatenate([y1, y2], 1), whole) <= 1e-6


def test_check_grads_float64():
  with x64():
    rng = np.random.default_rng(1)
    args = [jnp.asarray(rng.normal(size=s), jnp.float64) for s in [(2, 9, 3), (4, 3), (3,), (2, 3, 3)]]
    f = lambda x, w, b, s: jnp.sum(jnp.cos(causal_conv1d(x, w, b, "silu", initial_state=s)))
    check_grads(f, args, order=1, modes=["rev"])


@pytest.mark.parametrize("call,pattern", [
    (lambda: causal_conv1d(jnp.zeros((2, 5)), jnp.zeros((4, 5))), r"x has shape \(2, 5\)"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3)), jnp.zeros((4, 5))), r"expected 5 channels"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3)), jnp.zeros((4, 3)), jnp.zeros((2,))),
     r"bias has shape \(2,\), expected \(3,\)"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3), jnp.int32), jnp.zeros((4, 3))), r"x has dtype int32"),
    (lambda: causal_conv1d(jnp.zeros((2, 5, 3)), jnp.zeros((4, 3)), activation="relu"),
     r"activation must be None or 'silu'"),
    (lambda: causal_conv1d_step(jnp.zeros((2, 2, 3)), jnp.zeros((2, 3)), jnp.zeros((4, 3))),
     r"conv_state has shape \(2, 2, 3\), expected \(2, 3, 3\)"),
])
def test_bad_input(call, pattern):
  with pytest.raises(ValueError, match=pattern):
    call()
