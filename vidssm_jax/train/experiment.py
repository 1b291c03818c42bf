"""The stages a config runs, read top to bottom: pretrain → finetune → evaluate (and stream).

Each stage builds the mesh, the data iterator, the model and a sharded train state, jits its step
with explicit shardings, and hands it to ``loop.run_loop``. Stages share a workdir:

    <workdir>/pretrain/{checkpoints,metrics.jsonl,tensorboard}
    <workdir>/finetune/{checkpoints,metrics.jsonl,tensorboard}
    <workdir>/metrics.json      final metrics of the evaluate stage

``check_config`` runs first and turns every bad setting it can find (unknown model, task or
field, missing data, a batch the mesh cannot split) into one clear error before anything is
written.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vidssm_jax.data import pipeline, shards
from vidssm_jax.models import create_model
from vidssm_jax.nn.layers import REMAT_POLICIES
from vidssm_jax.nn.mamba import check_scan_backend
from vidssm_jax.train import finetune as ft
from vidssm_jax.train import pretrain as pt
from vidssm_jax.train.checkpoint import Checkpointer
from vidssm_jax.train.loop import MetricWriter, run_loop
from vidssm_jax.train.sharding import (batch_sharding, check_batch_size, fast_init_rng,
                                       make_mesh, replicated, tree_shardings, under_mesh)
from vidssm_jax.train.state import TrainState, count_params, create_state, make_optimizer

STAGES = ("pretrain", "finetune", "evaluate")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
  """A problem with the configuration or its inputs, reported as one line by main."""


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


def stages_of(config) -> list[str]:
  stages = [s.strip() for s in str(config.mode).split(",") if s.strip()]
  for s in stages:
    if s not in STAGES + ("stream",):
      raise ConfigError(f"mode {s!r} is not one of {STAGES + ('stream',)}")
  return stages


def model_kwargs(config) -> dict:
  """``config.model`` as ``create_model`` overrides: dtype names resolved, ``scan_backend`` and
  ``remat`` checked (a bad value is a ConfigError naming the field)."""
  kwargs = dict(config.model)
  if isinstance(kwargs.get("dtype"), str):
    if kwargs["dtype"] not in _DTYPES:
      raise ConfigError(f"model.dtype {kwargs['dtype']!r} is not one of {sorted(_DTYPES)}")
    kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
  if "scan_backend" in kwargs:
    try:
      check_scan_backend(kwargs["scan_backend"])
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if kwargs.get("remat", "none") not in REMAT_POLICIES:
    raise ConfigError(f"model.remat {kwargs['remat']!r} is not one of {list(REMAT_POLICIES)}")
  return kwargs


def build_model(config, stage: str):
  kwargs = model_kwargs(config)
  if stage == "pretrain":
    name = config.get("pretrain_model_name") or config.model_name
  else:
    name = config.model_name
    if config.finetune.get("head"):
      kwargs.update(head=config.finetune.head, num_classes=config.finetune.num_classes)
    else:
      kwargs.update(num_outputs=config.finetune.num_outputs)
  try:
    model = create_model(name, **kwargs)
  except TypeError as e:  # an override naming a field the model does not have
    raise ConfigError(f"model {name!r}: {e}") from None
  mask = config.get("pretrain", {}).get("mask")
  if stage == "pretrain" and mask is not None:
    options = {k: v for k, v in mask.items() if k not in ("kind", "ratio")}
    try:
      model = model.with_pretrain_mask(mask.kind, float(mask.ratio), **options)
    except ValueError as e:
      raise ConfigError(f"pretrain.mask: {e}") from None
  return model


def with_data_statistics(model, config):
  """A pretraining model whose pixel targets undo the input normalisation
  (``with_pixel_statistics``) is given the mean and std the pipeline normalises with: those of
  the shards' index.json."""
  if not hasattr(model, "with_pixel_statistics"):
    return model
  norm = shards.load_index(config.data.dir)["normalization"]
  try:
    return model.with_pixel_statistics(norm["mean"], norm["std"])
  except ValueError as e:
    raise ConfigError(f"data.dir {config.data.dir!r}: {e}") from None


