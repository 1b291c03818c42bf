"""The selective scan of Mamba v1, with pluggable backends.

For every channel ``d`` and state index ``n`` (SPEC §1):

    dt_t = softplus(delta_t + delta_bias)            (softplus only if delta_softplus)
    h_t  = exp(dt_t * A) * h_{t-1} + (dt_t * u_t) * B_t
    y_t  = <h_t, C_t> + D * u_t ;   y_t *= silu(z_t)

Shapes are channels-last:

    u, delta, z        (b, l, d)
    A                  (d, n)
    B, C               (b, l, n)  or  (b, l, g, n) with d % g == 0 (channel c reads group c // (d/g))
    D, delta_bias      (d,)
    initial_state      (b, d, n)

The state accumulates in float32 (float64 when the inputs are float64, so gradients can be
checked numerically). ``y`` comes back in ``u``'s dtype; the final state in the state dtype.

Backends (``backend=``):

- ``"reference"``: ``lax.scan`` over the length; the readable definition.
- ``"associative"``: ``lax.associative_scan`` inside chunks of ``chunk_size`` steps, the state
  carried between chunks by ``lax.scan``. The live intermediate is ``O(b·chunk·d·n)``. Its
  custom gradient stores only the chunk-boundary states and recomputes the states inside each
  chunk, so training memory stays linear in ``l·d``.
- ``"pallas"``: one fused Pallas kernel per direction (``selective_scan_pallas.py``). On GPU it
  compiles through Pallas' Triton lowering; on CPU it runs only when named, in Pallas interpret
  mode (that is how CI checks it), and ``"auto"`` never picks it there.
- ``"auto"``: the highest-priority backend registered for the current platform, from the
  constants below, set by ``python -m vidssm_jax.bench.scan``: ``"reference"`` on CPU (whose
  gradient keeps every state, ``O(b·l·d·n)``: name ``"associative"`` for long sequences there),
  ``"pallas"`` on GPU, ``"associative"`` on TPU.

A backend is a function

    fn(u, delta, A, B, C, D, z, delta_bias, h0, *, delta_softplus, reverse, chunk_size)
        -> (y, h_last)

over the raw inputs (validated by the public entry): ``u, delta, z`` ``(b, l, d)``, ``A``
``(d, n)``, ``B, C`` ``(b, l, g, n)`` (always with the group axis), ``D, delta_bias`` ``(d,)``
or ``None``, ``h0`` ``(b, d, n)`` in the state dtype. It returns ``y`` in ``u``'s dtype and the
last state in the state dtype. Fused kernels do the discretisation, D skip and z gate inside and
walk the length backwards for ``reverse``; the XLA backends share :func:`scan_backend`, one small
adapter that discretises and flips before a forward-only scan and adds D and the gate after.

A backend may also say at which length it runs without copying its inputs
(:func:`native_length`): the fused kernels work on whole chunks and whole segments and pad any
other length, a copy of every input (and of the cotangent) per call. A caller that makes the
inputs itself and wants only the outputs of a scan from the zero state can make them at that
length, with anything after the last real step, and drop the extra outputs: steps after the
last real one change neither the real outputs nor, with zero cotangents there, the gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

DEFAULT_CHUNK_SIZE = 64

# "auto" on GPU takes the highest of these among the backends that can run there. Set from the
# timings of `python -m vidssm_jax.bench.scan` on an H100; change them when new measurements say
# otherwise.
PALLAS_GPU_PRIORITY = 30
ASSOCIATIVE_PRIORITY = 10
# On CPU the plain lax.scan is the fastest overall: `python -m vidssm_jax.bench.scan` on 2 cores
# ran its forward 3-9x faster than the associative one on every shape; forward+backward was
# faster on half of the shapes and up to 2.2x slower on the others, and the E-ViM3 demo's whole
# training step took 0.70 s against 0.93 s. Elsewhere it is the fallback.
REFERENCE_PRIORITY = {"cpu": 15, "gpu": 0, "tpu": 0}


# --------------------------------------------------------------------------------------------
# Backend registry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backend:
  """A registered backend.

  ``priorities`` maps each platform the backend runs on to its priority for ``"auto"``, or to
  ``None`` when it runs there only if named explicitly. ``is_available`` says whether its
  optional dependencies are importable.
  """
  name: str
  fn: Callable
  priorities: dict[str, Optional[int]]
  is_available: Callable[[], bool] = lambda: True
  native_length: Callable[[int, int, int], int] = lambda b, l, d: l

  @property
  def platforms(self) -> tuple[str, ...]:
    return tuple(self.priorities)


_BACKENDS: dict[str, Backend] = {}


def register_backend(
    name: str,
    fn: Callable,
    *,
    platforms: Sequence[str] = ("cpu", "gpu", "tpu"),
    priority: Union[int, Mapping[str, Optional[int]]] = 0,
    is_available: Optional[Callable[[], bool]] = None,
    native_length: Optional[Callable[[int, int, int], int]] = None,
) -> None:
  """Registers ``fn`` as ``selective_scan(..., backend=name)`` (see the module docstring).

  ``priority`` is one number for every platform in ``platforms``, or a mapping platform ->
  priority (its keys are then the platforms); a priority of ``None`` means "runs there, but only
  when asked for by name", so ``"auto"`` never picks it on that platform. ``native_length(b, l,
  d)``: the smallest length ``>= l`` the backend runs without padding (default ``l``).
  """
  if isinstance(priority, Mapping):
    priorities = dict(priority)
  else:
    priorities = {p: priority for p in platforms}
  _BACKENDS[name] = Backend(name, fn, priorities, is_available or (lambda: True),
                            native_length or (lambda b, l, d: l))


def native_length(b: int, l: int, d: int, backend: str = "auto") -> int:
  """The smallest length ``>= l`` at which ``backend`` scans ``(b, ·, d)`` inputs without padding
  them (a copy of each): ``l`` for the XLA backends; whole chunks and segments for the fused
  kernels. See the module docstring for when a caller may pad to it."""
  return resolve_backend(backend).native_length(b, l, d)


def available_backends(platform: Optional[str] = None) -> list[str]:
  """Names of the backends that run on ``platform`` (default: JAX's default backend)."""
  platform = platform or jax.default_backend()
  return [b.name for b in _BACKENDS.values() if platform in b.priorities and b.is_available()]


def auto_backend(platform: Optional[str] = None) -> str:
  """The backend ``"auto"`` resolves to on ``platform`` (default: JAX's default backend)."""
  platform = platform or jax.default_backend()
  candidates = [b for b in _BACKENDS.values()
                if b.priorities.get(platform) is not None and b.is_available()]
  if not candidates:
    raise ValueError(f"selective_scan: no backend is registered for platform {platform!r}")
  return max(candidates, key=lambda b: b.priorities[platform]).name


def resolve_backend(backend: str) -> Backend:
  """Maps a backend name (or ``"auto"``) to its registered :class:`Backend`."""
  if backend == "auto":
    return _BACKENDS[auto_backend()]
  if backend not in _BACKENDS:
    raise ValueError(
        f"unknown selective_scan backend {backend!r}; registered: {sorted(_BACKENDS)} or 'auto'"
    )
  impl = _BACKENDS[backend]
  platform = jax.default_backend()
  if platform not in impl.priorities:
    raise ValueError(f"selective_scan backend {backend!r} does not run on {platform!r}; it runs "
                     f"on {list(impl.platforms)} (choose another backend or 'auto')")
  if not impl.is_available():
    raise ValueError(f"selective_scan backend {backend!r} needs packages that are not installed "
                     "here (see its module docstring); choose another backend or 'auto'")
  return impl


# --------------------------------------------------------------------------------------------
# Input checks (run in Python on static shapes, so they also work under jit)
# --------------------------------------------------------------------------------------------


def _shape_error(name: str, x, expected: str) -> ValueError:
  return ValueError(f"selective_scan: {name} has shape {tuple(x.shape)}, expected {expected}")


def _check_float(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"selective_scan: {name} has dtype {x.dtype}, expected a floating dtype")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state):
  """Validates shapes and dtypes; returns ``(b, l, d, g, n)``."""
  for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                  ("delta_bias", delta_bias), ("initial_state", initial_state)):
    if x is not None:
      _check_float(name, x)
  if u.ndim != 3:
    raise _shape_error("u", u, "(batch, length, channels)")
  b, l, d = u.shape
  if delta.shape != u.shape:
    raise _shape_error("delta", delta, f"{tuple(u.shape)} (the shape of u)")
  if A.ndim != 2 or A.shape[0] != d:
    raise _shape_error("A", A, f"({d}, d_state)")
  n = A.shape[1]
  for name, x in (("B", B), ("C", C)):
    if x.ndim == 3:
      expected = (b, l, n)
    elif x.ndim == 4:
      expected = (b, l, x.shape[2], n)
    else:
      raise _shape_error(name, x, f"({b}, {l}, {n}) or ({b}, {l}, groups, {n})")
    if x.shape != expected:
      raise _shape_error(name, x, f"{expected}")
  if B.ndim != C.ndim or B.shape != C.shape:
    raise ValueError(f"selective_scan: B has shape {tuple(B.shape)} but C has {tuple(C.shape)}; "
                     "they must match")
  g = 1 if B.ndim == 3 else B.shape[2]
  if g < 1 or d % g:
    raise ValueError(f"selective_scan: B and C have {g} groups, which does not divide the "
                     f"{d} channels of u (shape {tuple(u.shape)})")
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None and x.shape != (d,):
      raise _shape_error(name, x, f"({d},)")
  if z is not None and z.shape != u.shape:
    raise _shape_error("z", z, f"{tuple(u.shape)} (the shape of u)")
  if initial_state is not None and initial_state.shape != (b, d, n):
    raise _shape_error("initial_state", initial_state, f"({b}, {d}, {n})")
  return b, l, d, g, n


