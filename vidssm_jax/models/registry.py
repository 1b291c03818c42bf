"""Model registry: configs say ``model.name = "evim3_p4"`` and the trainer calls
``create_model(name, **overrides)``.

A model module registers its presets with ``@register("name")`` on a function that takes keyword
overrides and returns an (unbound) ``flax.linen.Module``.

What the trainer asks of a model, so that ``train/`` never names a particular one:

    in_chans                   channels of the input video
    num_layers, layer_groups   for layer-wise lr decay: the number of blocks, and each scanned
                               stack's parameter path -> the global index of its first block
    transfer_subtree           the subtree fine-tuning copies from a pretraining checkpoint
    with_pretrain_mask(kind, ratio, **options)
                               (pretraining models) the model set up for the masks the trainer
                               draws with ``masking.batched_mask``
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  """Decorator: registers ``fn(**overrides) -> nn.Module`` under ``name``."""

  def wrap(fn):
    if name in _MODELS:
      raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn

  return wrap


def list_models() -> list[str]:
  return sorted(_MODELS)


def create_model(name: str, **overrides) -> nn.Module:
  """Builds the registered model ``name`` with field ``overrides`` (e.g. ``depth=2``)."""
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
  return _MODELS[name](**overrides)