def ensure_data(config) -> None:
  """Writes synthetic shards when the config asks for them and they are missing."""
  d = config.data
  if d.synthetic:
    # Only process 0 writes (hosts may share the folder); the others wait for it. Written only
    # into an empty folder or one of synthetic shards (shards.ensure_synthetic).
    if jax.process_index() == 0:
      try:
        shards.ensure_synthetic(d.dir, d.synthetic, d.synthetic_num, size=d.image_size,
                                num_frames=d.get("synthetic_frames", 2 * d.num_frames * d.stride),
                                seed=config.seed)
      except ValueError as e:
        raise ConfigError(str(e)) from None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("vidssm_jax: synthetic shards written")
  elif not d.dir or not os.path.isdir(d.dir):
    raise ConfigError(f"data.dir {d.dir!r} does not exist; write shards with "
                      "`python -m vidssm_jax.data.shards` or set data.synthetic=echo")
  elif not shards.has_complete_index(d.dir):
    raise ConfigError(f"data.dir {d.dir!r} has no complete shard index (index.json); "
                      "re-run `python -m vidssm_jax.data.shards` to finish writing it")


def make_iterator(config, split: str, batch_size: int, *, train: bool, seed_offset: int = 0):
  d = config.data
  ds = pipeline.make_dataset(d.dir, split, num_frames=d.num_frames, stride=d.stride,
                             image_size=d.image_size, batch_size=batch_size, train=train,
                             seed=config.seed + seed_offset, num_workers=d.num_workers,
                             num_clips=d.eval_clips)
  return iter(ds)


def init_state(model, init_args, *, method, optim_config, total_steps, mesh, rng, use_ema,
               layer_decay=None):
  """Sharded train state: params initialised directly into their shardings.

  Returns ``(state, state_shardings)``.
  """
  rngs = {"params": rng, "dropout": rng}
  init = lambda: model.init(rngs, *init_args, method=method)["params"]
  boxed = jax.eval_shape(init)
  param_sh = tree_shardings(boxed, mesh)
  abstract_params = nn.meta.unbox(boxed)
  tx, _ = make_optimizer(optim_config, abstract_params, total_steps, layer_decay=layer_decay,
                         layer_groups=model.layer_groups, num_layers=model.num_layers)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params),
                                 param_sh, transform_non_params=lambda _: replicated(mesh))
  shardings = TrainState(step=replicated(mesh), params=param_sh, opt_state=opt_sh,
                         ema_params=param_sh if use_ema else None, tx=tx)
  with fast_init_rng():
    state = jax.jit(lambda: create_state(nn.meta.unbox(init()), tx, use_ema=use_ema),
                    out_shardings=shardings)()
  return state, shardings


# XLA options of every compiled training step. XLA's own Triton GEMM fusions are off (the GEMMs
# go to cuBLAS): their autotuning took ~10 s of the E-ViM3-p4 step's compile and cuBLAS ran the
# step as fast (one H200, jax 0.11.2, bench.train_step: compile 33.1 -> 23.6 s, step 309.5 ->
# 306.7 ms). The option is a no-op off GPU.
STEP_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def jit_step(step, shardings, mesh, extra_in=()):
  return jax.jit(under_mesh(step, mesh),
                 in_shardings=(shardings, batch_sharding(mesh), replicated(mesh)) + extra_in,
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,),
                 compiler_options=STEP_COMPILER_OPTIONS)


def example_batch(config, model, batch_size: int) -> jax.Array:
  d = config.data
  return jnp.zeros((batch_size, d.num_frames, d.image_size, d.image_size, int(model.in_chans)),
                   jnp.float32)


