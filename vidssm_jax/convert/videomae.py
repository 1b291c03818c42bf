"""VideoMAE(-v2) ViT checkpoints (github.com/OpenGVLab/VideoMAEv2, ``models/modeling_finetune.py``
``VisionTransformer``) -> our ``VideoViT`` params: source ``"videomae"``.

The target is a ``VideoViT`` built with ``k_bias=False`` (VideoMAE's attention biases) and
``tubelet`` as the checkpoint's; with ``use_mean_pooling=True`` (the released fine-tuned models)
it holds ``fc_norm`` and, with ``num_classes > 0``, ``head``; otherwise a final ``norm``.
Release names -> ours, per block ``i`` (slice ``i`` of the scanned ``stack/blocks``):

    patch_embed.proj.weight (dim, C, tt, p, p), .bias    patch_embed kernel (tt, p, p, C, dim)
    blocks.{i}.norm1 / norm2                             norm1 / norm2
    blocks.{i}.attn.qkv.weight (3·dim, dim)              attn/qkv/kernel (dim, 3·dim)
    blocks.{i}.attn.q_bias, .v_bias                      attn/q_bias, attn/v_bias
    blocks.{i}.attn.proj, mlp.fc1, mlp.fc2               attn/proj, fc1, fc2
    norm | fc_norm, head                                 norm | fc_norm, head

The position table is VideoMAE's fixed sinusoid (not in its state_dict; ours is the same table,
``vit.sinusoidal_table``). Layer scale (``gamma_1``/``gamma_2``, ``init_values > 0``), learnable
position embeddings and cosine attention are not supported: their keys are reported as
unexpected.
"""

from __future__ import annotations

import jax.numpy as jnp

from vidssm_jax.convert import Recipe, Rule, Transform, layer_norm, linear

# torch Conv3d weight (dim, C, tt, p, p) <-> flax nn.Conv kernel (tt, p, p, C, dim).
CONV3D = Transform(lambda w, shape: w.transpose(2, 3, 4, 1, 0),
                   lambda k: k.transpose(4, 3, 0, 1, 2))


def vit_block_rules(target: str, source: str) -> list[Rule]:
  """A scanned stack of VideoMAE-style blocks (q and v biases only): ``target`` our stacked
  blocks (``"stack/blocks"``), ``source`` the release's with ``{i}`` (``"blocks.{i}"``)."""
  rules = layer_norm(f"{target}/norm1", f"{source}.norm1")
  rules += layer_norm(f"{target}/norm2", f"{source}.norm2")
  rules += linear(f"{target}/attn/qkv", f"{source}.attn.qkv", bias=False)
  rules += [Rule(f"{target}/attn/q_bias", f"{source}.attn.q_bias"),
            Rule(f"{target}/attn/v_bias", f"{source}.attn.v_bias")]
  rules += linear(f"{target}/attn/proj", f"{source}.attn.proj")
  rules += linear(f"{target}/fc1", f"{source}.mlp.fc1")
  rules += linear(f"{target}/fc2", f"{source}.mlp.fc2")
  return rules


def recipe(model) -> Recipe:
  """Source ``"videomae"``: every parameter of a ``VideoViT`` with ``k_bias=False``."""
  if model.k_bias or not model.qkv_bias:
    raise ValueError("convert videomae: the target VideoViT needs k_bias=False and "
                     "qkv_bias=True (VideoMAE's q and v biases): create_model('vit_s', "
                     "k_bias=False, tubelet=2, ...)")
  rules = [Rule("patch_embed/kernel", "patch_embed.proj.weight", CONV3D),
           Rule("patch_embed/bias", "patch_embed.proj.bias")]
  rules += vit_block_rules("stack/blocks", "blocks.{i}")
  if model.use_mean_pooling:
    if model.num_classes:
      rules += layer_norm("fc_norm", "fc_norm") + linear("head", "head")
  else:
    rules += layer_norm("norm", "norm")

  def init(m, rng):
    return m.init(rng, jnp.zeros((1, m.tubelet, m.img_size, m.img_size, m.in_chans)))

  return Recipe(init=init, rules=rules)
