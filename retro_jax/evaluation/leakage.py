"""Dataset-leakage measure of RETRO's evaluation (paper §2.6).

For an evaluation chunk C of m tokens, r(C) is the length of the longest
common token substring between C and the neighbours it is evaluated with,
divided by m: r(C) = 0 when no token of C occurs in them, 1 when C appears
whole inside one neighbour (a copy of the evaluation text in the DB).
Reporting bits-per-byte only over chunks with r(C) <= alpha, for growing
alpha, separates what retrieval gains from copying from what it gains
otherwise.

Which neighbours a chunk is evaluated with: with CCA shifted by m - 1, the
tokens of chunk u are predicted from positions u*m - 1 ... u*m + m - 2, which
attend to the neighbours retrieved for chunk u - 1 (neighbour chunk and its
continuation, r = 2m tokens). So by default ("previous") r(C_u) compares C_u
with Ret(C_{u-1}), the text that can leak into its predictions, and the first
chunk of a sequence (no neighbours) has r = 0. `source="same"` compares C_u
with Ret(C_u) instead.

Substrings never span two neighbours, and padding (id 0) matches nothing.

Shape glossary:
  S: sequences.   n: tokens per sequence.   m: chunk size.   L: n // m.
  k: neighbours.  r: tokens per neighbour.  C: chunks.
"""

from __future__ import annotations

import numpy as np

from retro_jax.config import PAD_ID

SOURCES = ("previous", "same")


def longest_common_substring(a: np.ndarray, b: np.ndarray,
                             pad_id: int = PAD_ID) -> int:
  """Length of the longest common contiguous run of tokens of a and b,
  ignoring pad tokens (which match nothing). a, b: 1-D int arrays."""
  a, b = np.asarray(a), np.asarray(b)
  prev = np.zeros(len(b) + 1, np.int64)
  best = 0
  for x in a:
    cur = np.zeros_like(prev)
    if x != pad_id:
      cur[1:] = np.where(b == x, prev[:-1] + 1, 0)
    best = max(best, int(cur.max()))
    prev = cur
  return best


def _lcs_batch(chunks: np.ndarray, neighbours: np.ndarray,
               pad_id: int) -> np.ndarray:
  """Longest common substring lengths [C] of chunks [C, m] against the
  neighbours [C, k, r] of each (max over the k neighbours)."""
  c, m = chunks.shape
  _, k, r = neighbours.shape
  nb_ok = neighbours != pad_id  # [C, k, r]
  prev = np.zeros((c, k, r + 1), np.int32)  # [C, k, r+1]
  best = np.zeros(c, np.int32)  # [C]
  for i in range(m):
    tok = chunks[:, i]  # [C]
    eq = (neighbours == tok[:, None, None]) & nb_ok  # [C, k, r]
    eq &= (tok != pad_id)[:, None, None]
    cur = np.zeros_like(prev)
    cur[..., 1:] = np.where(eq, prev[..., :-1] + 1, 0)
    best = np.maximum(best, cur.reshape(c, -1).max(axis=1))
    prev = cur
  return best


def chunk_leakage(tokens: np.ndarray, neighbours: np.ndarray,
                  chunk_size: int, source: str = "previous",
                  pad_id: int = PAD_ID, block: int = 512) -> np.ndarray:
  """r(C) of every chunk of every sequence.

  Args:
    tokens: int [S, n] evaluation sequences.
    neighbours: int [S, L, k, r], the neighbours retrieved for each chunk.
    chunk_size: m.
    source: "previous" (Ret(C_{u-1}), the neighbours C_u is predicted
      with) or "same" (Ret(C_u)).
    pad_id: padding id (matches nothing).
    block: chunks processed at once (memory ~ block * k * r * m bytes).
  Returns:
    float32 [S, L] in [0, 1].
  """
  if source not in SOURCES:
    raise ValueError(f"leakage source must be one of {SOURCES}, got "
                     f"{source!r}")
  tokens, neighbours = np.asarray(tokens), np.asarray(neighbours)
  s, n = tokens.shape
  m = chunk_size
  if n % m or neighbours.shape[:2] != (s, n // m):
    raise ValueError(f"tokens {tokens.shape} and neighbours "
                     f"{neighbours.shape} do not match chunk size {m}")
  chunks = tokens.reshape(s, n // m, m)  # [S, L, m]
  if source == "previous":
    nbs = np.zeros_like(neighbours)  # [S, L, k, r]
    nbs[:, 1:] = neighbours[:, :-1]
  else:
    nbs = neighbours
  flat_chunks = chunks.reshape(-1, m)  # [C, m]
  flat_nbs = nbs.reshape(-1, *nbs.shape[2:])  # [C, k, r]
  out = np.zeros(len(flat_chunks), np.int32)
  for lo in range(0, len(flat_chunks), block):
    out[lo:lo + block] = _lcs_batch(flat_chunks[lo:lo + block],
                                    flat_nbs[lo:lo + block], pad_id)
  return (out / m).astype(np.float32).reshape(s, n // m)
