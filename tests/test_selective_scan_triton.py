"""Triton backend, without a GPU: the lazy import, the registry, the block-shape choice, and,
when the ``triton`` package is installed, the kernels compiled offline for sm_90 and run in
Triton's own interpreter against the float64 NumPy oracles (forward and every gradient)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from test_selective_scan import make_inputs, numpy_selective_scan
from test_selective_scan_pallas import numpy_selective_scan_vjp
from vidssm_jax.ops import selective_scan
from vidssm_jax.ops.selective_scan import available_backends
from vidssm_jax.ops.selective_scan_triton import TritonConfig, choose_block_d, make_spec

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="the triton package is not installed")


def test_importing_the_ops_imports_neither_triton_nor_jax_triton():
  code = ("import sys, vidssm_jax.ops, vidssm_jax.ops.selective_scan_triton; "
          "print(sorted(m for m in ('triton', 'jax_triton', 'vidssm_jax.ops._triton_kernels', "
          "'vidssm_jax.ops.selective_scan_pallas') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "[]", out.stdout


def test_triton_backend_is_gpu_only_and_needs_jax_triton():
  assert "triton" not in available_backends("cpu")
  have_jax_triton = HAVE_TRITON and importlib.util.find_spec("jax_triton") is not None
  assert ("triton" in available_backends("gpu")) == have_jax_triton
  x = make_inputs(0, 1, 4, 4, 2, 1)
  with pytest.raises(ValueError, match="backend 'triton' does not run on 'cpu'"):
    selective_scan(**x, backend="triton")


@pytest.mark.parametrize("b,d,g,config,expected", [
    (8, 768, 1, TritonConfig(), 16),        # 8 · 768 / 16 = 384 programs: about two per SM
    (32, 768, 1, TritonConfig(), 32),       # enough programs at the largest block
    (1, 768, 1, TritonConfig(), 4),         # few rows: down to min_block_d
    (1, 768, 1, TritonConfig(min_block_d=8), 8),
    (8, 768, 1, TritonConfig(block_d=64), 64),
    (8, 96, 2, TritonConfig(block_d=64), 16),  # 48 channels per group: 16 divides them
    (2, 6, 2, TritonConfig(), 1),           # 3 channels per group
])
def test_channel_block_divides_the_group_and_fills_the_gpu(b, d, g, config, expected):
  assert choose_block_d(b, d, g, config) == expected


@pytest.mark.parametrize("value,pattern", [
    (dict(chunk=48), r"TritonConfig.chunk must be a power of two, got 48"),
    (dict(chunk=16, bwd_chunk=32), r"bwd_chunk \(32\) must divide chunk \(16\)"),
])
def test_config_rejects_bad_values(value, pattern):
  with pytest.raises(ValueError, match=pattern):
    TritonConfig(**value)


# --------------------------------------------------------------------------------------------
# With triton installed: offline sm_90 compile, and Triton's interpreter on the CPU
# --------------------------------------------------------------------------------------------


@needs_triton
def test_kernels_compile_for_sm90_offline():
  from vidssm_jax.bench.scan import triton_compile_stats
  # n = 8 keeps the compile short; the block shapes are the defaults' at (8, 1568, 768, n).
  for name, stats in triton_compile_stats(TritonConfig(), (8, 1568, 768, 8)):
    assert 0 < stats["regs"] <= 255 and stats["ex2"] > 0, (name, stats)


class _HostTensor:
  """The part of torch.Tensor's interface that Triton's interpreter uses to read and write a
  kernel argument's memory, over a contiguous NumPy array (no PyTorch here)."""

  class _Storage:
    def __init__(self, array):
      self.array = array

    def data_ptr(self):
      return self.array.ctypes.data

    def cpu(self):
      return self

    def copy_(self, other):  # host and "device" memory are the same buffer
      del other

  class _Dtype(str):
    pass

  def __init__(self, array):
    self.array = np.ascontiguousarray(array)
    self.dtype = self._Dtype("torch." + {np.float32: "float32"}[self.array.dtype.type])

  def data_ptr(self):
    return self.array.ctypes.data

  def untyped_storage(self):
    return self._Storage(self.array)

  def storage_offset(self):
    return 0

  def size(self):
    return self.array.shape

  def stride(self):
    return tuple(s // self.array.itemsize for s in self.array.strides)

  def new_empty(self, *args, **kwargs):
    return self

  def set_(self, *args):
    return self

  def copy_(self, other):
    del other


def _run_interpreted(kernels, x, *, reverse, config, seed):
  """Forward and backward kernels on NumPy float32 buffers pre-filled with NaN (so a missed
  element shows), the host side's reductions done here; returns y, h_last, grads, dy, dh."""
  forward, backward = kernels
  f32 = lambda a: np.asarray(a, np.float32)
  u = f32(x["u"])
  b, l, d = u.shape
  n = x["A"].shape[1]
  B4 = x["B"] if x["B"].ndim == 4 else x["B"][:, :, None]
  C4 = x["C"] if x["C"].ndim == 4 else x["C"][:, :, None]
  g = B4.shape[2]
  spec = make_spec(u, B4, x.get("D"), x.get("z"), x.get("delta_bias"), delta_softplus=True,
                   reverse=reverse, config=config)
  pad = lambda a: f32(np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, spec.n - n)]))
  h0 = pad(x["initial_state"]) if "initial_state" in x else np.zeros((b, d, spec.n), np.float32)
  opt = lambda k: f32(x[k]) if k in x else np.zeros(1, np.float32)
  inputs = [u, f32(x["delta"]), pad(x["A"]), pad(B4), pad(C4), opt("D"), opt("z"),
            opt("delta_bias"), h0]
  nan = lambda *shape: np.full(shape, np.nan, np.float32)
  fwd_out = [nan(b, l, d), nan(b, d, spec.n), nan(b, math.ceil(l / spec.chunk), d, spec.n)]
  wrap = lambda arrays: [_HostTensor(a) for a in arrays]
  fwd_args = wrap(inputs + fwd_out)
  forward[spec.grid](*fwd_args, CHUNK=spec.chunk, SAVE=True, **spec.constexprs())
  y, h_last, h_chunks = (t.array for t in fwd_args[-3:])

  rng = np.random.default_rng(seed)
  dy, dh = f32(rng.normal(size=(b, l, d))), f32(rng.normal(size=(b, d, n)))
  nblocks = d // g // spec.block_d
  dbc = (b, l, g, spec.n) if spec.atomic_dbc else (b, l, g, nblocks, spec.n)
  bwd_out = [nan(b, l, d), nan(b, l, d), nan(b, l, d) if "z" in x else nan(1),
             np.zeros(dbc, np.float32) if spec.atomic_dbc else nan(*dbc),
             np.zeros(dbc, np.float32) if spec.atomic_dbc else nan(*dbc),
             nan(b, d, spec.n), nan(b, d), nan(b, d), nan(b, d, spec.n)]
  bwd_args = wrap(inputs[:8] + [h_chunks, dy, pad(dh)] + bwd_out)
  backward[spec.grid](*bwd_args, CHUNK=spec.bwd_chunk, SAVED_CHUNK=spec.chunk,
                      ATOMIC_DBC=spec.atomic_dbc, **spec.constexprs())
  du, ddelta, dz, dB, dC, dA, dD, dbias, dh0 = (t.array for t in bwd_args[-9:])
  if not spec.atomic_dbc:
    dB, dC = dB.sum(3), dC.sum(3)
  grads = dict(u=du, delta=ddelta, A=dA.sum(0)[:, :n], B=dB[..., :n].reshape(x["B"].shape),
               C=dC[..., :n].reshape(x["C"].shape))
  if "z" in x:
    grads["z"] = dz
  if "D" in x:
    grads["D"] = dD.sum(0)
  if "delta_bias" in x:
    grads["delta_bias"] = dbias.sum(0)
  if "initial_state" in x:
    grads["initial_state"] = dh0[..., :n]
  return y, h_last[..., :n], grads, dy, dh


