"""r(C), the leakage ratio of paper §2.6, against a brute-force reference."""

import numpy as np
import pytest

from retro_jax.evaluation import leakage


def brute_lcs(a, b, pad=0):
  """Longest common run of a and b by trying every pair of starts."""
  best = 0
  for i in range(len(a)):
    for j in range(len(b)):
      n = 0
      while (i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n]
             and a[i + n] != pad):
        n += 1
      best = max(best, n)
  return best


def brute_leakage(tokens, neighbours, m, source):
  s, n = tokens.shape
  out = np.zeros((s, n // m), np.float32)
  for i in range(s):
    for u in range(n // m):
      src = u - 1 if source == "previous" else u
      if src < 0:
        continue
      chunk = tokens[i, u * m:(u + 1) * m]
      out[i, u] = max(brute_lcs(chunk, nb) for nb in neighbours[i, src]) / m
  return out


@pytest.mark.parametrize("source", ["previous", "same"])
def test_matches_brute_force_on_random_cases(source):
  rng = np.random.default_rng(0)
  for case in range(6):
    m, k, r = 8, 1 + case % 3, 16
    s, l = 2, 3
    vocab = 3 + case  # Small vocabularies: many partial matches.
    tokens = rng.integers(0, vocab, (s, l * m))
    neighbours = rng.integers(0, vocab, (s, l, k, r))
    # Plant copies of chunk text (the leak the measure is for).
    neighbours[0, 0, 0, 3:3 + m] = tokens[0, m:2 * m]
    neighbours[1, 1, -1, 5:10] = tokens[1, 2 * m + 1:2 * m + 6]
    got = leakage.chunk_leakage(tokens, neighbours, m, source, block=2)
    want = brute_leakage(tokens, neighbours, m, source)
    np.testing.assert_array_equal(got, want)
    assert 0.0 <= got.min() and got.max() <= 1.0


def test_planted_copy_and_padding():
  m = 8
  tokens = np.arange(1, 2 * m + 1)[None]  # [1, 16], no repeats.
  neighbours = np.zeros((1, 2, 2, 2 * m), np.int64)
  neighbours[0, 0, 1, m:] = tokens[0, m:]  # Continuation == chunk 1.
  r = leakage.chunk_leakage(tokens, neighbours, m)
  assert r.tolist() == [[0.0, 1.0]]  # First chunk has no neighbours.
  assert leakage.chunk_leakage(tokens, neighbours, m, "same").tolist() == [
      [0.0, 0.0]]
  # Padding never matches padding.
  pad_tokens = np.zeros((1, 2 * m), np.int64)
  assert leakage.chunk_leakage(pad_tokens, np.zeros_like(neighbours),
                               m).max() == 0.0
  assert leakage.longest_common_substring([1, 2, 3, 0, 0],
                                          [9, 2, 3, 0, 0]) == 2


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="source"):
    leakage.chunk_leakage(np.zeros((1, 8)), np.zeros((1, 1, 1, 4)), 8, "x")
  with pytest.raises(ValueError, match="do not match"):
    leakage.chunk_leakage(np.zeros((1, 8)), np.zeros((1, 2, 1, 4)), 8)