def check_config(config, stages) -> None:
  """Fails early, before any file is written."""
  mesh = make_mesh(config.mesh)
  if "pretrain" in stages:
    check_batch_size(config.pretrain.batch_size, mesh, "pretrain.batch_size")
    model = build_model(config, "pretrain")
    if config.pretrain.mask.kind not in ("stc", "random", "tube"):
      raise ConfigError(f"pretrain.mask.kind {config.pretrain.mask.kind!r} is not one of "
                        "'stc', 'random', 'tube'")
    pt.token_grid(model)
  if "finetune" in stages or "evaluate" in stages:
    check_batch_size(config.finetune.batch_size, mesh, "finetune.batch_size")
    ft.check_task(config.finetune)
    build_model(config, "finetune")
  if not config.data.synthetic and stages:
    ensure_data(config)


# ------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------


def build_teacher(config, mesh, batch_size):
  """The frozen teacher of feature alignment: a model from the registry, its params restored
  from ``pretrain.teacher.checkpoint`` (params of a Checkpointer directory) or initialised."""
  t = config.pretrain.teacher
  teacher = create_model(t.name, **dict(t.get("model", {})))
  video = example_batch(config, teacher, batch_size)
  boxed = jax.eval_shape(lambda: teacher.init(jax.random.key(0), video)["params"])
  shardings = tree_shardings(boxed, mesh)
  if t.get("checkpoint"):
    ckpt = Checkpointer(t.checkpoint, async_save=False)
    restored = ckpt.restore_params()
    ckpt.close()
    params = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), restored, shardings)
  else:
    with fast_init_rng():
      params = jax.jit(lambda: nn.meta.unbox(teacher.init(jax.random.key(config.seed + 7),
                                                          video)["params"]),
                       out_shardings=shardings)()
  return teacher, params


def run_pretrain(config, workdir: str):
  mesh = make_mesh(config.mesh)
  p = config.pretrain
  model = with_data_statistics(build_model(config, "pretrain"), config)
  rng = jax.random.key(config.seed)
  bs = p.batch_size
  grid = pt.token_grid(model)
  mask0 = jnp.zeros((bs,) + grid, bool)
  state, shardings = init_state(model, (example_batch(config, model, bs), mask0),
                                method="pretrain_loss",
                                optim_config=p.optim, total_steps=p.steps, mesh=mesh, rng=rng,
                                use_ema=bool(p.ema_decay))
  print(f"pretrain: {config.model_name}, {count_params(state.params):,} parameters, "
        f"mesh {dict(mesh.shape)}")
  teacher, teacher_params, extra = None, None, ()
  if p.get("teacher") and p.teacher.name:
    teacher, teacher_params = build_teacher(config, mesh, bs)
    extra = (jax.tree.map(lambda x: x.sharding, teacher_params),)
  step = pt.make_pretrain_step(model, p.mask, teacher=teacher,
                               alpha=float(p.get("teacher", {}).get("alpha", 0.0)),
                               ema_decay=float(p.ema_decay), ema_every=int(p.ema_every))
  step = jit_step(step, shardings, mesh, extra)
  if teacher is not None:  # the frozen teacher's params go in as an argument, never updated
    jitted, step = step, lambda state, batch, rng: jitted(state, batch, rng, teacher_params)
  stage_dir = os.path.join(workdir, "pretrain")
  ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), keep=config.checkpoint.keep,
                      async_save=config.checkpoint.async_save)
  data_iter = make_iterator(config, "train", bs, train=True)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state, shardings, data_iter)
    print(f"pretrain: resumed from step {int(state.step)}")
  state, status = run_loop(
      step_fn=step, state=state, data_iter=data_iter, mesh=mesh, total_steps=p.steps,
      rng=jax.random.fold_in(rng, 1), checkpointer=ckpt, writer=MetricWriter(stage_dir),
      log_every=config.log_every, ckpt_every=config.checkpoint.every,
      image_fn=pt.make_image_fn(model, p.mask, seed=config.seed),
      image_every=int(p.get("image_every", 0)), desc="pretrain")
  ckpt.close()
  return state, status


