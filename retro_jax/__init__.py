"""retro_jax: RETRO (Borgeaud et al., 2022) in JAX + Haiku."""

from retro_jax.config import PRESETS, RetroConfig
from retro_jax.model.network import Retro, count_params
from retro_jax.retrieval.embedder import BertEmbedder


def load(workdir: str, step=None, mesh=None, **kwargs):
  """A trained run for research: config, params, tokenizer, DB and searcher,
  with generate / evaluate / logits / retrieve. See `retro_jax.inference.run.load`."""
  from retro_jax.inference import run  # pylint: disable=g-import-not-at-top
  return run.load(workdir, step, mesh, **kwargs)


__all__ = ["BertEmbedder", "PRESETS", "Retro", "RetroConfig", "count_params",
           "load"]
__version__ = "0.1.0"
