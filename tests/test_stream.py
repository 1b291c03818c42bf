"""Stream API: a real .mp4 (written with PyAV) streamed frame by frame equals the clip forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from vidssm_jax.models import create_model
from vidssm_jax.stream import StreamingRunner, live_step, preprocess, read_video, unrolled

av = pytest.importorskip("av")
CFG = dict(img_size=32, patch_size=16, dim=32, depth=4)
N_FRAMES, H, W = 8, 40, 48


def _write_mp4(path, n=N_FRAMES):
  rng = np.random.default_rng(0)
  with av.open(str(path), mode="w") as container:
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    for i in range(n):
      img = np.zeros((H, W, 3), np.uint8)
      img[:, : 6 * (i + 1)] = (200, 60, 30)  # a bar that grows frame by frame
      img = np.clip(img.astype(int) + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
  path = tmp_path_factory.mktemp("video") / "clip.mp4"
  _write_mp4(path)
  return path


@pytest.fixture(scope="module")
def phase_model():
  model = create_model("endomamba_tiny", **CFG, head="phase", num_classes=5)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1, 32, 32, 3)))
  return model, variables


def test_video_file_streamed_equals_clip_forward(mp4, phase_model):
  model, variables = phase_model
  frames = np.stack(list(read_video(mp4)))
  assert frames.shape == (N_FRAMES, H, W, 3) and frames.dtype == np.uint8
  runner = StreamingRunner(model, variables, progress=False)
  streamed = np.stack(list(runner.run_video(mp4)))
  assert streamed.shape == (N_FRAMES, 5) and runner.frames_seen == N_FRAMES
  whole = jax.jit(model.apply)(variables, preprocess(jnp.asarray(frames), 32)[None])[0]
  assert rel_err(streamed, whole) <= 1e-4
  # run_video starts a new stream; run() continues the current one.
  again = np.stack(list(runner.run_video(mp4, max_frames=3)))
  np.testing.assert_allclose(again, streamed[:3], rtol=1e-5, atol=1e-6)
  more = np.stack(list(runner.run(frames[3:5])))
  assert rel_err(more, whole[3:5]) <= 1e-4


def test_preprocess_resizes_and_normalises():
  white = jnp.full((2, 40, 48, 3), 255, jnp.uint8)
  x = preprocess(white, 32)
  assert x.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(x[0, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) /
                             np.array([0.229, 0.224, 0.225]), rtol=1e-5)
  np.testing.assert_allclose(preprocess(jnp.ones((32, 32, 3)), 32), x[0], rtol=1e-5)
  with pytest.raises(ValueError, match=r"expected \(..., height, width, 3\) RGB"):
    preprocess(jnp.ones((32, 32, 4)), 32)


def test_backbone_features_and_concurrent_streams(phase_model):
  model, variables = phase_model
  backbone = model.backbone
  bvars = {"params": variables["params"]["backbone"]}
  frames = np.random.default_rng(1).integers(0, 255, (3, 2, 32, 32, 3), dtype=np.uint8)
  runner = StreamingRunner(backbone, bvars, head=lambda f: f.mean(-2), progress=False)
  out = np.stack(list(runner.run(frames)))  # 2 concurrent streams, features pooled per frame
  assert out.shape == (3, 2, 32)
  clip = preprocess(jnp.asarray(frames).transpose(1, 0, 2, 3, 4), 32)
  whole = jax.jit(backbone.apply)(bvars, clip).mean(-2)
  assert rel_err(out.transpose(1, 0, 2), whole) <= 1e-4


def test_step_compiled_for_the_weights_is_the_same_step(phase_model):
  # live_step's fold_params: the variables as constants of an unrolled program, against the
  # variables as an argument of the scanned one, over frames that carry a state.
  model, variables = phase_model
  assert unrolled(model).backbone.unroll_layers and not model.backbone.unroll_layers
  frames = jax.random.normal(jax.random.key(3), (4, 2, 32, 32, 3))
  outs = {}
  # (the last: XLA options for the step alone, passed through to its compile)
  for fold, unroll, options in ((True, None, None), (False, None, None), (True, False, None),
                                (False, True, None), (True, None, {"xla_gpu_enable_pdl": True})):
    step = live_step(model, variables, fold_params=fold, unroll_layers=unroll,
                     compiler_options=options)
    key = (fold, unroll, bool(options))
    state, outs[key] = model.init_state(2), []
    for frame in frames:
      out, state = step(frame, state)
      outs[key].append(out)
  base = np.stack(outs[False, None, False])
  assert base.shape == (4, 2, 5)
  for key, got in outs.items():
    np.testing.assert_allclose(np.stack(got), base, rtol=1e-5, atol=1e-5, err_msg=str(key))
  assert not np.allclose(base[0], base[3])  # the frames differ, and so do the outputs
  # The options do reach the step's compile: a name XLA does not know is refused there.
  unknown = live_step(model, variables, compiler_options={"no_such_xla_option": True})
  with pytest.raises(Exception, match="no_such_xla_option"):
    unknown(frames[0], model.init_state(2))


def test_bad_files_raise_clear_errors(tmp_path, phase_model):
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"this is not a video" * 50)
  with pytest.raises(ValueError, match="corrupt video: .*bad.mp4"):
    list(read_video(bad))
  with pytest.raises(FileNotFoundError, match="video not found"):
    list(read_video(tmp_path / "missing.mp4"))
  with pytest.raises(ValueError, match="has no init_state/step"):
    StreamingRunner(create_model("vit_s", **{**CFG, "num_heads": 4}), {})
