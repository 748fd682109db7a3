"""The RETRO network: a decoder LM with chunked cross-attention to neighbours.

Shape glossary:
  B: batch.            N: sequence length, a multiple of m.
  m: chunk size.       L: chunks per sequence, N // m.
  k: neighbours.       r: tokens per neighbour (chunk + continuation).
  D: decoder width.    E: encoder width.      V: vocabulary.

The wiring of the layers (embedding, self-attention, CCA, MLP, logits) is
`stack.decoder_logits`; here it runs over whole sequences (`WholeSequence`),
as `decoding.Decoder` runs it one cached token at a time.

Padding (token id 0) in `neighbours` is masked everywhere; a chunk whose
neighbours are all padding receives exactly zero from every CCA layer, so the
logits equal those of the same parameters with retrieval switched off
(`neighbours=None`).

The neighbours of the last chunk reach one position only, the last (CCA
shifts by m - 1), and a next-token loss has no target there. With
`retrieve_for_last_position=False` they are never encoded and that position
is computed as if they were padding: the training and evaluation losses pass
it and skip 1/L of the encoder and CCA work, with every other logit the same.
"""

from __future__ import annotations

from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import RetroConfig
from retro_jax.model import neighbour_alignment
from retro_jax.model import stack


class WholeSequence:
  """`stack.Mode` of the full forward: causal self-attention over all N
  tokens and CCA of every chunk to its encoded neighbours at once."""

  remat = True  # A backward pass may follow (training).

  def __init__(self, cfg: RetroConfig, neighbours: Optional[jax.Array],
               retrieve_for_last_position: bool = True):
    """neighbours: [B, L, k, r] ids, or None to switch retrieval off."""
    retrieves = neighbours is not None and cfg.has_retrieval
    if retrieves and not retrieve_for_last_position:
      neighbours = neighbours[:, :-1]  # [B, L-1, k, r]: those CCA reads.
      retrieves = neighbours.shape[1] > 0
    self.retrieves = retrieves
    self.neighbours = neighbours if retrieves else None

  def self_attention(self, attn, h, cache):
    return attn(h), cache  # [B, N, D]

  def chunk_context(self, x, cache):
    return x, cache  # [B, N, D]: the encoder reads each chunk's m rows.

  def cross_attention(self, cca, h, encoded, valid, cache):
    return cca(h, encoded, valid), cache  # [B, N, D]


def _forward(cfg: RetroConfig, tokens: jax.Array,
             neighbours: Optional[jax.Array],
             retrieve_for_last_position: bool = True) -> jax.Array:
  """Logits [B, N, V] (float32) of tokens [B, N] given neighbours [B, L, k, r]."""
  if neighbours is not None and cfg.neighbour_alignment:
    neighbours = neighbour_alignment.align(tokens, neighbours, cfg.chunk_size,
                                           cfg.neighbour_alignment)
  mode = WholeSequence(cfg, neighbours, retrieve_for_last_position)
  return stack.decoder_logits(cfg, tokens, mode)[0]


def check_inputs(cfg: RetroConfig, tokens, neighbours) -> None:
  """Raises ValueError if tokens/neighbours do not fit the config."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape "
                     f"{tuple(tokens.shape)}")
  b, n = tokens.shape
  m = cfg.chunk_size
  if n == 0 or n % m:
    raise ValueError(f"sequence length {n} is not a positive multiple of the "
                     f"chunk size {m} (tokens shape {tuple(tokens.shape)})")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got {tokens.dtype}")
  _check_ids("tokens", tokens, cfg.vocab_size)
  if neighbours is None:
    return
  want = f"[batch={b}, chunks={n // m}, k, r]"
  if neighbours.ndim != 4:
    raise ValueError(f"neighbours must be {want}, got shape "
                     f"{tuple(neighbours.shape)}")
  if neighbours.shape[:2] != (b, n // m):
    raise ValueError(f"neighbours must be {want} for tokens of shape "
                     f"{tuple(tokens.shape)}, got {tuple(neighbours.shape)}")
  if not jnp.issubdtype(neighbours.dtype, jnp.integer):
    raise ValueError(f"neighbours must be integers, got {neighbours.dtype}")
  _check_ids("neighbours", neighbours, cfg.vocab_size)


def _check_ids(name: str, ids, vocab_size: int) -> None:
  """Ids outside [0, V) would be clamped silently by the embedding lookup.
  Checked only for concrete arrays (under jit the values are unknown)."""
  if isinstance(ids, jax.core.Tracer) or ids.size == 0:
    return
  lo, hi = int(np.min(ids)), int(np.max(ids))
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f"{name} hold ids in [{lo}, {hi}] but the vocabulary "
                     f"has {vocab_size} entries (valid ids 0..{vocab_size - 1})")


class Retro:
  """RETRO as a pair of pure functions (Haiku-transformed, no apply rng).

  `init(rng, tokens, neighbours)` returns params; `apply(params, tokens,
  neighbours)` returns float32 logits [B, N, V]. `neighbours=None` runs the
  decoder without retrieval (every CCA layer and the encoder skipped).
  """

  def __init__(self, config: RetroConfig):
    self.config = config
    self._fn = hk.without_apply_rng(
        hk.transform(lambda t, nb, last=True: _forward(config, t, nb, last)))

  def init(self, rng: jax.Array, tokens: jax.Array,
           neighbours: Optional[jax.Array] = None) -> hk.Params:
    check_inputs(self.config, tokens, neighbours)
    if neighbours is None and self.config.has_retrieval:
      b, n = tokens.shape
      c = self.config
      neighbours = jnp.zeros((b, n // c.chunk_size, c.num_neighbours,
                              c.neighbour_len), jnp.int32)
    return self._fn.init(rng, tokens, neighbours)

  def apply(self, params: hk.Params, tokens: jax.Array,
            neighbours: Optional[jax.Array] = None, *,
            retrieve_for_last_position: bool = True) -> jax.Array:
    """Logits [B, N, V]. With `retrieve_for_last_position=False` the last
    chunk's neighbours are not encoded and the last position (the only one
    they reach) attends to none; losses without a target there pass it."""
    check_inputs(self.config, tokens, neighbours)
    return self._fn.apply(params, tokens, neighbours,
                          retrieve_for_last_position)

  def dummy_inputs(self, batch: int = 1, length: Optional[int] = None):
    """Zero tokens and neighbours of the right shapes, e.g. for `init`."""
    c = self.config
    n = length or c.chunk_size
    tokens = jnp.zeros((batch, n), jnp.int32)
    neighbours = jnp.zeros((batch, n // c.chunk_size, c.num_neighbours,
                            c.neighbour_len), jnp.int32)
    return tokens, neighbours


EMBEDDING_PARAMS = ("embed", "enc_embed", "output")


def count_params(params_or_config, exclude_embeddings: bool = False) -> int:
  """Number of parameters of a params tree or of a config (via eval_shape).

  With `exclude_embeddings`, the token embedding tables and the output
  (unembedding) matrix are left out, as in the paper's Table 2.
  """
  if isinstance(params_or_config, RetroConfig):
    model = Retro(params_or_config)
    params = jax.eval_shape(model.init, jax.random.key(0),
                            *model.dummy_inputs())
  else:
    params = params_or_config
  total = 0
  for mod, name, leaf in hk.data_structures.traverse(params):
    if exclude_embeddings and mod.split("/")[-1] in EMBEDDING_PARAMS:
      continue
    total += int(np.prod(leaf.shape))
  return total
