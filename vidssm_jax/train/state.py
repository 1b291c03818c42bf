"""Train state (params, optimizer state, optional EMA of params) and the optimizer from config.

Optimizer: AdamW with linear warm-up then cosine decay, global-norm gradient clipping, a
weight-decay mask that leaves out ``A_log``, ``D``, norms, biases, tokens and position
embeddings, and (fine-tuning) layer-wise learning-rate decay.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

# Parameter names (last path component, or any component for modules) never decayed.
_NO_DECAY_LEAVES = re.compile(r"^(A_log|D|bias|scale|dt_bias|conv_bias|.*_bias|.*token.*|pos.*|"
                              r".*pos_embed.*|.*_embed_[lhw]|.*embedding.*)$")
_NO_DECAY_MODULES = re.compile(r"(^|_)(norm|ln|layernorm|rmsnorm)(_|\d|$)", re.IGNORECASE)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any  # same tree as params, or None when EMA is off
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def apply_gradients(self, grads, *, ema_decay: float = 0.0, ema_every: int = 1):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema_params
    if ema is not None:
      # EMA of weights, updated every `ema_every` steps (E-ViM³ uses 5).
      do = (self.step + 1) % ema_every == 0
      ema = jax.tree.map(lambda e, p: jnp.where(do, ema_decay * e + (1 - ema_decay) * p, e),
                         ema, params)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def create_state(params, tx, *, use_ema: bool) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if use_ema else None, tx=tx)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


# Weight-decay rules (``optim.decay_rule``), each ``(path names, per-layer ndim) -> bool``:
#   "ours"               kernels and conv weights; not A_log, D, norms, biases, tokens, position
#                        embeddings (the default)
#   "ndim>1"             every tensor of more than one axis (E-ViM³'s release: global tokens and
#                        position embeddings and A_log decayed; biases, norms and D not)
#   "endomamba_release"  everything but 1-D tensors, biases, pos_embed, cls_token, mask_token (so
#                        A_log and conv weights are decayed)
# ndim is that of one layer's tensor: a scanned stack's leading layers axis is not counted. Our
# shapes may drop the release's singleton axes (E-ViM³'s decoder mask token is (dim,) here, (1,
# dim) there), which only matters for parameters no gradient reaches.
_ENDOMAMBA_NO_DECAY = re.compile(r"^(bias|.*_bias|pos_embed.*|cls_token|mask_token)$")
DECAY_RULES = {
    "ours": lambda names, ndim: not (_NO_DECAY_LEAVES.match(names[-1]) or any(
        _NO_DECAY_MODULES.search(n) for n in names[:-1])),
    "ndim>1": lambda names, ndim: ndim > 1,
    "endomamba_release": lambda names, ndim: ndim > 1 and not _ENDOMAMBA_NO_DECAY.match(
        names[-1]),
}
_STACKED = re.compile(r"(^|_)blocks$")  # the scanned stacks' module names (nn/layers.layer_stack)


def decay_mask(params, rule: str = "ours") -> Any:
  """True where weight decay applies, by one of ``DECAY_RULES``."""
  if rule not in DECAY_RULES:
    raise ValueError(f"optim.decay_rule {rule!r} is not one of {sorted(DECAY_RULES)}")

  def decays(path, leaf):
    names = _path_names(path)
    ndim = len(np.shape(leaf)) - any(_STACKED.search(n) for n in names[:-1])
    return bool(DECAY_RULES[rule](names, ndim))

  return jax.tree_util.tree_map_with_path(decays, params)


def layer_ids(params, layer_groups: dict, num_layers: int) -> Any:
  """Layer index of each parameter for layer-wise lr decay: 0 for embeddings (anything before
  the blocks), ``offset + i + 1`` for slice ``i`` of a scanned stack (``layer_groups`` maps the
  stack's path, e.g. ``("backbone", "temporal_blocks")``, to the global index of its first
  block; its leaves carry a leading ``layers`` axis, so the id is an int array shaped to
  broadcast against the leaf), and ``num_layers + 1`` for everything after (final norm, head).
  """
  groups = {tuple(k): int(v) for k, v in layer_groups.items()}

  def layer_of(path, leaf):
    names = tuple(_path_names(path))
    for prefix, offset in groups.items():
      if names[:len(prefix)] == prefix:
        ids = offset + 1 + np.arange(leaf.shape[0])
        return ids.reshape((-1,) + (1,) * (len(leaf.shape) - 1))
    joined = "/".join(names).lower()
    if any(k in joined for k in ("embed", "token", "pos")):
      return 0
    return num_layers + 1

  return jax.tree_util.tree_map_with_path(layer_of, params)


def layer_decay_scales(params, layer_groups: dict, num_layers: int, decay: float) -> Any:
  """Per-leaf lr multipliers ``decay ** (num_layers + 1 - layer_id)`` (arrays for stacks)."""
  if num_layers < 1:
    raise ValueError(f"layer-wise lr decay needs the model's number of layers, got {num_layers}")
  ids = layer_ids(params, layer_groups, num_layers)
  return jax.tree.map(lambda i: np.float32(decay) ** (num_layers + 1 - np.asarray(i)), ids)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by a per-leaf constant."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(init, update)


def make_optimizer(opt_config, params, total_steps: int,
                   layer_decay: Optional[float] = None, layer_groups: Optional[dict] = None,
                   num_layers: int = 0):
  """AdamW from a config with fields lr, warmup_steps, weight_decay, clip_norm, b1, b2, eps
  (and optionally warmup_lr, the first step's lr, and min_lr, the last's; both default 0);
  with ``layer_decay``, layer-wise lr decay over the model's ``layer_groups`` (its scanned
  stacks) and ``num_layers``.

  Returns ``(tx, schedule)``.
  """
  warmup = min(int(opt_config.warmup_steps), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=float(opt_config.get("warmup_lr", 0.0)), peak_value=float(opt_config.lr),
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=float(opt_config.get("min_lr", 0.0)))
  parts = []
  if opt_config.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(float(opt_config.clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(opt_config.get("b1", 0.9)),
                           b2=float(opt_config.get("b2", 0.999)),
                           eps=float(opt_config.get("eps", 1e-8)),
                           weight_decay=float(opt_config.weight_decay),
                           mask=decay_mask(params, opt_config.get("decay_rule", "ours"))))
  if layer_decay:
    parts.append(scale_by_tree(layer_decay_scales(params, layer_groups or {}, num_layers,
                                                  float(layer_decay))))
  return optax.chain(*parts), schedule


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(flax.linen.meta.unbox(params))))
