"""MambaMixer / BiMambaMixer: initialisation as SPEC §1, streaming equals whole, causality."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from vidssm_jax.nn.mamba import MambaConfig, BiMambaMixer, MambaMixer
from vidssm_jax.ops.selective_scan import native_length

DIM, L = 24, 13


@pytest.fixture(scope="module")
def mixer_and_vars():
  m = MambaMixer(dim=DIM, n_layers=9)
  x = jax.random.normal(jax.random.key(0), (2, L, DIM))
  return m, m.init(jax.random.key(1), x), x


def test_parameters_and_init_follow_spec(mixer_and_vars):
  m, variables, _ = mixer_and_vars
  p = nn.meta.unbox(variables)["params"]
  d_inner, n, r = 2 * DIM, 16, math.ceil(DIM / 16)
  assert p["in_proj"]["kernel"].shape == (DIM, 2 * d_inner)
  assert p["ssm"]["x_proj"]["kernel"].shape == (d_inner, r + 2 * n)
  assert p["ssm"]["conv_weight"].shape == (4, d_inner)
  np.testing.assert_allclose(p["ssm"]["A_log"], np.log(np.tile(np.arange(1, n + 1), (d_inner, 1))),
                             rtol=1e-6)
  np.testing.assert_array_equal(p["ssm"]["D"], np.ones(d_inner))
  dt = jax.nn.softplus(p["ssm"]["dt_bias"])
  assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 1e-1 * 1.001
  assert float(jnp.abs(p["ssm"]["dt_proj_kernel"]).max()) <= r**-0.5
  # out_proj ~ U(±1/sqrt(fan_in)) / sqrt(n_layers): its bound shrinks by 3 for 9 layers.
  assert float(jnp.abs(p["out_proj"]["kernel"]).max()) <= d_inner**-0.5 / 3 + 1e-7
  assert float(jnp.abs(p["in_proj"]["kernel"]).max()) > d_inner**-0.5 / 3  # not scaled


def test_parameters_carry_logical_axis_names(mixer_and_vars):
  _, variables, _ = mixer_and_vars
  boxed = variables["params"]
  assert boxed["in_proj"]["kernel"].names == ("embed", "mlp")
  assert boxed["out_proj"]["kernel"].names == ("mlp", "embed")
  assert boxed["ssm"]["A_log"].names == ("mlp", "state")


def test_token_by_token_and_halves_equal_whole(mixer_and_vars):
  m, variables, x = mixer_and_vars
  whole = m.apply(variables, x)
  cache = m.init_cache(2)
  ys = []
  for t in range(L):
    y_t, cache = m.apply(variables, x[:, t], cache, method="step")
    ys.append(y_t)
  assert rel_err(jnp.stack(ys, 1), whole) <= 1e-5
  stepped = cache
  y1, cache = m.apply(variables, x[:, :6], m.init_cache(2), method="forward_chunk")
  y2, halves = m.apply(variables, x[:, 6:], cache, method="forward_chunk")
  assert rel_err(jnp.concatenate([y1, y2], 1), whole) <= 1e-5
  # The state after the two halves is the state after stepping through every token.
  assert rel_err(halves["ssm"], stepped["ssm"]) <= 1e-5
  assert rel_err(halves["conv"], stepped["conv"]) <= 1e-6


def test_mixer_is_causal_and_bimixer_is_not():
  x = jax.random.normal(jax.random.key(2), (1, 9, DIM))
  x2 = x.at[:, 6].add(1.0)  # change token 6 only
  uni = MambaMixer(dim=DIM)
  bi = BiMambaMixer(dim=DIM)
  vu, vb = uni.init(jax.random.key(3), x), bi.init(jax.random.key(3), x)
  du = jnp.abs(uni.apply(vu, x) - uni.apply(vu, x2)).max(-1)[0]
  db = jnp.abs(bi.apply(vb, x) - bi.apply(vb, x2)).max(-1)[0]
  assert float(du[:6].max()) == 0.0 and float(du[6:].min()) > 0
  assert float(db[:6].min()) > 0  # the backward branch carries token 6 to earlier positions


def test_bimixer_equals_two_directions_summed():
  """With the backward branch's parameters set to the forward's, the output is
  out_proj(y(x) + flip(y(flip(x)))) computed from a unidirectional mixer."""
  x = jax.random.normal(jax.random.key(4), (2, 8, DIM))
  bi = BiMambaMixer(dim=DIM)
  pb = nn.meta.unbox(bi.init(jax.random.key(5), x))["params"]
  pb = {**pb, "ssm_b": pb["ssm"]}
  uni = MambaMixer(dim=DIM)
  pu = {k: pb[k] for k in ("in_proj", "out_proj", "ssm")}
  # Same branch on the flipped sequence; the shared in/out projections are linear, so
  # out_proj(y_f + flip y_b) = uni(x) + uni(flip x) flipped.
  expected = uni.apply({"params": pu}, x) + jnp.flip(uni.apply({"params": pu}, jnp.flip(x, 1)), 1)
  assert rel_err(bi.apply({"params": pb}, x), expected) <= 1e-5
  half = BiMambaMixer(dim=DIM, divide_out=True).apply({"params": pb}, x)
  assert rel_err(half, expected / 2) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_fused_directions_equal_the_two_branches(backend):
  """BiMambaMixer's default runs both directions as one conv and one two-group scan; it must
  compute what the two branches compute one after the other, forward and gradients."""
  x = jax.random.normal(jax.random.key(6), (2, 11, DIM))
  cfg = MambaConfig(scan_backend=backend)
  fused = BiMambaMixer(dim=DIM, cfg=cfg, fuse_directions=True)
  apart = BiMambaMixer(dim=DIM, cfg=cfg, fuse_directions=False)
  variables = apart.init(jax.random.key(7), x)
  # Same parameter tree either way (checkpoints and converters do not see the fusion).
  assert jax.tree.structure(fused.init(jax.random.key(7), x)) == jax.tree.structure(variables)
  assert_same_function(fused, apart, variables, x, out_tol=1e-6)


def assert_same_function(got, want, variables, x, out_tol=1e-5, grad_tol=1e-5):
  """Two modules give the same outputs and the same gradients (parameters and input)."""
  assert rel_err(got.apply(variables, x), want.apply(variables, x)) <= out_tol
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  g_got = jax.grad(loss(got), argnums=(0, 1))(variables, x)
  g_want = jax.grad(loss(want), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    assert rel_err(a, b) <= grad_tol


@pytest.mark.parametrize("make", [lambda cfg: MambaMixer(dim=16, cfg=cfg),
                                  lambda cfg: BiMambaMixer(dim=16, cfg=cfg, fuse_directions=False)])
def test_fused_kernels_run_at_their_native_length_exactly(make):
  """300 tokens: the Pallas backend splits 32 channels of 2 rows into 2 segments of 152 steps,
  so the mixers run the scan's inputs at 304 steps (padded at the end, before the conv) and
  drop the extra outputs: the same outputs and gradients as the reference at 300 steps."""
  x = jax.random.normal(jax.random.key(8), (2, 300, 16))
  assert native_length(2, 300, 32, "pallas") == 304
  pallas, reference = make(MambaConfig(scan_backend="pallas")), make(MambaConfig())
  assert_same_function(pallas, reference, reference.init(jax.random.key(9), x), x)


def test_bfloat16_compute_is_close_to_float32(mixer_and_vars):
  m, variables, x = mixer_and_vars
  y32 = m.apply(variables, x)
  y16 = MambaMixer(dim=DIM, n_layers=9, cfg=MambaConfig(dtype=jnp.bfloat16)).apply(variables, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  assert rel_err(y16, y32) <= 3e-2


def test_bad_input_and_cache(mixer_and_vars):
  m, variables, x = mixer_and_vars
  with pytest.raises(ValueError, match=r"input has shape \(2, 13, 7\), expected \(batch, length, dim\) with dim = 24"):
    m.apply(variables, jnp.zeros((2, L, 7)))
  with pytest.raises(ValueError, match=r"cache\['conv'\] has shape \(3, 3, 48\), expected \(2, 3, 48\)"):
    m.apply(variables, x[:, 0], m.init_cache(3), method="step")
