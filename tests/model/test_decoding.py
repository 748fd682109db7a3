"""KV-cached decoding (retro_jax.model.decoding): one token a step through
the same layer stack as the full forward, so the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.config import RetroConfig
from retro_jax.model.decoding import Decoder
from retro_jax.model.network import Retro


def _decode_all(decoder, params, tokens, neighbours):
  """Logits [B, N, V] of feeding tokens [B, N] one at a time, with chunk u's
  neighbours [B, L, k, r] passed at its last position (None: never)."""
  m = decoder.config.chunk_size
  state = decoder.init_state(tokens.shape[0], tokens.shape[1])
  got = []
  for pos in range(tokens.shape[1]):
    nb = None
    if neighbours is not None and (pos + 1) % m == 0:
      nb = jnp.asarray(neighbours[:, pos // m])
    logits, state = decoder.step(params, state, jnp.asarray(tokens[:, pos]),
                                 nb)
    got.append(np.asarray(logits))
  return np.stack(got, 1)


def _random_params(model, tokens, neighbours, seed=0):
  """Parameters of `model` drawn without compiling its init: norm scales
  near 1, every weight N(0, 0.1^2)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, neighbours)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(rng.normal(
          1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0,
          0.1, leaf.shape), jnp.float32), shapes)


def _check_decode_equals_forward(cfg, n):
  model = Retro(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, cfg.vocab_size, (2, n)).astype(np.int32)
  nbs = rng.integers(1, cfg.vocab_size,
                     (2, n // cfg.chunk_size, cfg.num_neighbours,
                      cfg.neighbour_len)).astype(np.int32)
  nbs[0, 1] = 0                      # A chunk without neighbours.
  nbs[1, 0, 1, cfg.chunk_size + 2:] = 0  # A short continuation.
  params = _random_params(model, tokens, nbs)
  apply = jax.jit(model.apply)
  want = np.asarray(apply(params, tokens, nbs))  # [2, n, V]
  decoder = Decoder(cfg)
  np.testing.assert_allclose(_decode_all(decoder, params, tokens, nbs), want,
                             atol=2e-5, rtol=1e-5)
  # Retrieval matters from the first chunk's last token on, so the
  # comparison is not vacuous. (All-padding neighbours switch retrieval off
  # without another compilation.)
  off = np.asarray(apply(params, tokens, np.zeros_like(nbs)))
  m = cfg.chunk_size
  assert np.abs(off[:, m - 1:] - want[:, m - 1:]).max(-1).min() > 1e-3
  np.testing.assert_allclose(_decode_all(decoder, params, tokens, None), off,
                             atol=2e-5, rtol=1e-5)


def test_decode_steps_equal_the_full_forward():
  # Runs: layers_00_01 (scanned), CCA 3 (encodes), CCA 4; chunks of 8 keep
  # the steps few. CCA query and key biases, a tied output.
  cfg = RetroConfig.preset("tiny", num_layers=4, cca_layers=(3, 4),
                           scan_layers=True, chunk_size=8, neighbour_len=16,
                           cca_qk_bias=True, tie_output=True)
  _check_decode_equals_forward(cfg, 24)


@pytest.mark.slow
def test_decode_steps_equal_the_full_forward_deeper():
  # Runs: layer_00 (single), CCA 2, layers_02_03 (scanned), CCA 5; untied
  # output, the encoder's own embedding.
  cfg = RetroConfig.preset("tiny", num_layers=5, cca_layers=(2, 5),
                           scan_layers=True, share_embeddings=False)
  _check_decode_equals_forward(cfg, 192)


def test_decoder_state_has_one_cache_a_run(tiny):
  state = Decoder(tiny).init_state(3, 128)
  assert state["pos"].shape == ()
  # tiny: layer_00, CCA 2 (holds the chunk's activations), layer_02, CCA 4.
  assert [sorted(c) for c in state["layers"]] == [
      ["k", "v"], ["cca_k", "cca_v", "cca_valid", "context", "k", "v"],
      ["k", "v"], ["cca_k", "cca_v", "cca_valid", "k", "v"]]
  assert state["layers"][0]["k"].shape == (3, tiny.num_heads, 128,
                                           tiny.head_dim)
  assert state["layers"][1]["context"].shape == (3, 64, tiny.d_model)


def test_decoder_rejects_another_k(tiny):
  decoder = Decoder(tiny)
  state = decoder.init_state(1, 64)
  with pytest.raises(ValueError, match="num_neighbours=k"):
    decoder.step({}, state, jnp.zeros((1,), jnp.int32),
                 jnp.zeros((1, 3, 128), jnp.int32))
