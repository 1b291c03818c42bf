"""Release PyTorch state_dicts -> our Flax params, and back.

    params = convert_state_dict("evim3", state_dict, create_model("evim3_p4"))
    model.apply({"params": params}, video)        # reproduces the release
    save_params(params, "ckpt/")                  # accepted by --config.finetune.init_from=ckpt/
    params = load_params("ckpt/")

``state_dict`` maps the release's key names (a leading ``module.`` / ``model.`` is stripped) to
NumPy arrays. The command line does the same from a file: ``python -m vidssm_jax.convert --from
evim3 --input release.pth --preset evim3_p4 --output ckpt/``.

Writing a source (for the maintainers of ``convert/<model>.py``)
----------------------------------------------------------------
A source is a function ``recipe(model) -> Recipe``, named in ``SOURCES`` as
``"module:function"`` and imported only when asked for. A ``Recipe`` holds:

``init(model, rng) -> variables``
    how the model builds the params this source fills (``model.init`` on a dummy input, with
    ``method=`` for a pretraining model); it runs under ``jax.eval_shape``, so it costs nothing.
``rules``
    a list of :class:`Rule` ``(target, source, transform)``: ``target`` the ``/``-joined Flax
    path under ``params`` (``"encoder/patch_embed/kernel"``), ``source`` the release key. A
    ``source`` containing ``{i}`` fills a scanned stack (``nn.scan``, a leading ``layers`` axis):
    key ``i`` for slice ``i``, for every ``i`` of the target's leading axis.
``ignore``
    regular expressions of release keys that have no effect on its output (buffers, unused
    parameters); they are accepted and dropped. Every other key must be used by a rule.

Transforms know both directions, so every source can also export (``to_state_dict``); the
helpers below cover the usual layers (``linear``, ``layer_norm``, and the ``LINEAR``,
``CONV1D_DEPTHWISE``, ``conv3d_patch``, ``reshape_from`` transforms). Our layouts:

    torch Linear weight (out, in)            -> kernel (in, out)                  LINEAR
    torch depthwise Conv1d weight (D, 1, k)  -> conv_weight (k, D)                CONV1D_DEPTHWISE
    torch Conv3d patch embed (dim, C, t, p, p) -> Dense kernel (t·p·p·C, dim),
                                                 rows ordered (t, h, w, C)        conv3d_patch
    torch LayerNorm weight / bias            -> scale / bias                      layer_norm
    any extra singleton axes (tokens)        -> our shape                         reshape_from

After a conversion every leaf of the model's params must have been filled with its exact shape;
missing, unexpected and mis-shaped keys are reported together in one ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from flax import traverse_util
from flax.core import meta

# source name -> "module:function" returning the source's Recipe for a model.
SOURCES = {
    "evim3": "vidssm_jax.convert.evim3:finetune_recipe",
    "evim3_pretrain": "vidssm_jax.convert.evim3:pretrain_recipe",
    "endomamba": "vidssm_jax.convert.endomamba:backbone_recipe",
    "endomamba_pretrain": "vidssm_jax.convert.endomamba:pretrain_recipe",
    "videomamba": "vidssm_jax.convert.videomamba:recipe",
    "videomae": "vidssm_jax.convert.videomae:recipe",
}
STRIPPED_PREFIXES = ("module.", "model.")


# ---- transforms and rules ---------------------------------------------------------------------


class Transform(NamedTuple):
  """``forward(release_array, target_shape) -> ours``; ``backward(ours) -> release_array``."""

  forward: Callable[[np.ndarray, tuple], np.ndarray]
  backward: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform(lambda x, shape: x, lambda y: y)
LINEAR = Transform(lambda w, shape: w.T, lambda k: k.T)
CONV1D_DEPTHWISE = Transform(lambda w, shape: w[:, 0, :].T, lambda k: k.T[:, None, :])


def reshape_from(release_shape: tuple) -> Transform:
  """The same values with other singleton axes, e.g. tokens ``(6, 1, 1, 1, 1, dim) <-> (6, dim)``."""
  return Transform(lambda x, shape: x.reshape(shape), lambda y: y.reshape(release_shape))


def conv3d_patch(kernel: tuple) -> Transform:
  """Conv3d patch embedding (stride = kernel) ``(dim, C, t, p, p)`` <-> a Dense kernel
  ``(t·p·p·C, dim)`` over patches flattened in (t, h, w, C) order; ``kernel = (t, p, p)``."""

  def forward(w, shape):
    return w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0])

  def backward(k):
    c = k.shape[0] // int(np.prod(kernel))
    return k.reshape(*kernel, c, k.shape[1]).transpose(4, 3, 0, 1, 2)

  return Transform(forward, backward)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our param ``target`` (``/``-joined path) comes from release key ``source`` through
  ``transform``; ``{i}`` in ``source`` fills slice ``i`` of a stacked (scanned) target."""

  target: str
  source: str
  transform: Transform = IDENTITY

  @property
  def stacked(self) -> bool:
    return "{i}" in self.source


