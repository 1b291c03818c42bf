"""grain pipelines over the shards of ``vidssm_jax.data.shards``: clip sampling, augmentation,
normalisation, batching and per-host sharding, with an iterator state orbax can checkpoint.

    ds = make_dataset(dir, "train", num_frames=16, stride=2, image_size=112, batch_size=8,
                      train=True, seed=0)
    it = iter(ds)          # a grain DatasetIterator; it.get_state() / set_state() resume it
    batch = next(it)       # {"video": (8, 16, 112, 112, C) float32, "ef": (8,), "video_id": (8,)}

Data flow, per host (process ``p`` of ``P`` reads the videos ``p, p + P, p + 2P, ...``):

    train:  videos -> shuffle (seed, reshuffled every epoch) -> repeat forever
              -> random_map: decode record, random clip (num_frames every stride-th frame),
                 random resized crop, horizontal flip, brightness/contrast jitter, normalise
              -> batch (drop remainder) -> [worker processes]
    eval:   (video, clip) for num_clips uniformly spaced clips of every video, in order
              -> decode, whole frame resized, normalise -> batch; the last batch is padded
              (``valid`` False) so that every host runs the same number of steps

Batches are formed before the worker processes, which each compute whole batches, so a batch
is the same whatever ``num_workers``: data order is a function of (seed, step) only.

A batch is a dict of numpy arrays:

    video     (batch, num_frames, image_size, image_size, channels) float32, normalised:
              x / 255, then (x - mean) / std with the mean and std of index.json (ImageNet for
              RGB; 0.125 and 0.2 for grey, see ``shards.GREY_MEAN``)
    <label>   every video-level label of the dataset (e.g. ``ef`` float32 (batch,),
              ``polyp`` int32 (batch,))
    phase     int32 (batch, num_frames), the per-frame labels of the sampled frames
    mask      uint8 (batch, num_frames, image_size, image_size), cropped, resized (nearest) and
              flipped exactly like the video
    video_id  int32 (batch,), the video's position in its split (the same on every host)
    valid     bool (batch,), evaluation only: False for padding

A video shorter than ``(num_frames - 1) * stride + 1`` frames is padded by repeating its last
frame.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import grain
import numpy as np

from vidssm_jax.data import shards


# ------------------------------------------------------------------------------------------
# Clip sampling and augmentation (pure numpy; shared by train and eval)
# ------------------------------------------------------------------------------------------


def clip_indices(num_video_frames: int, num_frames: int, stride: int, start: int) -> np.ndarray:
  """Frame indices ``(num_frames,)`` of the clip starting at ``start``; past the end of the
  video the last frame repeats."""
  return np.minimum(start + stride * np.arange(num_frames), num_video_frames - 1)


def clip_span(num_frames: int, stride: int) -> int:
  """Source frames a clip covers."""
  return (num_frames - 1) * stride + 1


def uniform_starts(num_video_frames: int, num_frames: int, stride: int, num_clips: int
                   ) -> np.ndarray:
  """Start frames of ``num_clips`` clips spread evenly over the video, first to last."""
  last = max(0, num_video_frames - clip_span(num_frames, stride))
  return np.round(np.linspace(0, last, num_clips)).astype(np.int64)


def _linear_taps(start: float, length: float, out: int, limit: int):
  """Source indices and weights to resample ``[start, start + length)`` to ``out`` pixels
  (pixel centres, like ``jax.image.resize`` with "linear")."""
  pos = start + (np.arange(out, dtype=np.float64) + 0.5) * (length / out) - 0.5
  pos = np.clip(pos, 0, limit - 1)
  i0 = np.floor(pos).astype(np.int64)
  i1 = np.minimum(i0 + 1, limit - 1)
  return i0, i1, (pos - i0).astype(np.float32)


def _nearest_taps(start: float, length: float, out: int, limit: int) -> np.ndarray:
  pos = start + (np.arange(out, dtype=np.float64) + 0.5) * (length / out)
  return np.clip(np.floor(pos), 0, limit - 1).astype(np.int64)


def crop_resize(frames: np.ndarray, box: tuple[float, float, float, float], size: int, *,
                flip: bool = False) -> np.ndarray:
  """Bilinear crop-and-resize of ``frames (time, height, width, channels)`` uint8 to
  ``(time, size, size, channels)`` float32 in [0, 255]; ``box = (top, left, height, width)``
  in source pixels; ``flip`` mirrors the output left-right. Separable (rows, then columns)
  and in place, since this is the pipeline's hot loop. No antialiasing: a crop shrinks by
  little, or the shards were written near the training size."""
  top, left, h, w = box
  _, H, W, _ = frames.shape
  c0, c1, wc = _linear_taps(left, w, size, W)
  if flip:   # mirroring is free: read the columns right to left
    c0, c1, wc = c0[::-1], c1[::-1], wc[::-1]
  if (top, left, h, w) == (0, 0, H, W) and (H, W) == (size, size):
    return frames[:, :, c0].astype(np.float32)
  r0, r1, wr = _linear_taps(top, h, size, H)
  a = frames[:, r0]
  x = np.subtract(frames[:, r1], a, dtype=np.float32)
  x *= wr[None, :, None, None]
  x += a
  b = x[:, :, c0]
  out = np.subtract(x[:, :, c1], b)
  out *= wc[None, None, :, None]
  out += b
  return out


def crop_resize_nearest(masks: np.ndarray, box, size: int, *, flip: bool = False) -> np.ndarray:
  """Nearest-neighbour version for label maps ``(time, height, width)`` (dtype kept)."""
  top, left, h, w = box
  _, H, W = masks.shape
  r = _nearest_taps(top, h, size, H)
  c = _nearest_taps(left, w, size, W)
  return masks[:, r][:, :, c[::-1] if flip else c]


def random_box(rng: np.random.Generator, height: int, width: int,
               scale: tuple[float, float], ratio: tuple[float, float]
               ) -> tuple[float, float, float, float]:
  """Inception-style random resized crop: area fraction in ``scale``, aspect ratio (w / h)
  log-uniform in ``ratio``; falls back to the whole frame after 10 tries."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = math.sqrt(target * aspect)
    h = math.sqrt(target / aspect)
    if w <= width and h <= height:
      return float(rng.uniform(0, height - h)), float(rng.uniform(0, width - w)), h, w
  return 0.0, 0.0, float(height), float(width)


