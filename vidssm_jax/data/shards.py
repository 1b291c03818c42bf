"""Video datasets as ArrayRecord shards: one record per video, uint8 frames and labels, plus a
JSON index. Written once (from video files, or from the synthetic generators), read by
``vidssm_jax.data.pipeline``.

    python -m vidssm_jax.data.shards --videos DIR --labels CSV --out DIR [--size 112] [--channels 1]
    python -m vidssm_jax.data.shards --synthetic echo --num 1000 --out DIR [--size 112 --frames 64]

Layout of ``DIR``:

    train-00000-of-00003.array_record        records of split "train", in index order
    train-00000-of-00003.array_record.json   its completion marker: records, bytes, sha256, videos
    ...
    index.json                               written last: the dataset is complete iff it exists
                                             and every shard it lists is present and whole

A record is ``b"VSSM" | u16 version | u32 header length | JSON header | payload``. The header
holds ``{name, shape, dtype, fps, labels, codec, version, arrays}``; the payload is the video
``(time, height, width, channels)`` uint8, raw, followed by per-frame arrays named in
``arrays`` (e.g. ``phase (time,)`` int32, ``mask (time, height, width)`` uint8). Anything else
is rejected as "not a vidssm shard record".

Crash safety: a shard is written to ``<name>.tmp`` and renamed after ``close()``; its marker and
then ``index.json`` are written atomically after it. A killed run leaves no file that
``shard_is_complete`` or ``has_complete_index`` accepts, and re-running the same command keeps
the complete shards and writes the rest. A video FFmpeg cannot read is reported by name,
skipped, and counted in the summary.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import os
import re
import struct
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from vidssm_jax.data import synthetic
from vidssm_jax.data.video_io import VIDEO_EXTENSIONS, decode_video

MAGIC = b"VSSM"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")   # magic, version, header length
INDEX = "index.json"
SHARD_OPTIONS = "group_size:1"     # one record per chunk: random access for grain
SPLITS = ("train", "val", "test")

# Normalisation stored in index.json and applied by the pipeline after dividing by 255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)   # = vidssm_jax.models.endomamba.IMAGENET_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grey (echo): a fixed mean and std on the 0–1 scale, chosen for echo frames that are mostly the
# black background around the fan (our synthetic clips; EchoNet-Dynamic's pixel statistics are
# of this order, ~30 ± 50 on 0–255, a figure not checked here). Fixed, so a model can undo it.
GREY_MEAN = (0.125,)
GREY_STD = (0.2,)


def default_normalization(channels: int) -> dict:
  if channels == 3:
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": 1 / 255,
            "note": "x / 255, then (x - mean) / std (ImageNet)"}
  if channels == 1:
    return {"mean": list(GREY_MEAN), "std": list(GREY_STD), "scale": 1 / 255,
            "note": "x / 255, then (x - mean) / std (fixed grey statistics)"}
  raise ValueError(f"channels = {channels}, expected 1 or 3")


# ------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------


def encode_record(video: np.ndarray, *, name: str, fps: float, labels: Optional[dict] = None,
                  arrays: Optional[dict] = None) -> bytes:
  """One video as record bytes.

  Args:
    video: ``(time, height, width, channels)`` uint8.
    name: the video's name (e.g. its file name without extension).
    fps: frames per second.
    labels: video-level labels, JSON scalars (e.g. ``{"ef": 61.2}``).
    arrays: per-frame labels, arrays whose first axis is time (e.g. ``{"phase": (time,)
      int32, "mask": (time, height, width) uint8}``).
  """
  video = np.asarray(video)
  if video.ndim != 4 or video.dtype != np.uint8:
    raise ValueError(f"video has shape {video.shape} and dtype {video.dtype}, expected "
                     "(time, height, width, channels) uint8")
  arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
  for k, v in arrays.items():
    if v.shape[:1] != video.shape[:1]:
      raise ValueError(f"per-frame array {k!r} has shape {v.shape}; its first axis must be the "
                       f"video's {video.shape[0]} frames")
  labels = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in (labels or {}).items()}
  header = {"name": str(name), "shape": list(video.shape), "dtype": "uint8", "fps": float(fps),
            "labels": labels, "codec": "raw", "version": VERSION,
            "arrays": [{"key": k, "shape": list(v.shape), "dtype": v.dtype.str}
                       for k, v in arrays.items()]}
  head = json.dumps(header, separators=(",", ":")).encode()
  parts = [_PREFIX.pack(MAGIC, VERSION, len(head)), head, np.ascontiguousarray(video).tobytes()]
  parts += [v.tobytes() for v in arrays.values()]
  return b"".join(parts)


def decode_header(data: bytes) -> tuple[dict, int]:
  """``(header, payload offset)`` of record bytes; raises ValueError on anything else."""
  if len(data) < _PREFIX.size:
    raise ValueError(f"not a vidssm shard record ({len(data)} bytes)")
  magic, version, n = _PREFIX.unpack_from(data)
  if magic != MAGIC:
    raise ValueError(f"not a vidssm shard record (magic {magic!r}, expected {MAGIC!r})")
  if version != VERSION:
    raise ValueError(f"unsupported vidssm record version {version} (this reader: {VERSION})")
  header = json.loads(bytes(data[_PREFIX.size:_PREFIX.size + n]))
  return header, _PREFIX.size + n


def decode_record(data: bytes) -> dict:
  """Record bytes -> ``{"video": (time, height, width, channels) uint8, "name", "fps",
  **labels, **arrays}``. Arrays are read-only views of ``data``."""
  header, offset = decode_header(data)
  if header.get("codec") != "raw":
    raise ValueError(f"unsupported codec {header.get('codec')!r} in record {header['name']!r}")
  out = {"name": header["name"], "fps": header["fps"]}
  shape = tuple(header["shape"])
  n = int(np.prod(shape))
  out["video"] = np.frombuffer(data, np.uint8, n, offset).reshape(shape)
  offset += n
  for a in header["arrays"]:
    dtype = np.dtype(a["dtype"])
    count = int(np.prod(a["shape"]))
    out[a["key"]] = np.frombuffer(data, dtype, count, offset).reshape(a["shape"])
    offset += count * dtype.itemsize
  if offset != len(data):
    raise ValueError(f"record {header['name']!r} has {len(data) - offset} unexpected bytes")
  out.update(header["labels"])
  return out


# ------------------------------------------------------------------------------------------
# Reading an index
# ------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj: Any) -> None:
  """Atomically: a reader sees the old file or the whole new one, never a part."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _num_records(path: str) -> int:
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def shard_is_complete(path: str, *, verify: bool = False) -> bool:
  """Whether ``path`` is a finished shard: its marker exists and the file has the recorded
  size and record count (``verify``: and sha256). A ``.tmp`` file never is."""
  path = os.fspath(path)
  if not path.endswith(".array_record"):
    return False
  marker = _read_json(path + ".json")
  if marker is None or not os.path.isfile(path):
    return False
  if os.path.getsize(path) != marker.get("bytes"):
    return False
  try:
    if _num_records(path) != marker.get("num_records"):
      return False
  except Exception:  # array_record raises RuntimeError/ValueError on a damaged file
    return False
  return not verify or _sha256(path) == marker.get("sha256")


