"""Pallas backend: interpret mode on CPU against float64 NumPy oracles (the forward oracle of
test_selective_scan.py and the reverse-mode oracle of bench.scan, checked here against finite
differences), on the core tests' awkward
cases, forward and every gradient; the CUDA lowering of every kernel variant; the registry."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, x64
from test_selective_scan import CASES, GRAD_NAMES, make_inputs, numpy_selective_scan
from vidssm_jax.bench.scan import numpy_scan_and_vjp
from vidssm_jax.ops import selective_scan
from vidssm_jax.ops.selective_scan import auto_backend, available_backends
from vidssm_jax.ops.selective_scan import native_length as backend_native_length
from vidssm_jax.ops.selective_scan_pallas import (PallasConfig, backward_segments_for,
                                                 forward_block, native_length, segments_for,
                                                 selective_scan_pallas, time_parallel_for)

# Interpret mode turns every kernel into a large XLA program; XLA's backend optimisations buy
# nothing for a test and cost most of the compile time.
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
# Small chunks keep the unrolled kernels (and so the compile) small; one case uses the default.
TEST_CONFIG = PallasConfig(chunk=4, block_d=4, bwd_block_d=2)


def numpy_selective_scan_vjp(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             initial_state=None, *, dy, dh, reverse=False):
  """Gradients of <y, dy> + <h_last, dh> (softplus on), by the adjoint recursion, in float64:
  a dict with the gradient of every input that was given, in its shape.

  The recursion lives in ``vidssm_jax.bench.scan`` so that the GPU check (``--check``) uses the
  same oracle; the test below checks it against central finite differences.
  """
  x = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
           initial_state=initial_state)
  return numpy_scan_and_vjp(x, reverse=reverse, dy=dy, dh=dh)[2]


def _run(x, *, reverse, config, ct_seed=0):
  """Forward and VJP of the Pallas backend, compiled once for this input signature."""
  names = [k for k in GRAD_NAMES if k in x]
  rng = np.random.default_rng(ct_seed)
  b, l, d = x["u"].shape
  n = x["A"].shape[1]
  ct_y = jnp.asarray(rng.normal(size=(b, l, d)), x["u"].dtype)
  ct_h = jnp.asarray(rng.normal(size=(b, d, n)), jnp.promote_types(x["u"].dtype, jnp.float32))

  def fwd_vjp(args, ct_y, ct_h):
    f = lambda *a: selective_scan_pallas(**dict(zip(names, a)), delta_softplus=True,
                                         reverse=reverse, return_final_state=True, config=config)
    (y, h), vjp = jax.vjp(f, *args)
    return y, h, vjp((ct_y, ct_h))

  args = [jnp.asarray(x[k]) for k in names]
  compiled = jax.jit(fwd_vjp).lower(args, ct_y, ct_h).compile(FAST_COMPILE)
  y, h, grads = compiled(args, ct_y, ct_h)
  return y, h, dict(zip(names, grads)), np.asarray(ct_y, np.float64), np.asarray(ct_h)


def _case_id(c):
  return "l{}-g{}-{}{}{}{}".format(c[0], c[1], "G" if c[2] else "", "rev" if c[3] else "",
                                   "-h0" if c[4] else "", "-DzB" if c[5] else "")


# float32 on every case; bfloat16 on three lengths (the casts do not depend on the length).
BF16_CASES = [CASES[1], CASES[4], CASES[7]]
# (and once with B and C cast to float32 before the kernels, PallasConfig.bc_float32)
BC32_CONFIG = dataclasses.replace(TEST_CONFIG, bc_float32=True)
PARAMS = ([pytest.param(c, np.float32, 1e-5, TEST_CONFIG, id=_case_id(c) + "-f32")
           for c in CASES] +
          [pytest.param(c, jnp.bfloat16, 2e-2, TEST_CONFIG, id=_case_id(c) + "-bf16")
           for c in BF16_CASES] +
          [pytest.param(CASES[4], jnp.bfloat16, 2e-2, BC32_CONFIG,
                        id=_case_id(CASES[4]) + "-bf16-bc32")])


@pytest.mark.parametrize("case,dtype,tol,config", PARAMS)
def test_forward_and_gradients_match_numpy_oracle(case, dtype, tol, config):
  l, g, grouped, reverse, h0, extras = case
  x = make_inputs(l * 10 + g, 2, l, 6, 5, g, grouped_dims=grouped, extras=extras, h0=h0)
  x = {k: jnp.asarray(v, dtype) for k, v in x.items()}
  y, h, grads, ct_y, ct_h = _run(x, reverse=reverse, config=config, ct_seed=l)
  assert y.dtype == dtype and y.shape == x["u"].shape
  assert h.dtype == jnp.float32 and h.shape == (2, 6, 5)
  ref = {k: np.asarray(v, np.float64) for k, v in x.items()}
  ref_y, ref_h = numpy_selective_scan(**{k: v for k, v in ref.items() if k != "initial_state"},
                                      delta_softplus=True, reverse=reverse,
                                      h0=ref.get("initial_state"))
  assert rel_err(y, ref_y) <= tol
  assert rel_err(h, ref_h) <= tol
  ref_grads = numpy_selective_scan_vjp(**ref, dy=ct_y, dh=ct_h, reverse=reverse)
  assert set(grads) == set(ref_grads)
  for name, grad in grads.items():
    assert grad.shape == x[name].shape and grad.dtype == x[name].dtype, name
    assert rel_err(grad, ref_grads[name]) <= tol, (name, rel_err(grad, ref_grads[name]))


@pytest.mark.parametrize("config", [
    pytest.param(PallasConfig(), id="default"),
    pytest.param(PallasConfig(chunk=1, block_d=1, bwd_block_d=1), id="chunk1"),
    pytest.param(PallasConfig(chunk=2, block_d=8, bwd_block_d=4, atomic_dbc=True), id="atomic"),
    pytest.param(PallasConfig(chunk=4, block_d=4, bwd_block_d=2, gate_in_kernel=True),
                 id="gate-in-kernel"),
    pytest.param(PallasConfig(chunk=4, gate_in_kernel=True, segments=2),
                 id="gate-in-kernel-segments"),
])
def test_kernel_configs_agree_with_oracle(config):
  # l = 11 is a multiple of none of the chunks but 1 (a tail chunk), and 16 channels in 2
  # groups give several channel blocks per group (the dB / dC reduction across programs).
  x = make_inputs(5, 2, 11, 16, 4, 2, h0=True)
  y, h, grads, ct_y, ct_h = _run(x, reverse=True, config=config)
  ref = {k: np.asarray(v, np.float64) for k, v in x.items()}
  ref_y, ref_h = numpy_selective_scan(**{k: v for k, v in ref.items() if k != "initial_state"},
                                      delta_softplus=True, reverse=True, h0=ref["initial_state"])
  assert rel_err(y, ref_y) <= 1e-5 and rel_err(h, ref_h) <= 1e-5
  ref_grads = numpy_selective_scan_vjp(**ref, dy=ct_y, dh=ct_h, reverse=True)
  for name, grad in grads.items():
    assert rel_err(grad, ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("case,split,poison", [
    pytest.param(CASES[4], dict(segments=2), False, id=_case_id(CASES[4]) + "-s2"),
    pytest.param(CASES[7], dict(segments=3), False, id=_case_id(CASES[7]) + "-s3"),
    pytest.param(CASES[6], dict(segments=4), False, id=_case_id(CASES[6]) + "-s4"),
    pytest.param(CASES[5], dict(segments=2), True, id=_case_id(CASES[5]) + "-s2-poisoned"),
    pytest.param(CASES[7], dict(segments=1, bwd_segments=5), False,
                 id=_case_id(CASES[7]) + "-b5"),
    pytest.param(CASES[6], dict(segments=1, bwd_segments=2), True,
                 id=_case_id(CASES[6]) + "-b2-poisoned")])
def test_length_parallel_scans_match_numpy_oracle(case, split, poison):
  # The length-parallel scan (segments) and the backward-only split of an unsplit forward
  # (bwd_segments) on the core tests' awkward cases (groups, reverse and forward, initial
  # state, no extras): forward, final state and every gradient, through the carries between
  # the segments in both directions (and, backward only, the forward's chunk states taken per
  # segment). Poisoned outputs (NaN-filled before the kernels run) show that every kernel
  # writes every element it owns.
  l, g, grouped, reverse, h0, extras = case
  x = make_inputs(l * 10 + g, 2, l, 6, 5, g, grouped_dims=grouped, extras=extras, h0=h0)
  x = {k: jnp.asarray(v, np.float32) for k, v in x.items()}
  config = PallasConfig(chunk=4, block_d=2, bwd_block_d=2, poison_outputs=poison, **split)
  if "bwd_segments" in split:  # the backward split does run
    assert backward_segments_for(2, l, 6, config) == split["bwd_segments"]
  y, h, grads, ct_y, ct_h = _run(x, reverse=reverse, config=config, ct_seed=l)
  ref = {k: np.asarray(v, np.float64) for k, v in x.items()}
  ref_y, ref_h = numpy_selective_scan(**{k: v for k, v in ref.items() if k != "initial_state"},
                                      delta_softplus=True, reverse=reverse,
                                      h0=ref.get("initial_state"))
  assert rel_err(y, ref_y) <= 1e-5 and rel_err(h, ref_h) <= 1e-5
  ref_grads = numpy_selective_scan_vjp(**ref, dy=ct_y, dh=ct_h, reverse=reverse)
  assert set(grads) == set(ref_grads)
  for name, grad in grads.items():
    assert rel_err(grad, ref_grads[name]) <= 1e-5, (name, rel_err(grad, ref_grads[name]))


@pytest.mark.parametrize("l,g,grouped,h0,extras,block_t,block_d,dtype,poison,gate_in", [
    pytest.param(197, 1, False, True, True, 64, 2, np.float32, True, False,
                 id="l197-h0-DzB-t64-last-block-overlaps-poisoned"),
    pytest.param(37, 1, False, True, True, 16, 2, np.float32, False, True,
                 id="l37-h0-DzB-t16-gate-in-kernel"),
    pytest.param(11, 2, True, True, True, 4, 2, np.float32, True, False,
                 id="l11-g2G-h0-DzB-t4-poisoned"),
    pytest.param(1, 1, False, False, False, 64, 2, np.float32, False, False, id="l1-t64"),
    pytest.param(64, 2, False, False, True, 16, 1, np.float32, False, False,
                 id="l64-g2-DzB-t16-d1"),
    pytest.param(100, 1, False, True, True, 32, 2, jnp.bfloat16, False, False,
                 id="l100-h0-DzB-bf16")])
def test_time_parallel_forward_matches_numpy_oracle(l, g, grouped, h0, extras, block_t, block_d,
                                                   dtype, poison, gate_in):
  # The undifferentiated forward with time scanned across threads (PallasConfig.time_parallel):
  # a length shorter than a block, whole blocks, a last block that overlaps the one before,
  # groups, an initial state, no extras, the z gate inside the kernel; y and the final state
  # against the float64 oracle. Poisoned outputs show that every y element is written (the
  # overlap's masked store too).
  x = make_inputs(l * 10 + g, 2, l, 6, 5, g, grouped_dims=grouped, extras=extras, h0=h0)
  x = {k: jnp.asarray(v, dtype) for k, v in x.items()}
  names = [k for k in GRAD_NAMES if k in x]
  config = PallasConfig(chunk=4, time_parallel=True, tp_block_t=block_t, tp_block_d=block_d,
                        poison_outputs=poison, gate_in_kernel=gate_in)
  scan = lambda *a: selective_scan_pallas(**dict(zip(names, a)), delta_softplus=True,
                                          return_final_state=True, config=config)
  args = [x[k] for k in names]
  y, h = jax.jit(scan).lower(*args).compile(FAST_COMPILE)(*args)
  assert y.dtype == dtype and y.shape == x["u"].shape and h.shape == (2, 6, 5)
  ref = {k: np.asarray(v, np.float64) for k, v in x.items()}
  ref_y, ref_h = numpy_selective_scan(**{k: v for k, v in ref.items() if k != "initial_state"},
                                      delta_softplus=True, h0=ref.get("initial_state"))
  tol = 1e-5 if dtype == np.float32 else 2e-2
  assert rel_err(y, ref_y) <= tol and rel_err(h, ref_h) <= tol


def test_time_parallel_leaves_gradients_and_reverse_to_the_walk():
  # Under differentiation the forward must save its chunk states, and a reverse scan walks:
  # outputs and every gradient still match the oracle with time_parallel forced on.
  x = make_inputs(3, 2, 37, 6, 5, 1, h0=True)
  for reverse in (False, True):
    config = PallasConfig(chunk=4, block_d=2, time_parallel=True)
    y, h, grads, ct_y, ct_h = _run(x, reverse=reverse, config=config)
    ref = {k: np.asarray(v, np.float64) for k, v in x.items()}
    ref_y, _ = numpy_selective_scan(**{k: v for k, v in ref.items() if k != "initial_state"},
                                    delta_softplus=True, reverse=reverse, h0=ref["initial_state"])
    assert rel_err(y, ref_y) <= 1e-5
    ref_grads = numpy_selective_scan_vjp(**ref, dy=ct_y, dh=ct_h, reverse=reverse)
    for name, grad in grads.items():
      assert rel_err(grad, ref_grads[name]) <= 1e-5, name


def test_automatic_time_parallel_by_shape():
  config = PallasConfig()
  assert time_parallel_for(1, 768, False, config)  # a live stream's temporal scan
  assert time_parallel_for(1, 1536, False, config)  # its spatial scan, both directions
  assert not time_parallel_for(16, 1536, False, config)  # 16 streams: the walk fills the GPU
  assert not time_parallel_for(1, 768, True, config)  # reverse always walks
  assert not time_parallel_for(1, 768, False, PallasConfig(time_parallel=False))
  assert time_parallel_for(64, 768, False, PallasConfig(time_parallel=True))


def test_automatic_backward_segments_by_shape():
  config = PallasConfig()
  # Long rows whose programs fill the GPU forward: the backward alone splits.
  assert backward_segments_for(4, 8192, 1536, config) == 4
  assert backward_segments_for(8, 1568, 768, config) == 4  # 768 programs to 3072
  assert backward_segments_for(8, 784, 768, config) == 2  # segments keep >= 384 steps
  assert backward_segments_for(32, 197, 768, config) == 1
  assert backward_segments_for(1, 197, 768, config) == 1
  assert backward_segments_for(4, 8196, 1536, config) == 1  # no whole chunks per segment
  assert backward_segments_for(4, 8192, 1536, PallasConfig(bwd_segments=1)) == 1
  assert backward_segments_for(2, 1000, 6, PallasConfig(chunk=4, bwd_segments=4)) == 2


@pytest.mark.parametrize("b,l,d", [(4, 33635, 384), (4, 13571, 384), (8, 5553, 384),
                                   (1, 3136, 768), (8, 1568, 768), (1, 197, 1536), (2, 300, 32),
                                   (1, 1030, 16), (3, 1, 8), (2, 1031, 4096)])
def test_native_length_is_one_the_kernels_do_not_pad(b, l, d):
  """At ``native_length`` the backend adds no padded steps: whole segments of whole chunks when
  it splits, whole chunks from ``pad_min_length``, else the length as given."""
  config = PallasConfig()
  n = native_length(b, l, d)
  assert l <= n < l + 256
  assert native_length(b, n, d) == n  # already native
  segments = segments_for(b, n, d, config)
  if segments > 1:
    assert n % (segments * config.chunk) == 0
  elif n >= config.pad_min_length:
    assert n % config.chunk == 0
  else:
    assert n == l
  assert backend_native_length(b, l, d, "pallas") == n
  assert backend_native_length(b, l, d, "reference") == l


def test_automatic_segments_by_shape():
  config = PallasConfig()  # the default: segments=None, chosen by shape
  assert segments_for(8, 1568, 768, config) == 1     # 768 programs of 8 channels: enough
  assert segments_for(4, 8192, 1536, config) == 1
  assert segments_for(4, 33635, 384, config) == 16   # 192 programs: split to 3072
  assert segments_for(8, 5553, 384, config) == 8
  assert segments_for(1, 3136, 768, config) == 16    # segments keep >= 128 steps
  assert segments_for(1, 197, 768, config) == 1      # too short to split (streaming)
  assert segments_for(1, 3136, 768, PallasConfig(segments=1)) == 1  # forced: no split
  # float32 inputs: split to half as many programs (1536), the bf16 choice halved or the same
  f32 = jnp.float32
  assert segments_for(4, 33635, 384, config, f32) == 8
  assert segments_for(4, 13571, 384, config, f32) == 8
  assert segments_for(8, 5553, 384, config, f32) == 4
  assert segments_for(1, 3136, 768, config, f32) == 16   # 96 programs to 1536
  assert segments_for(4, 33635, 384, config, jnp.bfloat16) == 16
  assert segments_for(8, 1568, 768, config, f32) == 1
  # Channels and warps per program of the segments: 16 on one warp from 1536 such programs.
  assert forward_block(4 * 16, 384, 1, 16, config, split=True) == (16, 1)
  assert forward_block(1 * 16, 768, 1, 16, config, split=True) == (32, 4)
  assert forward_block(64, 384, 1, 16, PallasConfig(block_d=8), split=True) == (8, 1)
  # Unsplit: 32 channels on 4 warps while that gives two programs per SM; fewer rows shrink the
  # programs to one state element per thread (a live stream's scan, both BiMamba directions).
  assert forward_block(16, 768, 1, 16, config) == (32, 4)
  assert forward_block(1, 768, 1, 16, config) == (2, 1)
  assert forward_block(1, 1536, 2, 16, config) == (4, 2)
  assert forward_block(1, 768, 1, 8, config) == (4, 1)
  assert forward_block(1, 768, 1, 16, PallasConfig(block_d=8)) == (8, 1)


def test_public_entry_without_softplus_or_extras_and_undifferentiated():
  # The forward-only kernel (no saved chunk states), through selective_scan(backend="pallas").
  x = make_inputs(4, 2, 21, 8, 4, 2, extras=False)
  x["delta"] = np.abs(x["delta"])
  ref, ref_h = numpy_selective_scan(**x)
  fwd = jax.jit(lambda x: selective_scan(**x, return_final_state=True, backend="pallas"))
  y, h = fwd.lower(x).compile(FAST_COMPILE)(x)
  assert rel_err(y, ref) <= 1e-5 and rel_err(h, ref_h) <= 1e-5


@pytest.mark.parametrize("softplus,bias,reverse,segments", [
    (True, True, True, 1), (True, True, False, 1), (False, False, False, 1),
    (False, True, True, 1), (True, True, True, 3), (False, True, False, 4)],
    ids=["softplus-padded-reverse", "softplus-padded", "nobias-padded", "bias-tail-reverse",
         "segments3-reverse", "segments4-bias-folded"])
def test_lengths_off_the_chunk_padded_or_tailed(softplus, bias, reverse, segments):
  # l = 11 with chunk 4 and pad_min_length 0: padded with identity steps (dt = 0) unless delta
  # has a bias and no softplus, where the kernels run their unrolled tail chunk. With segments
  # (the length-parallel scan) the length is padded to whole chunks per segment (3 segments of
  # 4 steps; 4 of 4, the last one all padding), the bias folded into delta without softplus.
  # Forward and every gradient against the float64 lax.scan reference backend.
  x = make_inputs(7, 2, 11, 8, 4, 2, h0=True)
  x["delta"] = np.abs(x["delta"])
  if not bias:
    del x["delta_bias"]
  names = [k for k in GRAD_NAMES if k in x]
  config = PallasConfig(chunk=4, block_d=4, bwd_block_d=2, pad_min_length=0, segments=segments)

  def loss(backend, *args):
    kw = dict(zip(names, args))
    h0 = kw.pop("initial_state")
    y, h = selective_scan(**kw, delta_softplus=softplus, reverse=reverse, initial_state=h0,
                          return_final_state=True, backend=backend)
    return jnp.sum(y * jnp.cos(y)) + jnp.sum(h ** 2), (y, h)

  def pallas(*args):
    kw = dict(zip(names, args))
    h0 = kw.pop("initial_state")
    y, h = selective_scan_pallas(**kw, delta_softplus=softplus, reverse=reverse, initial_state=h0,
                                 return_final_state=True, config=config)
    return jnp.sum(y * jnp.cos(y)) + jnp.sum(h ** 2), (y, h)

  grad = lambda f: jax.grad(f, argnums=tuple(range(len(names))), has_aux=True)
  args = [jnp.asarray(x[k], jnp.float32) for k in names]
  got = jax.jit(grad(pallas)).lower(*args).compile(FAST_COMPILE)(*args)
  with x64():
    args64 = [jnp.asarray(x[k], jnp.float64) for k in names]
    want = jax.jit(grad(lambda *a: loss("reference", *a)))(*args64)
  for name, g, w in zip(names, got[0], want[0]):
    assert rel_err(g, w) <= 1e-5, name
  assert rel_err(got[1][0], want[1][0]) <= 1e-5 and rel_err(got[1][1], want[1][1]) <= 1e-5


def test_float64_inputs_keep_a_float64_state():
  with x64():
    x = make_inputs(3, 1, 6, 4, 3, 2, h0=True, dtype=np.float64)
    x = {k: jnp.asarray(v, jnp.float64) for k, v in x.items()}
    y, h, grads, ct_y, ct_h = _run(x, reverse=False, config=TEST_CONFIG)
    assert y.dtype == jnp.float64 and h.dtype == jnp.float64
    ref_y, ref_h = numpy_selective_scan(**{k: v for k, v in x.items() if k != "initial_state"},
                                        delta_softplus=True, h0=x["initial_state"])
    assert rel_err(y, ref_y) <= 1e-12 and rel_err(h, ref_h) <= 1e-12
    ref_grads = numpy_selective_scan_vjp(**x, dy=ct_y, dh=ct_h)
    for name, grad in grads.items():
      assert rel_err(grad, ref_grads[name]) <= 1e-12, name


def test_oracle_vjp_matches_finite_differences():
  # The reverse-mode oracle above is itself checked against central differences of the
  # forward oracle, on a tiny case, along one random direction per input.
  x = make_inputs(9, 1, 5, 4, 3, 2, h0=True, dtype=np.float64)
  rng = np.random.default_rng(1)
  dy, dh = rng.normal(size=(1, 5, 4)), rng.normal(size=(1, 4, 3))

  def objective(v):
    y, h = numpy_selective_scan(**{k: w for k, w in v.items() if k != "initial_state"},
                                delta_softplus=True, reverse=True, h0=v["initial_state"])
    return np.sum(y * dy) + np.sum(h * dh)

  grads = numpy_selective_scan_vjp(**x, dy=dy, dh=dh, reverse=True)
  for name in GRAD_NAMES:
    direction = rng.normal(size=x[name].shape)
    eps = 1e-6
    plus = {**x, name: x[name] + eps * direction}
    minus = {**x, name: x[name] - eps * direction}
    numeric = (objective(plus) - objective(minus)) / (2 * eps)
    assert abs(numeric - np.sum(grads[name] * direction)) <= 1e-6 * max(1.0, abs(numeric)), name


def test_registry_runs_pallas_on_cpu_only_when_asked():
  assert "pallas" in available_backends("cpu")
  assert auto_backend("cpu") == "reference"
  assert auto_backend("gpu") == "pallas"
  assert "pallas" not in available_backends("tpu")


@pytest.mark.parametrize("value,pattern", [
    (dict(block_d=24), r"PallasConfig.block_d must be a power of two, got 24"),
    (dict(chunk=0), r"PallasConfig.chunk must be a power of two, got 0"),
    (dict(num_warps=0), r"PallasConfig.num_warps must be a positive int, got 0"),
    (dict(pad_min_length=-1), r"PallasConfig.pad_min_length must be an int >= 0, got -1"),
    (dict(segments=0), r"PallasConfig.segments must be None or an int >= 1, got 0"),
    (dict(bwd_segments=0), r"PallasConfig.bwd_segments must be None or an int >= 1, got 0"),
])
def test_config_rejects_bad_values(value, pattern):
  with pytest.raises(ValueError, match=pattern):
    PallasConfig(**value)


# --------------------------------------------------------------------------------------------
# The kernels lower for CUDA (Pallas -> Triton IR), checked here without a GPU.
# --------------------------------------------------------------------------------------------


def _export_for_cuda(fn, *args):
  return jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*args)


# The default configuration, then the other code paths with a short chunk (a smaller kernel).
SHORT = PallasConfig(chunk=4)
LOWERING_VARIANTS = {
    "f32": dict(),
    "bf16": dict(dtype=jnp.bfloat16, config=SHORT),
    "groups-reverse-h0": dict(g=2, reverse=True, h0=True, config=SHORT),
    "no-extras-no-softplus": dict(extras=False, softplus=False, config=SHORT),
    "n5-atomic": dict(n=5, config=PallasConfig(chunk=4, atomic_dbc=True)),
    "bwd-libdevice": dict(config=PallasConfig(chunk=4, bwd_fast_math=False)),
    "gate-in-kernel": dict(config=PallasConfig(chunk=4, gate_in_kernel=True)),
    "gate-in-kernel-segments": dict(reverse=True, h0=True, kernels=(2, 4), config=PallasConfig(
        chunk=4, segments=2, gate_in_kernel=True)),
    # The length-parallel scan runs the light states kernel, then the forward kernel; its
    # gradient adds the light adjoints kernel and one backward kernel.
    "segments": dict(reverse=True, h0=True, config=PallasConfig(chunk=4, segments=2),
                     kernels=(2, 4)),
    # The backward-only split: one forward kernel; the gradient adds the light adjoints kernel
    # (with the segments' sums of dt) and one backward kernel.
    "bwd-segments": dict(reverse=True, h0=True, l=48, kernels=(1, 3),
                         config=PallasConfig(chunk=4, segments=1, bwd_segments=3)),
    # The undifferentiated forward scans time across threads (its own kernel and the pair
    # scan's Triton lowering); the gradient's forward walks and saves its chunk states.
    "time-parallel": dict(h0=True, dtype=jnp.bfloat16,
                          config=PallasConfig(chunk=4, time_parallel=True)),
    "walk": dict(h0=True, config=PallasConfig(chunk=4, time_parallel=False)),
    # bf16 u, delta, z with float32 B and C (PallasConfig.bc_float32)
    "bc-float32": dict(dtype=jnp.bfloat16, config=PallasConfig(chunk=4, bc_float32=True)),
}


@pytest.mark.parametrize("variant", list(LOWERING_VARIANTS))
def test_kernels_lower_for_cuda(variant):
  v = dict(dtype=jnp.float32, g=1, reverse=False, h0=False, extras=True, softplus=True, n=16,
           config=PallasConfig(), kernels=(1, 2), l=45)
  v.update(LOWERING_VARIANTS[variant])
  # l = 45 gives full chunks and a tail (48: whole chunks, for the backward-only split);
  # interpret=False asks for the GPU kernels.
  config = PallasConfig(**{**v["config"].__dict__, "interpret": False})
  x = make_inputs(0, 2, v["l"], 64, v["n"], v["g"], extras=v["extras"], h0=v["h0"])
  x = {k: jnp.asarray(a, v["dtype"]) for k, a in x.items()}
  names = [k for k in GRAD_NAMES if k in x]

  def loss(*args):
    y, h = selective_scan_pallas(**dict(zip(names, args)), delta_softplus=v["softplus"],
                                 reverse=v["reverse"], return_final_state=True, config=config)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

  forward = _export_for_cuda(loss, *[x[k] for k in names])
  gradient = _export_for_cuda(jax.grad(loss, tuple(range(len(names)))), *[x[k] for k in names])
  for exported, kernels in zip((forward, gradient), v["kernels"]):
    text = exported.mlir_module()
    assert text.count("__gpu$xla.gpu.triton") == kernels, variant
  expect_tp = v["config"].time_parallel is not False and not v["reverse"]  # b · d = 128: auto
  assert ("selective_scan_fwd_tp" in forward.mlir_module()) == expect_tp, variant
  assert "selective_scan_fwd_tp" not in gradient.mlir_module()


def test_bench_chains_stream_scans_from_state_to_state():
  """bench.scan times a live stream's scan as ``k`` calls in one program, each from the state
  the one before left: the chain equals the oracle run ``k`` times, feeding its state on."""
  from vidssm_jax.bench.scan import _chained_stream, _scan_fn, make_inputs as bench_inputs
  from vidssm_jax.bench.scan import with_initial_state
  x = with_initial_state(bench_inputs(1, 7, 8, 4, jnp.float32))
  h = _chained_stream(_scan_fn("reference", final_state=True), k=3)(x)
  ref = {k: np.asarray(v, np.float64) for k, v in x.items()}
  h_ref = ref.pop("initial_state")
  for _ in range(3):
    _, h_ref = numpy_selective_scan(**ref, delta_softplus=True, h0=h_ref)
  assert rel_err(h, h_ref) <= 1e-5
