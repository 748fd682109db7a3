"""What the evaluated chunks retrieve: the DB, the leakage probe, the control.

`config.eval.neighbours` picks one (`MODES`):

  db      the run's DB (or --db), as in training: the k nearest chunks of
          documents other than the sequence's own. The paper's evaluation.
  leak    the leakage probe: the DB plus the evaluated text itself, chunked
          as the DB chunks it, embedded by the same frozen BERT and kept
          retrievable: its chunks carry document ids that no evaluated
          document has, so the document filter keeps them (as it keeps a
          copy of the text that entered a DB under another corpus spec: the
          paper's WikiText-103 / Wikipedia case, §4). A chunk's nearest
          neighbour is then itself and its continuation, the text that the
          next chunk predicts, so a model that reads its neighbours copies:
          the quickest check that a trained RETRO uses retrieval.
  random  the control: k DB chunks drawn uniformly for every chunk. A gain
          that survives it does not come from relevant retrieval.

Whatever the neighbours, the leakage ratio r(C) of each chunk is measured
against those it is predicted with, and `report.overlap_split` gives bits
per byte with retrieval on and off on the chunks with r(C) > 0.75 and on
the rest.

Shape glossary: S sequences, n tokens each, m chunk size, L = n // m,
k neighbours, r tokens per neighbour, C chunks, q queries, D embedding width.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from retro_jax.config import PAD_ID
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import sequence_neighbours
from retro_jax.retrieval.neighbours import Retriever

MODES = ("db", "leak", "random")
# Document ids of the evaluated text inside the probe's DB: above every id a
# corpus gives (ids are int64 hashes or counters well below 2**62).
LEAKED_DOC_BASE = np.int64(1) << np.int64(62)

Batch = Dict[str, np.ndarray]


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"config.eval.neighbours must be one of {MODES}, got "
                     f"{mode!r}")
  return mode


class UnionSearcher:
  """Several searchers as one: ids of searcher i are offset by the sizes of
  those before it; results are merged by distance."""

  kind = "union"

  def __init__(self, searchers: Sequence[index_lib.Searcher]):
    dims = {s.dim for s in searchers}
    if len(dims) != 1:
      raise ValueError(f"searchers of different widths {sorted(dims)}")
    self.searchers = list(searchers)
    self.dim = dims.pop()
    self.offsets = np.cumsum([0] + [s.n for s in searchers])  # [len + 1]
    self.n = int(self.offsets[-1])

  def search(self, queries: np.ndarray,
             k: int) -> Tuple[np.ndarray, np.ndarray]:
    queries = index_lib.check_queries(queries, self.dim, k)
    ids, dists = [], []
    for s, offset in zip(self.searchers, self.offsets):
      if not s.n:
        continue
      i, d = s.search(queries, min(k, s.n))  # [q, c]
      ids.append(np.where(i >= 0, i + offset, -1))
      dists.append(d)
    ids, dists = np.concatenate(ids, 1), np.concatenate(dists, 1)  # [q, c]
    order = np.argsort(dists, axis=1, kind="stable")[:, :k]
    return index_lib.pad(np.take_along_axis(ids, order, 1),
                         np.take_along_axis(dists, order, 1), k)


def evaluated_chunks(batches: Sequence[Batch], chunk_size: int
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The evaluated text as DB rows: (tokens int32 [C, m], values int32
  [C, 2m], doc ids int64 [C]) of every chunk that holds a token, in batch
  order. A value is the chunk and the next chunk of the same document
  (zeros after its last), as `RetrievalDB.neighbour_values` gives."""
  m = chunk_size
  tokens = np.concatenate([b["tokens"] for b in batches]).reshape(-1, m)
  docs = np.concatenate([b["doc_ids"] for b in batches])[:, ::m].reshape(-1)
  keep = (tokens != PAD_ID).any(1)  # [C]
  tokens, docs = tokens[keep].astype(np.int32), docs[keep].astype(np.int64)
  nxt = np.zeros_like(tokens)  # [C, m]
  same = docs[1:] == docs[:-1]  # [C - 1]
  nxt[:-1][same] = tokens[1:][same]
  return tokens, np.concatenate([tokens, nxt], 1), docs


def leaked_retriever(base: Retriever, sp, batches: Sequence[Batch],
                     chunk_size: int) -> Retriever:
  """A Retriever over `base`'s DB plus the text of `batches` (see MODES):
  its chunks are embedded by `base`'s BERT exactly as the queries are."""
  tokens, values, docs = evaluated_chunks(batches, chunk_size)
  texts = sequence_neighbours.chunk_texts(sp, tokens, chunk_size)
  extra = index_lib.ExactSearcher(base.embedder.embed(texts))  # [C, D]
  n_db = base.searcher.n
  leaked_docs = LEAKED_DOC_BASE + docs  # [C]

  def split(ids, of_db, of_extra, width):
    ids = np.asarray(ids, np.int64)
    out = np.zeros(ids.shape + width, of_extra.dtype)
    in_db = ids < n_db
    if in_db.any():
      out[in_db] = of_db(ids[in_db])
    out[~in_db] = of_extra[ids[~in_db] - n_db]
    return out

  return Retriever(
      base.embedder, UnionSearcher([base.searcher, extra]),
      doc_ids_of=lambda ids: split(ids, base.doc_ids_of, leaked_docs, ()),
      values_of=lambda ids: split(ids, base.values_of, values,
                                  (values.shape[1],)))


def with_random_neighbours(batches: Iterable[Batch], db, k: int,
                           seed: int = 0) -> Iterator[Batch]:
  """`batches` with k uniformly drawn DB chunks (and their continuations)
  as the neighbours of every chunk: the control (see MODES)."""
  rng = np.random.default_rng([seed, 0xC0E7])
  for batch in batches:
    b, n = batch["tokens"].shape
    l = n // db.chunk_size
    ids = rng.integers(0, db.num_chunks, (b, l, k))  # [b, L, k]
    yield dict(batch, neighbours=db.neighbour_values(ids))  # [b, L, k, 2m]


def materialize(batches: Iterable[Batch],
                max_batches: Optional[int]) -> List[Batch]:
  """The first `max_batches` batches (all when None), as a list: the leak
  probe embeds the whole evaluated text before the first batch is scored."""
  out = []
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    out.append(batch)
  return out
