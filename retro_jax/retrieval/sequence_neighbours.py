"""Neighbours for every chunk of chunk-aligned sequences.

A sequence of n tokens is L = n / m chunks. Each chunk's k nearest DB chunks
are found, excluding every document that occurs anywhere in the sequence
(docs/design.md §3): a sequence of the end of document A and the start of
document B must not retrieve from A or B, or the model learns to copy. A
neighbour's value is the chunk followed by its continuation (r = 2m tokens,
`RetrievalDB.neighbour_values`); a missing neighbour is all zeros (pad).

Two ways to find them, chosen per sequence by `neighbours_for_batch`:

  neighbours_from_table      the sequence is L DB chunks (training): their
                             candidates are read from the DB's neighbour
                             table, computed once from the DB's own
                             embeddings, and filtered; a chunk left with
                             fewer than k is searched again with its stored
                             embedding. No BERT runs.
  neighbours_for_sequences   text not in the DB (held-out sets, prompts):
                             each chunk is detokenized, embedded by the
                             frozen BERT and searched.

`load_retriever` and `load_table` open a DB once per process (the embedder
and the index cost seconds to load), so a Beam worker or an evaluation loop
that calls them per batch pays that once. The embedder is named by its
checkpoint directory ("" = the bundled default), so a Beam worker that
unpickles a preprocessor opens the same embedder without any object being
handed over.

Shape glossary:
  S: sequences.    n: tokens per sequence.    m: chunk size (64).
  L: chunks per sequence (n / m).   k: neighbours.   r: tokens per neighbour.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from retro_jax.corpus import vocab
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import db_format
from retro_jax.retrieval import db_stage
from retro_jax.retrieval import build_job
from retro_jax.retrieval import index_shards
from retro_jax.retrieval import neighbours as nblib
from retro_jax.retrieval.neighbour_table import NeighbourTable
from retro_jax.retrieval.neighbours import Retriever

_RESOURCES: Dict[Tuple[str, ...], Tuple[Retriever, Any]] = {}
_DBS: Dict[str, dblib.RetrievalDB] = {}
_TABLES: Dict[str, "TableLookup"] = {}
_PROCESSORS: Dict[str, Any] = {}
_LOCK = threading.RLock()


def default_spm_path(spm_path: str, db_dir: str) -> str:
  """`spm_path`, else the copy of the vocabulary the DB build keeps in
  `db_dir` ("" if both are empty): the one place the data side (Tasks,
  their cache job, training and evaluation inputs) resolves the
  vocabulary of config.data.spm_path."""
  if spm_path or not db_dir:
    return spm_path or ""
  return os.path.join(db_dir, db_format.SPM_MODEL)


def _db_key(db_dir: str) -> str:
  """What a process's open DB is kept under: its folder and manifest bytes,
  so that a DB edited (or rebuilt) while the process runs is opened again,
  never served from the files of its earlier version."""
  path = os.path.join(db_dir, db_format.MANIFEST)
  try:
    with open(path, "rb") as f:
      stamp = db_format.sha256_bytes(f.read())
  except OSError:
    stamp = "no manifest"  # Opening it reports why.
  return f"{os.path.abspath(db_dir)}@{stamp}"


def load_retriever(db_dir: str, spm_path: str,
                   embedder: Union[str, Any, None] = "",
                   embed_batch: int = 32) -> Tuple[Retriever, Any]:
  """(Retriever, SentencePieceProcessor) for `db_dir`, loaded once per process.

  Args:
    db_dir: a finalized retrieval DB with its index.
    spm_path: the SentencePiece model of the sequences; must be the DB's.
    embedder: the BERT checkpoint directory ("" or None: the bundled
      default), loaded once per (directory, `embed_batch`); or a loaded
      BertEmbedder, reused for every call with the same weights.
    embed_batch: chunks per BERT forward pass of an embedder loaded here.
  Raises:
    ValueError: `spm_path` is not the vocabulary the DB was built with, or
      the embedder is not the DB's (both files / fingerprints named).
    IncompleteDBError: the DB is not finalized.
  """
  if isinstance(embedder, str) or embedder is None:
    which = ("path", os.path.abspath(embedder) if embedder else "",
             str(embed_batch))
  else:  # Keyed by what the embedder computes, not by the object.
    which = ("weights", embedder.fingerprint, str(embedder.batch_size))
  db_dir = db_stage.local_dir(db_dir)   # A gs:// DB: its staged copy.
  key = (_db_key(db_dir), os.path.abspath(spm_path)) + which
  with _LOCK:
    if key not in _RESOURCES:
      if isinstance(embedder, str) or embedder is None:
        from retro_jax.retrieval.embedder import BertEmbedder  # pylint: disable=g-import-not-at-top
        embedder_obj = BertEmbedder.load(embedder or None,
                                         batch_size=embed_batch)
      else:
        embedder_obj = embedder
      dblib.RetrievalDB.open(db_dir, spm_path=spm_path)  # Vocabulary check.
      db, searcher = build_job.open_for_queries(db_dir, embedder_obj)
      retriever = Retriever(embedder_obj, searcher, db.doc_ids_of,
                            db.neighbour_values)
      _RESOURCES[key] = (retriever, vocab.load(spm_path))
    return _RESOURCES[key]


def load_db(db_dir: str) -> dblib.RetrievalDB:
  """The finalized DB at `db_dir`, opened once per process."""
  db_dir = db_stage.local_dir(db_dir)
  key = _db_key(db_dir)
  with _LOCK:
    if key not in _DBS:
      _DBS[key] = dblib.RetrievalDB.open(db_dir)
    return _DBS[key]


class TableLookup:
  """A DB with its neighbour table, and its index opened only when a chunk
  needs searching again (a few per thousand): what table lookups need."""

  def __init__(self, db_dir: str):
    self.db = load_db(db_dir)
    self.table = NeighbourTable.open(db_dir)
    self._index_dir = db_format.index_dir_of(db_dir, self.db.manifest)
    self._searcher = None

  @property
  def searcher(self):
    with _LOCK:
      if self._searcher is None:
        self._searcher = index_shards.load(self._index_dir, self.db)
      return self._searcher


def load_table(db_dir: str) -> TableLookup:
  """The DB's `TableLookup`, opened once per process."""
  db_dir = db_stage.local_dir(db_dir)
  key = _db_key(db_dir)
  with _LOCK:
    if key not in _TABLES:
      _TABLES[key] = TableLookup(db_dir)
    return _TABLES[key]


