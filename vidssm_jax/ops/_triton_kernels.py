"""The Triton kernels of the ``"triton"`` selective-scan backend (see
``selective_scan_triton.py`` for the design, shapes and the host side).

A separate module so that importing ``selective_scan_triton`` does not import triton, and so
that the kernels are module globals (Triton's interpreter, ``TRITON_INTERPRET=1``, resolves the
``@triton.jit`` helpers a kernel calls among its globals). No ``from __future__ import
annotations`` here: Triton reads the ``tl.constexpr`` annotations as objects.

Pointers are to contiguous arrays: u, delta, z, y, dy, du, ddelta, dz (b, l, d); B, C
(b, l, g, n); A (d, n); D, delta_bias (d,); states (b, d, n) and (b, num_chunks, d, n); dB, dC
(b, l, g, n) or (b, l, g, num_blocks, n); dA (b, d, n); dD, d delta_bias (b, d). Every tile is
computed in float32 whatever the input dtype, and cast on store.
"""

import math

import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x log2 e): one ex2 per element


@triton.jit
def combine(a1, b1, a2, b2):
  # Composes h -> a1 h + b1 (earlier) with h -> a2 h + b2 (later).
  return a1 * a2, a2 * b1 + b2


@triton.jit
def softplus(x):
  # exp(x) where log(1 + exp(x)) would round to 0; x itself past float32's reach of exp.
  sp = tl.log(1.0 + tl.exp(tl.minimum(x, 20.0)))
  return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), sp))


