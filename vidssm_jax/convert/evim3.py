"""The E-ViM³ release (github.com/HenryZhou19/E-ViM3) -> our ``EViM3`` params.

Two sources:

    "evim3"           the EchoNet-Dynamic fine-tuning model (``echo_dynamic_video_mamba_3d``):
                      ``net.*`` the encoder, ``final.*`` the per-token LayerNorm and the first
                      head Linear, ``ef_head.net.mlp.*`` the EF MLP
    "evim3_pretrain"  the MAE pretraining model (``pretrain_video_mamba_3d_efficient``): ``net.*``
                      and ``pretrain_decoder*``, ``decoder_random_patch_mask_maker.mask_token``

Release names -> ours, per Mamba-3D block ``i`` (``net.encoder.{i}`` or
``pretrain_decoder.decoder_blocks.{i}``) and layer ``j`` of its six (``hwl_mamba``,
``r_hwl_mamba``, ``lwh_mamba``, ``r_lwh_mamba``, ``lhw_mamba``, ``r_lhw_mamba``, our
``layers_0..5``; each a one-layer ``Mamba`` whose ``mamba_layers.0`` holds ``norm`` and
``mamba_block``), stacked over ``i`` into the scanned ``stack/blocks``:

    mamba_block.in_proj / out_proj / x_proj .weight   mixer/{in_proj,out_proj}, mixer/ssm/x_proj
    mamba_block.conv1d.weight (D, 1, k), .bias        mixer/ssm/conv_weight (k, D), conv_bias
    mamba_block.dt_proj.weight (D, r), .bias          mixer/ssm/dt_proj_kernel (r, D), dt_bias
    mamba_block.A_log, .D                             mixer/ssm/A_log, D
    norm.weight, .bias                                norm/scale, bias

The release's ``encoder_random_patch_mask_maker.mask_token`` is written into masked positions the
efficient encoder then drops, so it never reaches the output: it is accepted and ignored.
"""

from __future__ import annotations

import jax.numpy as jnp

from vidssm_jax import masking
from vidssm_jax.convert import (CONV1D_DEPTHWISE, LINEAR, Recipe, Rule, Transform, conv3d_patch,
                                layer_norm, linear, reshape_from)

RELEASE_LAYERS = ("hwl_mamba", "r_hwl_mamba", "lwh_mamba", "r_lwh_mamba", "lhw_mamba",
                  "r_lhw_mamba")


def mamba_3d_rules(target: str, source: str) -> list[Rule]:
  """The six Mamba layers of every block of a scanned Mamba-3D stack: ``target`` e.g.
  ``"encoder/stack/blocks"``, ``source`` e.g. ``"net.encoder"`` (blocks ``{source}.{i}``)."""
  rules = []
  for j, name in enumerate(RELEASE_LAYERS):
    ours, theirs = f"{target}/layers_{j}", f"{source}.{{i}}.{name}.mamba_layers.0"
    mixer, block = f"{ours}/mixer", f"{theirs}.mamba_block"
    rules += layer_norm(f"{ours}/norm", f"{theirs}.norm")
    rules += [
        Rule(f"{mixer}/in_proj/kernel", f"{block}.in_proj.weight", LINEAR),
        Rule(f"{mixer}/out_proj/kernel", f"{block}.out_proj.weight", LINEAR),
        Rule(f"{mixer}/ssm/x_proj/kernel", f"{block}.x_proj.weight", LINEAR),
        Rule(f"{mixer}/ssm/conv_weight", f"{block}.conv1d.weight", CONV1D_DEPTHWISE),
        Rule(f"{mixer}/ssm/conv_bias", f"{block}.conv1d.bias"),
        Rule(f"{mixer}/ssm/dt_proj_kernel", f"{block}.dt_proj.weight", LINEAR),
        Rule(f"{mixer}/ssm/dt_bias", f"{block}.dt_proj.bias"),
        Rule(f"{mixer}/ssm/A_log", f"{block}.A_log"),
        Rule(f"{mixer}/ssm/D", f"{block}.D"),
    ]
  return rules


def _pos_rules(target: str, source: str, shape: tuple, dim: int) -> list[Rule]:
  """Factorised position embeddings: ``{source}{a}_pos_embed`` (1, L+, 1, 1, dim) etc. ->
  ``{target}/pos_embed_{a}`` (L+, dim)."""
  rules = []
  for axis, (a, n) in enumerate(zip("lhw", shape)):
    release = [1, 1, 1, 1, dim]
    release[1 + axis] = n
    rules.append(Rule(f"{target}/pos_embed_{a}", f"{source}{a}_pos_embed",
                      reshape_from(tuple(release))))
  return rules