def state_dtype(dtype) -> jnp.dtype:
  """The dtype the state accumulates in: float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


# --------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------


def selective_scan(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Optional[Array] = None,
    z: Optional[Array] = None,
    delta_bias: Optional[Array] = None,
    delta_softplus: bool = False,
    *,
    reverse: bool = False,
    initial_state: Optional[Array] = None,
    return_final_state: bool = False,
    backend: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
):
  """Runs the selective scan over the length axis.

  Args:
    u: input ``(b, l, d)``.
    delta: time step before discretisation ``(b, l, d)``.
    A: state matrix ``(d, n)`` (negative for a stable scan; Mamba uses ``-exp(A_log)``).
    B, C: input and output projections ``(b, l, n)`` or ``(b, l, g, n)``, ``d % g == 0``.
    D: skip ``(d,)``; z: gate ``(b, l, d)``, applied as ``y * silu(z)``.
    delta_bias: ``(d,)`` added to ``delta``; delta_softplus: apply softplus after the bias.
    reverse: scan from the last step to the first (the state then flows backwards in time).
    initial_state: ``(b, d, n)`` state before the first step scanned; zeros when omitted.
    return_final_state: also return the state after the last step scanned, ``(b, d, n)``.
    backend: ``"auto"``, ``"reference"``, ``"associative"``, ``"pallas"`` or another
      registered backend (see the module docstring).
    chunk_size: chunk length of the ``"associative"`` backend. The fused kernel takes its
      block shapes from its own tuned configuration (``PallasConfig``).

  Returns:
    ``y`` ``(b, l, d)`` in ``u``'s dtype, and the final state ``(b, d, n)`` (float32) when
    ``return_final_state``.
  """
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
  impl = resolve_backend(backend)
  return call_backend(functools.partial(impl.fn, chunk_size=chunk_size), u, delta, A, B, C, D, z,
                      delta_bias, delta_softplus, reverse=reverse, initial_state=initial_state,
                      return_final_state=return_final_state)


def call_backend(fn: Callable, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                 delta_softplus=False, *, reverse=False, initial_state=None,
                 return_final_state=False):
  """The public entry's work around a backend function ``fn`` (the contract of the module
  docstring, its keyword options bound): checks the inputs, adds the group axis to B and C,
  makes the initial state, calls ``fn`` and returns ``y`` or ``(y, h_last)``. Also used by the
  fused backend's explicit-config entry (``selective_scan_pallas``).
  """
  b, l, d, g, n = _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
  acc = state_dtype(u.dtype)
  B4, C4 = B.reshape(b, l, g, n), C.reshape(b, l, g, n)
  h0 = jnp.zeros((b, d, n), acc) if initial_state is None else initial_state.astype(acc)
  y, h_last = fn(u, delta, A, B4, C4, D, z, delta_bias, h0, delta_softplus=delta_softplus,
                 reverse=reverse)
  return (y, h_last) if return_final_state else y


def selective_scan_step(
    state: Array,
    u_t: Array,
    delta_t: Array,
    A: Array,
    B_t: Array,
    C_t: Array,
    D: Optional[Array] = None,
    z_t: Optional[Array] = None,
    delta_bias: Optional[Array] = None,
    delta_softplus: bool = False,
):
  """Advances the scan by one time step, for streaming.

  Args:
    state: ``(b, d, n)``; u_t, delta_t, z_t: ``(b, d)``; A: ``(d, n)``;
    B_t, C_t: ``(b, n)`` or ``(b, g, n)``; D, delta_bias: ``(d,)``.

  Returns:
    ``(y_t, state)``: ``y_t`` ``(b, d)`` in ``u_t``'s dtype and the new state ``(b, d, n)``.
  """
  if u_t.ndim != 2:
    raise _shape_error("u_t", u_t, "(batch, channels)")
  add_len = lambda x: None if x is None else x[:, None]
  y, state = selective_scan(
      add_len(u_t), add_len(delta_t), A, add_len(B_t), add_len(C_t), D, add_len(z_t),
      delta_bias, delta_softplus, initial_state=state, return_final_state=True,
      backend="reference")
  return y[:, 0], state


# --------------------------------------------------------------------------------------------
# The adapter shared by the XLA backends
# --------------------------------------------------------------------------------------------


def discretise(delta: Array, delta_bias: Optional[Array], delta_softplus: bool, dtype) -> Array:
  """dt = softplus(delta + delta_bias) (softplus only if asked), in ``dtype``. (b, l, d)."""
  dt = delta.astype(dtype)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(dtype)
  return jax.nn.softplus(dt) if delta_softplus else dt


def skip_and_gate(y_scan: Array, u: Array, D: Optional[Array], z: Optional[Array]) -> Array:
  """(y_scan + D * u) * silu(z), in ``y_scan``'s dtype; D and z optional. All (b, l, d)."""
  acc = y_scan.dtype
  y = y_scan
  if D is not None:
    y = y + u.astype(acc) * D.astype(acc)
  if z is not None:
    y = y * jax.nn.silu(z.astype(acc))
  return y