def load_index(directory: str) -> dict:
  """The parsed ``index.json`` of a shard directory (raises ``FileNotFoundError`` if missing)."""
  path = os.path.join(os.fspath(directory), INDEX)
  index = _read_json(path)
  if index is None:
    raise FileNotFoundError(f"no shard index at {path}; write the shards with "
                            "`python -m vidssm_jax.data.shards`")
  return index


def has_complete_index(directory: str, *, verify: bool = False) -> bool:
  """True iff ``directory/index.json`` exists and every shard it lists is present and complete
  (size and record count; ``verify=True`` also checks each sha256)."""
  if not directory:
    return False
  index = _read_json(os.path.join(os.fspath(directory), INDEX))
  if index is None or index.get("format") != "vidssm-shards":
    return False
  for split in index["splits"].values():
    for shard in split["shards"]:
      path = os.path.join(directory, shard["file"])
      if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
        return False
      try:
        if _num_records(path) != shard["num_records"]:
          return False
      except Exception:  # array_record raises RuntimeError/ValueError on a damaged file
        return False
      if verify and _sha256(path) != shard["sha256"]:
        return False
  return True


def split_info(directory: str, split: str, index: Optional[dict] = None) -> dict:
  index = index or load_index(directory)
  if split not in index["splits"]:
    raise ValueError(f"split {split!r} is not in {directory} (splits: {sorted(index['splits'])})")
  return index["splits"][split]


