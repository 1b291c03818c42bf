"""vidssm_jax: video state-space models (EndoMamba, E-ViM³) for medical video in JAX/Flax."""

__version__ = "0.1.0"
