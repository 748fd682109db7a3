"""retro_jax: RETRO (Borgeaud et al., 2022) in JAX + Haiku."""

from retro_jax.config import PRESETS, RetroConfig
from retro_jax.model import Retro, count_params
from retro_jax.retrieval.embedder import BertEmbedder

__all__ = ["BertEmbedder", "PRESETS", "Retro", "RetroConfig", "count_params"]
__version__ = "0.1.0"