def shard_paths(directory: str, split: str, index: Optional[dict] = None) -> list[str]:
  """Absolute paths of the shards of ``split``, in record order."""
  return [os.path.join(os.path.abspath(directory), s["file"])
          for s in split_info(directory, split, index)["shards"]]


def read_labels(directory: str, split: str, key: str) -> np.ndarray:
  """The video-level label ``key`` of every video of ``split``, in index order: ``(videos,)``
  (float32, or int32 for class labels)."""
  index = load_index(directory)
  schema = index["labels"].get(key)
  if schema is None or schema.get("per") != "video":
    video_keys = sorted(k for k, s in index["labels"].items() if s.get("per") == "video")
    raise ValueError(f"label {key!r} is not a video-level label of {directory} "
                     f"(video-level labels: {video_keys})")
  videos = split_info(directory, split, index)["videos"]
  return np.asarray([v["labels"][key] for v in videos], np.dtype(schema["dtype"]))


def read_split(directory: str, split: str) -> Iterable[dict]:
  """Decodes every record of ``split`` in order (see ``decode_record``); for inspection and
  tests. Training reads through ``vidssm_jax.data.pipeline``."""
  from array_record.python.array_record_module import ArrayRecordReader
  for path in shard_paths(directory, split):
    reader = ArrayRecordReader(path)
    try:
      for i in range(reader.num_records()):
        yield decode_record(reader.read([i])[0])
    finally:
      reader.close()


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


def _shard_name(split: str, i: int, n: int) -> str:
  return f"{split}-{i:05d}-of-{n:05d}.array_record"


_SHARD_RE = re.compile(r"^[\w.]+-\d{5}-of-\d{5}\.array_record(\.tmp|\.json|\.json\.tmp)?$")


def _spec_hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _run_job(args):
  """Worker body: ``(build, job) -> (record bytes, info)`` or ``(None, error message)``."""
  build, job = args
  try:
    out = build(job)
    name = out.get("name") or job["name"]
    record = encode_record(out["video"], name=name, fps=out["fps"], labels=out["labels"],
                           arrays=out.get("arrays"))
    return record, {"name": name, "labels": out["labels"], "shape": list(out["video"].shape),
                    "fps": float(out["fps"])}
  except (ValueError, FileNotFoundError, OSError) as e:
    return None, str(e)


def _jobs_results(build, jobs, pool):
  if pool is None:
    return map(_run_job, [(build, j) for j in jobs])
  return pool.imap(_run_job, [(build, j) for j in jobs], chunksize=1)


