"""k nearest DB chunks per query chunk, with same-document filtering.

RETRO packs training sequences across documents; a retrieved chunk must not
come from any document the sequence contains, or the model learns to copy its
own continuation (docs/design.md §3). `search_filtered` asks the index for more
candidates than needed, drops those of excluded documents, and asks again
with twice as many for the queries left short, until k survive or the whole
DB was searched (both searchers are exhaustive when asked for n).

`Retriever` ties an embedder, an index and the DB's lookups together; it
knows the DB only through two callables, so any store can back it.

Shape glossary:
  q: queries.      D: embedding width.      k: neighbours per query.
  c: candidates fetched per query.          r: tokens per neighbour value.
"""

from __future__ import annotations

from typing import (Callable, Collection, NamedTuple, Optional, Protocol,
                    Sequence, Tuple)

import numpy as np

from retro_jax.retrieval.index import Searcher

IdLookup = Callable[[np.ndarray], np.ndarray]


class Neighbours(NamedTuple):
  """The k nearest DB chunks of each query, nearest first."""

  ids: np.ndarray  # int64 [q, k]; -1 = no neighbour.
  dists: np.ndarray  # float32 [q, k] squared L2; +inf where ids is -1.


def filter_rows(ids: np.ndarray, dists: np.ndarray, docs: np.ndarray,
                 exclude: Sequence[Collection[int]],
                 k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Keeps, per row, the first k candidates whose document is not excluded.

  Args:
    ids, dists: [q, c] candidates, nearest first, -1 / +inf as padding.
    docs: int64 [q, c] document ids of `ids` (anything where ids is -1).
    exclude: q collections of excluded document ids.
    k: neighbours wanted.
  Returns:
    (ids [q, k], dists [q, k], count [q]) with count the survivors per row
    (at most k); the rest is padding.
  """
  out_ids = np.full((len(ids), k), -1, np.int64)  # [q, k]
  out_dists = np.full((len(ids), k), np.inf, np.float32)  # [q, k]
  count = np.zeros(len(ids), np.int64)  # [q]
  for i in range(len(ids)):
    banned = np.fromiter(exclude[i], np.int64, len(exclude[i]))
    keep = (ids[i] >= 0) & ~np.isin(docs[i], banned)  # [c]
    keep = np.flatnonzero(keep)[:k]
    count[i] = len(keep)
    out_ids[i, :len(keep)] = ids[i, keep]
    out_dists[i, :len(keep)] = dists[i, keep]
  return out_ids, out_dists, count


def search_filtered(searcher: Searcher, queries: np.ndarray, k: int,
                    doc_ids_of: IdLookup,
                    exclude: Sequence[Collection[int]]) -> Neighbours:
  """The k nearest neighbours of each query outside its excluded documents.

  Args:
    searcher: an index (`ExactSearcher`, `ScannSearcher`).
    queries: float32 [q, D].
    k: neighbours per query.
    doc_ids_of: int64 DB ids [m] -> their document ids [m].
    exclude: for each query, the document ids it must not retrieve from
      (for training: every document of its sequence).
  Returns:
    Neighbours [q, k], sorted by distance, padded with -1 / +inf when fewer
    than k DB chunks lie outside the excluded documents.
  """
  queries = np.asarray(queries, np.float32)
  if len(exclude) != len(queries):
    raise ValueError(f"exclude has {len(exclude)} entries for "
                     f"{len(queries)} queries")
  ids = np.full((len(queries), k), -1, np.int64)  # [q, k]
  dists = np.full((len(queries), k), np.inf, np.float32)  # [q, k]
  most = max((len(e) for e in exclude), default=0)
  fetch = min(searcher.n, max(4 * k, k + most))  # c, doubled on each pass.
  todo = np.arange(len(queries) if searcher.n else 0)  # Still short of k.
  while len(todo):
    cand, cand_dists = searcher.search(queries[todo], fetch)  # [t, c]
    docs = np.zeros(cand.shape, np.int64)  # [t, c]
    valid = cand >= 0
    docs[valid] = np.asarray(doc_ids_of(cand[valid]), np.int64)
    got, got_dists, count = filter_rows(
        cand, cand_dists, docs, [exclude[i] for i in todo], k)
    ids[todo], dists[todo] = got, got_dists
    if fetch >= searcher.n:  # Searched everything: what is left is all.
      break
    todo = todo[count < k]
    fetch = min(searcher.n, 2 * fetch)
  return Neighbours(ids, dists)


class Embedder(Protocol):
  """What `Retriever` needs of an embedder (BertEmbedder has it)."""

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [q, D]."""


class Retriever:
  """Texts or embeddings -> neighbour ids and their token values.

  Args:
    embedder: anything with `.embed(texts) -> float32 [q, D]` (BertEmbedder).
    searcher: the DB's index.
    doc_ids_of: int64 DB ids [m] -> int64 document ids [m].
    values_of: int64 DB ids [m] -> int32 [m, r] tokens (the chunk and its
      continuation, RETRO's neighbour value). Called with m = 0 too.
  """

  def __init__(self, embedder: Optional[Embedder], searcher: Searcher,
               doc_ids_of: IdLookup, values_of: IdLookup):
    self.embedder = embedder
    self.searcher = searcher
    self.doc_ids_of = doc_ids_of
    self.values_of = values_of

  def retrieve_texts(
      self, texts: Sequence[str], k: int,
      exclude: Optional[Sequence[Collection[int]]] = None
  ) -> Tuple[Neighbours, np.ndarray]:
    """Embeds `texts` and retrieves for them; see `retrieve_embeddings`."""
    if self.embedder is None:
      raise ValueError("this Retriever has no embedder: pass embeddings")
    return self.retrieve_embeddings(self.embedder.embed(texts), k, exclude)

  def retrieve_embeddings(
      self, embeddings: np.ndarray, k: int,
      exclude: Optional[Sequence[Collection[int]]] = None
  ) -> Tuple[Neighbours, np.ndarray]:
    """The k nearest DB chunks of each query and their values.

    Args:
      embeddings: float32 [q, D] queries.
      k: neighbours per query.
      exclude: per query, document ids not to retrieve from (None: none).
    Returns:
      (Neighbours [q, k], values int32 [q, k, r]); a missing neighbour
      (id -1) has all-zero values, the pad id, which the model masks.
    """
    embeddings = np.asarray(embeddings, np.float32)
    if exclude is None:
      exclude = [()] * len(embeddings)
    nb = search_filtered(self.searcher, embeddings, k, self.doc_ids_of,
                         exclude)
    valid = nb.ids >= 0  # [q, k]
    found = np.asarray(self.values_of(nb.ids[valid]), np.int32)  # [m, r]
    if found.ndim != 2:
      raise ValueError(f"values_of must return [m, r], got {found.shape}")
    values = np.zeros((*nb.ids.shape, found.shape[1]), np.int32)  # [q, k, r]
    values[valid] = found
    return nb, values
