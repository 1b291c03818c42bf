"""Models: ``create_model(name, **overrides)`` builds any registered preset.

Importing this package imports every model module so that their presets register.
"""

from vidssm_jax.models.registry import create_model, list_models, register

__all__ = ["create_model", "list_models", "register"]

from vidssm_jax.models import endomamba, vit  # noqa: F401,E402  (registers the presets)
from vidssm_jax.models import evim3  # noqa: F401,E402  (registers the E-ViM³ presets)
from vidssm_jax.models import videomamba  # noqa: F401,E402  (registers the VideoMamba presets)
