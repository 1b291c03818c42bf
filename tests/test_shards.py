"""ArrayRecord shards: bit-exact round trips, index counts, corrupt inputs, crash safety, resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vidssm_jax.data import shards, synthetic, video_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_record_round_trip_is_bit_exact():
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
  phase = rng.integers(0, 7, 5).astype(np.int32)
  mask = rng.integers(0, 2, (5, 6, 7)).astype(np.uint8)
  data = shards.encode_record(video, name="v1", fps=12.5, labels={"ef": 61.25, "polyp": 1},
                              arrays={"phase": phase, "mask": mask})
  assert data[:4] == b"VSSM"
  out = shards.decode_record(data)
  assert out["name"] == "v1" and out["fps"] == 12.5 and out["ef"] == 61.25 and out["polyp"] == 1
  for key, want in (("video", video), ("phase", phase), ("mask", mask)):
    assert out[key].dtype == want.dtype and out[key].shape == want.shape
    np.testing.assert_array_equal(out[key], want)


def test_reader_rejects_what_is_not_a_record():
  data = shards.encode_record(np.zeros((1, 2, 2, 1), np.uint8), name="x", fps=1)
  with pytest.raises(ValueError, match="not a vidssm shard record"):
    shards.decode_record(b"JUNK" + data[4:])
  with pytest.raises(ValueError, match="unsupported vidssm record version 9"):
    shards.decode_record(data[:4] + (9).to_bytes(2, "little") + data[6:])
  with pytest.raises(ValueError, match="unexpected bytes"):
    shards.decode_record(data + b"\0")
  with pytest.raises(ValueError, match=r"expected \(time, height, width, channels\) uint8"):
    shards.encode_record(np.zeros((2, 2, 1), np.uint8), name="x", fps=1)


@pytest.mark.parametrize("kind", ["echo", "endoscopy"])
def test_synthetic_shards_round_trip_and_index_counts(kind, tmp_path):
  num, frames, size = 11, 6, 16
  summary = shards.write_synthetic(kind, num, tmp_path, size=size, num_frames=frames, seed=3,
                                   shard_size=3, progress=False, log=lambda s: None)
  assert shards.has_complete_index(tmp_path, verify=True)
  index = shards.load_index(tmp_path)
  counts = shards.split_counts(num)
  assert [index["splits"][s]["num_videos"] for s in shards.SPLITS] == counts
  assert summary["videos"] == dict(zip(shards.SPLITS, counts)) and summary["skipped"] == 0
  assert index["frame_shape"] == [size, size, 1 if kind == "echo" else 3]
  i = 0
  for split in shards.SPLITS:
    info = index["splits"][split]
    assert sum(s["num_records"] for s in info["shards"]) == info["num_videos"]
    assert len(info["shards"]) == -(-info["num_videos"] // 3)
    for rec in shards.read_split(tmp_path, split):
      want = synthetic.generate(kind, 3, i, frames, size)
      np.testing.assert_array_equal(rec["video"], want["video"])
      if kind == "echo":
        assert abs(rec["ef"] - want["ef"]) < 1e-4
      else:
        np.testing.assert_array_equal(rec["mask"], want["mask"])
        np.testing.assert_array_equal(rec["phase"], want["phase"])
        assert rec["polyp"] == want["polyp"]
      i += 1
  assert i == num
  key = "ef" if kind == "echo" else "polyp"
  labels = shards.read_labels(tmp_path, "test", key)
  assert labels.shape == (counts[2],)
  assert labels.dtype == (np.float32 if kind == "echo" else np.int32)
  if kind == "endoscopy":
    with pytest.raises(ValueError, match="'phase' is not a video-level label"):
      shards.read_labels(tmp_path, "test", "phase")


def _write_videos(folder, clips):
  rows = []
  for i, (name, ext) in enumerate(clips):
    clip = synthetic.echo_clip(9, i, num_frames=8, size=16)
    video_io.encode_video(os.path.join(folder, name + ext), clip["video"], 20)
    rows.append({"FileName": name, "EF": f"{clip['ef']:.3f}", "FPS": 20,
                 "Split": "TRAIN" if i % 2 == 0 else "VAL"})
  return rows


def test_corrupt_videos_are_skipped_by_name_and_every_other_video_lands(tmp_path, capsys):
  videos = tmp_path / "videos"
  videos.mkdir()
  rows = _write_videos(videos, [("a", ".avi"), ("b", ".mp4"), ("c", ".avi"), ("d", ".mp4"),
                                ("e", ".avi")])
  (videos / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
  whole = (videos / "e.avi").read_bytes()
  (videos / "trunc.avi").write_bytes(whole[:len(whole) // 2])
  rows += [{"FileName": "bad", "EF": "50", "FPS": 20, "Split": "TRAIN"},
           {"FileName": "trunc.avi", "EF": "40", "FPS": 20, "Split": "VAL"},
           {"FileName": "absent", "EF": "40", "FPS": 20, "Split": "VAL"}]
  with open(tmp_path / "labels.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  out = tmp_path / "shards"
  rc = shards.main(["--videos", str(videos), "--labels", str(tmp_path / "labels.csv"),
                    "--out", str(out), "--size", "16", "--channels", "1", "--no-progress"])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "skipped" in printed and "bad.mp4" in printed and "trunc.avi" in printed
  assert "skipped 2" in printed and "absent" in printed
  index = shards.load_index(out)
  assert {s["name"] for s in index["skipped"]} == {"bad", "trunc"}
  assert index["summary"]["skipped"] == 2
  assert list(index["labels"]) == ["ef"]       # FPS is metadata, Split the split
  landed = {split: [r["name"] for r in shards.read_split(out, split)] for split in ("train", "val")}
  assert landed == {"train": ["a", "c", "e"], "val": ["b", "d"]}
  for split in landed:
    for rec in shards.read_split(out, split):
      want, _ = video_io.decode_video(videos / (rec["name"] + (".avi" if rec["name"] in "ace"
                                                                 else ".mp4")), channels=1)
      np.testing.assert_array_equal(rec["video"], want)
      if rec["name"] in "ace":  # ffv1 in .avi is lossless: the synthetic clip itself
        clip = synthetic.echo_clip(9, "abcde".index(rec["name"]), num_frames=8, size=16)
        np.testing.assert_array_equal(rec["video"], clip["video"])
  ef = {r["FileName"]: float(r["EF"]) for r in rows}
  np.testing.assert_allclose(shards.read_labels(out, "val", "ef"), [ef["b"], ef["d"]], rtol=1e-6)


def _unfinished_files(directory):
  """Files in ``directory`` that would pass for data: shards the checks accept."""
  return [f for f in os.listdir(directory) if f.endswith(".array_record")
          and shards.shard_is_complete(os.path.join(directory, f))]


def test_killed_writer_leaves_nothing_that_looks_complete_and_rerun_resumes(tmp_path):
  out = tmp_path / "echo"
  args = ["--synthetic", "echo", "--num", "10", "--out", str(out), "--size", "112",
          "--frames", "48", "--shard-size", "2", "--no-progress"]
  proc = subprocess.Popen([sys.executable, "-m", "vidssm_jax.data.shards"] + args, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while time.time() < deadline and not any(f.endswith(".json") for f in
                                           (os.listdir(out) if out.exists() else [])):
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  files = os.listdir(out)
  assert "index.json" not in files, "the writer finished before it was killed"
  assert not shards.has_complete_index(out)
  complete = _unfinished_files(out)
  total = 4 + 1 + 1   # 10 clips: 7 train (4 shards of 2), 2 val, 1 test
  assert 1 <= len(complete) < total, files
  for f in files:   # every shard file is either complete (with its marker) or a .tmp
    if f.endswith(".array_record"):
      assert f in complete
    elif f.endswith(".tmp"):
      assert not shards.shard_is_complete(os.path.join(out, f))

  summary = shards.write_synthetic("echo", 10, out, size=112, num_frames=48, seed=0,
                                   shard_size=2, progress=False, log=lambda s: None)
  assert summary["reused_shards"] == len(complete)
  assert summary["written_shards"] == total - len(complete)
  assert shards.has_complete_index(out, verify=True)
  assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
  names = [r["name"] for s in shards.SPLITS for r in shards.read_split(out, s)]
  assert names == [f"echo_{i:06d}" for i in range(10)]
  # bit for bit what the generator makes (spot checks: first and last clip)
  first = next(iter(shards.read_split(out, "train")))
  np.testing.assert_array_equal(first["video"], synthetic.echo_clip(0, 0, 48, 112)["video"])
  last = list(shards.read_split(out, "test"))[-1]
  np.testing.assert_array_equal(last["video"], synthetic.echo_clip(0, 9, 48, 112)["video"])


def test_half_written_tmp_and_unmarked_shards_are_not_accepted(tmp_path):
  log = lambda s: None
  shards.write_synthetic("echo", 6, tmp_path, size=8, num_frames=4, shard_size=2,
                         progress=False, log=log)
  index = shards.load_index(tmp_path)
  first = os.path.join(tmp_path, index["splits"]["train"]["shards"][0]["file"])
  # Simulate a crash mid-shard: the shard is gone, a half file lies under .tmp, and the index
  # (written last) is missing.
  data = open(first, "rb").read()
  os.remove(first)
  os.remove(os.path.join(tmp_path, "index.json"))
  with open(first + ".tmp", "wb") as f:
    f.write(data[:len(data) // 2])
  assert not shards.has_complete_index(tmp_path)
  assert not shards.shard_is_complete(first + ".tmp")
  # A whole-looking shard without its completion marker is not accepted either.
  with open(first, "wb") as f:
    f.write(data)
  os.remove(first + ".json")
  assert not shards.shard_is_complete(first)
  # A truncated shard with a stale marker fails the size check.
  second = os.path.join(tmp_path, index["splits"]["train"]["shards"][1]["file"])
  with open(second, "r+b") as f:
    f.truncate(100)
  assert not shards.shard_is_complete(second)

  summary = shards.write_synthetic("echo", 6, tmp_path, size=8, num_frames=4, shard_size=2,
                                   progress=False, log=log)
  assert summary["written_shards"] == 2 and summary["reused_shards"] == 2
  assert shards.has_complete_index(tmp_path, verify=True)
  assert shards.load_index(tmp_path)["splits"] == index["splits"]   # same bytes, same sums
  # Re-running a finished command is a no-op; a different command rewrites the set.
  assert shards.write_synthetic("echo", 6, tmp_path, size=8, num_frames=4, shard_size=2,
                                progress=False, log=log)["written_shards"] == 0
  shards.write_synthetic("echo", 4, tmp_path, size=8, num_frames=4, shard_size=4,
                         progress=False, log=log)
  assert shards.has_complete_index(tmp_path)
  left = sorted(f for f in os.listdir(tmp_path) if f.endswith(".array_record"))
  assert left == ["test-00000-of-00001.array_record", "train-00000-of-00001.array_record",
                  "val-00000-of-00001.array_record"]


def test_cli_errors_are_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit):
    shards.main(["--videos", str(tmp_path), "--out", str(tmp_path / "o")])
  assert "--videos needs --labels" in capsys.readouterr().err
  (tmp_path / "l.csv").write_text("Video,EF\n")
  assert shards.main(["--videos", str(tmp_path), "--labels", str(tmp_path / "l.csv"),
                      "--out", str(tmp_path / "o")]) == 2
  assert "has no rows" in capsys.readouterr().err
  (tmp_path / "l.csv").write_text("Clip,EF\nx,3\n")
  assert shards.main(["--videos", str(tmp_path), "--labels", str(tmp_path / "l.csv"),
                      "--out", str(tmp_path / "o")]) == 2
  assert "no file-name column" in capsys.readouterr().err


def test_index_json_records_what_a_model_needs(tmp_path):
  shards.write_synthetic("endoscopy", 3, tmp_path, size=8, num_frames=4, progress=False,
                         log=lambda s: None)
  index = json.load(open(tmp_path / "index.json"))
  assert index["channels"] == 3 and index["fps"] == synthetic.ENDOSCOPY_FPS
  assert index["normalization"]["mean"] == list(shards.IMAGENET_MEAN)
  assert index["labels"]["phase"]["num_classes"] == synthetic.NUM_PHASES
  assert index["labels"]["mask"]["per"] == "pixel"
  assert all(len(s["sha256"]) == 64 for s in index["splits"]["train"]["shards"])
  from vidssm_jax.nn.video import IMAGENET_MEAN, IMAGENET_STD
  assert shards.IMAGENET_MEAN == IMAGENET_MEAN and shards.IMAGENET_STD == IMAGENET_STD


# ------------------------------------------------------------------------------------------
# ensure_synthetic: where a synthetic preset may write
# ------------------------------------------------------------------------------------------

_SYN = dict(size=16, num_frames=4, seed=1, progress=False, log=lambda s: None)


def _listing(d):
  return sorted((f, os.path.getsize(os.path.join(d, f))) for f in os.listdir(d))


def test_ensure_synthetic_writes_a_new_or_empty_folder_and_then_reuses_it(tmp_path):
  new = tmp_path / "new" / "deeper"
  summary = shards.ensure_synthetic(str(new), "endoscopy", 12, **_SYN)
  assert summary["written_shards"] == 3 and shards.has_complete_index(new, verify=True)
  assert sum(summary["videos"].values()) == 12
  before = _listing(new)
  assert shards.ensure_synthetic(str(new), "endoscopy", 12, **_SYN) is None
  assert _listing(new) == before
  empty = tmp_path / "empty"
  empty.mkdir()
  assert shards.ensure_synthetic(str(empty), "echo", 5, **_SYN)["videos"]["train"] == 3


def test_ensure_synthetic_rewrites_synthetic_shards_of_other_settings(tmp_path):
  shards.ensure_synthetic(str(tmp_path), "endoscopy", 12, **_SYN)
  summary = shards.ensure_synthetic(str(tmp_path), "endoscopy", 30, **_SYN)
  assert sum(summary["videos"].values()) == 30
  assert shards.load_index(tmp_path)["splits"]["test"]["num_videos"] == 5
  assert shards.read_labels(tmp_path, "train", "polyp").shape == (21,)
  summary = shards.ensure_synthetic(str(tmp_path), "echo", 6, **_SYN)
  assert shards.load_index(tmp_path)["settings"]["synthetic"] == "echo"
  assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".array_record")) == [
      "test-00000-of-00001.array_record", "train-00000-of-00001.array_record",
      "val-00000-of-00001.array_record"]


def test_ensure_synthetic_resumes_a_killed_synthetic_write(tmp_path):
  shards.ensure_synthetic(str(tmp_path), "endoscopy", 9, **_SYN)
  os.remove(tmp_path / "index.json")                               # killed before the index,
  os.remove(tmp_path / "test-00000-of-00001.array_record.json")    # before a marker,
  (tmp_path / "extra-00000-of-00001.array_record.tmp").write_bytes(b"half a shard")  # mid-shard
  summary = shards.ensure_synthetic(str(tmp_path), "endoscopy", 9, **_SYN)
  assert (summary["reused_shards"], summary["written_shards"]) == (2, 1)
  assert shards.has_complete_index(tmp_path, verify=True)


def test_ensure_synthetic_never_writes_into_a_folder_of_other_things(tmp_path):
  videos = tmp_path / "videos"
  videos.mkdir()
  (videos / "case01.mp4").write_bytes(b"\0" * 100)
  (videos / "labels.csv").write_text("FileName,EF\ncase01,60\n")
  with pytest.raises(ValueError, match=r"holds files that are not synthetic shards "
                                       r"\(case01\.mp4, labels\.csv\)") as e:
    shards.ensure_synthetic(str(videos), "echo", 5, **_SYN)
  assert "\n" not in str(e.value) and sorted(os.listdir(videos)) == ["case01.mp4", "labels.csv"]
  # Real shards whose index is not written yet (a conversion still running) are not ours either.
  real = tmp_path / "real"
  build = lambda job: {"video": np.zeros((2, 8, 8, 3), np.uint8), "fps": 10.0,
                       "labels": {"polyp": 0}}
  jobs = {"train": [{"name": "patient_a"}, {"name": "patient_b"}], "val": [{"name": "patient_c"}]}
  shards.write_dataset(str(real), jobs, build, name="mine", channels=3, label_schema={},
                       settings={}, progress=False, log=lambda s: None)
  os.remove(real / "index.json")
  before = _listing(real)
  with pytest.raises(ValueError, match="train-00000-of-00001.array_record.json"):
    shards.ensure_synthetic(str(real), "endoscopy", 5, **_SYN)
  assert _listing(real) == before
  with pytest.raises(ValueError, match="is a file"):
    shards.ensure_synthetic(str(videos / "labels.csv"), "echo", 5, **_SYN)


def test_ensure_synthetic_reads_a_complete_real_dataset_as_it_is(tmp_path):
  build = lambda job: {"video": np.zeros((2, 8, 8, 3), np.uint8), "fps": 10.0,
                       "labels": {"polyp": 1}}
  jobs = {s: [{"name": f"{s}_video"}] for s in shards.SPLITS}
  shards.write_dataset(str(tmp_path), jobs, build, name="mine", channels=3, label_schema={},
                       settings={}, progress=False, log=lambda s: None)
  (tmp_path / "README.txt").write_text("my data")
  before = _listing(tmp_path)
  assert shards.ensure_synthetic(str(tmp_path), "endoscopy", 50, **_SYN) is None
  assert _listing(tmp_path) == before