class _Clips:
  """Turns ``(video_id, record bytes)`` into a clip example. Picklable (worker processes)."""

  def __init__(self, index: dict, *, num_frames: int, stride: int, image_size: int,
               scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
               jitter: float = 0.2):
    self.num_frames, self.stride, self.image_size = num_frames, stride, image_size
    self.scale, self.ratio, self.flip, self.jitter = scale, ratio, flip, jitter
    norm = index["normalization"]
    self.mean = np.asarray(norm["mean"], np.float32)
    self.std = np.asarray(norm["std"], np.float32)
    self.labels = {k: np.dtype(s["dtype"]) for k, s in index["labels"].items()}

  def example(self, video_id: int, data: bytes, start: Optional[int],
              rng: Optional[np.random.Generator]) -> dict:
    """``start`` None: a random clip (needs ``rng``); ``rng`` None: no augmentation."""
    rec = shards.decode_record(data)
    video = rec["video"]
    T, H, W, _ = video.shape
    if start is None:
      start = int(rng.integers(0, max(0, T - clip_span(self.num_frames, self.stride)) + 1))
    idx = clip_indices(T, self.num_frames, self.stride, start)
    box = (0.0, 0.0, float(H), float(W))
    flip, bright, contrast = False, 1.0, 1.0
    if rng is not None:
      box = random_box(rng, H, W, self.scale, self.ratio)
      flip = self.flip and bool(rng.integers(0, 2))
      bright = float(rng.uniform(1 - self.jitter, 1 + self.jitter))
      contrast = float(rng.uniform(1 - self.jitter, 1 + self.jitter))
    x = crop_resize(video[idx], box, self.image_size, flip=flip)
    # Brightness, contrast about the clip's mean, and normalisation as one affine map:
    # y = x / 255 * b; y = (y - m) * c + m; out = (y - mean) / std.
    m = bright * float(x.mean()) / 255.0
    x *= (bright * contrast / 255.0) / self.std
    x += ((1.0 - contrast) * m - self.mean) / self.std
    out = {"video": x, "video_id": np.int32(video_id)}
    for key, dtype in self.labels.items():
      if key not in rec:
        continue
      value = rec[key]
      if key == "mask" or (isinstance(value, np.ndarray) and value.ndim == 3):
        value = crop_resize_nearest(value[idx], box, self.image_size, flip=flip)
      elif isinstance(value, np.ndarray) and value.ndim >= 1:
        value = value[idx]
      out[key] = np.asarray(value, dtype)
    return out


class _TrainExample(grain.transforms.RandomMap):
  """A random, augmented clip of video ``video_id``."""

  def __init__(self, clips: _Clips, source):
    self.clips, self.source = clips, source

  def random_map(self, video_id, rng: np.random.Generator):
    return self.clips.example(int(video_id), self.source[int(video_id)], None, rng)