def scan_backend(scan: Callable) -> Callable:
  """Turns a forward-only scan over discretised inputs into a backend (module docstring).

  ``scan(u, dt, A, B, C, h0, *, chunk_size) -> (y_scan, h_last)`` sees ``u, dt`` ``(b, l, d)``
  with ``dt`` discretised, ``B, C`` ``(b, l, g, n)``, and returns ``y_scan = <h_t, C_t>`` in the
  state dtype. The adapter discretises, flips the length for ``reverse`` (and flips ``y`` back),
  adds the D skip and the z gate, and casts ``y`` to ``u``'s dtype.
  """

  def backend(u, delta, A, B, C, D, z, delta_bias, h0, *, delta_softplus, reverse, chunk_size):
    dt = discretise(delta, delta_bias, delta_softplus, h0.dtype)
    flip = (lambda x: jnp.flip(x, axis=1)) if reverse else (lambda x: x)
    y, h_last = scan(flip(u), flip(dt), A, flip(B), flip(C), h0, chunk_size=chunk_size)
    return skip_and_gate(flip(y), u, D, z).astype(u.dtype), h_last

  backend.__name__ = backend.__qualname__ = f"scan_backend({scan.__name__})"
  return backend


# --------------------------------------------------------------------------------------------
# Backend "reference": lax.scan, one step at a time
# --------------------------------------------------------------------------------------------


