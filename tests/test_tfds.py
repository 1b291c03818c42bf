"""tfds builders on tiny fake manual_dirs of real video files, and the tfds -> shards converter."""

import csv
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vidssm_jax.data import pipeline, shards, synthetic, video_io
from vidssm_jax.data.tfds import EchonetDynamic, PolypDiag, to_shards

QUIET = dict(progress=False, log=lambda s: None)
ECHONET_COLUMNS = ["FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS",
                   "NumberOfFrames", "Split"]


def prepare(builder, manual_dir):
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir)))


@pytest.fixture(scope="module")
def echonet(tmp_path_factory):
  """EchoNet-Dynamic's layout: FileList.csv in the official format, Videos/<FileName>.avi."""
  root = tmp_path_factory.mktemp("echonet")
  manual = root / "EchoNet-Dynamic"
  (manual / "Videos").mkdir(parents=True)
  rows, clips = [], {}
  for i, split in enumerate(["TRAIN", "TRAIN", "TRAIN", "VAL", "TEST", "TEST"]):
    name = f"0X{i + 10:X}ABCDEF"
    clip = synthetic.echo_clip(4, i, num_frames=10 + i, size=24)
    video_io.encode_video(manual / "Videos" / f"{name}.avi", clip["video"], 50)
    clips[name] = clip
    rows.append({"FileName": name, "EF": f"{clip['ef']:.6f}", "ESV": f"{clip['esv']:.6f}",
                 "EDV": f"{clip['edv']:.6f}", "FrameHeight": 24, "FrameWidth": 24, "FPS": 50,
                 "NumberOfFrames": 10 + i, "Split": split})
  # A listed video that is corrupt is left out, not fatal.
  (manual / "Videos" / "0XBROKEN.avi").write_bytes(b"RIFF" + bytes(300))
  rows.append(dict(rows[0], FileName="0XBROKEN", Split="TRAIN"))
  with open(manual / "FileList.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=ECHONET_COLUMNS)
    w.writeheader()
    w.writerows(rows)
  builder = EchonetDynamic(data_dir=str(root / "tfds"))
  prepare(builder, manual)
  return builder, rows, clips, root


def test_echonet_builder_reads_the_official_layout(echonet):
  builder, rows, clips, _ = echonet
  assert {s: builder.info.splits[s].num_examples for s in ("train", "val", "test")} == \
      {"train": 3, "val": 1, "test": 2}
  assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(builder.data_dir))
  by_name = {r["FileName"]: r for r in rows}
  seen = set()
  for split in ("train", "val", "test"):
    for ex in builder.as_data_source(split):
      name = ex["filename"].decode()
      seen.add(name)
      assert by_name[name]["Split"].lower() == split
      # ffv1 is lossless: the frames are the synthetic clip, bit for bit
      np.testing.assert_array_equal(ex["video"], clips[name]["video"])
      assert ex["ef"] == pytest.approx(float(by_name[name]["EF"]), rel=1e-6)
      assert ex["esv"] == pytest.approx(float(by_name[name]["ESV"]), rel=1e-6)
      assert ex["fps"] == 50.0
  assert seen == set(clips)


def test_echonet_converts_to_shards_that_the_pipeline_reads(echonet):
  builder, rows, clips, root = echonet
  out = root / "shards"
  summary = to_shards(builder, str(out), shard_size=2, **QUIET)
  assert summary["videos"] == {"train": 3, "val": 1, "test": 2}
  assert shards.has_complete_index(out, verify=True)
  index = shards.load_index(out)
  assert index["channels"] == 1 and index["labels"]["ef"]["per"] == "video"
  for split in ("train", "val", "test"):
    src = {ex["filename"].decode(): ex for ex in builder.as_data_source(split)}
    for rec in shards.read_split(out, split):
      np.testing.assert_array_equal(rec["video"], clips[rec["name"]]["video"])
      assert rec["ef"] == pytest.approx(float(src[rec["name"]]["ef"]), rel=1e-6)
      assert rec["fps"] == 50.0
  ef = shards.read_labels(out, "test", "ef")
  names = [v["name"] for v in index["splits"]["test"]["videos"]]
  np.testing.assert_allclose(ef, [clips[n]["ef"] for n in names], rtol=1e-5)
  batch = next(iter(pipeline.make_dataset(str(out), "train", num_frames=4, stride=2,
                                          image_size=16, batch_size=2, train=True,
                                          process_index=0, process_count=1)))
  assert batch["video"].shape == (2, 4, 16, 16, 1)


def test_polypdiag_builder_and_converter(tmp_path):
  manual = tmp_path / "PolypDiag"
  (manual / "videos").mkdir(parents=True)
  (manual / "splits").mkdir()
  lines = {"train": [], "val": []}
  for i in range(5):
    clip = synthetic.endoscopy_clip(6, i, num_frames=4, size=32)
    name = f"case_{i}"
    video_io.encode_video(manual / "videos" / f"{name}.mp4", clip["video"], 25)
    lines["train" if i < 3 else "val"].append(f"{name}{'.mp4' if i % 2 else ''} {i % 2}")
  for split, ls in lines.items():
    (manual / "splits" / f"{split}.txt").write_text("\n".join(ls) + "\n")
  builder = PolypDiag(data_dir=str(tmp_path / "tfds"), config="112")
  prepare(builder, manual)
  assert builder.info.splits["train"].num_examples == 3
  assert builder.info.splits["val"].num_examples == 2
  for ex in builder.as_data_source("val"):
    name = ex["filename"].decode()
    i = int(name[-1])
    assert ex["label"] == i % 2
    want, fps = video_io.decode_video(manual / "videos" / f"{name}.mp4", size=112)
    np.testing.assert_array_equal(ex["video"], want)
    assert ex["video"].shape == (4, 112, 112, 3) and fps == 25.0

  out = tmp_path / "shards"
  to_shards(builder, str(out), **QUIET)
  index = shards.load_index(out)
  assert index["labels"]["polyp"] == {"dtype": "int32", "num_classes": 2,
                                      "names": ["normal", "abnormal"], "per": "video"}
  assert index["splits"]["test"]["alias_of"] == "val"   # Endo-FM reports PolypDiag's val
  names = [v["name"] for v in index["splits"]["test"]["videos"]]
  assert sorted(names) == ["case_3", "case_4"]      # tfds's order (it shuffles by key)
  assert shards.read_labels(out, "test", "polyp").tolist() == \
      shards.read_labels(out, "val", "polyp").tolist() == [int(n[-1]) % 2 for n in names]
  for rec in shards.read_split(out, "train"):
    want, _ = video_io.decode_video(manual / "videos" / f"{rec['name']}.mp4", size=112)
    np.testing.assert_array_equal(rec["video"], want)


def test_missing_manual_files_give_a_clear_error(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "README").write_text("not the dataset")
  with pytest.raises(FileNotFoundError, match="(?s)FileList.csv.*echonet.github.io"):
    prepare(EchonetDynamic(data_dir=str(tmp_path / "tfds")), tmp_path / "manual")
  with pytest.raises(FileNotFoundError, match="(?s)splits/train.txt.*weakly-polyp"):
    prepare(PolypDiag(data_dir=str(tmp_path / "tfds2")), tmp_path / "manual")
