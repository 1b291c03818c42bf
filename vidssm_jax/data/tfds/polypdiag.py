"""PolypDiag as a tensorflow-datasets builder (manual download; no TensorFlow needed).

PolypDiag (from Endo-FM's downstream benchmark) is 253 colonoscopy videos from HyperKvasir and
LDPolypVideo, each labelled normal (0) or abnormal (1, polyps), with Endo-FM's train/val split
(Endo-FM reports F1 on val). Download it from the link in the tianyu0207/weakly-polyp README
and point ``manual_dir`` at the folder with ``videos/`` and ``splits/``:

    manual_dir/
      videos/<video_name>.mp4
      splits/train.txt     one "<video_name> <label>" line per video (UCF101 style)
      splits/val.txt

    from vidssm_jax.data.tfds import PolypDiag
    b = PolypDiag(data_dir="/data/tfds", config="224")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))
    ds = b.as_data_source("val")      # ds[i]["video"]: (time, 224, 224, 3) uint8

Each example: ``video (time, size, size, 3)`` uint8 resized to the config's square size (the
sources range up to 1080p), ``label`` (ClassLabel normal/abnormal), ``fps`` float32,
``filename``. Videos FFmpeg cannot decode are logged and left out.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vidssm_jax.data.video_io import VIDEO_EXTENSIONS, decode_video

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
PolypDiag is shared through a Google Drive link in the README of
https://github.com/tianyu0207/weakly-polyp (research use). Download and unzip it, and pass its
folder as manual_dir: it must contain videos/ (the .mp4 files) and splits/train.txt and
splits/val.txt, each line "<video_name> <label>" with label 0 (normal) or 1 (abnormal).
"""

SPLITS = ("train", "val")


@dataclasses.dataclass
class PolypDiagConfig(tfds.core.BuilderConfig):
  size: int = 224   # frames are resized to size × size


def read_split_file(manual_dir: str, split: str) -> list[tuple[str, str, int]]:
  """``(name, path, label)`` per line of ``splits/<split>.txt``, checked for the files."""
  videos = os.path.join(manual_dir, "videos")
  list_path = os.path.join(manual_dir, "splits", f"{split}.txt")
  if not os.path.isdir(videos) or not os.path.isfile(list_path):
    raise FileNotFoundError(f"PolypDiag: expected {videos}/ and {list_path} in manual_dir "
                            f"{manual_dir!r}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  entries = []
  with open(list_path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2 or parts[1] not in ("0", "1"):
        raise ValueError(f"PolypDiag: {list_path} line {n}: {line.strip()!r}, expected "
                         "'<video_name> <0|1>'")
      name = os.path.basename(parts[0])
      path = os.path.join(videos, name)
      if not name.lower().endswith(VIDEO_EXTENSIONS):
        path += ".mp4"
      entries.append((os.path.splitext(name)[0], path, int(parts[1])))
  return entries


class PolypDiag(tfds.core.GeneratorBasedBuilder):
  """PolypDiag: colonoscopy videos labelled normal / abnormal (manual download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "RGB uint8 frames resized to the config's size."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  # tfds 4.9.x finds a packaged builder's file through `importlib_resources`, a backport it
  # only declares for Python < 3.9; naming the file here skips that lookup.
  code_path = epath.Path(__file__)
  BUILDER_CONFIGS = [PolypDiagConfig(name="224", size=224), PolypDiagConfig(name="112", size=112)]

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[1],
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(None, s, s, 3), dtype=np.uint8,
                                          encoding="zlib"),
            "label": tfds.features.ClassLabel(names=["normal", "abnormal"]),
            "fps": tfds.features.Scalar(np.float32),
            "filename": tfds.features.Text(),
        }),
        supervised_keys=("video", "label"),
        homepage="https://github.com/tianyu0207/weakly-polyp",
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(read_split_file(manual_dir, split))
            for split in SPLITS}

  def _generate_examples(self, entries):
    size = self.builder_config.size
    for name, path, label in entries:
      try:
        video, fps = decode_video(path, size=size, channels=3)
      except (ValueError, FileNotFoundError) as e:
        logging.warning("PolypDiag: leaving out %s: %s", name, e)
        continue
      yield name, {"video": video, "label": label, "fps": fps, "filename": name}