def _grouped(x: Array, g: int) -> Array:
  """(..., d) -> (..., g, d // g): channel c belongs to group c // (d // g)."""
  return x.reshape(*x.shape[:-1], g, x.shape[-1] // g)


def _scan_reference(u, dt, A, B, C, h0, *, chunk_size=None):
  del chunk_size
  b, l, d = u.shape
  g, n = B.shape[2], B.shape[3]
  acc = h0.dtype
  Ag = A.astype(acc).reshape(g, d // g, n)

  def step(h, xs):  # h: (b, g, d/g, n)
    u_t, dt_t, B_t, C_t = xs  # (b, g, d/g), (b, g, d/g), (b, g, n), (b, g, n)
    h = jnp.exp(dt_t[..., None] * Ag) * h + (dt_t * u_t)[..., None] * B_t[:, :, None, :]
    y_t = jnp.einsum("bgcn,bgn->bgc", h, C_t)
    return h, y_t

  xs = (_grouped(u.astype(acc), g), _grouped(dt, g), B.astype(acc), C.astype(acc))
  xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), xs)
  h_last, ys = lax.scan(step, h0.reshape(b, g, d // g, n), xs)
  return jnp.moveaxis(ys, 0, 1).reshape(b, l, d), h_last.reshape(b, d, n)


# --------------------------------------------------------------------------------------------
# Backend "associative": chunked lax.associative_scan with a recomputing custom gradient
# --------------------------------------------------------------------------------------------


def _combine(earlier, later):
  """Composes two affine maps h -> a*h + b (earlier applied first)."""
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


def _chunk_terms(u, dt, A, B):
  """Per-step decay ``a = exp(dt*A)`` and input ``b = dt*u*B`` of one chunk.

  u, dt: (b, T, g, c); A: (g, c, n); B: (b, T, g, n) -> a, b: (b, T, g, c, n).
  """
  a = jnp.exp(dt[..., None] * A)
  bu = (dt * u)[..., None] * B[:, :, :, None, :]
  return a, bu


def _chunk_states(h_prev, a, bu):
  """States h_t of a chunk, given the state before it. h_prev: (b, g, c, n)."""
  cum_a, cum_b = lax.associative_scan(_combine, (a, bu), axis=1)
  return cum_a * h_prev[:, None] + cum_b


def _to_chunks(x: Array, num_chunks: int, chunk: int) -> Array:
  """(b, l_pad, ...) -> (num_chunks, b, chunk, ...)."""
  x = x.reshape(x.shape[0], num_chunks, chunk, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_chunks(x: Array) -> Array:
  """(num_chunks, b, chunk, ...) -> (b, num_chunks * chunk, ...)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _prepare_chunks(u, dt, A, B, C, h0, chunk_size):
  """Pads the length to a multiple of the chunk and splits into chunks.

  Padding steps have dt = 0, so a = 1 and b = 0: they leave the state unchanged.
  """
  b, l, d = u.shape
  g, n = B.shape[2], B.shape[3]
  acc = h0.dtype
  chunk = min(chunk_size, l)
  num_chunks = math.ceil(l / chunk)
  pad = num_chunks * chunk - l
  padl = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  chunks = dict(
      u=_to_chunks(padl(_grouped(u.astype(acc), g)), num_chunks, chunk),
      dt=_to_chunks(padl(_grouped(dt.astype(acc), g)), num_chunks, chunk),
      B=_to_chunks(padl(B.astype(acc)), num_chunks, chunk),
      C=_to_chunks(padl(C.astype(acc)), num_chunks, chunk),
  )
  return chunks, A.astype(acc).reshape(g, d // g, n), h0.reshape(b, g, d // g, n)


def _assoc_forward(u, dt, A, B, C, h0, chunk_size):
  """Returns y, the last state and the state before every chunk (for the backward pass)."""
  b, l, d = u.shape
  xs, Ag, h = _prepare_chunks(u, dt, A, B, C, h0, chunk_size)

  def chunk_step(h_prev, x):
    a, bu = _chunk_terms(x["u"], x["dt"], Ag, x["B"])
    hs = _chunk_states(h_prev, a, bu)
    y = jnp.einsum("btgcn,btgn->btgc", hs, x["C"])
    return hs[:, -1], (y, h_prev)

  h_last, (y, h_starts) = lax.scan(chunk_step, h, xs)
  y = _from_chunks(y)[:, :l].reshape(b, l, d)
  return y, h_last.reshape(h0.shape), h_starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _assoc_scan(u, dt, A, B, C, h0, chunk_size):
  y, h_last, _ = _assoc_forward(u, dt, A, B, C, h0, chunk_size)
  return y, h_last


def _assoc_scan_fwd(u, dt, A, B, C, h0, chunk_size):
  y, h_last, h_starts = _assoc_forward(u, dt, A, B, C, h0, chunk_size)
  return (y, h_last), (u, dt, A, B, C, h0, h_starts)


def _assoc_scan_bwd(chunk_size, res, cotangents):
  """Reverse-time adjoint of h_t = a_t h_{t-1} + b_t, one chunk at a time.

  With g_t = dy_t * C_t, the state adjoint is lam_t = g_t + a_{t+1} lam_{t+1} (a linear scan
  backwards in time, run with the same associative combine). Then
  d a_t = lam_t h_{t-1} and d b_t = lam_t give the gradients of dt, u, A and B, and
  dC_t = dy_t * h_t. States inside a chunk are recomputed from the saved chunk start.
  """
  u, dt, A, B, C, h0, h_starts = res
  dy, dh_last = cotangents
  b, l, d = u.shape
  g, n = B.shape[2], B.shape[3]
  acc = h0.dtype
  xs, Ag, _ = _prepare_chunks(u, dt, A, B, C, h0, chunk_size)
  num_chunks, chunk = xs["u"].shape[0], xs["u"].shape[2]
  pad = num_chunks * chunk - l
  dy = jnp.pad(_grouped(dy.astype(acc), g), [(0, 0), (0, pad), (0, 0), (0, 0)])
  xs["dy"] = _to_chunks(dy, num_chunks, chunk)
  xs["h_prev"] = h_starts

  def chunk_step(carry, x):
    # carry: a_{next} * lam_{next} flowing in from the following chunk, (b, g, c, n);
    # dA accumulates over chunks.
    lam_in, dA = carry
    a, bu = _chunk_terms(x["u"], x["dt"], Ag, x["B"])
    hs = _chunk_states(x["h_prev"], a, bu)
    g_t = x["dy"][..., None] * x["C"][:, :, :, None, :]
    g_t = g_t.at[:, -1].add(lam_in)
    # Coefficient multiplying lam_{t+1} is a_{t+1}; the last step of the chunk gets none here.
    a_next = jnp.concatenate([a[:, 1:], jnp.ones_like(a[:, :1])], axis=1)
    _, lam = lax.associative_scan(_combine, (a_next, g_t), axis=1, reverse=True)
    h_before = jnp.concatenate([x["h_prev"][:, None], hs[:, :-1]], axis=1)
    da_a = lam * h_before * a  # d(loss)/d(dt*A) elementwise
    ddt = jnp.sum(da_a * Ag, -1) + jnp.einsum("btgcn,btgn->btgc", lam, x["B"]) * x["u"]
    du = jnp.einsum("btgcn,btgn->btgc", lam, x["B"]) * x["dt"]
    dB = jnp.einsum("btgcn,btgc->btgn", lam, x["dt"] * x["u"])
    dC = jnp.einsum("btgcn,btgc->btgn", hs, x["dy"])
    dA = dA + jnp.einsum("btgcn,btgc->gcn", da_a, x["dt"])
    return (a[:, 0] * lam[:, 0], dA), (du, ddt, dB, dC)

  lam_last = dh_last.astype(acc).reshape(b, g, d // g, n)
  (dh0, dA), (du, ddt, dB, dC) = lax.scan(
      chunk_step, (lam_last, jnp.zeros_like(Ag)), xs, reverse=True)
  unchunk = lambda x: _from_chunks(x)[:, :l]
  du = unchunk(du).reshape(b, l, d).astype(u.dtype)
  ddt = unchunk(ddt).reshape(b, l, d).astype(dt.dtype)
  dB, dC = unchunk(dB).astype(B.dtype), unchunk(dC).astype(C.dtype)
  return (du, ddt, dA.reshape(d, n).astype(A.dtype), dB, dC,
          dh0.reshape(h0.shape).astype(h0.dtype))


_assoc_scan.defvjp(_assoc_scan_fwd, _assoc_scan_bwd)


def _scan_associative(u, dt, A, B, C, h0, *, chunk_size=DEFAULT_CHUNK_SIZE):
  return _assoc_scan(u, dt, A, B, C, h0, chunk_size)


# --------------------------------------------------------------------------------------------
# Registration. The fused kernel loads lazily: importing this module must not import Pallas.
# --------------------------------------------------------------------------------------------


def _lazy_backend(module: str, attr: str) -> Callable:
  """A backend function that imports ``module`` on its first call."""

  def backend(*args, **kwargs):
    return getattr(importlib.import_module(module), attr)(*args, **kwargs)

  backend.__name__ = backend.__qualname__ = f"{module}.{attr}"
  return backend


register_backend("reference", scan_backend(_scan_reference), priority=REFERENCE_PRIORITY)
register_backend("associative", scan_backend(_scan_associative), priority=ASSOCIATIVE_PRIORITY)
register_backend("pallas", _lazy_backend("vidssm_jax.ops.selective_scan_pallas", "pallas_backend"),
                 priority={"gpu": PALLAS_GPU_PRIORITY, "cpu": None},
                 native_length=_lazy_backend("vidssm_jax.ops.selective_scan_pallas",
                                             "native_length"))
