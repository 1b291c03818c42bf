"""EchoNet-Dynamic as a tensorflow-datasets builder (manual download; no TensorFlow needed).

EchoNet-Dynamic (Ouyang et al., Nature 2020) is 10,030 apical four-chamber echocardiogram
videos, 112 × 112, with the ejection fraction and end-systolic/-diastolic volumes of each, and
an official TRAIN/VAL/TEST split. It is distributed by Stanford AIMI under a research data-use
agreement, so it cannot be downloaded automatically: fetch it, unzip it, and point
``manual_dir`` at the folder that holds ``FileList.csv`` and ``Videos/``:

    env TFDS_DATA_DIR=~/tensorflow_datasets tfds build vidssm_jax/data/tfds/echonet_dynamic.py \
        --manual_dir=/data/EchoNet-Dynamic

or in Python:

    from vidssm_jax.data.tfds import EchonetDynamic
    b = EchonetDynamic(data_dir="/data/tfds")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir="/data/EchoNet-Dynamic"))
    ds = b.as_data_source("train")    # ds[i]["video"]: (time, 112, 112, 1) uint8

Each example: ``video (time, height, width, 1)`` uint8 (grey: the videos are grey in RGB),
``ef``, ``esv``, ``edv``, ``fps`` float32, ``filename`` (FileList's FileName). Splits
``train``, ``val``, ``test`` follow FileList.csv's ``Split`` column. Frames are stored
zlib-compressed ``Tensor`` features (``tfds.features.Video`` needs TensorFlow and ffmpeg); the
files are ArrayRecord, readable by ``as_data_source`` and grain. Videos FFmpeg cannot decode
are logged and left out. ``vidssm_jax.data.tfds.convert`` turns the splits into our shards.
"""

from __future__ import annotations

import csv
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vidssm_jax.data.video_io import decode_video

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
EchoNet-Dynamic needs registration: request access at
https://echonet.github.io/dynamic/ (Stanford AIMI, research data-use agreement), download and
unzip the dataset, and pass its folder as manual_dir. It must contain FileList.csv (columns
FileName, EF, ESV, EDV, FrameHeight, FrameWidth, FPS, NumberOfFrames, Split) and Videos/ with
one <FileName>.avi per row.
"""

_SPLITS = {"TRAIN": "train", "VAL": "val", "TEST": "test"}
_COLUMNS = ("FileName", "EF", "ESV", "EDV", "FPS", "Split")


def read_file_list(manual_dir: str) -> list[dict]:
  """Rows of ``manual_dir/FileList.csv`` with the video path, checked for the expected files."""
  csv_path = os.path.join(manual_dir, "FileList.csv")
  videos = os.path.join(manual_dir, "Videos")
  if not os.path.isfile(csv_path) or not os.path.isdir(videos):
    raise FileNotFoundError(
        f"EchoNet-Dynamic: expected {csv_path} and the folder {videos}/ in manual_dir "
        f"{manual_dir!r}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  missing = [c for c in _COLUMNS if rows and c not in rows[0]]
  if not rows or missing:
    raise ValueError(f"EchoNet-Dynamic: {csv_path} lacks the columns {missing or _COLUMNS}")
  for r in rows:
    name = r["FileName"]
    r["path"] = os.path.join(videos, name if name.lower().endswith(".avi") else name + ".avi")
  return rows


class EchonetDynamic(tfds.core.GeneratorBasedBuilder):
  """EchoNet-Dynamic: echo videos with ejection fraction labels (manual download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Grey uint8 frames at their native size, FileList labels."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # tfds 4.9.x finds a packaged builder's file through `importlib_resources`, a backport it
  # only declares for Python < 3.9; naming the file here skips that lookup.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[1],
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(None, None, None, 1), dtype=np.uint8,
                                          encoding="zlib"),
            "ef": tfds.features.Scalar(np.float32),
            "esv": tfds.features.Scalar(np.float32),
            "edv": tfds.features.Scalar(np.float32),
            "fps": tfds.features.Scalar(np.float32),
            "filename": tfds.features.Text(),
        }),
        homepage="https://echonet.github.io/dynamic/",
        citation="Ouyang et al., Video-based AI for beat-to-beat assessment of cardiac "
                 "function. Nature 580, 252–256 (2020).",
    )

  def _split_generators(self, dl_manager):
    rows = read_file_list(os.fspath(dl_manager.manual_dir))
    by_split = {}
    for r in rows:
      split = _SPLITS.get(r["Split"].strip().upper(), r["Split"].strip().lower())
      by_split.setdefault(split, []).append(r)
    return {split: self._generate_examples(split_rows) for split, split_rows in by_split.items()}

  def _generate_examples(self, rows):
    for r in rows:
      try:
        video, fps = decode_video(r["path"], channels=1)
      except (ValueError, FileNotFoundError) as e:
        logging.warning("EchoNet-Dynamic: leaving out %s: %s", r["FileName"], e)
        continue
      yield r["FileName"], {
          "video": video, "ef": float(r["EF"]), "esv": float(r["ESV"]),
          "edv": float(r["EDV"]), "fps": float(r["FPS"] or fps), "filename": r["FileName"]}