@triton.jit
def chunk_rows(k, L: tl.constexpr, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
  """Steps of chunk k in scan order, their validity, and their time indices."""
  s = k * CHUNK + tl.arange(0, CHUNK)
  valid = s < L
  t = (L - 1 - s) if REVERSE else s
  return s, valid, t


@triton.jit
def load_dt(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
  """dt (and the pre-softplus value) of a (chunk, block_d) tile; 0 on padding rows."""
  x = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
  if HAS_BIAS:
    x = x + bias[None, :]
  dt = softplus(x) if SOFTPLUS else x
  return tl.where(mask, dt, 0.0), x


@triton.jit
def forward_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    y_ptr, hlast_ptr, hchunks_ptr,
    L: tl.constexpr, DIM: tl.constexpr, G: tl.constexpr, N: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    SAVE: tl.constexpr):
  """Program (batch row, group, channel block): y, the last state, and (SAVE) the state
  before every chunk, walking the chunks in scan order."""
  bi = tl.program_id(0).to(tl.int64)
  gi = tl.program_id(1)
  d0 = gi * (DIM // G) + tl.program_id(2) * BLOCK_D
  offs_d = d0 + tl.arange(0, BLOCK_D)
  offs_n = tl.arange(0, N)
  NUM_CHUNKS: tl.constexpr = (L + CHUNK - 1) // CHUNK
  # The state is held transposed, (N, BLOCK_D): its row n is then laid out like a row of the
  # (CHUNK, BLOCK_D) tiles, with no layout conversion between them.
  state_offs = offs_n[:, None] + offs_d[None, :] * N
  h = tl.load(h0_ptr + bi * DIM * N + state_offs)
  bias = tl.load(bias_ptr + offs_d).to(tl.float32) if HAS_BIAS else None
  Dv = tl.load(D_ptr + offs_d).to(tl.float32) if HAS_D else None
  for k in range(NUM_CHUNKS):
    if SAVE:
      tl.store(hchunks_ptr + (bi * NUM_CHUNKS + k) * DIM * N + state_offs, h)
    s, valid, t = chunk_rows(k, L, CHUNK, REVERSE)
    offs = bi * L * DIM + t[:, None] * DIM + offs_d[None, :]  # (CHUNK, BLOCK_D)
    mask = valid[:, None]
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt, _ = load_dt(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
    dtu = dt * u
    bc_offs = (bi * L + t) * G * N + gi * N  # (CHUNK,)
    y = tl.zeros((CHUNK, BLOCK_D), tl.float32)
    for n in range(N):
      A_n = tl.load(A_ptr + offs_d * N + n) * LOG2E  # (BLOCK_D,)
      B_n = tl.load(B_ptr + bc_offs + n, mask=valid, other=0.0).to(tl.float32)
      C_n = tl.load(C_ptr + bc_offs + n, mask=valid, other=0.0).to(tl.float32)
      a = tl.exp2(dt * A_n[None, :])
      a_cum, b_cum = tl.associative_scan((a, dtu * B_n[:, None]), 0, combine)
      is_n = offs_n[:, None] == n
      h_n = tl.sum(tl.where(is_n, h, 0.0), axis=0)  # row n of the state, (BLOCK_D,)
      states = a_cum * h_n[None, :] + b_cum  # h_t for every step of the chunk
      y += states * C_n[:, None]
      # Padding rows are identity maps, so the last row is the state after the chunk.
      last = tl.sum(tl.where((tl.arange(0, CHUNK) == CHUNK - 1)[:, None], states, 0.0), 0)
      h = tl.where(is_n, last[None, :], h)
    if HAS_D:
      y += Dv[None, :] * u
    if HAS_Z:
      z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
      y *= z * tl.sigmoid(z)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
  tl.store(hlast_ptr + bi * DIM * N + state_offs, h)


@triton.jit
def backward_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, hchunks_ptr, dy_ptr,
    dhlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    L: tl.constexpr, DIM: tl.constexpr, G: tl.constexpr, N: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, SAVED_CHUNK: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, ATOMIC_DBC: tl.constexpr):
  """Program (batch row, group, channel block): every gradient, walking chunks of CHUNK steps
  from last to first; SAVED_CHUNK (a multiple of CHUNK) is the forward's saving interval."""
  bi = tl.program_id(0).to(tl.int64)
  gi = tl.program_id(1)
  dj = tl.program_id(2)
  NUM_BLOCKS: tl.constexpr = DIM // G // BLOCK_D
  d0 = gi * (DIM // G) + dj * BLOCK_D
  offs_d = d0 + tl.arange(0, BLOCK_D)
  offs_n = tl.arange(0, N)
  rows = tl.arange(0, CHUNK)
  NUM_CHUNKS: tl.constexpr = (L + CHUNK - 1) // CHUNK
  NUM_SAVED: tl.constexpr = (L + SAVED_CHUNK - 1) // SAVED_CHUNK
  SUB: tl.constexpr = SAVED_CHUNK // CHUNK  # backward chunks per saved chunk
  # States, their adjoints and dA are held transposed, (N, BLOCK_D), as in the forward.
  state_offs = bi * DIM * N + offs_n[:, None] + offs_d[None, :] * N
  bias = tl.load(bias_ptr + offs_d).to(tl.float32) if HAS_BIAS else None
  Dv = tl.load(D_ptr + offs_d).to(tl.float32) if HAS_D else None
  mu = tl.load(dhlast_ptr + state_offs)  # a_{t+1} lam_{t+1} flowing in from later steps
  dA = tl.zeros((N, BLOCK_D), tl.float32)
  dD = tl.zeros((BLOCK_D,), tl.float32)
  dbias = tl.zeros((BLOCK_D,), tl.float32)
  for kk in range(NUM_CHUNKS):
    k = NUM_CHUNKS - 1 - kk
    s, valid, t = chunk_rows(k, L, CHUNK, REVERSE)
    offs = bi * L * DIM + t[:, None] * DIM + offs_d[None, :]
    mask = valid[:, None]
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt, x = load_dt(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
    # dt one step later in scan order, for a_{t+1}; 0 (a = 1) past the chunk's end.
    valid_next = (s + 1 < L) & (rows < CHUNK - 1)
    t_next = (t - 1) if REVERSE else (t + 1)
    offs_next = bi * L * DIM + t_next[:, None] * DIM + offs_d[None, :]
    dt_next, _ = load_dt(delta_ptr, offs_next, valid_next[:, None], bias, HAS_BIAS, SOFTPLUS)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
      z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
      sz = tl.sigmoid(z)
      dys = dy * z * sz
    else:
      dys = dy
    dtu = dt * u
    bc_offs = (bi * L + t) * G * N + gi * N
    # The state before this chunk: the saved state before its saved chunk, advanced over the
    # earlier backward chunks of that saved chunk.
    saved = k // SUB
    h = tl.load(hchunks_ptr + (bi * NUM_SAVED + saved) * DIM * N + offs_n[:, None]
                + offs_d[None, :] * N)
    for i in tl.static_range(SUB - 1):  # (static bounds: the interpreter runs this too)
      sub = saved * SUB + i
      if sub < k:
        s2, valid2, t2 = chunk_rows(sub, L, CHUNK, REVERSE)
        offs2 = bi * L * DIM + t2[:, None] * DIM + offs_d[None, :]
        u2 = tl.load(u_ptr + offs2, mask=valid2[:, None], other=0.0).to(tl.float32)
        dt2, _ = load_dt(delta_ptr, offs2, valid2[:, None], bias, HAS_BIAS, SOFTPLUS)
        bc2 = (bi * L + t2) * G * N + gi * N
        for n in range(N):
          A_n = tl.load(A_ptr + offs_d * N + n) * LOG2E
          B_n = tl.load(B_ptr + bc2 + n, mask=valid2, other=0.0).to(tl.float32)
          # A scan, not tl.reduce: the reduction may reorder this non-commutative combine.
          a_cum, b_cum = tl.associative_scan(
              (tl.exp2(dt2 * A_n[None, :]), dt2 * u2 * B_n[:, None]), 0, combine)
          is_n = offs_n[:, None] == n
          h_n = tl.sum(tl.where(is_n, h, 0.0), axis=0)
          last = (rows == CHUNK - 1)[:, None]
          h_end = tl.sum(tl.where(last, a_cum * h_n[None, :] + b_cum, 0.0), axis=0)
          h = tl.where(is_n, h_end[None, :], h)
    ddt = tl.zeros((CHUNK, BLOCK_D), tl.float32)
    du = tl.zeros((CHUNK, BLOCK_D), tl.float32)
    y = tl.zeros((CHUNK, BLOCK_D), tl.float32)
    dB = tl.zeros((CHUNK, N), tl.float32)
    dC = tl.zeros((CHUNK, N), tl.float32)
    for n in range(N):
      A_raw = tl.load(A_ptr + offs_d * N + n)
      A_n = A_raw * LOG2E
      B_n = tl.load(B_ptr + bc_offs + n, mask=valid, other=0.0).to(tl.float32)
      C_n = tl.load(C_ptr + bc_offs + n, mask=valid, other=0.0).to(tl.float32)
      a = tl.exp2(dt * A_n[None, :])
      bx = dtu * B_n[:, None]
      a_cum, b_cum = tl.associative_scan((a, bx), 0, combine)
      is_n = offs_n[:, None] == n
      h_n = tl.sum(tl.where(is_n, h, 0.0), axis=0)
      states = a_cum * h_n[None, :] + b_cum
      y += states * C_n[:, None]
      # lam_t = g_t + a_{t+1} lam_{t+1}, the chunk's last step taking mu from later chunks.
      mu_n = tl.sum(tl.where(is_n, mu, 0.0), axis=0)
      g = dys * C_n[:, None] + tl.where((rows == CHUNK - 1)[:, None], mu_n[None, :], 0.0)
      a_next = tl.exp2(dt_next * A_n[None, :])
      _, lam = tl.associative_scan((a_next, g), 0, combine, reverse=True)
      da = lam * (states - bx)  # lam_t a_t h_{t-1}: d loss / d (dt A)
      lam_b = lam * B_n[:, None]
      ddt += da * A_raw[None, :] + lam_b * u
      du += lam_b * dt
      dA += tl.where(is_n, tl.sum(da * dt, axis=0)[None, :], 0.0)
      dB += tl.where(offs_n[None, :] == n, tl.sum(lam * dtu, axis=1)[:, None], 0.0)
      dC += tl.where(offs_n[None, :] == n, tl.sum(states * dys, axis=1)[:, None], 0.0)
      mu_out = tl.sum(tl.where((rows == 0)[:, None], a * lam, 0.0), axis=0)
      mu = tl.where(is_n, mu_out[None, :], mu)
    if HAS_D:
      du += dys * Dv[None, :]
      dD += tl.sum(dys * u, axis=0)
      y += Dv[None, :] * u
    if HAS_Z:
      dz = dy * y * sz * (1.0 + z * (1.0 - sz))
      tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    ddelta = ddt * tl.sigmoid(x) if SOFTPLUS else ddt
    ddelta = tl.where(mask, ddelta, 0.0)
    if HAS_BIAS:
      dbias += tl.sum(ddelta, axis=0)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(ddelta_ptr + offs, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask)
    if ATOMIC_DBC:
      dbc_offs = ((bi * L + t) * G + gi)[:, None] * N + offs_n[None, :]
      tl.atomic_add(dB_ptr + dbc_offs, dB, mask=mask, sem="relaxed")
      tl.atomic_add(dC_ptr + dbc_offs, dC, mask=mask, sem="relaxed")
    else:
      dbc_offs = (((bi * L + t) * G + gi) * NUM_BLOCKS + dj)[:, None] * N + offs_n[None, :]
      tl.store(dB_ptr + dbc_offs, dB, mask=mask)
      tl.store(dC_ptr + dbc_offs, dC, mask=mask)
  dparam_offs = (bi * DIM + offs_d)
  tl.store(dA_ptr + state_offs, dA)
  if HAS_D:
    tl.store(dD_ptr + dparam_offs, dD)
  if HAS_BIAS:
    tl.store(dbias_ptr + dparam_offs, dbias)
  tl.store(dh0_ptr + state_offs, mu)

