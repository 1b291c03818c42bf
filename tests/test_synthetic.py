"""Synthetic echo and endoscopy clips: labels agree with what is rendered, determinism, spread."""

import numpy as np
import pytest

from vidssm_jax.data import synthetic


def measured_ef(lv_mask: np.ndarray) -> float:
  """EF from rendered LV masks ``(time, h, w)``, independently of the generator: per frame, the
  cavity area A (pixels) and long axis L from the mask's second moments (a filled ellipse of
  half-axis a has variance a²/4 along it, so L = 2a = 4·sqrt(λ_max)); area–length volume
  8A²/(3πL); EF from the largest and smallest volume."""
  volumes = []
  for frame in lv_mask.astype(np.float64):
    ys, xs = np.nonzero(frame)
    cov = np.cov(np.stack([xs, ys]).astype(np.float64), bias=True)
    length = 4.0 * np.sqrt(np.linalg.eigvalsh(cov)[-1])
    volumes.append(8.0 * len(xs) ** 2 / (3.0 * np.pi * length))
  volumes = np.asarray(volumes)
  return 100.0 * (volumes.max() - volumes.min()) / volumes.max()


@pytest.mark.parametrize("seed", [0, 11])
def test_echo_ef_label_matches_the_rendered_ventricle(seed):
  for index in range(12):
    clip = synthetic.echo_clip(seed, index, num_frames=26, size=112)
    assert abs(measured_ef(clip["lv_mask"]) - clip["ef"]) < 2.0, (seed, index)
    assert clip["edv"] > clip["esv"] > 0
    assert abs(100 * (clip["edv"] - clip["esv"]) / clip["edv"] - clip["ef"]) < 1e-9


def test_echo_clip_shape_dtype_and_fan():
  clip = synthetic.echo_clip(0, 3, num_frames=10, size=40)
  v = clip["video"]
  assert v.shape == (10, 40, 40, 1) and v.dtype == np.uint8
  assert clip["lv_mask"].shape == (10, 40, 40) and clip["lv_mask"].dtype == np.uint8
  # Black outside the sector: the top corners are outside the fan.
  assert v[:, :4, :4].max() == 0 and v[:, :4, -4:].max() == 0
  # The cavity is dark, the frame is not.
  inside = v[..., 0][clip["lv_mask"] == 1].mean()
  assert inside < 0.5 * v[..., 0][v[..., 0] > 0].mean()


def test_echo_ef_spread_and_heart_period():
  efs, periods = [], []
  for index in range(240):
    clip = synthetic.echo_clip(5, index, num_frames=26, size=16)
    efs.append(clip["ef"])
    periods.append(clip["period"])
  efs = np.asarray(efs)
  assert efs.min() < 25 and efs.max() > 75
  counts, _ = np.histogram(efs, bins=6, range=(20, 80))
  assert counts.min() >= 20, counts  # roughly uniform: 40 expected per bin
  assert 12 <= min(periods) and max(periods) <= 24


def test_echo_beat_is_visible_in_the_mask_area():
  clip = synthetic.echo_clip(1, 4, num_frames=60, size=48)
  area = clip["lv_mask"].sum((1, 2)).astype(np.float64)
  spectrum = np.abs(np.fft.rfft(area - area.mean()))
  freq = np.fft.rfftfreq(len(area))[np.argmax(spectrum)]
  assert abs(1 / freq - clip["period"]) < 0.25 * clip["period"]


@pytest.mark.parametrize("kind", ["echo", "endoscopy"])
def test_same_seed_and_index_give_the_same_clip(kind):
  a = synthetic.generate(kind, 3, 7, 12, 24)
  b = synthetic.generate(kind, 3, 7, 12, 24)
  c = synthetic.generate(kind, 3, 8, 12, 24)
  d = synthetic.generate(kind, 4, 7, 12, 24)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
  assert not np.array_equal(a["video"], c["video"]) and not np.array_equal(a["video"], d["video"])


def test_endoscopy_labels_are_consistent():
  seen_polyp = set()
  for index in range(10):
    clip = synthetic.endoscopy_clip(2, index, num_frames=40, size=32)
    assert clip["video"].shape == (40, 32, 32, 3) and clip["video"].dtype == np.uint8
    assert clip["mask"].shape == (40, 32, 32) and set(np.unique(clip["mask"])) <= {0, 1}
    phase = clip["phase"]
    assert phase.shape == (40,) and phase.dtype == np.int32
    assert phase.min() >= 0 and phase.max() < synthetic.NUM_PHASES
    assert np.all(np.diff(phase) >= 0)
    if clip["polyp"]:
      visible = clip["mask"].sum((1, 2))
      # a polyp is in view in every frame unless the instrument hides it
      tool = synthetic._PHASE_TOOL[phase]
      assert np.all(visible[~tool] > 0), visible
    else:
      assert clip["mask"].max() == 0
    seen_polyp.add(clip["polyp"])
  assert seen_polyp == {0, 1}


def test_endoscopy_phases_change_the_scene():
  # Frames of different phases differ in colour: mean RGB per phase over many clips.
  means = {}
  for index in range(12):
    clip = synthetic.endoscopy_clip(0, index, num_frames=48, size=24)
    for p in np.unique(clip["phase"]):
      means.setdefault(int(p), []).append(clip["video"][clip["phase"] == p].mean((0, 1, 2)))
  rgb = {p: np.mean(v, 0) for p, v in means.items()}
  assert set(rgb) == set(range(synthetic.NUM_PHASES)), sorted(rgb)
  # irrigation is bluer than insertion; bleeding redder relative to green; withdrawal greener
  assert rgb[2][2] / rgb[2][0] > 1.2 * rgb[0][2] / rgb[0][0]
  assert rgb[4][0] / rgb[4][1] > 1.2 * rgb[0][0] / rgb[0][1]
  assert rgb[6][1] / rgb[6][0] > 1.2 * rgb[0][1] / rgb[0][0]


def test_bad_arguments_are_clear():
  with pytest.raises(ValueError, match="num_frames = 0"):
    synthetic.echo_clip(0, 0, num_frames=0)
  with pytest.raises(ValueError, match="size = 4"):
    synthetic.endoscopy_clip(0, 0, size=4)
  with pytest.raises(ValueError, match="synthetic kind 'mri'"):
    synthetic.generate("mri", 0, 0, 4, 16)


def test_polyps_stand_out_of_the_wall_at_low_resolution():
  # The clip label must be learnable from 32 x 32 frames: polyps are pale yellow domes on a red
  # wall (green minus blue well above the wall's), covering a few per cent of every frame.
  inside, outside, cover = [], [], []
  for index in range(12):
    clip = synthetic.endoscopy_clip(5, index, num_frames=8, size=32)
    if not clip["polyp"]:
      continue
    v = clip["video"].astype(np.float64) / 255.0
    gb, m = v[..., 1] - v[..., 2], clip["mask"].astype(bool)
    inside.append(gb[m].mean())
    outside.append(gb[~m].mean())
    cover.append(m.mean())
  assert len(inside) >= 3
  assert np.mean(inside) > np.mean(outside) + 0.1, (inside, outside)
  assert np.median(cover) > 0.03, cover
