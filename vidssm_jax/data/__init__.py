"""The data layer: video files or generators -> ArrayRecord shards -> grain batches.

    synthetic.py   echo (EF) and endoscopy (polyp, per-frame phase and mask) clip generators,
                   deterministic per (seed, index): the embedded default data
    video_io.py    PyAV decode (resized in FFmpeg) and encode of whole clips
    shards.py      one record per video + index.json; the writer CLI
                   (``python -m vidssm_jax.data.shards``), crash-safe and resumable
    pipeline.py    ``make_dataset``: grain clip sampling, augmentation, normalisation,
                   batching, per-host sharding, checkpointable iterator state
    tfds/          tensorflow-datasets builders (EchoNet-Dynamic, PolypDiag; manual download)
                   and a tfds -> shards converter

Submodules are imported on use (``from vidssm_jax.data import pipeline, shards``), so the
shard writer does not pull in grain or JAX.
"""
