"""selective_scan: every backend against a float64 NumPy oracle written here, gradients,
memory of the chunked backend, and input checks."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import rel_err, x64
from vidssm_jax.ops import selective_scan, selective_scan_step
from vidssm_jax.ops.selective_scan import (auto_backend, available_backends, register_backend,
                                           resolve_backend)

BACKENDS = ["reference", "associative"]


def numpy_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, reverse=False, h0=None):
  """The definition, step by step, in float64. B, C: (b, l, n) or (b, l, g, n)."""
  u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
  b, l, d = u.shape
  n = A.shape[1]
  if B.ndim == 3:
    B, C = B[:, :, None], C[:, :, None]
  g = B.shape[2]
  group = np.arange(d) // (d // g)  # group of each channel
  dt = delta + (0 if delta_bias is None else np.asarray(delta_bias, np.float64))
  if delta_softplus:
    dt = np.log1p(np.exp(dt))
  h = np.zeros((b, d, n)) if h0 is None else np.asarray(h0, np.float64).copy()
  y = np.zeros((b, l, d))
  steps = range(l - 1, -1, -1) if reverse else range(l)
  for t in steps:
    Bt, Ct = B[:, t][:, group], C[:, t][:, group]  # (b, d, n)
    h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * Bt
    y[:, t] = np.sum(h * Ct, -1)
  if D is not None:
    y = y + u * np.asarray(D, np.float64)
  if z is not None:
    z = np.asarray(z, np.float64)
    y = y * z / (1 + np.exp(-z))
  return y, h


def make_inputs(seed, b, l, d, n, g, *, grouped_dims=True, extras=True, h0=False, dtype=np.float32):
  rng = np.random.default_rng(seed)
  bc_shape = (b, l, g, n) if (g > 1 or grouped_dims) else (b, l, n)
  x = dict(
      u=rng.normal(size=(b, l, d)),
      delta=rng.normal(size=(b, l, d)) * 0.5 - 1.0,
      A=-np.exp(rng.normal(size=(d, n)) * 0.5),
      B=rng.normal(size=bc_shape),
      C=rng.normal(size=bc_shape),
  )
  if extras:
    x.update(D=rng.normal(size=(d,)), z=rng.normal(size=(b, l, d)),
             delta_bias=rng.normal(size=(d,)) * 0.3)
  if h0:
    x["initial_state"] = rng.normal(size=(b, d, n))
  return {k: v.astype(dtype) for k, v in x.items()}


# (length, groups, B/C with a group axis, reverse, initial state, D/z/delta_bias)
CASES = [
    (1, 1, False, False, False, True),
    (1, 2, True, True, True, True),
    (7, 1, False, False, True, False),
    (7, 2, True, True, False, True),
    (257, 1, True, True, True, True),
    (257, 2, True, False, False, False),
    (1000, 1, False, False, True, True),
    (1000, 2, True, True, True, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "l{}-g{}-{}{}{}{}".format(
    c[0], c[1], "G" if c[2] else "", "rev" if c[3] else "", "-h0" if c[4] else "",
    "-DzB" if c[5] else ""))
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (jnp.bfloat16, 2e-2)],
                         ids=["f32", "bf16"])
def test_matches_numpy_oracle(backend, case, dtype, tol):
  l, g, grouped, reverse, h0, extras = case
  x = make_inputs(l * 10 + g, 2, l, 6, 5, g, grouped_dims=grouped, extras=extras, h0=h0)
  x = {k: jnp.asarray(v, dtype) for k, v in x.items()}
  y, h = selective_scan(**x, delta_softplus=True, reverse=reverse, return_final_state=True,
                        backend=backend, chunk_size=64)
  assert y.dtype == dtype and y.shape == x["u"].shape
  assert h.dtype == jnp.float32 and h.shape == (2, 6, 5)
  ref_args = {k: np.asarray(v, np.float64) for k, v in x.items()}
  ref_y, ref_h = numpy_selective_scan(**{k: v for k, v in ref_args.items() if k != "initial_state"},
                                      delta_softplus=True, reverse=reverse,
                                      h0=ref_args.get("initial_state"))
  assert rel_err(y, ref_y) <= tol
  assert rel_err(h, ref_h) <= tol


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 2000])
def test_chunk_sizes_agree(chunk_size):
  x = make_inputs(3, 1, 100, 4, 3, 1, h0=True)
  y_ref, h_ref = numpy_selective_scan(**{k: v for k, v in x.items() if k != "initial_state"},
                                      delta_softplus=True, h0=x["initial_state"])
  y, h = selective_scan(**x, delta_softplus=True, return_final_state=True,
                        backend="associative", chunk_size=chunk_size)
  assert rel_err(y, y_ref) <= 1e-5 and rel_err(h, h_ref) <= 1e-5


def test_no_softplus_and_no_extras():
  x = make_inputs(5, 2, 33, 4, 3, 2, extras=False)
  x["delta"] = np.abs(x["delta"])  # a valid step size without softplus
  ref, _ = numpy_selective_scan(**x)
  for backend in BACKENDS:
    assert rel_err(selective_scan(**x, backend=backend), ref) <= 1e-5


GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def _loss(backend, reverse, chunk_size=8):
  def loss(*args):
    kw = dict(zip(GRAD_NAMES, args))
    y, h = selective_scan(**kw, delta_softplus=True, reverse=reverse, return_final_state=True,
                          backend=backend, chunk_size=chunk_size)
    # A loss that weights every output and the final state differently.
    w = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
    return jnp.sum(y * w) + jnp.sum(jnp.sin(h))
  return loss


@pytest.mark.parametrize("l,g,reverse", [(1, 1, False), (7, 2, True), (257, 2, False),
                                         (1000, 1, True)])
def test_gradients_agree_between_backends(l, g, reverse):
  x = make_inputs(l + g, 2, l, 4, 3, g, h0=True)
  args = [jnp.asarray(x[k]) for k in GRAD_NAMES]
  argnums = tuple(range(len(args)))
  g_ref = jax.jit(jax.grad(_loss("reference", reverse), argnums))(*args)
  g_asc = jax.jit(jax.grad(_loss("associative", reverse, 64), argnums))(*args)
  for name, a, r in zip(GRAD_NAMES, g_asc, g_ref):
    assert a.shape == r.shape, name
    assert rel_err(a, r) <= 1e-4, f"gradient of {name}: rel err {rel_err(a, r)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_grads_float64(backend):
  with x64():
    x = make_inputs(11, 2, 9, 4, 3, 2, h0=True, dtype=np.float64)
    args = [jnp.asarray(x[k], jnp.float64) for k in GRAD_NAMES]
    check_grads(_loss(backend, reverse=True, chunk_size=4), args, order=1, modes=["rev"],
                atol=1e-6, rtol=1e-6)
    check_grads(_loss(backend, reverse=False, chunk_size=4), args, order=1, modes=["rev"],
                atol=1e-6, rtol=1e-6)


def test_two_halves_with_carried_state_equal_whole():
  x = make_inputs(21, 2, 51, 4, 3, 2)
  for backend in BACKENDS:
    y, h = selective_scan(**x, delta_softplus=True, return_final_state=True, backend=backend)
    first = {k: (v[:, :20] if v.ndim >= 3 else v) for k, v in x.items()}
    second = {k: (v[:, 20:] if v.ndim >= 3 else v) for k, v in x.items()}
    y1, h1 = selective_scan(**first, delta_softplus=True, return_final_state=True, backend=backend)
    y2, h2 = selective_scan(**second, delta_softplus=True, initial_state=h1,
                            return_final_state=True, backend=backend)
    assert rel_err(jnp.concatenate([y1, y2], 1), y) <= 1e-5
    assert rel_err(h2, h) <= 1e-5


def test_step_equals_scan():
  x = make_inputs(8, 3, 12, 6, 4, 2, h0=True)
  y_all, h_all = selective_scan(**x, delta_softplus=True, return_final_state=True)
  h = jnp.asarray(x["initial_state"])
  ys = []
  for t in range(12):
    y_t, h = selective_scan_step(h, x["u"][:, t], x["delta"][:, t], x["A"], x["B"][:, t],
                                 x["C"][:, t], x["D"], x["z"][:, t], x["delta_bias"],
                                 delta_softplus=True)
    ys.append(y_t)
  assert rel_err(jnp.stack(ys, 1), y_all) <= 1e-5
  assert rel_err(h, h_all) <= 1e-5


def test_chunked_backend_memory_is_far_below_unchunked():
  b, l, d, n = 1, 4096, 64, 16
  x = make_inputs(0, b, l, d, n, 1, grouped_dims=False, extras=False)

  def peak_bytes(chunk_size):
    def loss(u, delta, B, C):
      return selective_scan(u, delta, x["A"], B, C, delta_softplus=True, backend="associative",
                            chunk_size=chunk_size).sum()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    mem = grad.lower(x["u"], x["delta"], x["B"], x["C"]).compile().memory_analysis()
    return mem.temp_size_in_bytes

  chunked, unchunked = peak_bytes(32), peak_bytes(l)
  # One (b, l, d, n) float32 state tensor is 16.8 MB; the chunked gradient must not hold any.
  assert chunked < b * l * d * n * 4 / 2, chunked
  assert chunked / unchunked < 0.1, (chunked, unchunked)


def test_auto_backend_is_registered_and_runs():
  assert {"reference", "associative"} <= set(available_backends("cpu"))
  x = make_inputs(1, 1, 5, 2, 2, 1)
  ref, _ = numpy_selective_scan(**x)
  assert rel_err(selective_scan(**x, backend="auto"), ref) <= 1e-5
  with pytest.raises(ValueError, match="unknown selective_scan backend 'nope'"):
    selective_scan(**x, backend="nope")


def _bad(**overrides):
  x = make_inputs(0, 2, 5, 4, 3, 2, h0=True)
  x.update(overrides)
  return x


@pytest.mark.parametrize("overrides,pattern", [
    (dict(u=np.zeros((2, 5), np.float32)), r"u has shape \(2, 5\), expected \(batch, length"),
    (dict(delta=np.zeros((2, 6, 4), np.float32)), r"delta has shape \(2, 6, 4\), expected \(2, 5, 4\)"),
    (dict(A=np.zeros((5, 3), np.float32)), r"A has shape \(5, 3\), expected \(4, d_state\)"),
    (dict(B=np.zeros((2, 5, 3, 3), np.float32), C=np.zeros((2, 5, 3, 3), np.float32)),
     r"3 groups, which does not divide the 4 channels"),
    (dict(C=np.zeros((2, 5, 2, 4), np.float32)), r"C has shape \(2, 5, 2, 4\), expected \(2, 5, 2, 3\)"),
    (dict(u=np.zeros((2, 5, 4), np.int32)), r"u has dtype int32, expected a floating dtype"),
    (dict(initial_state=np.zeros((2, 3, 4), np.float32)),
     r"initial_state has shape \(2, 3, 4\), expected \(2, 4, 3\)"),
    (dict(D=np.zeros((3,), np.float32)), r"D has shape \(3,\), expected \(4,\)"),
    (dict(z=np.zeros((2, 5, 3), np.float32)), r"z has shape \(2, 5, 3\), expected \(2, 5, 4\)"),
])
def test_bad_input_names_argument_and_shapes(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    selective_scan(**_bad(**overrides))


def test_auto_uses_per_platform_priorities_and_named_only_backends():
  # The module itself (the package exports the function under the same name).
  ss = importlib.import_module("vidssm_jax.ops.selective_scan")
  # "pallas" runs on CPU only when named (interpret mode): "auto" never picks it there.
  assert ss._BACKENDS["pallas"].priorities["cpu"] is None
  assert auto_backend("cpu") == "reference"
  calls = []

  def traced_associative(*args, **kwargs):
    calls.append(kwargs["reverse"])
    return ss._BACKENDS["associative"].fn(*args, **kwargs)

  try:
    register_backend("test_first", traced_associative, priority={"cpu": 99, "gpu": None})
    register_backend("test_tpu_only", traced_associative, priority={"tpu": 1})
    assert auto_backend("cpu") == "test_first" and auto_backend("gpu") != "test_first"
    x = make_inputs(2, 1, 9, 4, 3, 1)
    ref, _ = numpy_selective_scan(**x, reverse=True)
    assert rel_err(selective_scan(**x, reverse=True), ref) <= 1e-5 and calls == [True]
    assert "test_tpu_only" not in available_backends("cpu")
    with pytest.raises(ValueError, match="backend 'test_tpu_only' does not run on 'cpu'"):
      resolve_backend("test_tpu_only")
  finally:
    ss._BACKENDS.pop("test_first", None)
    ss._BACKENDS.pop("test_tpu_only", None)
  assert auto_backend("cpu") == "reference"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_contract_takes_raw_inputs(backend):
  # A backend receives B, C with the group axis, D / z / delta_bias possibly None, the state
  # dtype's h0, and returns y in u's dtype with the last state in the state dtype.
  x = make_inputs(6, 2, 13, 4, 3, 2, h0=True, dtype=np.float32)
  x = {k: jnp.asarray(v) for k, v in x.items()}
  fn = resolve_backend(backend).fn
  for extras in (True, False):
    kw = {k: (x[k] if extras else None) for k in ("D", "z", "delta_bias")}
    y, h = fn(x["u"].astype(jnp.bfloat16), x["delta"], x["A"], x["B"], x["C"], kw["D"], kw["z"],
              kw["delta_bias"], x["initial_state"], delta_softplus=True, reverse=True,
              chunk_size=4)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    ref_y, ref_h = numpy_selective_scan(
        np.asarray(x["u"].astype(jnp.bfloat16), np.float64), x["delta"], x["A"], x["B"], x["C"],
        kw["D"], kw["z"], kw["delta_bias"], delta_softplus=True, reverse=True,
        h0=x["initial_state"])
    assert rel_err(y, ref_y) <= 2e-2 and rel_err(h, ref_h) <= 1e-5
