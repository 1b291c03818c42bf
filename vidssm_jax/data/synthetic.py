"""Synthetic medical videos with a real learning signal: the embedded default data of the demo,
the notebooks and the tests, so the library runs out of the box without registration-gated data.

Two generators, each deterministic per ``(seed, index)`` (``np.random.default_rng([seed, index])``)
and renderable at any length and size:

    echo_clip(seed, index, num_frames, size)       ultrasound-like apical four-chamber clip
        video  (time, size, size, 1) uint8          grey, black outside the sector fan
        ef     float                                ejection fraction in %, ~U[20, 80]
        edv, esv  float                             volumes in ml (area–length formula)
        lv_mask (time, size, size) uint8            rendered LV cavity (the EF ground truth)

    endoscopy_clip(seed, index, num_frames, size)  a camera moving through a textured tunnel
        video  (time, size, size, 3) uint8          RGB
        polyp  int                                  1 if polyp-like blobs are on the wall
        mask   (time, size, size) uint8             per-pixel polyp mask (0/1)
        phase  (time,) int32                        per-frame phase in [0, NUM_PHASES)

Echo: the left ventricle is a dark ellipse (blood pool) inside a bright ring (myocardium),
beating with a random heart period of 12–24 frames, phase, size and orientation; the apex is
fixed and the base moves, as in an apical view. Frames are rendered anti-aliased and then
multiplied by gamma-distributed speckle. The label is EchoNet's definition of EF: the volumes of
the largest (end-diastolic) and smallest (end-systolic) LV of the clip, each by the area–length
formula ``V = 8 A² / (3 π L)`` (A the cavity area, L its long axis). A single frame does not
tell the EF (the ventricle's size is random): it can only be read by watching a beat.

Endoscopy: each pixel looks at the wall of a unit-radius tunnel at depth ``f / r`` (r the
distance to a wandering vanishing point), textured in wall coordinates (haustral folds, vessels,
mottling) and lit by a light at the camera. Polyps are pale yellow domes on the red wall (large
enough to be seen in 32 × 32 frames), placed along the camera's path so one is in view in every
frame of a polyp video. The video is a sequence of phases (:data:`PHASES`), each of which
changes the scene (motion, tint, an instrument).
"""

from __future__ import annotations

import numpy as np

ECHO_FPS = 20.0        # heart period 12–24 frames = 0.6–1.2 s (50–100 bpm)
ECHO_WIDTH_CM = 16.0   # the image spans 16 cm, which puts EDV near 60–200 ml
ENDOSCOPY_FPS = 25.0
PHASES = ("insertion", "inspection", "irrigation", "instrument", "bleeding", "coagulation",
          "withdrawal")
NUM_PHASES = len(PHASES)
KINDS = ("echo", "endoscopy")


def _rng(seed: int, index: int) -> np.random.Generator:
  if seed < 0 or index < 0:
    raise ValueError(f"seed ({seed}) and index ({index}) must be non-negative")
  return np.random.default_rng([int(seed), int(index)])


