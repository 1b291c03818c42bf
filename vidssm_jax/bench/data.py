"""Input pipeline throughput: training clips per second of ``pipeline.make_dataset``.

    python -m vidssm_jax.bench.data                  # the default table, 2–3 minutes on 2 busy cores
    python -m vidssm_jax.bench.data --clips 400 --workers 0 4 8

Rows: 16 × 224 × 224 RGB clips (synthetic endoscopy) and 32 × 112 × 112 grey clips (synthetic
echo), both at stride 2, with 0, 1 and 2 worker processes. Each row reads the training stream
(decode record, random clip, random resized crop, flip, jitter, normalise, batch) for
``--clips`` clips (default 96 at 224², 256 at 112²) after ``--warmup`` batches, which also
absorb the workers' start-up, and reports clips/s: the median over windows of 4 batches
(batches from worker processes arrive in bursts, so a per-batch median would flatter them)
and the overall rate. The shard sets are written once to ``--dir`` (a temp folder by default)
and reused.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from vidssm_jax.data import pipeline, shards

# (name, synthetic kind, clip frames, image size, source frames, source size, clips to write,
#  clips to time by default)
ROWS = (
    ("16x224x224 rgb", "endoscopy", 16, 224, 32, 224, 12, 96),
    ("32x112x112 grey", "echo", 32, 112, 72, 112, 16, 256),
)


def ensure_shards(directory: str, kind: str, num: int, frames: int, size: int) -> str:
  path = os.path.join(directory, f"{kind}_{num}x{frames}x{size}")
  if not shards.has_complete_index(path):
    shards.write_synthetic(kind, num, path, size=size, num_frames=frames, seed=0,
                           workers=min(2, os.cpu_count() or 1), progress=False)
  return path


def measure(path: str, *, num_frames: int, image_size: int, workers: int, batch_size: int,
            clips: int, warmup: int) -> tuple[float, float]:
  """``(median clips/s over windows of 4 batches, clips/s overall)`` of the training stream."""
  ds = pipeline.make_dataset(path, "train", num_frames=num_frames, stride=2,
                             image_size=image_size, batch_size=batch_size, train=True, seed=0,
                             num_workers=workers, process_index=0, process_count=1)
  it = iter(ds)
  try:
    for _ in range(warmup):
      next(it)
    window, rates = 4, []
    start = time.perf_counter()
    for _ in range(max(1, clips // (window * batch_size))):
      t = time.perf_counter()
      for _ in range(window):
        batch = next(it)
        del batch
      rates.append(window * batch_size / (time.perf_counter() - t))
    total = time.perf_counter() - start
  finally:
    if workers:
      it.close()
  return statistics.median(rates), len(rates) * window * batch_size / total


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m vidssm_jax.bench.data", description=__doc__)
  p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "vidssm_bench_data"),
                 help="where the synthetic shard sets are written (reused when complete)")
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--clips", type=int, default=None,
                 help="timed clips per row (default 96 at 224², 256 at 112²)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--warmup", type=int, default=3, help="untimed batches per row")
  a = p.parse_args(argv)

  print(f"data pipeline throughput ({os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}), batch {a.batch_size}, {a.warmup} warm-up batches per row")
  results = []
  for name, kind, frames, size, src_frames, src_size, num, clips in ROWS:
    start = time.perf_counter()
    path = ensure_shards(a.dir, kind, num, src_frames, src_size)
    print(f"  shards for {name}: {path} ({time.perf_counter() - start:.1f} s)")
    for w in a.workers:
      median, overall = measure(path, num_frames=frames, image_size=size, workers=w,
                                batch_size=a.batch_size, clips=a.clips or clips,
                                warmup=a.warmup)
      results.append((name, w, median, overall))
      print(f"  {name:18s} workers={w}: {median:7.1f} clips/s", flush=True)
  print()
  print("| clip (frames x size, channels) | workers | clips/s (median of 4-batch windows) "
        "| clips/s (overall) |")
  print("|---|---|---|---|")
  for name, w, median, overall in results:
    print(f"| {name} | {w} | {median:.1f} | {overall:.1f} |")


if __name__ == "__main__":
  main()
