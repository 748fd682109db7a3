"""Neighbours shifted onto their query chunk, and dropped where none overlaps.

An option beside the paper's neighbour layout (`RetroConfig.
neighbour_alignment`; 0, the default, leaves neighbours as retrieved).

Why: a neighbour is a DB chunk and its continuation, cut at the DB's own
chunk boundaries. When the neighbour repeats the query's text, it usually does
so at some offset: on the quickstart's held-out files the first neighbour
holds the next chunk with r(C) > 0.75 at offset 0 for 0.7% of chunks, but at
the best offset in [-63, 63] tokens for 8.5% (docs/results.md §3). A model
that learnt to read its neighbours by position misses the others, and the
rest, which share no text, mostly mislead it.

What: for every neighbour of chunk u, the shift s in [-(m-1), m-1] at which
most of its tokens equal the query chunk's tokens position by position
(ties go to s = 0, then to the smallest |s|); the neighbour is read from
token s on, `aligned[i] = neighbour[i + s]` (0, padding, outside it), so its
first m tokens sit under the query chunk and the next m under chunk u+1, the
ones CCA predicts. A neighbour with fewer than `min_matches` such tokens at
its best shift becomes all padding: the model reads nothing from it.

The shift depends only on token ids, so it is computed inside the model (the
same for training, evaluation and sampling, cached or online neighbours) and
carries no gradient. Applying it twice changes nothing.

Shape glossary: B batch, N tokens, L = N / m chunks, k neighbours per chunk,
r tokens per neighbour, m chunk size, S = 2m - 1 shifts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _shift_order(m: int) -> jax.Array:
  """int32 [S]: shifts from -(m-1) to m-1, as indices 0..S-1."""
  return jnp.arange(-(m - 1), m, dtype=jnp.int32)


def align(tokens: jax.Array, neighbours: jax.Array, chunk_size: int,
          min_matches: int) -> jax.Array:
  """Neighbours [B, L, k, r] aligned to chunks of tokens [B, N]; see above.

  Args:
    tokens: int [B, N], N = L * chunk_size.
    neighbours: int [B, L, k, r], r >= chunk_size; 0 is padding.
    chunk_size: m.
    min_matches: a neighbour with fewer positional matches at its best
      shift becomes all padding (1: keep any neighbour sharing a token).
  Returns:
    int [B, L, k, r], the dtype of `neighbours`.
  """
  b, n = tokens.shape
  m = chunk_size
  _, num_chunks, k, r = neighbours.shape
  query = tokens.reshape(b, num_chunks, 1, 1, m)  # [B, L, 1, 1, m]
  pad = m - 1
  padded = jnp.pad(neighbours, ((0, 0), (0, 0), (0, 0), (pad, pad)))
  # [B, L, k, r + 2m - 2]
  shifts = _shift_order(m)  # [S]
  # Window of each shift under the query chunk: padded[s + pad + j].
  under = jnp.take(padded, (shifts + pad)[:, None] + jnp.arange(m)[None],
                   axis=-1)  # [B, L, k, S, m]
  hits = jnp.sum((under == query) & (query != 0), axis=-1,
                 dtype=jnp.int32)  # [B, L, k, S]
  # Most matches first; among equals the smallest |s| (s = 0 first).
  preference = hits * (2 * m) + (m - jnp.abs(shifts))  # [B, L, k, S]
  best = jnp.argmax(preference, axis=-1)  # [B, L, k]
  best_hits = jnp.take_along_axis(hits, best[..., None], axis=-1)[..., 0]
  shift = shifts[best]  # [B, L, k]
  index = shift[..., None] + pad + jnp.arange(r)  # [B, L, k, r]
  aligned = jnp.take_along_axis(padded, index, axis=-1)  # [B, L, k, r]
  keep = (best_hits >= min_matches)[..., None]  # [B, L, k, 1]
  return jnp.where(keep, aligned, 0).astype(neighbours.dtype)


def align_chunk(chunk: jax.Array, neighbours: jax.Array,
                min_matches: int) -> jax.Array:
  """`align` for one chunk per row: chunk [B, m], neighbours [B, k, r]
  (sampling, where neighbours arrive one completed chunk at a time)."""
  m = chunk.shape[1]
  return align(chunk, neighbours[:, None], m, min_matches)[:, 0]