def _with_missing_from(pretrained: dict, init: dict):
  """``pretrained`` completed with the leaves of ``init`` it lacks; returns ``(tree, the paths
  taken from init)``."""
  from flax import traverse_util

  flat, fresh = traverse_util.flatten_dict(pretrained), traverse_util.flatten_dict(init)
  kept = sorted("/".join(path) for path in fresh if path not in flat)
  flat.update({path: v for path, v in fresh.items() if path not in flat})
  return traverse_util.unflatten_dict(flat), kept


def _transfer_pretrained(config, workdir, model, params):
  """Copies the model's ``transfer_subtree`` from the pretraining checkpoint into ``params``."""
  src = config.finetune.init_from
  if not src:
    return params
  ckpt_dir = os.path.join(workdir, "pretrain", "checkpoints") if src == "pretrain" else src
  if not os.path.isdir(os.path.join(ckpt_dir, "latest")):
    if src == "pretrain":
      print("finetune: no pretraining checkpoint in this workdir; starting from scratch")
      return params
    raise ConfigError(f"finetune.init_from {src!r} has no checkpoints (expected {ckpt_dir}/latest)")
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  pretrained = ckpt.restore_params()
  ckpt.close()
  params = dict(params)
  key = model.transfer_subtree
  copied = [key] if key in params and key in pretrained else []
  if not copied:
    raise ConfigError(f"pretrained params from {ckpt_dir} have no {key!r} subtree")
  for k in copied:
    adapt = getattr(getattr(model, k, None), "adapt_pretrained", None)
    if adapt is not None:  # the subtree's module says how a pretraining checkpoint maps onto it
      pretrained[k], kept = adapt(pretrained[k], params[k])
    else:  # leaves only fine-tuning has (E-ViM³'s norm_f, as the release) keep their init
      pretrained[k], kept = _with_missing_from(pretrained[k], params[k])
    if kept:
      print(f"finetune: {k}: {', '.join(kept)} not in the pretraining checkpoint (or another "
            "shape); kept at init")
    want = jax.tree.map(lambda x: x.shape, params[k])
    got = jax.tree.map(lambda x: x.shape, pretrained[k])
    if want != got:
      raise ConfigError(f"pretrained {k} from {ckpt_dir} does not match the fine-tuning model's "
                        "(different model overrides?)")
    params[k] = jax.tree.map(lambda new, old: jax.device_put(jnp.asarray(old, new.dtype),
                                                             new.sharding), params[k],
                             pretrained[k])
  print(f"finetune: initialised {', '.join(copied)} from {ckpt_dir}")
  return params


def _eval_fn(config, model, mesh, split: str, use_ema: bool):
  predict = jax.jit(under_mesh(lambda params, video: model.apply({"params": params}, video), mesh))

  def evaluate(state) -> dict:
    params = state.ema_params if (use_ema and state.ema_params is not None) else state.params
    batches = pipeline.make_dataset(
        config.data.dir, split, num_frames=config.data.num_frames, stride=config.data.stride,
        image_size=config.data.image_size, batch_size=config.finetune.batch_size, train=False,
        seed=config.seed, num_workers=0, num_clips=config.data.eval_clips)
    preds, labels = ft.collect_predictions(predict, params, batches, mesh, config.finetune)
    return ft.compute_metrics(config.finetune, preds, labels)

  return evaluate