def write_dataset(out_dir: str, jobs: dict[str, list[dict]], build: Callable, *,
                  name: str, channels: int, label_schema: dict, settings: dict,
                  normalization: Optional[dict] = None, aliases: Optional[dict] = None,
                  shard_size: int = 256, workers: int = 1, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
  """Writes ``jobs`` (per split, one dict per video with at least ``"name"``) as shards + index.

  ``build(job) -> {"video": (time, height, width, channels) uint8, "fps", "labels": {...},
  "arrays": {...} (optional), "name" (optional, default job["name"])}`` is called once per
  video (in ``workers`` processes when > 1; it must be a module-level function)
  and raises ``ValueError``/``OSError`` for a video it cannot read, which is then skipped.
  ``settings`` (e.g. size, seed) together with the jobs decide which existing shards are
  reused. ``aliases`` name further splits that read another's shards (e.g. ``{"test": "val"}``
  where a benchmark evaluates on its validation split). Returns a summary: videos written per
  split, skipped videos and seconds taken.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm.auto import tqdm

  start = time.perf_counter()
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  if shard_size < 1:
    raise ValueError(f"shard_size = {shard_size}, expected >= 1")
  aliases = dict(aliases or {})
  for alias, target in aliases.items():
    if target not in jobs or alias in jobs:
      raise ValueError(f"alias {alias!r} -> {target!r}: the target must be one of the splits "
                       f"{sorted(jobs)} and the alias none of them")
  spec = _spec_hash({"name": name, "settings": settings, "jobs": jobs, "channels": channels,
                     "aliases": aliases})
  index_path = os.path.join(out_dir, INDEX)
  old = _read_json(index_path)
  if old is not None and old.get("spec") == spec and has_complete_index(out_dir):
    log(f"{out_dir}: already complete ({INDEX} matches this command); nothing to do")
    return dict(old["summary"], seconds=0.0, reused_shards=sum(
        len(s["shards"]) for s in old["splits"].values()), written_shards=0)
  if old is not None:
    os.remove(index_path)   # from here until the end, the directory is visibly incomplete

  plan = []  # (split, shard file, jobs)
  for split, split_jobs in jobs.items():
    n = max(1, -(-len(split_jobs) // shard_size))
    for i in range(n):
      plan.append((split, _shard_name(split, i, n),
                   split_jobs[i * shard_size:(i + 1) * shard_size]))
  planned = {f for _, f, _ in plan}
  stale = [f for f in os.listdir(out_dir)   # shards of an earlier, different command
           if _SHARD_RE.match(f) and f.split(".array_record")[0] + ".array_record" not in planned]
  for f in stale:
    os.remove(os.path.join(out_dir, f))
  if stale:
    log(f"{out_dir}: removed {len(stale)} shard files of an earlier, different dataset")

  total = sum(len(j) for j in jobs.values())
  bar = tqdm(total=total, desc=f"writing {name}", unit="video", disable=not progress,
             mininterval=1.0, dynamic_ncols=True)
  say = bar.write if progress else log
  pool = None
  if workers > 1:
    pool = multiprocessing.get_context("spawn").Pool(workers)
  markers, reused, written = {}, 0, 0
  try:
    for split, file, shard_jobs in plan:
      path = os.path.join(out_dir, file)
      shard_spec = _spec_hash({"spec": spec, "file": file})
      marker = _read_json(path + ".json")
      if marker is not None and marker.get("spec") == shard_spec and shard_is_complete(
          path, verify=True):
        markers[file] = marker
        reused += 1
        bar.update(len(shard_jobs))
        continue
      for stale in (path, path + ".json"):
        if os.path.exists(stale):
          os.remove(stale)
      tmp = path + ".tmp"
      writer = ArrayRecordWriter(tmp, SHARD_OPTIONS)
      videos, skipped = [], []
      for job, (record, info) in zip(shard_jobs, _jobs_results(build, shard_jobs, pool)):
        if record is None:
          skipped.append({"name": job["name"], "source": job.get("path", job["name"]),
                          "error": info})
          say(f"skipped {job.get('path', job['name'])}: {info}")
        else:
          writer.write(record)
          videos.append(info)
        bar.update(1)
        bar.set_postfix(skipped=sum(len(m["skipped"]) for m in markers.values()) + len(skipped),
                        refresh=False)
      writer.close()
      os.replace(tmp, path)
      marker = {"spec": shard_spec, "file": file, "split": split, "num_records": len(videos),
                "bytes": os.path.getsize(path), "sha256": _sha256(path), "videos": videos,
                "skipped": skipped}
      _write_json(path + ".json", marker)
      markers[file] = marker
      written += 1
  finally:
    bar.close()
    if pool is not None:
      pool.close()
      pool.join()

  index = _make_index(name, channels, label_schema, normalization, plan, markers, spec, settings)
  for alias, target in aliases.items():
    index["splits"][alias] = dict(index["splits"][target], alias_of=target)
  index["summary"] = {"videos": {s: v["num_videos"] for s, v in index["splits"].items()
                                 if "alias_of" not in v},
                      "skipped": len(index["skipped"]), "shards": len(plan)}
  _write_json(index_path, index)
  seconds = time.perf_counter() - start
  summary = dict(index["summary"], seconds=seconds, reused_shards=reused, written_shards=written)
  counts = ", ".join(f"{s} {n}" for s, n in summary["videos"].items())
  log(f"wrote {sum(summary['videos'].values())} videos ({counts}) to {out_dir} in "
      f"{len(plan)} shards ({reused} kept from an earlier run) in {seconds:.1f} s; "
      f"skipped {summary['skipped']}"
      + (": " + ", ".join(s["source"] for s in index["skipped"]) if index["skipped"] else ""))
  return summary


def _make_index(name, channels, label_schema, normalization, plan, markers, spec, settings):
  splits, skipped, shapes, fps = {}, [], set(), set()
  for split, file, _ in plan:
    m = markers[file]
    s = splits.setdefault(split, {"shards": [], "videos": [], "num_videos": 0})
    s["shards"].append({"file": file, "num_records": m["num_records"], "bytes": m["bytes"],
                        "sha256": m["sha256"]})
    s["videos"] += [{"name": v["name"], "labels": v["labels"]} for v in m["videos"]]
    s["num_videos"] += m["num_records"]
    skipped += [dict(x, split=split) for x in m["skipped"]]
    shapes |= {tuple(v["shape"][1:]) for v in m["videos"]}
    fps |= {v["fps"] for v in m["videos"]}
  return {
      "format": "vidssm-shards", "version": VERSION, "name": name,
      "frame_shape": list(shapes.pop()) if len(shapes) == 1 else None,   # None: sizes differ
      "channels": channels, "fps": fps.pop() if len(fps) == 1 else None,
      "labels": label_schema,
      "normalization": normalization or default_normalization(channels),
      "record": {"codec": "raw", "options": SHARD_OPTIONS},
      "splits": splits, "skipped": skipped, "spec": spec, "settings": settings,
  }


# ------------------------------------------------------------------------------------------
# Synthetic data
# ------------------------------------------------------------------------------------------

SYNTHETIC_LABELS = {
    "echo": {
        "ef": {"per": "video", "dtype": "float32", "unit": "%"},
        "edv": {"per": "video", "dtype": "float32", "unit": "ml"},
        "esv": {"per": "video", "dtype": "float32", "unit": "ml"},
    },
    "endoscopy": {
        "polyp": {"per": "video", "dtype": "int32", "num_classes": 2},
        "phase": {"per": "frame", "dtype": "int32", "num_classes": synthetic.NUM_PHASES,
                  "names": list(synthetic.PHASES)},
        "mask": {"per": "pixel", "dtype": "uint8", "num_classes": 2},
    },
}


def split_counts(num: int, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> list[int]:
  """Videos per split (train, val, test) for ``num`` videos; every split gets at least one
  video when ``num >= 3``."""
  counts = [int(round(num * f)) for f in fractions[:-1]]
  if num >= len(fractions):
    counts = [max(1, c) for c in counts]
  counts.append(num - sum(counts))
  if counts[-1] < (1 if num >= len(fractions) else 0):
    counts[0] -= 1 - counts[-1]
    counts[-1] = 1
  return counts


def _build_synthetic(job: dict):
  clip = synthetic.generate(job["kind"], job["seed"], job["index"], job["num_frames"],
                            job["size"])
  if job["kind"] == "echo":
    labels = {k: round(float(clip[k]), 4) for k in ("ef", "edv", "esv")}
    return {"video": clip["video"], "fps": clip["fps"], "labels": labels}
  return {"video": clip["video"], "fps": clip["fps"], "labels": {"polyp": int(clip["polyp"])},
          "arrays": {"phase": clip["phase"], "mask": clip["mask"]}}


def synthetic_jobs(kind: str, num: int, *, size: int, num_frames: int, seed: int
                   ) -> dict[str, list[dict]]:
  """Clip ``i`` of ``range(num)`` -> split by position: the first 70 % train, then 15 % val,
  15 % test (EF and the polyp label are i.i.d. per clip, so no split is biased)."""
  if kind not in synthetic.KINDS:
    raise ValueError(f"synthetic kind {kind!r} is not one of {synthetic.KINDS}")
  if num < 1:
    raise ValueError(f"num = {num}, expected >= 1 clips")
  jobs, start = {}, 0
  for split, n in zip(SPLITS, split_counts(num)):
    jobs[split] = [{"name": f"{kind}_{i:06d}", "kind": kind, "seed": int(seed), "index": i,
                    "num_frames": int(num_frames), "size": int(size)}
                   for i in range(start, start + n)]
    start += n
  return jobs


def write_synthetic(kind: str, num: int, out_dir: str, *, size: int = 112, num_frames: int = 64,
                    seed: int = 0, shard_size: int = 256, workers: int = 1,
                    progress: bool = True, log: Callable[[str], None] = print) -> dict:
  """Writes ``num`` synthetic ``kind`` clips (``"echo"`` or ``"endoscopy"``) of ``num_frames``
  square ``size``² frames to ``out_dir``, split 70/15/15 into train/val/test, + index.json.

  Echo clips are grey ``(num_frames, size, size, 1)`` with labels ``ef``/``edv``/``esv``;
  endoscopy clips RGB ``(num_frames, size, size, 3)`` with ``polyp``, per-frame ``phase`` and
  per-pixel ``mask``. Deterministic per ``(seed, clip index)``; re-running resumes.
  """
  jobs = synthetic_jobs(kind, num, size=size, num_frames=num_frames, seed=seed)
  channels = 1 if kind == "echo" else 3
  return write_dataset(out_dir, jobs, _build_synthetic, name=f"synthetic_{kind}",
                       channels=channels, label_schema=SYNTHETIC_LABELS[kind],
                       settings={"synthetic": kind, "size": size, "num_frames": num_frames,
                                 "seed": seed},
                       shard_size=shard_size, workers=workers, progress=progress, log=log)


_SYNTHETIC_NAME_RE = re.compile(r"^(%s)_\d{6}$" % "|".join(synthetic.KINDS))


def _first_record_name(path: str) -> Optional[str]:
  from array_record.python.array_record_module import ArrayRecordReader
  try:
    reader = ArrayRecordReader(path)
    try:
      return decode_header(reader.read([0])[0])[0].get("name")
    finally:
      reader.close()
  except Exception:  # not an ArrayRecord file, empty, or not our records
    return None


def _foreign_files(directory: str) -> list[str]:
  """The entries of ``directory`` that are not synthetic shards, their markers, their index or
  a half-written file of our writer (``.tmp``): what writing synthetic clips there could harm."""
  foreign = []
  for f in sorted(os.listdir(directory)):
    path = os.path.join(directory, f)
    if f.endswith(".tmp") and (f == INDEX + ".tmp" or _SHARD_RE.match(f)):
      continue   # never accepted as data; the writer replaces it
    if f == INDEX:
      index = _read_json(path) or {}
      ok = bool(index.get("settings", {}).get("synthetic"))
    elif _SHARD_RE.match(f) and f.endswith(".array_record.json"):
      videos = (_read_json(path) or {}).get("videos")
      ok = isinstance(videos, list) and all(_SYNTHETIC_NAME_RE.match(str(v.get("name", "")))
                                            for v in videos)
    elif _SHARD_RE.match(f) and f.endswith(".array_record"):
      marker = _read_json(path + ".json")
      ok = marker is not None or bool(_SYNTHETIC_NAME_RE.match(_first_record_name(path) or ""))
    else:
      ok = False
    if not ok:
      foreign.append(f)
  return foreign


def ensure_synthetic(directory: str, kind: str, num: int, *, size: int, num_frames: int,
                     seed: int = 0, progress: bool = True,
                     log: Callable[[str], None] = print) -> Optional[dict]:
  """Makes ``directory`` a dataset to train on for a config with ``data.synthetic = kind``.

  - A complete shard index of real data: used as it is (nothing written).
  - Synthetic shards of exactly these settings (kind, ``num`` clips, size, frames, seed): used.
  - A missing or empty folder, or one holding only synthetic shards (of other settings, or
    half-written by a killed run): ``num`` clips are written there (``write_synthetic``), reusing
    what matches.
  - Anything else (raw videos, other files, real shards without a complete index): ValueError,
    and nothing is touched.

  Returns ``write_synthetic``'s summary when it wrote, else None.
  """
  if not directory:
    raise ValueError(f"synthetic {kind} clips need a folder to be written to: set data.dir")
  directory = os.fspath(directory)
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f"data.dir {directory!r} is a file, not a folder")
  if has_complete_index(directory):
    index = load_index(directory)
    settings = index.get("settings", {})
    if not settings.get("synthetic"):
      return None
    want = {"synthetic": kind, "size": size, "num_frames": num_frames, "seed": seed}
    total = sum(s["num_videos"] for s in index["splits"].values() if "alias_of" not in s)
    if all(settings.get(k) == v for k, v in want.items()) and total == num:
      return None
  elif os.path.isdir(directory):
    foreign = _foreign_files(directory)
    if foreign:
      shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
      raise ValueError(
          f"data.dir {directory!r} has no complete shard index and holds files that are not "
          f"synthetic shards ({shown}); synthetic clips are written only into an empty folder "
          "or one of synthetic shards: point data.dir at a new folder, or write shards of "
          "your videos with `python -m vidssm_jax.data.shards --videos ...`")
  log(f"writing {num} synthetic {kind} clips to {directory} ...")
  return write_synthetic(kind, num, directory, size=size, num_frames=num_frames, seed=seed,
                         progress=progress, log=log)


# ------------------------------------------------------------------------------------------
# Video files + a label CSV
# ------------------------------------------------------------------------------------------

_NAME_COLUMNS = ("filename", "file", "video", "video_name", "name", "path")
_SPLIT_COLUMNS = ("split",)
# EchoNet-Dynamic's FileList.csv describes the file in these columns; they are not labels.
_META_COLUMNS = ("frameheight", "framewidth", "fps", "numberofframes")


def _find_column(fields: Sequence[str], candidates: Sequence[str]) -> Optional[str]:
  lower = {f.lower(): f for f in fields}
  return next((lower[c] for c in candidates if c in lower), None)


def _hash_split(name: str, fractions=(0.7, 0.15, 0.15)) -> str:
  u = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32
  return SPLITS[0] if u < fractions[0] else SPLITS[1] if u < fractions[0] + fractions[1] \
      else SPLITS[2]


def _parse_number(v: str):
  try:
    f = float(v)
  except ValueError:
    return None
  return f


def _build_file(job: dict):
  video, fps = decode_video(job["path"], size=job["size"], channels=job["channels"])
  return {"video": video, "fps": fps, "labels": job["labels"]}


def video_jobs(video_dir: str, labels_csv: str, *, size: int, channels: int,
               label_columns: Optional[Sequence[str]] = None,
               log: Callable[[str], None] = print) -> tuple[dict, dict]:
  """Matches the rows of ``labels_csv`` to video files under ``video_dir``.

  The CSV names each video in a column ``FileName``/``filename``/``video``/``name``/``path``
  (with or without extension), optionally its split in ``Split`` (TRAIN/VAL/TEST or any
  name; without it, a hash of the name assigns 70/15/15), and labels in the other numeric
  columns (or ``label_columns``), stored under lower-case keys (EchoNet's ``EF`` -> ``ef``).
  Returns ``(jobs per split, label schema)``.
  """
  with open(labels_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise ValueError(f"--labels {labels_csv} has no rows")
  fields = list(rows[0].keys())
  name_col = _find_column(fields, _NAME_COLUMNS)
  if name_col is None:
    raise ValueError(f"--labels {labels_csv}: no file-name column; expected one of "
                     f"{_NAME_COLUMNS} (case-insensitive), got {fields}")
  split_col = _find_column(fields, _SPLIT_COLUMNS)
  if label_columns is None:
    skip = {name_col, split_col} | {f for f in fields if f.lower() in _META_COLUMNS}
    label_columns = [f for f in fields if f not in skip
                     and all(_parse_number(r[f]) is not None for r in rows if r[f] != "")]
  else:
    missing = [c for c in label_columns if c not in fields]
    if missing:
      raise ValueError(f"--label-columns {missing} are not columns of {labels_csv} ({fields})")

  files = {}
  for root, _, names in os.walk(video_dir):
    for n in names:
      if n.lower().endswith(VIDEO_EXTENSIONS):
        files.setdefault(n, os.path.join(root, n))
        files.setdefault(os.path.splitext(n)[0], os.path.join(root, n))
  jobs, schema, missing = {}, {}, []
  for c in label_columns:
    values = [_parse_number(r[c]) for r in rows if r[c] != ""]
    integer = all(v is not None and float(v).is_integer() for v in values)
    schema[c.lower()] = {"per": "video", "dtype": "int32" if integer else "float32",
                         "column": c}
  for r in rows:
    key = os.path.basename(r[name_col])
    path = files.get(key) or files.get(os.path.splitext(key)[0])
    if path is None:
      missing.append(r[name_col])
      continue
    labels = {}
    for c in label_columns:
      v = _parse_number(r[c]) if r[c] != "" else float("nan")
      labels[c.lower()] = int(v) if schema[c.lower()]["dtype"] == "int32" and v == v else v
    name = os.path.splitext(os.path.basename(path))[0]
    given = r[split_col].strip().lower() if split_col else ""
    split = given or _hash_split(name)
    jobs.setdefault(split, []).append({"name": name, "path": os.path.abspath(path),
                                       "bytes": os.path.getsize(path), "size": size,
                                       "channels": channels, "labels": labels})
  if missing:
    log(f"{len(missing)} rows of {labels_csv} have no video under {video_dir} "
        f"(first: {missing[:5]}); they are left out")
  if not jobs:
    raise ValueError(f"no video under --videos {video_dir} matches a row of {labels_csv}")
  return jobs, schema


def write_videos(video_dir: str, labels_csv: str, out_dir: str, *, size: int = 112,
                 channels: int = 3, name: Optional[str] = None,
                 label_columns: Optional[Sequence[str]] = None, shard_size: int = 256,
                 workers: int = 1, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
  """Decodes the videos of ``video_dir`` named in ``labels_csv`` (see ``video_jobs``), resizes
  them to ``size``² with ``channels`` (1: grey, 3: RGB) and writes shards + index.json."""
  jobs, schema = video_jobs(video_dir, labels_csv, size=size, channels=channels,
                            label_columns=label_columns, log=log)
  ordered = {s: jobs[s] for s in SPLITS if s in jobs}
  ordered.update({s: j for s, j in jobs.items() if s not in ordered})
  return write_dataset(out_dir, ordered, _build_file,
                       name=name or os.path.basename(os.path.abspath(video_dir)),
                       channels=channels, label_schema=schema,
                       settings={"size": size, "channels": channels, "csv": labels_csv},
                       shard_size=shard_size, workers=workers, progress=progress, log=log)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m vidssm_jax.data.shards",
      description="Write video datasets (files + a label CSV, or synthetic) as ArrayRecord shards.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--videos", help="folder of .mp4/.avi files (searched recursively)")
  src.add_argument("--synthetic", choices=synthetic.KINDS, help="generate clips instead")
  p.add_argument("--labels", help="CSV: a file-name column, optional Split, numeric labels")
  p.add_argument("--label-columns", help="comma-separated CSV columns to keep as labels")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--size", type=int, default=112, help="square frame size (default 112)")
  p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                 help="1 grey or 3 RGB (default: 3; synthetic echo is grey)")
  p.add_argument("--num", type=int, default=1000, help="synthetic clips (default 1000)")
  p.add_argument("--frames", type=int, default=64, help="frames per synthetic clip (default 64)")
  p.add_argument("--seed", type=int, default=0, help="synthetic seed")
  p.add_argument("--name", help="dataset name in index.json (default: the folder's name)")
  p.add_argument("--shard-size", type=int, default=256, help="videos per shard (default 256)")
  p.add_argument("--workers", type=int, default=1, help="decoding/generating processes")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  a = p.parse_args(argv)
  try:
    if a.synthetic:
      if a.channels is not None and a.channels != (1 if a.synthetic == "echo" else 3):
        p.error(f"--channels {a.channels} does not match synthetic {a.synthetic}")
      write_synthetic(a.synthetic, a.num, a.out, size=a.size, num_frames=a.frames, seed=a.seed,
                      shard_size=a.shard_size, workers=a.workers, progress=not a.no_progress)
    else:
      if not a.labels:
        p.error("--videos needs --labels CSV")
      cols = a.label_columns.split(",") if a.label_columns else None
      write_videos(a.videos, a.labels, a.out, size=a.size, channels=a.channels or 3,
                   name=a.name, label_columns=cols, shard_size=a.shard_size, workers=a.workers,
                   progress=not a.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
