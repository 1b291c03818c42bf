"""Live-stream inference: run a video file or an iterator of frames (an endoscope feed) through a
streaming model one frame at a time, with one jitted step.

    from vidssm_jax.models import create_model
    from vidssm_jax.stream import StreamingRunner

    model = create_model("endomamba_small", head="phase", num_classes=7)
    runner = StreamingRunner(model, variables)
    for logits in runner.run_video("case01.mp4"):     # (7,) per frame, as soon as it arrives
        ...
    for logits in runner.run(camera_frames()):        # any iterable of (H, W, 3) RGB frames
        ...

The model is anything with ``init_state(batch)`` and ``step(frame, state)``: the EndoMamba
backbone (features ``(tokens, dim)`` a frame) or a backbone with the phase head (logits ``(K,)``).
Frames of any size are resized (bilinear) to the model's ``img_size`` and normalised with the
ImageNet mean and std inside the jitted step. Each step costs the same whatever came before.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vidssm_jax.nn.video import IMAGENET_MEAN, IMAGENET_STD

Array = jax.Array


def preprocess(frames: Array, img_size: int) -> Array:
  """RGB ``frames (..., H, W, 3)`` (uint8 in [0, 255] or float in [0, 1]) ->
  ``(..., img_size, img_size, 3)`` float32, resized bilinearly and ImageNet-normalised."""
  if frames.ndim < 3 or frames.shape[-1] != 3:
    raise ValueError(f"preprocess: frames have shape {tuple(frames.shape)}, expected "
                     "(..., height, width, 3) RGB")
  x = frames.astype(jnp.float32)
  if jnp.issubdtype(frames.dtype, jnp.integer):
    x = x / 255.0
  if frames.shape[-3:-1] != (img_size, img_size):
    x = jax.image.resize(x, (*frames.shape[:-3], img_size, img_size, 3), "bilinear")
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def read_video(path: str | os.PathLike, *, max_frames: Optional[int] = None) -> Iterator[np.ndarray]:
  """Decodes ``path`` with PyAV, yielding RGB frames ``(H, W, 3)`` uint8 in order.

  Raises ``FileNotFoundError`` for a missing file and ``ValueError("corrupt video: <path>")``
  when FFmpeg cannot read it.
  """
  try:
    import av  # lazy: the [video] extra
  except ImportError as e:
    raise ImportError("reading video files needs PyAV: pip install 'vidssm_jax[video]'") from e
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"video not found: {path}")
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError(f"corrupt video: {path} (no video stream)")
      stream = container.streams.video[0]
      for i, frame in enumerate(container.decode(stream)):
        if max_frames is not None and i >= max_frames:
          return
        yield frame.to_ndarray(format="rgb24")
  except (av.error.FFmpegError, av.error.InvalidDataError) as e:
    raise ValueError(f"corrupt video: {path} ({e})") from e


def count_frames(path: str | os.PathLike) -> Optional[int]:
  """The frame count the container declares, or None (used for the progress bar)."""
  import av
  try:
    with av.open(os.fspath(path)) as container:
      return container.streams.video[0].frames or None
  except (av.error.FFmpegError, IndexError):
    return None


def unrolled(model):
  """``model`` with its block stacks as straight-line code (``EndoMamba.unroll_layers``), the
  backbone of a model with a head included; any other model as it is."""
  if hasattr(model, "unroll_layers"):
    return model.clone(unroll_layers=True)
  backbone = getattr(model, "backbone", None)
  if backbone is not None and hasattr(backbone, "unroll_layers"):
    return model.clone(backbone=backbone.clone(unroll_layers=True, parent=None))
  return model


def live_step(model, variables, *, head: Optional[Callable[[Array], Array]] = None,
              prepare: Optional[Callable[[Array], Array]] = None, fold_params: bool = True,
              unroll_layers: Optional[bool] = None, compiler_options: Optional[dict] = None):
  """One live frame of ``model`` as one jitted program: ``step(frames, state) -> (out, state)``,
  ``prepare`` (e.g. resizing) before the model's ``step`` and ``head`` after it; the state is
  donated (updated in place) on GPU and TPU.

  ``fold_params`` (ours, the default): the step is compiled for these ``variables``: they enter
  the program as constants and the block stacks are unrolled (``unrolled``), so XLA folds every
  expression of the parameters alone (the bfloat16 casts of the weights, the two directions'
  concatenated conv and scan parameters, ``-exp(A_log)``) out of the frame, and the host hands
  the program only the frame and the state. The same outputs (the same arithmetic, up to the
  order XLA picks); a longer compile (8 against 3 s for EndoMamba-S on an H100) and a copy of the
  parameters inside the executable. Measured on one H100 (EndoMamba-S, bf16, batch 1, one run):
  synced frame 1.689 ms as before -> 1.528 constants only -> 1.458 unrolled only -> 1.283 both;
  60 frames back to back 1.251 -> 1.178 -> 1.048 -> 0.973 ms a frame. ``False``: the variables
  are an argument of the jitted step (new weights need no new compile), which the returned
  function passes on every call. ``unroll_layers``: unroll the
  stacks or not whatever ``fold_params`` says (``None``: as ``fold_params``; for ablations).
  ``compiler_options``: XLA options for this program alone (``jax.jit``'s), e.g.
  ``{"xla_gpu_enable_pdl": True}``; the names are XLA's ``DebugOptions`` fields of the backend.
  """
  donate = jax.default_backend() != "cpu"  # donation is not implemented on CPU
  prepare = prepare or (lambda frames: frames)
  head = head or (lambda out: out)
  unroll = fold_params if unroll_layers is None else unroll_layers
  net = unrolled(model) if unroll else model

  def step(variables, frames, state):
    out, state = net.apply(variables, prepare(frames), state, method="step")
    return head(out), state

  if fold_params:
    return jax.jit(lambda frames, state: step(variables, frames, state),
                   donate_argnums=(1,) if donate else (), compiler_options=compiler_options)
  jitted = jax.jit(step, donate_argnums=(2,) if donate else (), compiler_options=compiler_options)
  return lambda frames, state: jitted(variables, frames, state)


class StreamingRunner:
  """Runs frames through ``model`` one at a time with a jitted ``step``, carrying the state.

  Args:
    model: a module with ``init_state(batch)`` and ``step(frame, state)`` (EndoMamba, or
      ``create_model(..., head="phase")``) and ``img_size``.
    variables: its variables (``{"params": ...}``).
    head: optional function applied to each step's output inside the jitted step
      (e.g. ``lambda f: phase_head.apply(head_vars, f)`` or ``jax.nn.softmax``).
    progress: show a ``tqdm`` progress bar.
    fold_params: compile the step for these ``variables`` (``live_step``; the default).

  ``run(frames)`` yields one output per frame: for frames ``(H, W, 3)`` the output of a single
  stream (e.g. ``(K,)`` logits), for ``(b, H, W, 3)`` the outputs of ``b`` concurrent streams.
  The state carries over between ``run`` calls unless ``reset=True``; ``reset()`` starts over.
  """

  def __init__(self, model, variables, *, head: Optional[Callable[[Array], Array]] = None,
               progress: bool = True, fold_params: bool = True):
    if not (hasattr(model, "init_state") and hasattr(model, "step")):
      raise ValueError(f"StreamingRunner: {type(model).__name__} has no init_state/step; use an "
                       "EndoMamba backbone or a model built with head='phase'")
    self.model, self.progress = model, progress
    self.img_size = getattr(model, "img_size", None) or model.backbone.img_size
    self.state = None
    self._step = live_step(model, variables, head=head, fold_params=fold_params,
                           prepare=lambda frames: preprocess(frames, self.img_size))

  def reset(self) -> None:
    self.state = None

  @property
  def frames_seen(self) -> int:
    """Frames consumed so far by stream 0 (the next frame's index)."""
    return 0 if self.state is None else int(self.state["frame"][0])

  def run(self, frames: Iterable[Any], *, reset: bool = False, total: Optional[int] = None
          ) -> Iterator[np.ndarray]:
    """Yields the prediction for each frame of ``frames`` as soon as it is computed."""
    from tqdm.auto import tqdm

    if reset:
      self.reset()
    for frame in tqdm(frames, total=total, disable=not self.progress, unit="frame"):
      frame = jnp.asarray(frame)
      single = frame.ndim == 3
      batch = frame[None] if single else frame
      if batch.ndim != 4:
        raise ValueError(f"StreamingRunner: a frame has shape {tuple(frame.shape)}, expected "
                         "(height, width, 3) or (streams, height, width, 3)")
      if self.state is None:
        self.state = self.model.init_state(batch.shape[0])
      out, self.state = self._step(batch, self.state)
      out = np.asarray(out)
      yield out[0] if single else out

  def run_video(self, path: str | os.PathLike, *, max_frames: Optional[int] = None,
                reset: bool = True) -> Iterator[np.ndarray]:
    """Decodes ``path`` (PyAV) and yields one prediction per frame (see ``run``)."""
    total = count_frames(path) if self.progress else None
    if total is not None and max_frames is not None:
      total = min(total, max_frames)
    yield from self.run(read_video(path, max_frames=max_frames), reset=reset, total=total)


def run_from_config(config, video: Optional[str], output: Optional[str], *, workdir: str) -> str:
  """``python -m vidssm_jax.main --mode=stream``: streams ``video`` through the fine-tuned model
  of ``workdir`` (its best, else latest, fine-tuning checkpoint) one frame at a time and writes
  one CSV row per frame: ``frame, prediction, prob_<class>...``. Returns the CSV path.

  The config must describe a per-frame model (``finetune.head = "phase"``, e.g.
  ``configs/endomamba_cholec80.py``); class names come from ``finetune.class_names`` if set.
  """
  import csv

  from vidssm_jax.models import create_model
  from vidssm_jax.train.checkpoint import Checkpointer

  f = config.finetune
  if f.get("head") != "phase":
    raise ValueError(f"mode=stream needs a per-frame model (finetune.head='phase', e.g. "
                     f"configs/endomamba_cholec80.py); this config has head={f.get('head')!r}")
  if not video:
    raise ValueError("mode=stream needs --video=PATH (a video file to stream)")
  if not os.path.exists(video):
    raise FileNotFoundError(f"video not found: {video}")
  ckpt_dir = os.path.join(workdir, "finetune", "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no fine-tuning checkpoints in {ckpt_dir}; run mode=finetune with "
                            "this --workdir first")
  ckpt = Checkpointer(ckpt_dir, best_metric=f.get("select_metric"),
                      best_mode=f.get("select_mode", "max"), async_save=False)
  has_best = ckpt.best is not None and ckpt.best.best_step() is not None
  use_ema = bool(config.evaluate.get("use_ema") and f.get("ema_decay"))
  params = ckpt.restore_params(which="best" if has_best else "latest", use_ema=use_ema)
  ckpt.close()

  kwargs = dict(config.model)
  if isinstance(kwargs.get("dtype"), str):
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  model = create_model(config.model_name, head="phase", num_classes=int(f.num_classes), **kwargs)
  runner = StreamingRunner(model, {"params": params}, head=jax.nn.softmax)
  names = list(f.get("class_names") or [str(k) for k in range(int(f.num_classes))])
  output = output or os.path.join(workdir, os.path.splitext(os.path.basename(video))[0] + ".csv")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "w", newline="") as fh:
    writer = csv.writer(fh)
    writer.writerow(["frame", "prediction"] + [f"prob_{n}" for n in names])
    for i, probs in enumerate(runner.run_video(video)):
      writer.writerow([i, names[int(np.argmax(probs))]] + [f"{p:.6f}" for p in probs])
  print(f"stream: {runner.frames_seen} frames of {video} -> {output}")
  return output