def linear(target: str, source: str, bias: bool = True) -> list[Rule]:
  """A torch Linear ``source.weight (out, in)`` [``source.bias``] -> Dense ``target``."""
  rules = [Rule(f"{target}/kernel", f"{source}.weight", LINEAR)]
  return rules + ([Rule(f"{target}/bias", f"{source}.bias")] if bias else [])


def layer_norm(target: str, source: str) -> list[Rule]:
  """A torch LayerNorm -> ``nn.LayerNorm`` ``target`` (scale, bias)."""
  return [Rule(f"{target}/scale", f"{source}.weight"), Rule(f"{target}/bias", f"{source}.bias")]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one source fills one model (see the module docstring)."""

  init: Callable[[Any, jax.Array], Any]
  rules: list
  ignore: tuple = ()


# ---- conversion -------------------------------------------------------------------------------


def recipe_for(source: str, model) -> Recipe:
  """The source's Recipe for ``model``; a ValueError naming the sources for an unknown one."""
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; sources are {sorted(SOURCES)}")
  module, function = SOURCES[source].split(":")
  return getattr(importlib.import_module(module), function)(model)


def strip_prefixes(state_dict: dict) -> dict:
  """Drops a leading ``module.`` (DDP) or ``model.`` wrapper from every key, repeatedly."""
  out = {}
  for key, value in state_dict.items():
    changed = True
    while changed:
      changed = False
      for prefix in STRIPPED_PREFIXES:
        if key.startswith(prefix):
          key, changed = key[len(prefix):], True
    out[key] = value
  return out


def param_shapes(recipe: Recipe, model) -> dict:
  """``{"a/b/c": ShapeDtypeStruct}`` of the params the recipe's init builds (no compute)."""
  variables = jax.eval_shape(lambda: recipe.init(model, jax.random.PRNGKey(0)))
  params = meta.unbox(variables["params"])
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _slices(rule: Rule, shape: tuple) -> list[tuple[str, tuple]]:
  """``[(release key, our shape of that piece)]`` for a rule and its target's shape."""
  if rule.stacked:
    return [(rule.source.format(i=i), tuple(shape[1:])) for i in range(shape[0])]
  return [(rule.source, tuple(shape))]


def convert_state_dict(source: str, state_dict: dict, model) -> dict:
  """Release ``state_dict`` (key -> array) -> our nested params dict (NumPy, float32).

  Raises:
    ValueError: unknown ``source``; or, in one message, the release keys the model needs but
      ``state_dict`` lacks, the keys no rule uses, and the arrays of the wrong shape.
  """
  recipe = recipe_for(source, model)
  state = strip_prefixes(state_dict)
  targets = param_shapes(recipe, model)
  filled, used, missing, misshaped = {}, set(), [], []
  for rule in recipe.rules:
    if rule.target not in targets:
      raise ValueError(f"convert {source}: rule target {rule.target!r} is not a parameter of "
                       f"{type(model).__name__} (a model field differs from the release's?)")
    want = targets[rule.target]
    pieces = []
    for key, shape in _slices(rule, want.shape):
      if key not in state:
        missing.append(key)
        continue
      used.add(key)
      array = np.asarray(state[key])
      try:
        piece = np.asarray(rule.transform.forward(array, shape))
      except ValueError:
        piece = None
      if piece is None or piece.shape != shape:
        misshaped.append(f"{key} {tuple(array.shape)} (for {rule.target} {shape})")
        continue
      pieces.append(piece.astype(want.dtype))
    if len(pieces) == len(_slices(rule, want.shape)):
      filled[rule.target] = np.stack(pieces) if rule.stacked else pieces[0]
  ignored = [re.compile(p) for p in recipe.ignore]
  unexpected = sorted(k for k in state if k not in used and not any(p.fullmatch(k)
                                                                    for p in ignored))
  unfilled = sorted(set(targets) - set(filled) - {r.target for r in recipe.rules})
  _raise_problems(source, missing, unexpected, misshaped, unfilled)
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in filled.items()})


