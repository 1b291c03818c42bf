"""The EndoMamba release (github.com/TianCuteQY/EndoMamba) -> our ``EndoMamba`` params.

Two sources:

    "endomamba"           the backbone (``video_sm/models/endomamba.py``), alone or with its
                          ``head`` Linear (per-frame logits of the mean token: our clip or phase
                          head's ``fc``)
    "endomamba_pretrain"  the pretraining model (``modeling_pretrain.py``): ``encoder.*`` (the
                          backbone without cls token), ``decoder.*``, ``encoder_to_decoder``,
                          ``mask_token``

Release names -> ours, per block ``i`` (``layers.{i}``; the first ``num_spatial_layers`` are
bidirectional and fill slice ``i`` of the scanned ``spatial_blocks``, the rest fill slice
``i - num_spatial_layers`` of ``temporal_blocks``):

    mixer.in_proj / out_proj / x_proj .weight     mixer/{in_proj,out_proj}, mixer/ssm/x_proj
    mixer.conv1d.weight (D, 1, k), .bias          mixer/ssm/conv_weight (k, D), conv_bias
    mixer.dt_proj.weight (D, r), .bias            mixer/ssm/dt_proj_kernel (r, D), dt_bias
    mixer.A_log, mixer.D                          mixer/ssm/A_log, D
    mixer.{conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b}   the same under mixer/ssm_b
    norm.weight                                   norm/scale (RMSNorm, no bias)
    patch_embed.proj (dim, C, 1, p, p)            patch_embed (a 2D conv, kernel (p, p, C, dim))
    pos_embed (1, tokens, dim), cls_token (1, 1, dim), norm_f.weight

The temporal embedding of the release is a fixed sinusoid (not in its state_dict); ours is
computed the same way.
"""

from __future__ import annotations

import jax.numpy as jnp

from vidssm_jax.convert import (CONV1D_DEPTHWISE, LINEAR, Recipe, Rule, Transform, layer_norm,
                                linear, reshape_from)
from vidssm_jax.convert.videomae import vit_block_rules

# torch Conv3d patch embedding with temporal kernel 1 (dim, C, 1, p, p) <-> our 2D nn.Conv
# kernel (p, p, C, dim).
PATCH_CONV = Transform(lambda w, shape: w[:, :, 0].transpose(2, 3, 1, 0),
                       lambda k: k.transpose(3, 2, 0, 1)[:, :, None])


class LayerKey(str):
  """A stacked rule's release key whose slice ``i`` is release layer ``first + i``.

  The core fills slice ``i`` from ``source.format(i=i)``; the temporal stack's slice 0 is the
  release's layer ``num_spatial_layers``, so this key shifts the index.
  """

  def __new__(cls, template: str, first: int):
    key = super().__new__(cls, template)
    key.first = first
    return key

  def format(self, *, i: int) -> str:
    return str.format(self, i=self.first + i)


def mamba_block_rules(target: str, source: str, first: int, bidirectional: bool) -> list[Rule]:
  """One scanned stack of EndoMamba blocks: ``target`` e.g. ``"temporal_blocks"``, ``source``
  e.g. ``"layers"`` (release block ``{source}.{first + i}`` fills slice ``i``)."""
  block = LayerKey(f"{source}.{{i}}", first)
  key = lambda name: LayerKey(f"{block}.{name}", first)
  rules = [Rule(f"{target}/norm/scale", key("norm.weight")),
           Rule(f"{target}/mixer/in_proj/kernel", key("mixer.in_proj.weight"), LINEAR),
           Rule(f"{target}/mixer/out_proj/kernel", key("mixer.out_proj.weight"), LINEAR)]
  branches = [("ssm", "")] + ([("ssm_b", "_b")] if bidirectional else [])
  for ours, suffix in branches:
    ssm = f"{target}/mixer/{ours}"
    rules += [
        Rule(f"{ssm}/conv_weight", key(f"mixer.conv1d{suffix}.weight"), CONV1D_DEPTHWISE),
        Rule(f"{ssm}/conv_bias", key(f"mixer.conv1d{suffix}.bias")),
        Rule(f"{ssm}/x_proj/kernel", key(f"mixer.x_proj{suffix}.weight"), LINEAR),
        Rule(f"{ssm}/dt_proj_kernel", key(f"mixer.dt_proj{suffix}.weight"), LINEAR),
        Rule(f"{ssm}/dt_bias", key(f"mixer.dt_proj{suffix}.bias")),
        Rule(f"{ssm}/A_log", key(f"mixer.A{suffix}_log")),
        Rule(f"{ssm}/D", key(f"mixer.D{suffix}")),
    ]
  return rules


