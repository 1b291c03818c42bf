"""Video files <-> uint8 frame arrays, with PyAV (the ``[video]`` extra; FFmpeg is bundled in its
wheel, no system ffmpeg needed).

    decode_video(path, size=112, channels=1) -> (frames (time, 112, 112, 1) uint8, fps)
    encode_video(path, frames, fps)           frames (time, height, width, channels) uint8 -> file

Decoding resizes inside FFmpeg (swscale, bilinear) while converting each frame, which is much
faster than resizing afterwards. A file FFmpeg cannot read, one with no video stream or no
decodable frame, or one that ends well before the frame count its header declares (a truncated
download) raises ``ValueError("corrupt video: <path> (...)")``; a missing file raises
``FileNotFoundError``. ``vidssm_jax.stream.read_video`` is the frame-at-a-time reader for
live inference; this module reads whole clips for preprocessing.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".m4v")


def _av():
  try:
    import av  # lazy: the [video] extra
  except ImportError as e:
    raise ImportError("reading or writing video files needs PyAV: "
                      "pip install 'vidssm_jax[video]'") from e
  return av


def decode_video(path: str | os.PathLike, *, size: Optional[int | tuple[int, int]] = None,
                 channels: int = 3, max_frames: Optional[int] = None
                 ) -> tuple[np.ndarray, float]:
  """Decodes every frame of ``path``.

  Args:
    path: a video file (.avi, .mp4, ...).
    size: output ``(height, width)``, or an int for square frames; None keeps the file's size.
    channels: 3 (RGB) or 1 (grey, FFmpeg's luma).
    max_frames: stop after this many frames.

  Returns:
    ``(frames, fps)``: ``frames (time, height, width, channels)`` uint8 and the stream's
    average frame rate (0.0 when the container does not declare one).
  """
  if channels not in (1, 3):
    raise ValueError(f"channels = {channels}, expected 1 (grey) or 3 (RGB)")
  av = _av()
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"video not found: {path}")
  if isinstance(size, int):
    size = (size, size)
  fmt = "gray" if channels == 1 else "rgb24"
  kwargs = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
  frames = []
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError(f"corrupt video: {path} (no video stream)")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      declared = int(stream.frames or 0)
      fps = float(stream.average_rate) if stream.average_rate else 0.0
      for frame in container.decode(stream):
        frames.append(frame.to_ndarray(format=fmt, **kwargs))
        if max_frames is not None and len(frames) >= max_frames:
          break
  except (av.error.FFmpegError, av.error.InvalidDataError) as e:
    raise ValueError(f"corrupt video: {path} ({e})") from e
  if not frames:
    raise ValueError(f"corrupt video: {path} (no decodable frame)")
  # A truncated AVI keeps its header's frame count; allow a little slack for containers that
  # round it, but a file missing more than that is incomplete.
  if max_frames is None and declared and len(frames) < declared - max(1, declared // 50):
    raise ValueError(f"corrupt video: {path} (decoded {len(frames)} of the {declared} frames "
                     "its header declares; truncated?)")
  video = np.stack(frames)
  if channels == 1:
    video = video[..., None]
  return video, fps


def encode_video(path: str | os.PathLike, frames: np.ndarray, fps: float, *,
                 codec: Optional[str] = None, crf: int = 18) -> None:
  """Writes ``frames (time, height, width, channels)`` uint8 (channels 1 or 3) to ``path``.

  ``codec`` defaults by extension: ``libx264`` (yuv420p, ``crf``) for .mp4/.mov/.mkv, ``ffv1``
  (lossless) for .avi. H.264 in yuv420p needs even heights and widths. Grey frames are written
  as grey with ffv1 (bit-exact) and expanded to RGB otherwise.
  """
  av = _av()
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.dtype != np.uint8:
    raise ValueError(f"frames have shape {frames.shape} and dtype {frames.dtype}, expected "
                     "(time, height, width, 1 or 3) uint8")
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  codec = codec or ("ffv1" if ext == ".avi" else "libx264")
  grey = frames.shape[-1] == 1
  with av.open(path, mode="w") as container:
    stream = container.add_stream(codec, rate=int(round(fps)) or 25)
    stream.height, stream.width = frames.shape[1], frames.shape[2]
    if codec == "ffv1":
      stream.pix_fmt = "gray" if grey else "bgr0"
    else:
      stream.pix_fmt = "yuv420p"
      if codec == "libx264":
        stream.options = {"crf": str(crf)}
    for f in frames:
      if grey and codec == "ffv1":
        frame = av.VideoFrame.from_ndarray(f[..., 0], format="gray")
      else:
        frame = av.VideoFrame.from_ndarray(np.repeat(f, 3, -1) if grey else f, format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