def _raise_problems(source, missing, unexpected, misshaped, unfilled):
  parts = []
  for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("wrong shapes", misshaped), ("params no rule fills", unfilled)):
    if items:
      shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20
                                       else "")
      parts.append(f"{len(items)} {title}: {shown}")
  if parts:
    raise ValueError(f"convert {source}: the state_dict does not fit the model: "
                     + "; ".join(parts))


def to_state_dict(source: str, params: dict, model) -> dict:
  """Our params -> a release-format state_dict (key -> NumPy array), the inverse of
  :func:`convert_state_dict` (ignored release keys are not produced)."""
  recipe = recipe_for(source, model)
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(meta.unbox(params)).items()}
  out = {}
  for rule in recipe.rules:
    value = flat[rule.target]
    for i, (key, _) in enumerate(_slices(rule, value.shape)):
      out[key] = np.asarray(rule.transform.backward(value[i] if rule.stacked else value))
  return out


# ---- files ------------------------------------------------------------------------------------


def read_state_dict(path: str) -> dict:
  """A release checkpoint file -> ``{key: float32 NumPy array}``.

  ``.pth`` / ``.pt`` (needs torch: ``pip install 'vidssm_jax[torch]'``; a dict holding the
  weights under ``"model"``, ``"state_dict"`` or ``"module"`` is unwrapped), ``.safetensors``
  (needs ``safetensors``) or ``.npz``.
  """
  if not os.path.isfile(path):
    raise ValueError(f"no such file: {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".pth", ".pt"):
    return _read_torch(path)
  if ext == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError:
      raise ValueError("reading .safetensors needs the safetensors package: "
                       "pip install safetensors") from None
    return dict(load_file(path))
  if ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
  raise ValueError(f"{path}: unknown checkpoint format {ext!r} (expected .pth, .pt, "
                   ".safetensors or .npz)")


def _read_torch(path: str) -> dict:
  try:
    import torch
  except ImportError:
    raise ValueError("reading .pth needs torch: pip install 'vidssm_jax[torch]'") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle, zip and torch errors alike
    raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
  for key in ("model", "state_dict", "module"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
  return {k: v.detach().float().numpy() for k, v in obj.items() if torch.is_tensor(v)}


def save_params(params: dict, directory: str) -> str:
  """Writes ``params`` as a step-0 checkpoint under ``directory`` in the trainer's layout
  (``<directory>/latest/0/state``), so ``--config.finetune.init_from=<directory>`` and
  :func:`load_params` read it. Returns the absolute directory."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  tree = {"step": np.zeros((), np.int32), "params": params}
  with ocp.CheckpointManager(os.path.join(directory, "latest"),
                             options=ocp.CheckpointManagerOptions(create=True)) as manager:
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)), force=True)
    manager.wait_until_finished()
  return directory


def load_params(directory: str) -> dict:
  """The params of the newest checkpoint under ``directory`` (written by :func:`save_params` or
  by the trainer)."""
  from vidssm_jax.train.checkpoint import Checkpointer

  if not os.path.isdir(os.path.join(directory, "latest")):
    raise ValueError(f"{directory} holds no checkpoint (expected {directory}/latest/<step>)")
  ckpt = Checkpointer(directory, async_save=False)
  try:
    return ckpt.restore_params()
  finally:
    ckpt.close()
