"""Analytic training FLOPs (retro_jax.model.flops) against what the model
holds and computes."""

import numpy as np
import pytest

from retro_jax import count_params
from retro_jax.config import RetroConfig
from retro_jax.model import flops


@pytest.mark.parametrize("t, block", [(256, 64), (512, 128), (100, 64),
                                      (64, 64)])
def test_causal_score_pairs_count_the_blocks_causal_attend_computes(t, block):
  # causal_attend: query block i reads keys [0, (i + 1) * block), or one
  # full T x T product when T is not a multiple of the block.
  if t % block or t <= block:
    want = t * t
  else:
    want = sum(block * (i + 1) * block for i in range(t // block))
  assert flops.causal_score_pairs(t, block) == want
  assert flops.causal_score_pairs(t, block) <= t * t


def test_dense_flops_are_six_per_weight_and_token():
  """Without retrieval every decoder weight (norm scales aside) is used once
  a token in the forward pass: 2 FLOPs, and 6 with the backward."""
  cfg = RetroConfig.preset("tiny", cca_layers=())
  b, n = 2, 256
  out = flops.train_flops(cfg, b, n, retrieval=False)
  norms = (2 * cfg.num_layers + 1) * cfg.d_model
  dense = count_params(cfg, exclude_embeddings=True) - norms
  assert out["decoder_dense"] == 6 * dense * b * n
  assert out["logits"] == 6 * cfg.d_model * cfg.vocab_size * b * n
  assert not any(name.startswith(("cca", "encoder")) for name in out)
  assert out["total"] == pytest.approx(sum(
      v for name, v in out.items() if name != "total"))


def test_retrieval_adds_encoder_and_cca_for_all_chunks_but_the_last():
  cfg = RetroConfig.preset("tiny")
  b, n, m = 1, 256, cfg.chunk_size
  on = flops.train_flops(cfg, b, n)
  off = flops.train_flops(cfg, b, n, retrieval=False)
  for name in ("decoder_dense", "decoder_self_attention", "logits"):
    assert on[name] == off[name]
  assert on["total"] > off["total"]
  # The encoder's dense work grows with the L - 1 encoded chunks.
  longer = flops.train_flops(cfg, b, 2 * n)
  chunks, longer_chunks = n // m - 1, 2 * n // m - 1
  np.testing.assert_allclose(
      longer["encoder_dense"] / on["encoder_dense"], longer_chunks / chunks)