def run_finetune(config, workdir: str):
  mesh = make_mesh(config.mesh)
  f = config.finetune
  model = build_model(config, "finetune")
  rng = jax.random.key(config.seed + 1)
  state, shardings = init_state(
      model, (example_batch(config, model, f.batch_size),), method=None, optim_config=f.optim,
      total_steps=f.steps, mesh=mesh, rng=rng, use_ema=bool(f.ema_decay),
      layer_decay=f.layer_decay or None)
  stage_dir = os.path.join(workdir, "finetune")
  ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), keep=config.checkpoint.keep,
                      best_metric=f.select_metric, best_mode=f.select_mode,
                      async_save=config.checkpoint.async_save)
  data_iter = make_iterator(config, "train", f.batch_size, train=True, seed_offset=1)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state, shardings, data_iter)
    print(f"finetune: resumed from step {int(state.step)}")
  else:
    params = _transfer_pretrained(config, workdir, model, state.params)
    state = state.replace(params=params, ema_params=(jax.tree.map(jnp.copy, params)
                                                     if state.ema_params is not None else None))
  print(f"finetune: {config.model_name} ({f.task}), {count_params(state.params):,} parameters")
  step = jit_step(ft.make_finetune_step(model, f, ema_decay=float(f.ema_decay),
                                        ema_every=int(f.ema_every)), shardings, mesh)
  state, status = run_loop(
      step_fn=step, state=state, data_iter=data_iter, mesh=mesh, total_steps=f.steps,
      rng=jax.random.fold_in(rng, 1), checkpointer=ckpt, writer=MetricWriter(stage_dir),
      log_every=config.log_every, ckpt_every=config.checkpoint.every,
      eval_every=f.eval_every, eval_fn=_eval_fn(config, model, mesh, "val", bool(f.ema_decay)),
      desc="finetune")
  ckpt.close()
  return state, status


def run_evaluate(config, workdir: str, state: Optional[TrainState] = None) -> dict:
  """Evaluates the best fine-tuning checkpoint on ``config.evaluate.split``; writes metrics.json."""
  mesh = make_mesh(config.mesh)
  f = config.finetune
  model = build_model(config, "finetune")
  use_ema = bool(config.evaluate.use_ema and f.ema_decay)
  ckpt_dir = os.path.join(workdir, "finetune", "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ConfigError(f"evaluate: no fine-tuning checkpoints in {ckpt_dir}; run mode=finetune")
  ckpt = Checkpointer(ckpt_dir, best_metric=f.select_metric, best_mode=f.select_mode,
                      async_save=False)
  which = "best" if ckpt.best is not None and ckpt.best.best_step() is not None else "latest"
  params = ckpt.restore_params(which=which, use_ema=use_ema)
  ckpt.close()
  split = config.evaluate.split
  metrics = _eval_fn(config, model, mesh, split, use_ema=False)(
      TrainState(step=None, params=params, opt_state=None, ema_params=None, tx=None))
  result = {f"{split}/{k}": v for k, v in metrics.items()}
  if f.task in ("regression", "classification"):
    train_labels = shards.read_labels(config.data.dir, "train", f.label_key)
    test_labels = shards.read_labels(config.data.dir, split, f.label_key)
    baseline = ft.mean_baseline(f, train_labels, test_labels)
    kind = "mean" if f.task == "regression" else "majority"
    result.update({f"{split}/baseline_{kind}_{k}": v for k, v in baseline.items()})
    result[f"{split}/num_videos"] = len(test_labels)
  result["checkpoint"] = which
  with open(os.path.join(workdir, "metrics.json"), "w") as fh:
    json.dump(result, fh, indent=2)
  return result


def run(config, workdir: str) -> dict:
  """Runs every stage of ``config.mode`` in order; returns the final metrics (if evaluated)."""
  stages = stages_of(config)
  check_config(config, stages)
  ensure_data(config)
  os.makedirs(workdir, exist_ok=True)
  result = {}
  for stage in stages:
    if stage == "pretrain":
      _, status = run_pretrain(config, workdir)
    elif stage == "finetune":
      _, status = run_finetune(config, workdir)
    elif stage == "evaluate":
      result = run_evaluate(config, workdir)
      status = "done"
    else:
      raise ConfigError("mode=stream is run by `python -m vidssm_jax.stream`")
    if status == "preempted":
      print(f"{stage}: pre-empted; checkpoint saved, re-run the same command to resume")
      break
  return result