def encoder_rules(model) -> list[Rule]:
  """``net.*`` -> ``encoder/*`` (all but ``norm_f``, which the release keeps in ``final``)."""
  d = model.dim
  rules = [Rule("encoder/patch_embed/kernel", "net.patch_embed.proj.weight",
                conv3d_patch((model.tubelet, model.patch, model.patch))),
           Rule("encoder/patch_embed/bias", "net.patch_embed.proj.bias")]
  for ours, theirs, n in (("face", "faces", 6), ("edge", "edges", 12),
                          ("corner", "corners", 8)):
    rules.append(Rule(f"encoder/{ours}_tokens", f"net.global_{theirs}_token",
                      reshape_from((n, 1, 1, 1, 1, d))))
  if model.num_registers > 0:
    rules.append(Rule("encoder/register_token", "net.global_reg_token",
                      reshape_from((1, 1, 1, 1, d))))
  rules += _pos_rules("encoder", "net.", model.layout.shape, d)
  return rules + mamba_3d_rules("encoder/stack/blocks", "net.encoder")


def head_rules(model) -> list[Rule]:
  """``final.final_linear.mlp.0`` -> ``head/fc1``; ``ef_head.net.mlp.{0, 2, ..}`` -> ``head/mlp_k``
  and, last, ``head/fc``."""
  rules = linear("head/fc1", "final.final_linear.mlp.0")
  for k in range(model.head_layers - 1):
    rules += linear(f"head/mlp_{k}", f"ef_head.net.mlp.{2 * k}")
  return rules + linear("head/fc", f"ef_head.net.mlp.{2 * (model.head_layers - 1)}")


def pixel_order(in_chans: int, kernel: tuple, is_kernel: bool) -> Transform:
  """The release's patch pixels are ordered (C, t, h, w), ours (t, h, w, C): a Linear to pixels
  ``weight (P, dim)`` <-> ``kernel (dim, P)`` (``is_kernel``), or its bias ``(P,)``."""
  c, (t, h, w) = in_chans, kernel

  def forward(x, shape):
    y = x.reshape(c, t, h, w, -1).transpose(1, 2, 3, 0, 4).reshape(c * t * h * w, -1)
    return y.T if is_kernel else y[:, 0]

  def backward(y):
    y = y.T if is_kernel else y[:, None]
    x = y.reshape(t, h, w, c, -1).transpose(3, 0, 1, 2, 4).reshape(c * t * h * w, -1)
    return x if is_kernel else x[:, 0]

  return Transform(forward, backward)


def decoder_rules(model) -> list[Rule]:
  """``pretrain_decoder*`` and the decoder's mask token -> ``decoder/*``."""
  d = model.decoder_dim or model.dim
  kernel = (model.tubelet, model.patch, model.patch)
  rules = [Rule("decoder/mask_token", "decoder_random_patch_mask_maker.mask_token",
                reshape_from((1, d)))]
  rules += _pos_rules("decoder", "pretrain_decoder_", model.layout.shape, d)
  if model.decoder_depth:
    rules += mamba_3d_rules("decoder/stack/blocks", "pretrain_decoder.decoder_blocks")
  rules += layer_norm("decoder/norm", "pretrain_decoder.final_norm")
  return rules + [
      Rule("decoder/pred/kernel", "pretrain_decoder.patch_reconstruct.weight",
           pixel_order(model.in_chans, kernel, is_kernel=True)),
      Rule("decoder/pred/bias", "pretrain_decoder.patch_reconstruct.bias",
           pixel_order(model.in_chans, kernel, is_kernel=False)),
  ]


def _video(model):
  return jnp.zeros((1, model.num_frames, model.img_size, model.img_size, model.in_chans))


def finetune_recipe(model) -> Recipe:
  """Source ``"evim3"``: the fine-tuning model (``pool="egt_concat"``, the release's head)."""
  rules = (encoder_rules(model) + layer_norm("encoder/norm_f", "final.final_norm")
           + head_rules(model))
  return Recipe(init=lambda m, rng: m.init(rng, _video(m)), rules=rules)


def pretrain_recipe(model) -> Recipe:
  """Source ``"evim3_pretrain"``: the MAE model (``pretrain_norm=False``, as the release)."""

  def init(m, rng):
    mask = masking.batched_mask(rng, 1, m.token_grid, m.mask_ratio, m.mask_kind,
                                time_chain=m.time_chain, space_chain=m.space_chain)
    return m.init(rng, _video(m), mask, method=m.pretrain_loss)

  return Recipe(init=init, rules=encoder_rules(model) + decoder_rules(model),
                ignore=(r"encoder_random_patch_mask_maker\.mask_token",))