def backbone_rules(backbone, target: str = "", source: str = "") -> list[Rule]:
  """Every parameter of an ``EndoMamba`` under ``target`` (``""`` or ``"backbone/"``) from the
  release keys under ``source`` (``""`` or ``"encoder."``)."""
  s, n = backbone.n_spatial, backbone.num_tokens
  rules = [Rule(f"{target}patch_embed/kernel", f"{source}patch_embed.proj.weight", PATCH_CONV),
           Rule(f"{target}patch_embed/bias", f"{source}patch_embed.proj.bias"),
           Rule(f"{target}pos_embed", f"{source}pos_embed", reshape_from((1, n, backbone.dim))),
           Rule(f"{target}norm_f/scale", f"{source}norm_f.weight")]
  if backbone.use_cls_token:
    rules.append(Rule(f"{target}cls_token", f"{source}cls_token",
                      reshape_from((1, 1, backbone.dim))))
  if s:
    rules += mamba_block_rules(f"{target}spatial_blocks", f"{source}layers", 0, True)
  if backbone.depth - s:
    rules += mamba_block_rules(f"{target}temporal_blocks", f"{source}layers", s, False)
  return rules


def _video(backbone, frames: int = 1):
  return jnp.zeros((1, frames, backbone.img_size, backbone.img_size, backbone.in_chans))


def backbone_recipe(model) -> Recipe:
  """An ``EndoMamba``, or one wrapped with a clip or phase head (``BackboneWithHead``), whose
  ``head/fc`` is the release's ``head`` Linear."""
  if hasattr(model, "head"):
    if model.kind not in ("clip", "phase"):
      raise ValueError(f"convert endomamba: the release's backbone has a linear head on the "
                       f"mean token; our {model.kind!r} head has no counterpart in it (convert "
                       "the backbone alone: create_model without head=)")
    rules = backbone_rules(model.backbone, "backbone/") + linear("head/fc", "head")
  else:
    rules = backbone_rules(model)
  backbone = getattr(model, "backbone", model)
  return Recipe(init=lambda m, rng: m.init(rng, _video(backbone)), rules=rules)


def pretrain_recipe(model) -> Recipe:
  """An ``EndoMambaPretrainer`` (no ``align_proj``: the release's teacher has the student's
  width). The decoder's sinusoidal position table is not a parameter in either."""
  bb, t = model.backbone, model.num_frames
  rules = backbone_rules(bb, "backbone/", "encoder.")
  rules += linear("decoder/embed", "encoder_to_decoder", bias=False)
  rules += [Rule("decoder/mask_token", "mask_token", reshape_from((1, 1, model.decoder_dim)))]
  rules += vit_block_rules("decoder/stack/blocks", "decoder.blocks.{i}")
  rules += layer_norm("decoder/norm", "decoder.norm") + linear("decoder/head", "decoder.head")
  grid = bb.grid_size  # a tube mask with the model's count of masked patches a frame
  masked = (jnp.arange(grid * grid) < model.num_masked).reshape(grid, grid)
  mask = jnp.broadcast_to(masked, (1, t, grid, grid))
  init = lambda m, rng: m.init(rng, _video(bb, t), mask, train=False)
  return Recipe(init=init, rules=rules)
