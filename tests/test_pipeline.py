"""grain pipelines: determinism, resume from an orbax-saved iterator state, host sharding,
evaluation clips and padding, normalisation, augmentation of masks with the video, workers."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vidssm_jax.data import pipeline, shards, synthetic

QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def echo_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("echo")
  shards.write_synthetic("echo", 30, d, size=16, num_frames=20, seed=1, shard_size=8, **QUIET)
  return str(d)


@pytest.fixture(scope="module")
def endo_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("endo")
  shards.write_synthetic("endoscopy", 10, d, size=24, num_frames=12, seed=2, **QUIET)
  return str(d)


def make(directory, split="train", **kw):
  args = dict(num_frames=4, stride=2, image_size=16, batch_size=4, train=True, seed=0,
              process_index=0, process_count=1)
  args.update(kw)
  return pipeline.make_dataset(directory, split, **args)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def test_train_batches_have_the_contract_shapes(echo_dir, endo_dir):
  b = next(iter(make(echo_dir)))
  assert b["video"].shape == (4, 4, 16, 16, 1) and b["video"].dtype == np.float32
  assert b["ef"].shape == (4,) and b["ef"].dtype == np.float32
  assert b["video_id"].dtype == np.int32
  b = next(iter(make(endo_dir, image_size=20)))
  assert b["video"].shape == (4, 4, 20, 20, 3)
  assert b["polyp"].shape == (4,) and b["polyp"].dtype == np.int32
  assert b["phase"].shape == (4, 4) and b["phase"].dtype == np.int32
  assert b["mask"].shape == (4, 4, 20, 20) and b["mask"].dtype == np.uint8


def test_order_is_a_function_of_the_seed(echo_dir):
  a = take(iter(make(echo_dir, seed=5)), 8)        # 32 clips: more than one epoch of 21
  b = take(iter(make(echo_dir, seed=5)), 8)
  assert_same_batches(a, b)
  c = take(iter(make(echo_dir, seed=6)), 8)
  assert not all(np.array_equal(x["video_id"], y["video_id"]) for x, y in zip(a, c))
  ids = np.concatenate([x["video_id"] for x in a])
  assert sorted(ids[:21]) == list(range(21))        # one epoch sees every video once
  assert not np.array_equal(ids[:8], ids[21:29])    # the next epoch is reshuffled


def test_restored_iterator_state_yields_exactly_the_next_batches(echo_dir, tmp_path):
  straight = take(iter(make(echo_dir, seed=3)), 7)
  it = iter(make(echo_dir, seed=3))
  take(it, 4)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False))
  mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  take(it, 2)  # the run goes on, then dies

  fresh = iter(make(echo_dir, seed=3))
  mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_same_batches(take(fresh, 3), straight[4:7])
  mngr.close()


def test_two_processes_read_disjoint_halves_that_cover_the_split(echo_dir):
  n = shards.load_index(echo_dir)["splits"]["train"]["num_videos"]
  seen = []
  for p in range(2):
    it = iter(make(echo_dir, process_index=p, process_count=2, batch_size=5))
    ids = set(np.concatenate([b["video_id"] for b in take(it, 6)]).tolist())
    assert ids == set(range(p, n, 2)), (p, sorted(ids))
    seen.append(ids)
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(n))
  # evaluation: every clip of every video exactly once over both hosts, same step count
  evals = [list(make(echo_dir, "train", train=False, num_clips=2, batch_size=4,
                     process_index=p, process_count=2)) for p in range(2)]
  assert len(evals[0]) == len(evals[1]) == -(-((n + 1) // 2) * 2 // 4)
  ids = [np.concatenate([b["video_id"][b["valid"]] for b in e]) for e in evals]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(np.concatenate(ids).tolist()) == sorted(list(range(n)) * 2)


def test_eval_clips_are_uniform_normalised_and_padded(echo_dir):
  batches = list(make(echo_dir, "val", train=False, num_clips=3, batch_size=4, num_frames=5,
                      stride=3))
  records = list(shards.read_split(echo_dir, "val"))
  n = len(records)
  assert len(batches) == -(-n * 3 // 4)
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.dtype == bool and valid.sum() == n * 3 and not valid[n * 3:].any()
  videos = np.concatenate([b["video"] for b in batches])
  ids = np.concatenate([b["video_id"] for b in batches])
  ef = np.concatenate([b["ef"] for b in batches])
  norm = shards.load_index(echo_dir)["normalization"]
  for j in range(n * 3):
    rec, clip = records[j // 3], j % 3
    assert ids[j] == j // 3 and abs(ef[j] - rec["ef"]) < 1e-4
    # 20 frames, clip span (5 - 1) * 3 + 1 = 13: starts 0, 4, 7 (rounded linspace to 7)
    start = [0, 4, 7][clip]
    frames = rec["video"][start:start + 13:3].astype(np.float64)
    want = (frames / 255.0 - norm["mean"][0]) / norm["std"][0]
    np.testing.assert_allclose(videos[j], want, rtol=0, atol=1e-5)


def test_short_videos_repeat_their_last_frame():
  np.testing.assert_array_equal(pipeline.clip_indices(5, 4, 2, 0), [0, 2, 4, 4])
  np.testing.assert_array_equal(pipeline.clip_indices(3, 4, 2, 0), [0, 2, 2, 2])
  np.testing.assert_array_equal(pipeline.uniform_starts(5, 4, 2, 3), [0, 0, 0])
  np.testing.assert_array_equal(pipeline.uniform_starts(20, 2, 1, 4), [0, 6, 12, 18])


def bilinear_reference(frames, box, size):
  """float64 loop over output pixels: half-pixel centres, edge clamp."""
  top, left, h, w = box
  T, H, W, C = frames.shape
  out = np.zeros((T, size, size, C))
  for i in range(size):
    y = min(max(top + (i + 0.5) * h / size - 0.5, 0), H - 1)
    y0 = int(np.floor(y))
    y1 = min(y0 + 1, H - 1)
    for j in range(size):
      x = min(max(left + (j + 0.5) * w / size - 0.5, 0), W - 1)
      x0 = int(np.floor(x))
      x1 = min(x0 + 1, W - 1)
      wy, wx = y - y0, x - x0
      out[:, i, j] = ((1 - wy) * (1 - wx) * frames[:, y0, x0] + (1 - wy) * wx * frames[:, y0, x1]
                      + wy * (1 - wx) * frames[:, y1, x0] + wy * wx * frames[:, y1, x1])
  return out


@pytest.mark.parametrize("box,size", [((0, 0, 9, 7), 13), ((2.5, 1.25, 5.0, 4.5), 6),
                                      ((0, 0, 9, 7), 4), ((0, 0, 9, 9), 9)])
@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_matches_a_float64_reference(box, size, flip):
  frames = np.random.default_rng(0).integers(0, 256, (2, 9, box[3] if box[3] == 9 else 7, 3),
                                             dtype=np.uint8)
  got = pipeline.crop_resize(frames, box, size, flip=flip)
  want = bilinear_reference(frames.astype(np.float64), box, size)
  np.testing.assert_allclose(got, want[:, :, ::-1] if flip else want, rtol=0, atol=1e-3)
  masks = frames[..., 0]
  nearest = pipeline.crop_resize_nearest(masks, box, size, flip=flip)
  rows = np.clip(np.floor(box[0] + (np.arange(size) + 0.5) * box[2] / size), 0, 8).astype(int)
  cols = np.clip(np.floor(box[1] + (np.arange(size) + 0.5) * box[3] / size), 0,
                 masks.shape[2] - 1).astype(int)
  want = masks[:, rows][:, :, cols]
  np.testing.assert_array_equal(nearest, want[:, :, ::-1] if flip else want)


def _build_mask_video(job):
  """A video whose pixels are its polyp mask (×255), to check masks follow the video."""
  clip = synthetic.endoscopy_clip(4, job["index"], 6, 24)
  mask = clip["mask"]
  mask[:, :4, :12] = 1   # make every frame asymmetric so a missed flip would show
  return {"video": np.repeat(mask[..., None] * 255, 3, -1).astype(np.uint8), "fps": 25.0,
          "labels": {"polyp": 1}, "arrays": {"mask": mask}}


def test_masks_are_cropped_resized_and_flipped_with_the_video(tmp_path):
  jobs = {"train": [{"name": f"v{i}", "index": i} for i in range(4)]}
  shards.write_dataset(tmp_path, jobs, _build_mask_video, name="maskvid", channels=3,
                       label_schema={"polyp": {"per": "video", "dtype": "int32"},
                                     "mask": {"per": "pixel", "dtype": "uint8"}},
                       settings={}, **QUIET)
  norm = shards.load_index(tmp_path)["normalization"]
  for b in take(iter(make(tmp_path, image_size=20, jitter=0.0, batch_size=4, num_frames=3,
                          stride=1)), 4):
    pixels = (b["video"] * np.asarray(norm["std"]) + np.asarray(norm["mean"])) * 255.0
    from_video = pixels[..., 0] > 127.5
    agree = (from_video == (b["mask"] == 1)).mean()
    assert agree > 0.97, agree


def test_workers_give_the_same_batches(endo_dir):
  kw = dict(seed=7, batch_size=2, image_size=12, num_frames=3)
  a = take(iter(make(endo_dir, num_workers=0, **kw)), 3)
  it = iter(make(endo_dir, num_workers=1, **kw))
  try:
    b = take(it, 3)
    assert_same_batches(a, [{k: np.array(v) for k, v in x.items()} for x in b])
  finally:
    del b
    it.close()


def test_bad_arguments_are_clear(echo_dir, tmp_path):
  with pytest.raises(ValueError, match="no complete shard index"):
    make(str(tmp_path))
  with pytest.raises(ValueError, match="split 'dev' is not in"):
    make(echo_dir, "dev")
  with pytest.raises(ValueError, match="batch_size = 0"):
    make(echo_dir, batch_size=0)
  with pytest.raises(ValueError, match=r"process_index = 2 is not in \[0, process_count = 2\)"):
    make(echo_dir, process_index=2, process_count=2)
