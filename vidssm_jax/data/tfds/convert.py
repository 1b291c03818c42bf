"""A prepared tensorflow-datasets dataset -> our ArrayRecord shards (``vidssm_jax.data.shards``).

    python -m vidssm_jax.data.tfds.convert --dataset echonet_dynamic \
        --manual_dir /data/EchoNet-Dynamic --data_dir /data/tfds --out /data/echonet_shards

builds the dataset first if ``data_dir`` does not hold it yet (from ``manual_dir``), then
writes every split as shards + index.json, ready for ``pipeline.make_dataset``.

What goes where: the feature ``video`` ``(time, height, width, channels)`` uint8 becomes the
record's frames; scalar features (``Scalar``, ``ClassLabel``) become video-level labels
(``fps`` becomes the record's fps); other tensors whose first axis is time become per-frame
arrays; a ``filename`` text feature names the record. Known datasets get their usual label
names and split aliases (PolypDiag: ``label`` -> ``polyp``, and ``test`` reads ``val``, the
split Endo-FM reports).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from vidssm_jax.data import shards

RENAME = {"polyp_diag": {"label": "polyp"}}
ALIASES = {"polyp_diag": {"test": "val"}}
_META = ("fps", "filename")
_SOURCES: dict = {}


def _features(builder) -> dict:
  import tensorflow_datasets as tfds
  out = {}
  for key, f in builder.info.features.items():
    if isinstance(f, tfds.features.ClassLabel):
      out[key] = ("label", {"dtype": "int32", "num_classes": f.num_classes, "names": f.names})
    elif isinstance(f, tfds.features.Text):
      out[key] = ("text", {})
    elif isinstance(f, tfds.features.Tensor) and not f.shape:
      integer = np.issubdtype(np.dtype(f.np_dtype), np.integer)
      out[key] = ("label", {"dtype": "int32" if integer else "float32"})
    elif isinstance(f, tfds.features.Tensor) and key != "video" and f.shape[:1] == (None,):
      out[key] = ("array", {"dtype": np.dtype(f.np_dtype).name})
  return out


def _source(data_dir: str, split: str):
  """``as_data_source`` of a prepared dataset, cached per process (workers included)."""
  key = (data_dir, split)
  if key not in _SOURCES:
    import tensorflow_datasets as tfds
    _SOURCES[key] = tfds.builder_from_directory(data_dir).as_data_source(split)
  return _SOURCES[key]


def _build_tfds(job: dict) -> dict:
  ex = _source(job["data_dir"], job["split"])[job["i"]]
  video = np.asarray(ex["video"])
  if video.ndim != 4 or video.dtype != np.uint8:
    raise ValueError(f"{job['name']}: feature 'video' has shape {video.shape} and dtype "
                     f"{video.dtype}, expected (time, height, width, channels) uint8")
  labels, arrays = {}, {}
  for key, (kind, _) in job["features"].items():
    new = job["rename"].get(key, key)
    if kind == "label" and key not in _META:
      labels[new] = np.asarray(ex[key]).item()
    elif kind == "array":
      arrays[new] = np.asarray(ex[key])
  name = ex.get("filename")
  name = name.decode() if isinstance(name, bytes) else name
  return {"video": video, "fps": float(ex.get("fps", 0.0)), "labels": labels,
          "arrays": arrays, "name": str(name) if name else None}


def to_shards(builder, out_dir: str, *, splits: Optional[Sequence[str]] = None,
              rename: Optional[dict] = None, aliases: Optional[dict] = None,
              shard_size: int = 256, workers: int = 1, progress: bool = True,
              log: Callable[[str], None] = print) -> dict:
  """Writes the prepared tfds ``builder``'s ``splits`` (default: all) to ``out_dir`` as shards.

  ``rename`` maps feature names to label names and ``aliases`` adds splits that read another's
  shards (defaults: ``RENAME``/``ALIASES`` for the builder's name). Returns the summary of
  ``shards.write_dataset``.
  """
  data_dir = os.fspath(builder.data_dir)
  info = builder.info
  if "video" not in info.features:
    raise ValueError(f"{builder.name} has no 'video' feature (features: {list(info.features)})")
  splits = list(splits or info.splits.keys())
  rename = RENAME.get(builder.name, {}) if rename is None else rename
  aliases = ALIASES.get(builder.name, {}) if aliases is None else aliases
  aliases = {a: t for a, t in aliases.items() if t in splits and a not in splits}
  features = _features(builder)
  jobs = {}
  for split in splits:
    n = info.splits[split].num_examples
    jobs[split] = [{"name": f"{split}_{i:06d}", "data_dir": data_dir, "split": split, "i": i,
                    "features": features, "rename": rename} for i in range(n)]
  schema = {}
  for key, (kind, meta) in features.items():
    if key in _META or kind == "text":
      continue
    schema[rename.get(key, key)] = dict(meta, per="video" if kind == "label" else "frame")
  channels = int(info.features["video"].shape[-1])
  config = builder.builder_config.name if builder.builder_config else ""
  return shards.write_dataset(
      out_dir, jobs, _build_tfds, name=builder.name, channels=channels, label_schema=schema,
      settings={"tfds": f"{builder.name}/{config}:{builder.version}", "data_dir": data_dir},
      aliases=aliases, shard_size=shard_size, workers=workers, progress=progress, log=log)


def main(argv: Optional[Sequence[str]] = None) -> int:
  import tensorflow_datasets as tfds
  import vidssm_jax.data.tfds  # noqa: F401  (registers our builders)

  p = argparse.ArgumentParser(prog="python -m vidssm_jax.data.tfds.convert",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", required=True,
                 help="tfds name, e.g. echonet_dynamic, polyp_diag/112")
  p.add_argument("--data_dir", required=True, help="tfds data_dir (built here if missing)")
  p.add_argument("--manual_dir", help="the downloaded dataset (needed to build it)")
  p.add_argument("--out", required=True, help="output shard folder")
  p.add_argument("--shard-size", type=int, default=256)
  p.add_argument("--workers", type=int, default=1)
  a = p.parse_args(argv)
  try:
    builder = tfds.builder(a.dataset, data_dir=a.data_dir)
    if not builder.is_prepared():
      if not a.manual_dir:
        p.error(f"{a.dataset} is not built in {a.data_dir}; pass --manual_dir")
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=a.manual_dir))
    to_shards(builder, a.out, shard_size=a.shard_size, workers=a.workers)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
