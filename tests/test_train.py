"""Training system end to end: the CLI, 1 vs 8 devices, resume after SIGKILL, the demo,
bad-input errors, optimizer masks and the frozen teacher."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVIM3 = os.path.join(REPO, "configs", "evim3.py")

# A very small demo: 48 synthetic clips of 8 frames at 16 × 16 (a 2 × 4 × 4 token grid, STC
# chains of 2 × 2 × 2 tokens: 3 of the 4 chains masked), a few steps of each stage.
TINY = [
    "--config.data.synthetic_num=48", "--config.data.num_frames=8", "--config.data.stride=1",
    "--config.data.image_size=16", "--config.model.num_frames=8", "--config.model.img_size=16",
    "--config.pretrain.batch_size=8", "--config.finetune.batch_size=8",
    "--config.pretrain.mask.space_chain=2",
    "--config.log_every=1", "--config.checkpoint.async_save=False",
]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the runs of this module (shared by both xdist
  workers): a run of a config already compiled skips the ~20 s compile of its training step.
  Set in the environment the runs inherit (this process's jax was configured at import)."""
  patch = pytest.MonkeyPatch()
  patch.setenv("JAX_COMPILATION_CACHE_DIR",
               str(tmp_path_factory.getbasetemp().parent / "jax_compile_cache"))
  patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  yield
  patch.undo()


def run_main(args, workdir, *, devices=1, timeout=600, check=True, env_extra=None):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.update(env_extra or {})
  cmd = [sys.executable, "-m", "vidssm_jax.main", f"--workdir={workdir}"] + args
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-5000:]}")
  return proc


def losses(stage_dir):
  from vidssm_jax.train.loop import read_metrics
  return {r["step"]: r["loss"] for r in read_metrics(stage_dir) if "loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("echo_shards"))


def test_one_and_eight_devices_give_the_same_losses(data_dir, tmp_path):
  # (tests/test_sharded_scan.py checks the same with the fused Pallas backend under shard_map.)
  args = [f"--config={EVIM3}:demo", f"--config.data.dir={data_dir}", "--mode=pretrain",
          "--config.pretrain.steps=5"] + TINY
  run_main(args + ["--config.mesh.data=1"], tmp_path / "one", devices=1)
  run_main(args + ["--config.mesh.data=4", "--config.mesh.fsdp=2"], tmp_path / "eight", devices=8)
  one, eight = losses(tmp_path / "one" / "pretrain"), losses(tmp_path / "eight" / "pretrain")
  assert sorted(one) == [1, 2, 3, 4, 5] and sorted(eight) == sorted(one)
  assert all(loss > 0.1 for loss in one.values()), one  # masked patches are predicted
  for step in one:
    assert abs(one[step] - eight[step]) <= 1e-5 * abs(one[step]), (step, one[step], eight[step])


def test_resume_after_sigkill_repeats_the_same_losses(data_dir, tmp_path):
  # Also: the scan backend and remat chosen on the command line.
  args = [f"--config={EVIM3}:demo", f"--config.data.dir={data_dir}", "--mode=pretrain",
          "--config.pretrain.steps=8", "--config.checkpoint.every=3",
          "--config.model.scan_backend=associative", "--config.model.remat=full"] + TINY
  run_main(args, tmp_path / "straight")
  straight = losses(tmp_path / "straight" / "pretrain")

  # Start the same run, kill it hard once step 5 is logged (after the step-3 checkpoint).
  workdir = tmp_path / "killed"
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "vidssm_jax.main", f"--workdir={workdir}"] + args,
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and 5 not in losses(workdir / "pretrain"):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 5 in losses(workdir / "pretrain"), "the run never reached step 5"
  ckpts = os.listdir(workdir / "pretrain" / "checkpoints" / "latest")
  assert "3" in ckpts, ckpts

  run_main(args, workdir)  # resumes from step 3
  from vidssm_jax.train.loop import read_metrics
  records = [r for r in read_metrics(workdir / "pretrain") if "loss" in r]
  resumed = {r["step"]: r["loss"] for r in records[[r["step"] for r in records].index(5) + 1:]}
  assert sorted(resumed) == [4, 5, 6, 7, 8]
  for step, loss in resumed.items():
    assert abs(loss - straight[step]) <= 1e-5 * abs(straight[step]), (step, loss, straight[step])