def load_processor(spm_path: str):
  """The SentencePiece processor of `spm_path`, loaded once per process."""
  key = os.path.abspath(spm_path)
  with _LOCK:
    if key not in _PROCESSORS:
      _PROCESSORS[key] = vocab.load(spm_path)
    return _PROCESSORS[key]


def chunk_texts(sp, tokens: np.ndarray, chunk_size: int) -> list:
  """The detokenized text of every chunk of `tokens` [S, n], row-major
  ([S * L] strings); pad and EOS ids decode to nothing, as in the DB."""
  chunks = tokens.reshape(-1, chunk_size)  # [S * L, m]
  return [sp.decode([int(t) for t in c if t != dblib.PAD_ID]) for c in chunks]


def neighbours_for_sequences(
    retriever: Retriever, sp, tokens: np.ndarray, doc_ids: np.ndarray,
    k: int, chunk_size: int = 64,
    embeddings: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict]:
  """The k neighbours of every chunk, none from a document of its sequence.

  Args:
    retriever: a `Retriever` over the DB (see `load_retriever`).
    sp: the SentencePiece processor that detokenizes chunks for BERT.
    tokens: int32 [S, n] packed sequences, n a multiple of `chunk_size`.
    doc_ids: int64 [S, n] the document of every position.
    k: neighbours per chunk.
    chunk_size: m.
    embeddings: optional float32 [S * L, D] chunk embeddings (skips BERT).
  Returns:
    (neighbours int32 [S, L, k, r], stats) where stats has "chunks" (S * L),
    "dropped" (neighbours among each chunk's unfiltered k nearest that came
    from a document of its sequence and were replaced), "missing" (slots
    left empty because fewer than k DB chunks lie outside those documents),
    and per sequence "dropped_per_sequence", "missing_per_sequence" [S].
  """
  tokens = np.asarray(tokens)
  doc_ids = np.asarray(doc_ids, np.int64)
  if tokens.ndim != 2 or tokens.shape != doc_ids.shape:
    raise ValueError(f"tokens {tokens.shape} and doc_ids {doc_ids.shape} "
                     "must both be [S, n]")
  num_seq, n = tokens.shape
  if n % chunk_size:
    raise ValueError(f"sequence length {n} is not a multiple of the chunk "
                     f"size {chunk_size}")
  num_chunks = n // chunk_size
  if embeddings is None:
    embeddings = retriever.embedder.embed(
        chunk_texts(sp, tokens, chunk_size))  # [S * L, D]
  # Each chunk excludes every document of its own sequence.
  seq_docs = [set(np.unique(d).tolist()) for d in doc_ids]
  exclude = [seq_docs[i // num_chunks] for i in range(num_seq * num_chunks)]
  nb, values = retriever.retrieve_embeddings(embeddings, k, exclude)
  # What the filter replaced: excluded documents among the unfiltered top k.
  if retriever.searcher.n:
    top, _ = retriever.searcher.search(np.asarray(embeddings, np.float32),
                                       min(k, retriever.searcher.n))  # [q, k]
  else:
    top = np.full((len(exclude), 0), -1, np.int64)
  top_docs = np.zeros(top.shape, np.int64)
  top_docs[top >= 0] = retriever.doc_ids_of(top[top >= 0])
  dropped = np.array([
      int(np.isin(top_docs[i][top[i] >= 0], list(exclude[i])).sum())
      for i in range(len(exclude))]).reshape(num_seq, num_chunks)  # [S, L]
  missing = (nb.ids < 0).sum(-1).reshape(num_seq, num_chunks)  # [S, L]
  neighbours = values.reshape(num_seq, num_chunks, k, -1)  # [S, L, k, r]
  searched = np.full((num_seq, num_chunks), 1, np.int64)  # Every chunk.
  return neighbours.astype(np.int32), _stats(dropped, missing, searched)


def _stats(dropped: np.ndarray, missing: np.ndarray,
           searched: np.ndarray) -> Dict[str, Any]:
  """The retrieval counts of [S, L] per-chunk arrays, in total and per
  sequence."""
  return {"chunks": int(dropped.size), "dropped": int(dropped.sum()),
          "missing": int(missing.sum()), "searched": int(searched.sum()),
          "dropped_per_sequence": dropped.sum(-1).astype(np.int64),
          "missing_per_sequence": missing.sum(-1).astype(np.int64),
          "searched_per_sequence": searched.sum(-1).astype(np.int64)}


def neighbours_from_table(lookup: TableLookup, chunk_ids: np.ndarray,
                          k: int) -> Tuple[np.ndarray, Dict]:
  """The k neighbours of every chunk of sequences of DB chunks, none from a
  document of its sequence, from the neighbour table.

  Args:
    lookup: the DB and its table (`load_table`).
    chunk_ids: int64 [S, L] the DB ids of each sequence's chunks.
    k: neighbours per chunk.
  Returns:
    (neighbours int32 [S, L, k, r], stats) as `neighbours_for_sequences`,
    where "dropped" counts the table's first k candidates that the filter
    removed (the table holds no chunk of the chunk's own document, so this
    is the sequence's other documents only), and "searched" the chunks
    whose row kept fewer than k candidates after the filter and were
    searched again in the index with their stored embedding (never embedded
    again).
  """
  chunk_ids = np.asarray(chunk_ids, np.int64)
  num_seq, num_chunks = chunk_ids.shape
  db = lookup.db
  flat = chunk_ids.reshape(-1)  # [q]
  seq_docs = [set(np.unique(db.doc_ids_of(row)).tolist()) for row in chunk_ids]
  exclude = [seq_docs[i // num_chunks] for i in range(len(flat))]
  cand, cand_dists = lookup.table.lookup(flat)  # [q, C]
  docs = np.zeros(cand.shape, np.int64)  # [q, C]
  valid = cand >= 0
  docs[valid] = db.doc_ids_of(cand[valid])
  ids, _, count = nblib.filter_rows(cand, cand_dists, docs, exclude, k)
  short = np.flatnonzero(count < k)  # Rows the table could not fill.
  if len(short):
    again = nblib.search_filtered(
        lookup.searcher, db.embeddings_of(flat[short]), k, db.doc_ids_of,
        [exclude[i] for i in short])
    ids[short] = again.ids
  top = cand[:, :k]  # What the filter replaced among the unfiltered top k.
  dropped = np.array([int(np.isin(docs[i, :k][top[i] >= 0],
                                  list(exclude[i])).sum())
                      for i in range(len(flat))]).reshape(num_seq, num_chunks)
  missing = (ids < 0).sum(-1).reshape(num_seq, num_chunks)  # [S, L]
  searched = np.zeros(len(flat), np.int64)  # [q]
  searched[short] = 1
  values = db.neighbour_values(ids)  # [q, k, r]; id -1 -> zeros.
  neighbours = values.reshape(num_seq, num_chunks, k, -1)  # [S, L, k, r]
  return neighbours.astype(np.int32), _stats(
      dropped, missing, searched.reshape(num_seq, num_chunks))


def neighbours_for_batch(db_dir: str, spm_path: str, embedder: str,
                         embed_batch: int, tokens: np.ndarray,
                         doc_ids: np.ndarray, chunk_ids: np.ndarray, k: int,
                         chunk_size: int = 64) -> Tuple[np.ndarray, Dict]:
  """Neighbours of a batch of sequences: looked up in the table where every
  chunk is a DB chunk (chunk_ids int64 [S, L] >= 0), else embedded and
  searched (`neighbours_for_sequences`). Returns ([S, L, k, r], stats)."""
  tokens, chunk_ids = np.asarray(tokens), np.asarray(chunk_ids, np.int64)
  in_db = (chunk_ids >= 0).all(-1)  # [S]
  parts = []
  if in_db.any():
    parts.append((in_db, neighbours_from_table(load_table(db_dir),
                                               chunk_ids[in_db], k)))
  if (~in_db).any():
    retriever, sp = load_retriever(db_dir, spm_path, embedder, embed_batch)
    parts.append((~in_db, neighbours_for_sequences(
        retriever, sp, tokens[~in_db], np.asarray(doc_ids)[~in_db], k,
        chunk_size)))
  out = np.zeros((len(tokens), tokens.shape[1] // chunk_size, k,
                  2 * chunk_size), np.int32)  # [S, L, k, r]
  stats = {f"{key}_per_sequence": np.zeros(len(tokens), np.int64)
           for key in ("dropped", "missing", "searched")}
  for rows, (nb, st) in parts:
    out[rows] = nb
    for key in stats:
      stats[key][rows] = st[key]
  return out, stats
