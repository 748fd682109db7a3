"""RETROfit (retro_jax.training.retrofit): a baseline's weights inside a
RETRO model, the retrieval components left as initialised."""

import dataclasses

import jax
import numpy as np
import pytest

from conftest import random_neighbours, random_tokens
from retro_jax.config import RetroConfig
from retro_jax.model.network import Retro
from retro_jax.training import retrofit
from retro_jax.training.step import is_retrieval_module


def _init(cfg: RetroConfig, seed: int):
  tokens = random_tokens(cfg, 1, 2 * cfg.chunk_size)
  neighbours = random_neighbours(cfg, 1, 2 * cfg.chunk_size)
  return Retro(cfg).init(jax.random.key(seed), tokens, neighbours)


@pytest.mark.parametrize("scan", [False, True])
def test_graft_takes_every_non_retrieval_weight_from_the_baseline(tiny, scan):
  retro_cfg = dataclasses.replace(tiny, scan_layers=scan)
  base_cfg = dataclasses.replace(retro_cfg, cca_layers=())
  retro, base = _init(retro_cfg, 0), _init(base_cfg, 1)
  out = retrofit.graft(retro, base)
  source = retrofit.per_layer(base)
  assert retrofit.per_layer(out).keys() == source.keys()
  for key, value in retrofit.per_layer(out).items():
    np.testing.assert_array_equal(value, source[key])  # From the baseline.
  retrieval = [m for m in out if is_retrieval_module(m)]
  assert retrieval  # CCA and the encoder: kept as initialised.
  for module in retrieval:
    for name, value in out[module].items():
      np.testing.assert_array_equal(value, retro[module][name])


def test_a_baseline_of_another_shape_is_refused(tiny):
  wider = dataclasses.replace(tiny, cca_layers=(), d_ff=2 * tiny.d_ff)
  with pytest.raises(ValueError, match="d_ff"):
    retrofit.check_baseline(wider, tiny)
  retrofit.check_baseline(dataclasses.replace(tiny, cca_layers=()), tiny)