def test_demo_end_to_end_beats_the_mean_baseline(tmp_path):
  data = tmp_path / "data"
  # The demo config with fewer clips and pretraining steps (the full demo is timed by hand).
  proc = run_main([f"--config={EVIM3}:demo", f"--config.data.dir={data}",
                   "--config.pretrain.steps=10", "--config.pretrain.image_every=10",
                   "--config.data.synthetic_num=240"],
                  tmp_path / "demo", timeout=900)
  result = json.load(open(tmp_path / "demo" / "metrics.json"))
  assert "vs predict-the-mean baseline" in proc.stdout
  assert result["test/mae"] < 0.8 * result["test/baseline_mean_mae"], result


def test_stream_mode_writes_per_frame_predictions_of_the_finetuned_model(tmp_path):
  """mode=finetune for two steps on synthetic Cholec80-like clips, then mode=stream on an mp4:
  one CSV row per frame, probabilities over the seven named phases, prediction = their argmax."""
  from vidssm_jax.data import synthetic, video_io
  cholec = os.path.join(REPO, "configs", "endomamba_cholec80.py")
  args = [f"--config={cholec}:synthetic", f"--config.data.dir={tmp_path / 'data'}"]
  run_main(args + ["--mode=finetune", "--config.finetune.steps=2", "--config.finetune.eval_every=2",
                   "--config.data.synthetic_num=12", "--config.finetune.batch_size=2",
                   "--config.checkpoint.async_save=False"], tmp_path / "w")
  clip = synthetic.endoscopy_clip(1, 0, num_frames=9, size=48)
  video_io.encode_video(tmp_path / "case.mp4", clip["video"], fps=25)
  proc = run_main(args + ["--mode=stream", f"--video={tmp_path / 'case.mp4'}",
                          f"--output={tmp_path / 'out.csv'}"], tmp_path / "w")
  assert "stream: 9 frames" in proc.stdout
  rows = [line.split(",") for line in open(tmp_path / "out.csv").read().splitlines()]
  header, rows = rows[0], rows[1:]
  names = [h[len("prob_"):] for h in header[2:]]
  assert header[:2] == ["frame", "prediction"] and len(names) == 7 and "Preparation" in names
  assert [int(r[0]) for r in rows] == list(range(9))
  for r in rows:
    probs = np.array([float(v) for v in r[2:]])
    assert abs(probs.sum() - 1) < 1e-4 and r[1] == names[int(np.argmax(probs))], r


@pytest.mark.parametrize("override,message", [
    (["--config.model_name=no_such_model"], "unknown model 'no_such_model'"),
    (["--config.finetune.task=dance"], "unknown fine-tuning task 'dance'"),
    (["--config.pretrain.batch_size=7", "--config.mesh.data=2"], "pretrain.batch_size = 7 is not divisible"),
    (["--config.data.synthetic=", "--config.data.dir=/nonexistent/shards"], "data.dir '/nonexistent/shards' does not exist"),
    (["--config.model.scan_backend=fastest"], "scan_backend 'fastest' is not one of"),
    (["--config.model.remat=some"], "model.remat 'some' is not one of"),
])
def test_bad_config_is_one_clear_line_and_writes_nothing(override, message, tmp_path):
  workdir = tmp_path / "w"
  proc = run_main([f"--config={EVIM3}:demo", f"--config.data.dir={tmp_path / 'd'}"] + TINY
                  + override, workdir, check=False, devices=2)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (workdir / "pretrain").exists() and not (workdir / "finetune").exists()


