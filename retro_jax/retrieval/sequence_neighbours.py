"""Neighbours for every chunk of packed training sequences.

A packed sequence of n tokens is cut into L = n / m chunks; each chunk is
detokenized, embedded by the frozen BERT, and its k nearest DB chunks are
retrieved, excluding every document that occurs anywhere in the sequence
(docs/design.md §3): a sequence packed from the end of document A and the start of
document B must not retrieve from A or B, or the model learns to copy. A
neighbour's value is the chunk followed by its continuation (r = 2m tokens,
`RetrievalDB.neighbour_values`); a missing neighbour is all zeros (pad).

`load_retriever` opens a DB once per process (the embedder and the index
cost seconds to load), so a Beam worker or an evaluation loop that calls it
per batch pays that once. The embedder is named by its checkpoint directory
("" = the bundled default), so a Beam worker that unpickles a preprocessor
opens the same embedder without any object being handed over.

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
from retro_jax.retrieval import build_job
from retro_jax.retrieval.neighbours import Retriever

_RESOURCES: Dict[Tuple[str, ...], Tuple[Retriever, Any]] = {}
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
  key = (os.path.abspath(db_dir), os.path.abspath(spm_path)) + which
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
  stats = {"chunks": num_seq * num_chunks, "dropped": int(dropped.sum()),
           "missing": int(missing.sum()),
           "dropped_per_sequence": dropped.sum(-1).astype(np.int64),
           "missing_per_sequence": missing.sum(-1).astype(np.int64)}
  return neighbours.astype(np.int32), stats
