"""Depthwise causal convolution over the length axis, and its single-step form for streaming.

    y_t[c] = bias[c] + sum_{j=0}^{k-1} weight[j, c] * x_{t-k+1+j}[c]

with ``x_s = 0`` for ``s < 0`` (or taken from ``initial_state``, the ``k - 1`` inputs before
the first step). This matches PyTorch's ``nn.Conv1d(d, d, k, groups=d, padding=k-1)`` cropped to
the first ``l`` outputs, as in Mamba, with ``weight[j, c] == torch_weight[c, 0, j]``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

_ACTIVATIONS = {None: lambda x: x, "silu": jax.nn.silu, "swish": jax.nn.silu}


def _activation(name):
  if name not in _ACTIVATIONS:
    raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {name!r}")
  return _ACTIVATIONS[name]


def _check(x, weight, bias, state, state_name):
  for name, a in (("x", x), ("weight", weight), ("bias", bias), (state_name, state)):
    if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"causal_conv1d: {name} has dtype {a.dtype}, expected a floating dtype")
  if weight.ndim != 2:
    raise ValueError(f"causal_conv1d: weight has shape {tuple(weight.shape)}, "
                     "expected (kernel_size, channels)")
  k, d = weight.shape
  if x.shape[-1] != d:
    raise ValueError(f"causal_conv1d: x has shape {tuple(x.shape)}, expected {d} channels last "
                     f"(weight has shape {tuple(weight.shape)})")
  if bias is not None and bias.shape != (d,):
    raise ValueError(f"causal_conv1d: bias has shape {tuple(bias.shape)}, expected ({d},)")
  if state is not None and state.shape != (x.shape[0], k - 1, d):
    raise ValueError(f"causal_conv1d: {state_name} has shape {tuple(state.shape)}, "
                     f"expected ({x.shape[0]}, {k - 1}, {d})")
  return k, d


def causal_conv1d(
    x: Array,
    weight: Array,
    bias: Optional[Array] = None,
    activation: Optional[str] = None,
    *,
    initial_state: Optional[Array] = None,
    return_final_state: bool = False,
):
  """Depthwise causal convolution.

  Args:
    x: ``(b, l, d)``.
    weight: ``(k, d)``; bias: ``(d,)``; activation: ``None`` or ``"silu"``.
    initial_state: ``(b, k-1, d)``, the inputs just before ``x`` (zeros when omitted).
    return_final_state: also return the last ``k-1`` inputs, ``(b, k-1, d)``, to carry on.

  Returns:
    ``y`` ``(b, l, d)`` in ``x``'s dtype, and the final state when asked.
  """
  if x.ndim != 3:
    raise ValueError(f"causal_conv1d: x has shape {tuple(x.shape)}, "
                     "expected (batch, length, channels)")
  k, d = _check(x, weight, bias, initial_state, "initial_state")
  b, l, _ = x.shape
  act = _activation(activation)
  if initial_state is None:
    initial_state = jnp.zeros((b, k - 1, d), x.dtype)
  xp = jnp.concatenate([initial_state.astype(x.dtype), x], axis=1)  # (b, l + k - 1, d)
  w = weight.astype(x.dtype)
  y = sum(xp[:, j:j + l] * w[j] for j in range(k))  # k is small (4): k shifted multiply-adds
  if bias is not None:
    y = y + bias.astype(x.dtype)
  y = act(y)
  if return_final_state:
    return y, xp[:, l:]
  return y


def causal_conv1d_step(
    conv_state: Array,
    x_t: Array,
    weight: Array,
    bias: Optional[Array] = None,
    activation: Optional[str] = None,
):
  """One streaming step.

  Args:
    conv_state: ``(b, k-1, d)``, the previous ``k-1`` inputs, oldest first.
    x_t: ``(b, d)``; weight: ``(k, d)``; bias: ``(d,)``.

  Returns:
    ``(y_t, conv_state)``: ``y_t`` ``(b, d)`` and the updated state.
  """
  if x_t.ndim != 2:
    raise ValueError(f"causal_conv1d_step: x_t has shape {tuple(x_t.shape)}, "
                     "expected (batch, channels)")
  _check(x_t, weight, bias, conv_state, "conv_state")
  window = jnp.concatenate([conv_state.astype(x_t.dtype), x_t[:, None]], axis=1)  # (b, k, d)
  y = jnp.einsum("bkd,kd->bd", window, weight.astype(x_t.dtype))
  if bias is not None:
    y = y + bias.astype(x_t.dtype)
  return _activation(activation)(y), window[:, 1:]