INTERPRETER_CASES = {
    # A tail chunk, n = 5 padded to 8, forward direction, backward chunk = forward chunk.
    "tail": (7, 1, False, True, True, TritonConfig(block_d=4, chunk=4, bwd_chunk=4)),
    # Two groups, reverse, two backward chunks per saved forward chunk.
    "groups-reverse-subchunks": (19, 2, True, True, True,
                                 TritonConfig(block_d=4, chunk=8, bwd_chunk=4)),
    # No D, z, delta_bias or initial state; dB and dC reduced with atomics.
    "plain-atomic": (13, 2, False, False, False,
                     TritonConfig(block_d=4, chunk=8, bwd_chunk=8, atomic_dbc=True)),
}


def interpreter_errors() -> dict:
  """{case: {output: relative error against the oracles}}, the kernels run in Triton's
  interpreter. Needs TRITON_INTERPRET=1 from the start of the process (Triton reads it when it
  builds its own library of @triton.jit functions), hence the subprocess below."""
  from vidssm_jax.ops import _triton_kernels
  kernels = (_triton_kernels.forward_kernel, _triton_kernels.backward_kernel)
  errors = {}
  for name, (l, g, reverse, h0, extras, config) in INTERPRETER_CASES.items():
    x = make_inputs(l, 2, l, 16, 5, g, h0=h0, extras=extras)
    y, h, grads, dy, dh = _run_interpreted(kernels, x, reverse=reverse, config=config, seed=l)
    ref = {k: np.asarray(v, np.float64) for k, v in x.items()}
    ref_y, ref_h = numpy_selective_scan(**{k: v for k, v in ref.items() if k != "initial_state"},
                                        delta_softplus=True, reverse=reverse,
                                        h0=ref.get("initial_state"))
    ref_grads = numpy_selective_scan_vjp(**ref, dy=dy, dh=dh, reverse=reverse)
    errors[name] = {"y": rel_err(y, ref_y), "h_last": rel_err(h, ref_h)}
    errors[name].update({f"d{k}": rel_err(grads[k], ref_grads[k]) for k in ref_grads})
    errors[name]["shapes match"] = all(grads[k].shape == x[k].shape for k in grads)
    errors[name]["same gradients"] = sorted(grads) == sorted(ref_grads)
  return errors


@needs_triton
def test_kernels_match_oracle_in_triton_interpreter():
  # One subprocess for every case (a test each would start one per xdist worker).
  out = subprocess.run([sys.executable, __file__], capture_output=True, text=True,
                       cwd=os.path.dirname(__file__),
                       env={**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert sorted(results) == sorted(INTERPRETER_CASES)
  for case, errors in results.items():
    assert errors.pop("shapes match") and errors.pop("same gradients"), case
    assert len(errors) >= 7, case  # y, h_last and at least u, delta, A, B, C
    for output, err in errors.items():
      assert err <= 1e-5, (case, output, err)  # NaN (an unwritten element) fails this too


if __name__ == "__main__":
  print(json.dumps(interpreter_errors()))
