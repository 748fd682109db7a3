"""The steps of a RETRO Task: chunk-aligned sequences, then their neighbours.

  chunk_sequences (the Task's source)     {tokens [n], doc_ids [n],
                                           chunk_ids [L]}
    a split that is the DB's training part: L consecutive DB chunks per
      sequence, read from the DB (chunk_ids their DB ids); nothing is
      tokenized or embedded
    any other split (held-out text): corpus ─► SentencePiece ─► chunks
      (corpus/packing.pack_chunks, cut as the DB cuts), chunk_ids -1
   ─► attach_neighbours                   + neighbours [L, k, r]: looked up
                                          in the DB's neighbour table for DB
                                          chunks, BERT + index otherwise;
                                          the sequence's documents excluded

Each step is a function of a tf.data.Dataset (or a split) and plain
arguments (paths, sizes), so a Task that holds them pickles into a Beam
worker, which opens the vocabulary, embedder, DB and table itself, once per
process.

Shape glossary:
  n: tokens per sequence (seq_len).   m: chunk size (64).   L = n / m.
  k: neighbours per chunk.            r: tokens per neighbour (2m).
  S: sequences per retrieval batch.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping

import numpy as np
import tensorflow as tf

from retro_jax.config import CHUNK_SIZE
from retro_jax.corpus import packing
from retro_jax.corpus import sources
from retro_jax.data import cache_job
from retro_jax.retrieval import sequence_neighbours

DB_PART = "train"  # The DB part whose chunks a Task split can be read from.


def split_source(split: str, corpus: str, max_bytes: Mapping[str, int],
                 meta: Mapping[str, str]) -> Dict[str, Any]:
  """The `sources.text_source` record of a Task split."""
  return sources.text_source(corpus, split, int(max_bytes.get(split) or 0),
                             meta)


def reads_db(split: str, *, corpus: str, max_bytes: Mapping[str, int],
             meta: Mapping[str, str], db_part: Mapping[str, Any]) -> bool:
  """Whether `split` is exactly the text of the DB's training part (its
  chunks are then DB chunks, read and looked up rather than embedded)."""
  return split_source(split, corpus, max_bytes, meta) == db_part.get("source")


def _db_sequences(db_dir: str, seq_len: int, chunk_size: int
                  ) -> Iterator[Dict[str, Any]]:
  """L consecutive chunks of the DB's training part per sequence; the last
  partial sequence is dropped."""
  db = sequence_neighbours.load_db(db_dir)
  part = db.part(DB_PART)
  per_seq = seq_len // chunk_size
  first = part["first_chunk"]
  for s in range(part["num_chunks"] // per_seq):
    ids = np.arange(first + s * per_seq, first + (s + 1) * per_seq)  # [L]
    yield {"tokens": db.chunk_tokens(ids).reshape(-1),  # [n]
           "doc_ids": np.repeat(db.doc_ids_of(ids), chunk_size),  # [n]
           "chunk_ids": ids.astype(np.int64)}  # [L]


def _corpus_sequences(source: Mapping[str, Any], spm_path: str, seq_len: int,
                      chunk_size: int) -> Iterator[Dict[str, Any]]:
  """Held-out text cut as the DB cuts it (document_chunks), never in it."""
  sp = sequence_neighbours.load_processor(spm_path)
  per_seq = seq_len // chunk_size

  def encoded():
    for doc in sources.source_documents(source):
      try:  # Lone surrogates have no UTF-8 form: the DB skips them too.
        doc.text.encode("utf-8")
      except UnicodeEncodeError:
        continue
      yield doc.doc_id, sp.encode(doc.text)

  for tokens, doc_ids in packing.pack_chunks(encoded(), seq_len, chunk_size):
    yield {"tokens": tokens, "doc_ids": doc_ids,
           "chunk_ids": np.full(per_seq, -1, np.int64)}


def chunk_sequences(split: str, shuffle_files: bool, seed=None, *,
                    corpus: str, max_bytes: Mapping[str, int],
                    meta: Mapping[str, str], db_dir: str, spm_path: str,
                    seq_len: int, chunk_size: int = CHUNK_SIZE
                    ) -> tf.data.Dataset:
  """The Task's source: {tokens int32 [n], doc_ids int64 [n], chunk_ids
  int64 [L]} for every sequence of `split`, in order (`shuffle_files` is
  ignored: the cache job reads in order and batches shuffle online).

  Args:
    split: the Task split.
    shuffle_files, seed: seqio's data source arguments (unused).
    corpus: a `sources.open_corpus` spec.
    max_bytes: bytes of text read per split (0 or absent: all).
    meta: keep only documents whose meta has these values.
    db_dir: the retrieval DB; a split equal to its training part is read
      from it.
    spm_path: the DB's vocabulary (tokenizes the other splits).
    seq_len: n, a multiple of `chunk_size`.
    chunk_size: m.
  """
  del shuffle_files, seed
  db = sequence_neighbours.load_db(db_dir)
  if reads_db(split, corpus=corpus, max_bytes=max_bytes, meta=meta,
              db_part=db.part(DB_PART)):
    make = lambda: _db_sequences(db_dir, seq_len, chunk_size)
  else:
    source = split_source(split, corpus, max_bytes, meta)
    make = lambda: _corpus_sequences(source, spm_path, seq_len, chunk_size)
  per_seq = seq_len // chunk_size
  return tf.data.Dataset.from_generator(make, output_signature={
      "tokens": tf.TensorSpec((seq_len,), tf.int32),
      "doc_ids": tf.TensorSpec((seq_len,), tf.int64),
      "chunk_ids": tf.TensorSpec((per_seq,), tf.int64)})


def attach_neighbours(ds: tf.data.Dataset, *, db_dir: str, spm_path: str,
                      num_neighbours: int, embedder: str = "",
                      embed_batch: int = 32, chunk_size: int = CHUNK_SIZE,
                      batch_size: int = 8) -> tf.data.Dataset:
  """Adds neighbours int32 [L, k, r] to {tokens [n], doc_ids [n],
  chunk_ids [L]} and drops chunk_ids.

  Sequences of DB chunks (chunk_ids >= 0) look their neighbours up in the
  DB's neighbour table; others are embedded with the BERT checkpoint
  directory `embedder` ("" = the bundled default) and searched
  (sequence_neighbours), in batches of `batch_size` sequences, with the
  resources opened once per process. Each example also carries
  `retrieval_stats` int64 [4] = (chunks, dropped, missing, searched) for
  the cache job's summary, which the cache job strips before writing.
  """
  k = num_neighbours

  def retrieve(tokens, doc_ids, chunk_ids):
    nb, stats = sequence_neighbours.neighbours_for_batch(
        db_dir, spm_path, embedder, embed_batch, tokens, doc_ids, chunk_ids,
        k, chunk_size)  # [S, L, k, r]
    per_seq = np.stack([np.full(len(tokens), tokens.shape[1] // chunk_size),
                        stats["dropped_per_sequence"],
                        stats["missing_per_sequence"],
                        stats["searched_per_sequence"]], -1).astype(np.int64)
    if cache_job.progress_hook is not None:
      cache_job.progress_hook(len(tokens))
    return nb, per_seq

  def attach(ex):
    nb, per_seq = tf.numpy_function(
        retrieve, [ex["tokens"], ex["doc_ids"], ex["chunk_ids"]],
        [tf.int32, tf.int64], stateful=False)
    seq_len = ex["tokens"].shape[-1]
    nb.set_shape([None, seq_len // chunk_size, k, 2 * chunk_size])
    per_seq.set_shape([None, 4])
    out = {key: v for key, v in ex.items() if key != "chunk_ids"}
    return dict(out, neighbours=nb, **{cache_job.STATS_FEATURE: per_seq})

  return ds.batch(batch_size).map(attach).unbatch()