class _EvalExample(grain.transforms.Map):
  """Example ``j`` of a host's evaluation pass: clip ``j % num_clips`` of its video
  ``video_ids[j // num_clips]``, or, past the end, a copy of ``pad_id``'s first clip marked
  ``valid`` False."""

  def __init__(self, clips: _Clips, source, video_ids: list[int], pad_id: int, num_clips: int):
    self.clips, self.source, self.video_ids = clips, source, video_ids
    self.pad_id, self.num_clips = pad_id, num_clips

  def map(self, j: int):
    valid = j < len(self.video_ids) * self.num_clips
    video_id = self.video_ids[j // self.num_clips] if valid else self.pad_id
    clip = j % self.num_clips if valid else 0
    data = self.source[video_id]
    T = shards.decode_header(data)[0]["shape"][0]
    start = int(uniform_starts(T, self.clips.num_frames, self.clips.stride, self.num_clips)[clip])
    out = self.clips.example(video_id, data, start, None)
    out["valid"] = np.bool_(valid)
    return out


# ------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------


def _check(name, value, minimum=1):
  if not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} = {value!r}, expected an integer >= {minimum}")


def make_dataset(directory: str, split: str, *, num_frames: int, stride: int, image_size: int,
                 batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
                 num_clips: int = 1, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, num_threads: Optional[int] = None,
                 crop_scale: tuple[float, float] = (0.6, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 jitter: float = 0.2) -> grain.IterDataset:
  """A grain dataset of batches over ``split`` of the shards in ``directory``.

  Args:
    directory: a shard folder with a complete index.json.
    split: "train", "val", "test" (or any split of the index).
    num_frames, stride: a clip is ``num_frames`` frames, every ``stride``-th.
    image_size: output frames are ``image_size``².
    batch_size: examples per batch on this host.
    train: True: endless, shuffled by ``seed`` (differently every epoch), augmented, random clip
      per video. False: one finite pass, ``num_clips`` uniformly spaced clips per video, no
      augmentation, last batch padded (``valid``).
    seed: data order and augmentation are functions of (seed, step) only.
    num_workers: worker processes (0: threads in this process). The batches do not depend on it.
    num_clips: clips per video in evaluation (EchoNet's all-clips protocol averages them).
    process_index, process_count: this host's slice (default: ``jax.process_index()``,
      ``jax.process_count()``); every host reads a disjoint slice of the videos.
    num_threads: threads computing batches in each process (default: 2 without workers, 1
      per worker process, where more threads only contend for the same cores and make the
      workers slow to stop).
    crop_scale, crop_ratio, flip, jitter: training augmentation (random resized crop with area
      fraction ``crop_scale`` and aspect ``crop_ratio``, horizontal flip, brightness and contrast
      factors in ``1 ± jitter``).

  Returns:
    An ``IterDataset``; ``iter(ds)`` is a ``DatasetIterator`` whose state
    ``grain.checkpoint.CheckpointSave/Restore`` save and restore (one small JSON per host).
  """
  for name, v in (("num_frames", num_frames), ("stride", stride), ("image_size", image_size),
                  ("batch_size", batch_size), ("num_clips", num_clips)):
    _check(name, v)
  _check("num_workers", num_workers, 0)
  if num_threads is None:
    num_threads = 1 if num_workers else 2
  _check("num_threads", num_threads)
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index = {process_index} is not in [0, process_count = "
                     f"{process_count})")
  directory = os.fspath(directory)
  if not shards.has_complete_index(directory):
    raise ValueError(f"{directory!r} has no complete shard index (index.json); write it with "
                     "`python -m vidssm_jax.data.shards`")
  index = shards.load_index(directory)
  info = shards.split_info(directory, split, index)
  n = info["num_videos"]
  if n == 0:
    raise ValueError(f"split {split!r} of {directory} has no videos")
  source = grain.sources.ArrayRecordDataSource(shards.shard_paths(directory, split, index))
  clips = _Clips(index, num_frames=num_frames, stride=stride, image_size=image_size,
                 scale=tuple(crop_scale), ratio=tuple(crop_ratio), flip=flip, jitter=jitter)
  mine = list(range(process_index, n, process_count))
  if train:
    if not mine:
      raise ValueError(f"split {split!r} has {n} videos, too few for {process_count} processes")
    # The host's video ids are the source (not a slice of the records): past the first epoch
    # indices wrap within this list, so a host never drifts into another host's videos.
    ds = (grain.MapDataset.source(mine)
          .shuffle(seed=seed % 2**32)
          .repeat(None)
          .random_map(_TrainExample(clips, source), seed=(seed + 1) % 2**32)
          .batch(batch_size, drop_remainder=True))
  else:
    per_host = -(-n // process_count)   # the most videos any host has: all run this many steps
    steps = -(-per_host * num_clips // batch_size)
    ds = (grain.MapDataset.range(steps * batch_size)
          .map(_EvalExample(clips, source, mine, mine[0] if mine else 0, num_clips))
          .batch(batch_size))
  buffer = num_threads if num_workers else 2 * num_threads   # batches computed ahead
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                               prefetch_buffer_size=buffer))
  if num_workers > 0:
    _allow_unparsed_flags()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it_ds



def _allow_unparsed_flags() -> None:
  """grain 0.2.x reads an absl flag when it starts worker processes and fails in a script that
  never parsed flags (google/grain#1355, fixed upstream); outside an absl app, declare the
  flags parsed so their defaults apply."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
