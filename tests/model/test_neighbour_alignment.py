"""Neighbours aligned to their query chunk (model/neighbour_alignment.py):
a loop reference, planted copies found at their offset, unrelated neighbours
dropped, idempotence, and the model applying it itself."""

import jax
import numpy as np
import pytest

from retro_jax.config import RetroConfig
from retro_jax.model import neighbour_alignment
from retro_jax.model.network import Retro

M = 8  # Small chunks keep the loop reference quick.


def _reference(tokens, neighbours, m, min_matches):
  """The definition, one neighbour at a time."""
  b, num_chunks, k, r = neighbours.shape
  out = np.zeros_like(neighbours)
  for i in range(b):
    for u in range(num_chunks):
      q = tokens[i, u * m:(u + 1) * m]
      for j in range(k):
        nb = neighbours[i, u, j]
        best = None
        for s in range(-(m - 1), m):
          hits = sum(1 for t in range(m)
                     if 0 <= t + s < r and q[t] != 0 and nb[t + s] == q[t])
          key = (hits, -abs(s))
          if best is None or key > best[0]:
            best = (key, s)
        (hits, _), s = best
        if hits >= min_matches:
          out[i, u, j] = [nb[t + s] if 0 <= t + s < r else 0
                          for t in range(r)]
  return out


def test_matches_the_loop_reference_on_random_and_planted_text():
  rng = np.random.default_rng(0)
  b, num_chunks, k, r = 2, 3, 3, 2 * M
  tokens = rng.integers(1, 6, (b, num_chunks * M)).astype(np.int32)
  tokens[1, -3:] = 0  # Padding in the query never counts as a match.
  neighbours = rng.integers(0, 6, (b, num_chunks, k, r)).astype(np.int32)
  # Planted: the sequence's own text, starting 3 tokens early and late.
  neighbours[0, 0, 0, 3:] = tokens[0, :r - 3]
  neighbours[0, 1, 1, :r - 2] = tokens[0, M + 2:M + r]
  for min_matches in (1, 4, M):
    want = _reference(tokens, neighbours, M, min_matches)
    got = np.asarray(neighbour_alignment.align(tokens, neighbours, M,
                                               min_matches))
    np.testing.assert_array_equal(got, want)


def test_a_copy_at_an_offset_is_moved_under_its_chunk():
  rng = np.random.default_rng(1)
  text = rng.integers(1, 1000, 5 * M).astype(np.int32)  # A document.
  tokens = text[M:3 * M][None]  # [1, 2m]: chunks 0 and 1 of the query.
  for offset in (-5, 0, 3):  # The DB chunk starts `offset` tokens later.
    start = M + offset
    nb = text[start:start + 2 * M][None, None, None]  # [1, 1, 1, 2m]
    nbs = np.concatenate([nb, np.zeros_like(nb)], axis=1)  # [1, 2, 1, 2m]
    got = np.asarray(neighbour_alignment.align(tokens, nbs, M, M // 2))
    # Its first m tokens are the query chunk, the next m its continuation,
    # as far as the retrieved window reaches; the rest is padding.
    want = text[M:3 * M].copy()
    if offset < 0:  # The window ends before the continuation does.
      want[2 * M + offset:] = 0
    if offset > 0:  # It starts after the query chunk does.
      want[:offset] = 0
    np.testing.assert_array_equal(got[0, 0, 0], want)
    np.testing.assert_array_equal(got[0, 1, 0], 0)  # Empty stays empty.


def test_unrelated_neighbours_become_padding_and_it_is_idempotent():
  rng = np.random.default_rng(2)
  tokens = rng.integers(1, 500, (1, 2 * M)).astype(np.int32)
  unrelated = rng.integers(500, 900, (1, 2, 1, 2 * M)).astype(np.int32)
  np.testing.assert_array_equal(
      neighbour_alignment.align(tokens, unrelated, M, 1), 0)
  mixed = rng.integers(1, 4, (1, 2, 2, 2 * M)).astype(np.int32)
  once = neighbour_alignment.align(tokens, mixed, M, 2)
  np.testing.assert_array_equal(
      neighbour_alignment.align(tokens, once, M, 2), once)
  np.testing.assert_array_equal(
      neighbour_alignment.align_chunk(tokens[:, :M], mixed[:, 0], 2),
      np.asarray(once)[:, 0])


def test_the_model_aligns_its_neighbours_itself():
  cfg = RetroConfig.preset("tiny").replace(vocab_size=64)
  aligned_cfg = cfg.replace(neighbour_alignment=4)
  m = cfg.chunk_size
  rng = np.random.default_rng(3)
  tokens = rng.integers(1, 8, (2, 2 * m)).astype(np.int32)
  nbs = rng.integers(0, 8, (2, 2, cfg.num_neighbours, cfg.neighbour_len)
                     ).astype(np.int32)
  nbs[0, 0, 0, 5:5 + 2 * m - 5] = tokens[0, :2 * m - 5]
  plain, aligned = Retro(cfg), Retro(aligned_cfg)
  params = plain.init(jax.random.key(0), tokens, nbs)
  by_hand = neighbour_alignment.align(tokens, nbs, m, 4)
  np.testing.assert_array_equal(aligned.apply(params, tokens, nbs),
                                plain.apply(params, tokens, by_hand))
  assert not np.array_equal(np.asarray(by_hand), nbs)


def test_the_option_is_checked():
  with pytest.raises(ValueError, match="neighbour_alignment"):
    RetroConfig.preset("tiny").replace(neighbour_alignment=65)