def _check_shape(num_frames: int, size: int) -> None:
  if num_frames < 1:
    raise ValueError(f"num_frames = {num_frames}, expected >= 1")
  if size < 8:
    raise ValueError(f"size = {size}, expected >= 8 pixels")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates ``(x, y)``, each ``(1, size, size)`` float32 in (0, 1)."""
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  return c[None, None, :], c[None, :, None]


def _col(v) -> np.ndarray:
  """A per-frame value ``(time,)`` -> ``(time, 1, 1)`` for broadcasting against frames."""
  return np.asarray(v, np.float32).reshape(-1, 1, 1)


# ------------------------------------------------------------------------------------------
# Echo
# ------------------------------------------------------------------------------------------


def heart_cycle(t: np.ndarray, period: float, phase: float, systole: float = 0.4) -> np.ndarray:
  """Ventricular filling ``w(t)`` in [0, 1] (1 = end-diastole, 0 = end-systole).

  ``t`` frames (any shape), ``period`` in frames, ``phase`` in cycles. Contraction takes the
  first ``systole`` of each cycle and filling the rest, each a half cosine, so ``w`` is smooth.
  """
  c = np.mod(t / period + phase, 1.0)
  contract = 0.5 * (1.0 + np.cos(np.pi * c / systole))
  fill = 0.5 * (1.0 - np.cos(np.pi * (c - systole) / (1.0 - systole)))
  return np.where(c < systole, contract, fill)


def area_length_volume(area: np.ndarray, length: np.ndarray) -> np.ndarray:
  """The area–length (single-plane ellipsoid) volume ``8 A² / (3 π L)`` (area·length units)."""
  return 8.0 * np.square(area) / (3.0 * np.pi * length)


def _ellipse_rho(x, y, cx, cy, a, b, theta):
  """Normalised radius of each pixel in an ellipse (<= 1 inside). ``a`` runs along the
  direction (sin θ, cos θ) (θ = 0: vertical), ``b`` across it. Arguments broadcast."""
  dx, dy = x - cx, y - cy
  s, c = np.sin(theta), np.cos(theta)
  along = dx * s + dy * c
  across = dx * c - dy * s
  return np.sqrt(np.square(along / a) + np.square(across / b))


def _coverage(rho, b, size):
  """Anti-aliased coverage of an ellipse from its normalised radius: ~1 px soft edge."""
  return np.clip(0.5 + (1.0 - rho) * (b * size), 0.0, 1.0)


def echo_params(seed: int, index: int) -> dict:
  """The random geometry of clip ``index`` (all lengths in image widths, angles in radians)."""
  rng = _rng(seed, index)
  p = {}
  p["period"] = rng.uniform(12.0, 24.0)              # frames per beat
  p["phase"] = rng.uniform(0.0, 1.0)                 # cycles
  p["target_ef"] = rng.uniform(0.20, 0.80)
  p["theta"] = rng.uniform(-0.35, 0.35)              # long axis tilt from vertical
  p["a_ed"] = rng.uniform(0.27, 0.34)                # LV half-length at end-diastole
  p["b_ed"] = p["a_ed"] * rng.uniform(0.48, 0.62)    # LV half-width at end-diastole
  p["apex"] = (0.5 + rng.uniform(-0.06, 0.06), rng.uniform(0.12, 0.18))
  p["wall"] = rng.uniform(0.045, 0.065)              # myocardium thickness at end-diastole
  p["fan_half_angle"] = rng.uniform(0.62, 0.75)      # ~36–43 degrees
  p["tissue"] = rng.uniform(0.22, 0.34)              # background brightness
  p["myo"] = rng.uniform(0.75, 0.95)                 # myocardium brightness
  p["blood"] = rng.uniform(0.02, 0.06)               # cavity brightness
  p["speckle_shape"] = rng.uniform(3.0, 6.0)         # gamma shape: lower = grainier
  p["rv_scale"] = rng.uniform(0.75, 0.9)
  p["texture"] = rng.uniform(0.0, 1.0, size=(6, 6)).astype(np.float32)
  p["noise_seed"] = int(rng.integers(0, 2**32))
  # Both axes shorten with EF so that V(ES)/V(ED) = a_es b_es² / (a_ed b_ed²) = 1 - EF.
  keep = 1.0 - p["target_ef"]
  p["a_es"], p["b_es"] = p["a_ed"] * keep**0.2, p["b_ed"] * keep**0.4
  return p


def _lv_geometry(p: dict, num_frames: int):
  """Per-frame LV half-axes and centre ``(a, b, cx, cy)``, each ``(time,)``. The apex stays put,
  the base moves (apical view)."""
  w = heart_cycle(np.arange(num_frames, dtype=np.float64), p["period"], p["phase"])
  a = p["a_es"] + w * (p["a_ed"] - p["a_es"])
  b = p["b_es"] + w * (p["b_ed"] - p["b_es"])
  cx = p["apex"][0] + a * np.sin(p["theta"])
  cy = p["apex"][1] + a * np.cos(p["theta"])
  return a, b, cx, cy, w


def _texture(p: dict, x, y):
  """Low-frequency tissue texture in [0.6, 1.4]: a 6×6 random grid, bilinearly upsampled."""
  g = p["texture"]
  n = g.shape[0] - 1
  gx, gy = np.clip(x * n, 0, n - 1e-4), np.clip(y * n, 0, n - 1e-4)
  ix, iy = gx.astype(int), gy.astype(int)
  fx, fy = gx - ix, gy - iy
  v = (g[iy, ix] * (1 - fx) * (1 - fy) + g[iy, ix + 1] * fx * (1 - fy)
       + g[iy + 1, ix] * (1 - fx) * fy + g[iy + 1, ix + 1] * fx * fy)
  return 0.6 + 0.8 * v


def echo_clip(seed: int, index: int, num_frames: int = 64, size: int = 112) -> dict:
  """An ultrasound-like apical four-chamber clip and its EF label.

  Returns a dict: ``video (num_frames, size, size, 1) uint8``, ``lv_mask (num_frames, size, size)
  uint8`` (the rendered LV cavity), ``ef`` (%), ``edv``/``esv`` (ml), ``period`` (frames),
  ``fps``. A clip of at least 24 frames shows a full beat whatever the heart period.
  """
  _check_shape(num_frames, size)
  p = echo_params(seed, index)
  x, y = _grid(size)
  a, b, cx, cy, w = _lv_geometry(p, num_frames)
  theta = np.float32(p["theta"])
  # Myocardial volume is conserved, roughly: the wall thickens as the cavity shrinks.
  wall = p["wall"] * np.sqrt(p["a_ed"] * p["b_ed"] / (a * b))
  A, B, CX, CY, W = _col(a), _col(b), _col(cx), _col(cy), _col(wall)

  lv_rho = _ellipse_rho(x, y, CX, CY, A, B, theta)
  lv = _coverage(lv_rho, B, size)
  lv_myo = _coverage(_ellipse_rho(x, y, CX, CY, A + W, B + W, theta), B + W, size)

  # Right ventricle beside the LV (image left), sharing the septum; it empties less.
  s, c = float(np.sin(p["theta"])), float(np.cos(p["theta"]))
  rv_a = _col(p["rv_scale"] * (p["a_es"] + (0.35 + 0.65 * w) * (p["a_ed"] - p["a_es"])))
  rv_b = _col(0.55 * p["b_ed"] * (0.75 + 0.25 * w))
  off = p["b_ed"] + p["wall"] + 0.55 * p["b_ed"]
  rcx = _col(cx - off * c + 0.15 * a * s)
  rcy = _col(cy + off * s + 0.15 * a * c)
  rv = _coverage(_ellipse_rho(x, y, rcx, rcy, rv_a, rv_b, theta), rv_b, size)
  rv_myo = _coverage(_ellipse_rho(x, y, rcx, rcy, rv_a + 0.6 * W, rv_b + 0.6 * W, theta),
                     rv_b + 0.6 * W, size)

  # Atria below the base, filling while the ventricles contract.
  la_r = _col(0.5 * p["b_ed"] * (0.85 + 0.3 * (1.0 - w)))
  base_x, base_y = p["apex"][0] + 2 * p["a_ed"] * s, p["apex"][1] + 2 * p["a_ed"] * c
  la_cx, la_cy = base_x + 0.12 * s, base_y + 0.12 * c
  ra_cx, ra_cy = la_cx - off * c, la_cy + off * s
  la = _coverage(_ellipse_rho(x, y, la_cx, la_cy, la_r * 1.3, la_r, theta), la_r, size)
  ra = _coverage(_ellipse_rho(x, y, ra_cx, ra_cy, la_r * 1.3, la_r, theta), la_r, size)

  img = np.broadcast_to(p["tissue"] * _texture(p, x, y), lv.shape).astype(np.float32)
  myo = np.maximum(lv_myo, rv_myo)
  img = img * (1 - myo) + p["myo"] * myo
  for cavity in (lv, rv, la, ra):
    img = img * (1 - cavity) + p["blood"] * cavity

  # Sector fan from a transducer at the top centre, with depth attenuation; speckle.
  fx, fy = x - 0.5, y + 0.02
  r = np.sqrt(fx * fx + fy * fy)
  angle = np.arctan2(fx, fy)
  fan = (np.clip((0.98 - r) * size, 0, 1) * np.clip((p["fan_half_angle"] - np.abs(angle))
                                                     * r * size, 0, 1))
  img = img * fan * (1.0 - 0.35 * np.clip(r, 0, 1))
  noise_rng = np.random.default_rng(p["noise_seed"])
  # Speckle is a property of the tissue, not the pixel: a lower-resolution image averages
  # (112 / size)² speckle grains per pixel, which raises the gamma shape by that factor.
  k = p["speckle_shape"] * max(1.0, (112.0 / size) ** 2)
  img = img * (noise_rng.standard_gamma(k, size=img.shape, dtype=np.float32) / k)
  video = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None]

  lv_mask = (lv_rho <= 1.0).astype(np.uint8)
  # EF as a sonographer measures it: the clip's largest and smallest LV, area–length volumes.
  cm = ECHO_WIDTH_CM
  vol = area_length_volume(np.pi * a * b * cm * cm, 2 * a * cm)   # cm³ = ml
  edv, esv = float(vol.max()), float(vol.min())
  return {"video": video, "lv_mask": lv_mask, "ef": 100.0 * (edv - esv) / edv, "edv": edv,
          "esv": esv, "period": float(p["period"]), "fps": ECHO_FPS}


# ------------------------------------------------------------------------------------------
# Endoscopy
# ------------------------------------------------------------------------------------------

# Per phase: forward speed (tunnel radii a frame), roll (radians a frame), RGB tint, haze
# (mix with a colour), and whether an instrument is in view.
_PHASE_SPEED = np.array([0.10, 0.03, 0.02, 0.015, 0.01, 0.01, -0.08], np.float32)
_PHASE_ROLL = np.array([0.0, 0.04, 0.0, 0.0, 0.01, 0.0, 0.02], np.float32)
_PHASE_TINT = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.85, 0.95, 1.1], [1.0, 1.0, 1.0],
                        [1.05, 0.55, 0.5], [1.0, 1.0, 1.0], [0.6, 0.95, 0.85]], np.float32)
_PHASE_HAZE = np.array([0.0, 0.0, 0.35, 0.0, 0.0, 0.3, 0.0], np.float32)
_PHASE_HAZE_RGB = np.array([[0, 0, 0], [0, 0, 0], [0.75, 0.85, 1.0], [0, 0, 0], [0, 0, 0],
                            [1.0, 1.0, 1.0], [0, 0, 0]], np.float32)
_PHASE_TOOL = np.array([0, 0, 0, 1, 0, 1, 0], bool)
_MUCOSA = np.array([0.88, 0.46, 0.38], np.float32)
_VESSEL = np.array([0.55, 0.12, 0.12], np.float32)
_POLYP = np.array([1.0, 0.86, 0.52], np.float32)   # pale yellow: stands out of the red wall
_TOOL = np.array([0.62, 0.64, 0.68], np.float32)
_FOCAL = 0.45       # pinhole focal length in half-image units: depth = _FOCAL / r
_VISIBLE = 4.0      # depth beyond which the light no longer reaches (and masks stop)


def phase_sequence(rng: np.random.Generator, num_frames: int) -> np.ndarray:
  """Per-frame phases ``(time,)`` int32: consecutive phases from a random start, each lasting
  12–40 frames, staying in the last phase at the end."""
  phases = np.empty(num_frames, np.int32)
  p, t = int(rng.integers(0, NUM_PHASES)), 0
  while t < num_frames:
    n = int(rng.integers(12, 41))
    phases[t:t + n] = p
    t += n
    p = min(p + 1, NUM_PHASES - 1)
  return phases


def endoscopy_params(seed: int, index: int, num_frames: int) -> dict:
  rng = _rng(seed, index)
  p = {"polyp": int(rng.integers(0, 2))}
  p["phase"] = phase_sequence(rng, num_frames)
  speed = _PHASE_SPEED[p["phase"]] * rng.uniform(0.7, 1.3)
  p["z"] = np.concatenate([[0.0], np.cumsum(speed[:-1])]).astype(np.float32)
  roll = np.concatenate([[0.0], np.cumsum(_PHASE_ROLL[p["phase"]][:-1])])
  p["roll"] = (rng.uniform(0, 2 * np.pi) + roll).astype(np.float32)
  t = np.arange(num_frames, dtype=np.float32)
  wander = rng.uniform(0.05, 0.25, size=2)
  freq = rng.uniform(0.02, 0.08, size=2)
  start = rng.uniform(0, 2 * np.pi, size=2)
  p["vx"] = wander[0] * np.sin(2 * np.pi * freq[0] * t + start[0])
  p["vy"] = wander[1] * np.cos(2 * np.pi * freq[1] * t + start[1])
  p["fold_period"] = rng.uniform(0.8, 1.4)
  # (axial frequency, integer angular frequency, phase) of plane waves on the wall; integer
  # angular frequencies keep the texture continuous around the tunnel.
  p["vessels"] = [(float(kz), float(np.round(ka)), float(ph)) for kz, ka, ph in
                  rng.uniform(-1, 1, size=(4, 3)) * [6, 3, np.pi]]
  p["mottle"] = [(float(kz), float(np.round(ka)), float(ph)) for kz, ka, ph in
                 rng.uniform(-1, 1, size=(3, 3)) * [2, 2, np.pi]]
  p["tool_angle"] = rng.uniform(-0.4, 0.4)
  p["tool_reach"] = rng.uniform(0.3, 0.7)
  # Polyps every ~2 radii along the whole path, so one is in view in every frame.
  polyps = []
  if p["polyp"]:
    zs = np.arange(p["z"].min() + rng.uniform(0.6, 1.2), p["z"].max() + 3.0, 2.0)
    for z in zs:
      polyps.append((z + rng.uniform(-0.3, 0.3), rng.uniform(0, 2 * np.pi),
                     rng.uniform(0.35, 0.55)))
  p["polyps"] = polyps
  return p


def endoscopy_clip(seed: int, index: int, num_frames: int = 32, size: int = 112) -> dict:
  """A colonoscopy-like clip with its labels.

  Returns a dict: ``video (num_frames, size, size, 3) uint8``, ``polyp`` (0/1 clip label),
  ``mask (num_frames, size, size) uint8`` (visible polyp pixels), ``phase (num_frames,) int32``,
  ``fps``.
  """
  _check_shape(num_frames, size)
  p = endoscopy_params(seed, index, num_frames)
  x, y = _grid(size)
  x, y = 2 * x - 1, 2 * y - 1                                # [-1, 1]
  dx, dy = x - _col(p["vx"]), y - _col(p["vy"])
  r = np.sqrt(dx * dx + dy * dy) + 1e-3
  depth = _FOCAL / r                                         # (time, size, size)
  wall_z = depth + _col(p["z"])
  wall_a = np.arctan2(dy, dx) + _col(p["roll"])

  # Texture in wall coordinates, so it moves with the wall as the camera travels.
  folds = 0.5 + 0.5 * np.cos(2 * np.pi * wall_z / p["fold_period"])
  shade = 0.6 + 0.4 * folds ** 3
  # Vessels: thin wiggly lines along the zero-crossings of a few plane waves on the wall.
  vessel = np.zeros_like(wall_z)
  wiggle = 0.8 * np.sin(3 * wall_z + 2 * wall_a)
  for kz, ka, ph in p["vessels"]:
    wave = np.sin(kz * wall_z + ka * wall_a + (ph + wiggle))
    vessel = np.maximum(vessel, np.clip(1.0 - np.abs(wave) / 0.06, 0.0, 1.0))
  mottle = sum(np.sin(kz * wall_z + ka * wall_a + ph) for kz, ka, ph in p["mottle"])
  base = 1.0 + 0.08 * mottle
  light = 1.0 / (1.0 + np.square(depth / 1.6))              # falls off with depth

  polyp = np.zeros_like(wall_z)
  for pz, pa, pr in p["polyps"]:
    da = np.mod(wall_a - pa + np.pi, 2 * np.pi) - np.pi          # wrapped to [-π, π)
    d2 = (np.square(wall_z - pz) + np.square(da)) / (pr * pr)
    polyp = np.maximum(polyp, np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)))  # dome height in [0, 1]
  in_polyp = polyp > 0

  colour = _MUCOSA * (shade * base)[..., None]
  colour = colour * (1 - 0.6 * vessel[..., None]) + _VESSEL * (0.6 * vessel[..., None])
  dome = (0.75 + 0.45 * polyp)[..., None] * _POLYP
  colour = np.where(in_polyp[..., None], dome, colour)
  colour = colour * light[..., None]

  phase = p["phase"]
  colour = colour * _PHASE_TINT[phase][:, None, None, :]
  haze = _PHASE_HAZE[phase][:, None, None, None]
  colour = colour * (1 - haze) + _PHASE_HAZE_RGB[phase][:, None, None, :] * haze

  # An instrument enters from the lower right in the instrument/coagulation phases.
  tool = np.zeros(wall_z.shape, bool)
  if _PHASE_TOOL[phase].any():
    ang = p["tool_angle"] + np.float32(np.pi / 4)
    ux, uy = np.cos(ang), np.sin(ang)                        # from the corner inwards
    along = (1.0 - x) * ux + (1.0 - y) * uy
    across = np.abs((1.0 - x) * uy - (1.0 - y) * ux)
    reach = p["tool_reach"] * (1.0 + 0.2 * np.sin(np.arange(len(phase)) * 0.3))
    tool = (along < 2 * _col(reach)) & (across < 0.22) & _PHASE_TOOL[phase][:, None, None]
    metal = (_TOOL * (0.7 + 0.6 * (0.22 - across) / 0.22)[..., None]).astype(np.float32)
    colour = np.where(tool[..., None], metal, colour)

  video = np.clip(colour * 255.0 + 0.5, 0, 255).astype(np.uint8)
  mask = (in_polyp & (depth < _VISIBLE) & ~tool).astype(np.uint8)
  return {"video": video, "mask": mask, "phase": phase.astype(np.int32), "polyp": p["polyp"],
          "fps": ENDOSCOPY_FPS}


def generate(kind: str, seed: int, index: int, num_frames: int, size: int) -> dict:
  """``echo_clip`` or ``endoscopy_clip`` by name."""
  if kind == "echo":
    return echo_clip(seed, index, num_frames, size)
  if kind == "endoscopy":
    return endoscopy_clip(seed, index, num_frames, size)
  raise ValueError(f"synthetic kind {kind!r} is not one of {KINDS}")