def test_unknown_config_field_is_rejected(tmp_path):
  proc = run_main([f"--config={EVIM3}:demo", "--config.pretrain.stepz=3"], tmp_path / "w",
                  check=False)
  assert proc.returncode != 0 and "stepz" in proc.stderr
  assert not (tmp_path / "w").exists()


def test_layer_decay_on_the_real_endomamba_tree_with_a_head():
  """The fine-tuning model of configs/endomamba_polypdiag.py (EndoMamba + clip head, stacked
  spatial and temporal blocks): block i gets decay**(depth - i), embeddings decay**(depth + 1),
  the head 1; through the optimizer, on the real parameter tree."""
  import flax.linen as nn
  import jax.numpy as jnp
  from ml_collections import config_flags  # noqa: F401  (configs load as files)
  import importlib.util
  from vidssm_jax.train import experiment
  from vidssm_jax.train.state import decay_mask, layer_decay_scales, make_optimizer

  spec = importlib.util.spec_from_file_location(
      "polyp", os.path.join(REPO, "configs", "endomamba_polypdiag.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("")
  config.finetune.layer_decay = 0.75
  model = experiment.build_model(config, "finetune")
  assert model.num_layers == 24 and model.layer_groups == {
      ("backbone", "spatial_blocks"): 0, ("backbone", "temporal_blocks"): 12}
  video = jax.ShapeDtypeStruct((1, 2, 224, 224, 3), jnp.float32)
  params = nn.meta.unbox(jax.eval_shape(lambda v: model.init(jax.random.key(0), v), video))
  params = params["params"]
  scales = layer_decay_scales(params, model.layer_groups, model.num_layers, 0.75)
  bb = scales["backbone"]
  spatial = np.asarray(bb["spatial_blocks"]["mixer"]["in_proj"]["kernel"]).ravel()
  temporal = np.asarray(bb["temporal_blocks"]["mixer"]["ssm"]["A_log"]).ravel()
  np.testing.assert_allclose(np.concatenate([spatial, temporal]),
                             0.75 ** (24 - np.arange(24)), rtol=1e-6)
  assert float(bb["patch_embed"]["kernel"]) == np.float32(0.75) ** 25
  assert float(bb["pos_embed"]) == np.float32(0.75) ** 25
  assert float(bb["norm_f"]["scale"]) == 1.0 and float(scales["head"]["fc"]["kernel"]) == 1.0
  mults = [float(np.max(x)) for x in jax.tree.leaves(scales)]
  assert max(mults) == 1.0  # nothing gets more than the base learning rate

  # Through the optimizer: Adam's first update is ±lr per element whatever the gradient, so the
  # update of block i over the head's is its multiplier.
  optim = config.finetune.optim
  optim.update(dict(weight_decay=0.0, warmup_steps=0))
  small = jax.tree.map(lambda x: jnp.ones((x.shape[0],) + (1,) * (len(x.shape) - 1)),
                       params)  # one element per stacked slice keeps it cheap
  tx, _ = make_optimizer(optim, small, total_steps=10, layer_decay=0.75,
                         layer_groups=model.layer_groups, num_layers=model.num_layers)
  updates, _ = tx.update(small, tx.init(small), small)
  head = abs(float(updates["head"]["fc"]["kernel"].ravel()[0]))
  got = np.abs(np.asarray(updates["backbone"]["temporal_blocks"]["mixer"]["in_proj"]["kernel"]))
  np.testing.assert_allclose(got.ravel() / head, 0.75 ** (12 - np.arange(12)), rtol=1e-5)
  # The weight-decay mask follows the stacked layout too.
  mask = decay_mask(params)["backbone"]
  assert mask["temporal_blocks"]["mixer"]["in_proj"]["kernel"]
  assert not mask["temporal_blocks"]["mixer"]["ssm"]["A_log"]
  assert not mask["spatial_blocks"]["norm"]["scale"]


def test_scan_backend_and_remat_come_from_the_config():
  """Every config declares model.scan_backend / chunk_size / remat, so the CLI override parses,
  reaches the model, and a bad value is a ConfigError naming the field."""
  import importlib.util
  from vidssm_jax.train import experiment
  for name in ("evim3.py", "endomamba.py", "endomamba_polypdiag.py", "endomamba_cvc.py",
               "endomamba_cholec80.py", "evim3_ef.py"):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("")
    assert {"scan_backend", "chunk_size", "remat"} <= set(config.model), name
    config.model.scan_backend = "associative"
    config.model.chunk_size = 16
    config.model.remat = "full"
    model = experiment.build_model(config, "finetune")
    mamba = getattr(model, "backbone", model).mamba
    assert (mamba.scan_backend, mamba.chunk_size) == ("associative", 16), name
    config.model.scan_backend = "fastest"
    with pytest.raises(experiment.ConfigError, match="scan_backend 'fastest' is not one of"):
      experiment.build_model(config, "finetune")
    config.model.scan_backend = "auto"
    config.model.remat = "some"
    with pytest.raises(experiment.ConfigError, match="model.remat 'some' is not one of"):
      experiment.build_model(config, "finetune")


def test_weight_decay_rules_on_real_parameter_trees():
  """optim.decay_rule on the trees of E-ViM³ and EndoMamba (shapes only): "ndim>1" counts one
  layer's axes (a stack's leading layers axis is not one), "endomamba_release" drops biases,
  pos_embed, cls_token and mask_token too, "ours" is the default; an unknown rule is an error."""
  import flax.linen as nn
  import jax.numpy as jnp
  from flax import traverse_util
  from vidssm_jax.models import create_model
  from vidssm_jax.train.state import DECAY_RULES, decay_mask

  def tree(name, video):
    model = create_model(name)
    shapes = jax.eval_shape(lambda v: model.init(jax.random.key(0), v),
                            jax.ShapeDtypeStruct(video, jnp.float32))
    return nn.meta.unbox(shapes["params"])

  def decayed(params, rule):
    flat = traverse_util.flatten_dict(decay_mask(params, rule))
    return {"/".join(k) for k, v in flat.items() if v}

  evim3 = tree("evim3_tiny", (1, 16, 32, 32, 1))
  layer = "encoder/stack/blocks/layers_2"
  big = decayed(evim3, "ndim>1")
  assert {"encoder/face_tokens", "encoder/register_token", "encoder/pos_embed_l",
          f"{layer}/mixer/ssm/A_log", f"{layer}/mixer/ssm/conv_weight", "head/fc/kernel"} <= big
  assert not big & {f"{layer}/mixer/ssm/D", f"{layer}/norm/scale", f"{layer}/mixer/ssm/dt_bias",
                    "encoder/norm_f/scale", "head/fc/bias"}
  ours = decayed(evim3, "ours")
  assert ours < big and not ours & {"encoder/face_tokens", f"{layer}/mixer/ssm/A_log"}
  assert decay_mask(evim3) == decay_mask(evim3, "ours")

  endo = tree("endomamba_tiny", (1, 2, 224, 224, 3))
  rel = decayed(endo, "endomamba_release")
  assert {"patch_embed/kernel", "spatial_blocks/mixer/ssm/A_log",
          "temporal_blocks/mixer/ssm/conv_weight"} <= rel
  assert not rel & {"pos_embed", "cls_token", "patch_embed/bias", "spatial_blocks/norm/scale",
                    "temporal_blocks/mixer/ssm/D", "temporal_blocks/mixer/ssm/dt_bias"}
  assert sorted(DECAY_RULES) == ["endomamba_release", "ndim>1", "ours"]
  with pytest.raises(ValueError, match="decay_rule 'all' is not one of"):
    decay_mask(evim3, "all")
