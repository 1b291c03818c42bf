"""Pure JAX ops (no Flax): the selective scan and the causal depthwise convolution."""

from vidssm_jax.ops.causal_conv1d import causal_conv1d, causal_conv1d_step
from vidssm_jax.ops.selective_scan import selective_scan, selective_scan_step

__all__ = ["causal_conv1d", "causal_conv1d_step", "selective_scan", "selective_scan_step"]
