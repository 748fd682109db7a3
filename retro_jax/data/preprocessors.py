"""The steps of a RETRO Task: documents -> packed sequences with neighbours.

  corpus_documents (sources.open_corpus)  {text, doc_id}
   ─► tokenize (SentencePiece)            {tokens [len], doc_id}
   ─► pack_sequences                      {tokens [n], doc_ids [n]}
                                          (EOS after each doc)
   ─► attach_neighbours                   + neighbours [L, k, r] (BERT +
                                          index, the sequence's docs excluded)

Each step is a function of a tf.data.Dataset and plain arguments (paths,
sizes), so a Task that holds them pickles into a Beam worker, which opens
the vocabulary, embedder and DB itself, once per process.

Tokenization and packing match the DB build (retrieval/db_build.py) and
corpus/packing.py: the same SentencePiece model encodes the same text, so
chunk texts and document ids of a Task over the DB's corpus are those of the
DB, and same-document filtering removes exactly the sequence's own documents.

Shape glossary:
  n: tokens per sequence (seq_len).   m: chunk size (64).   L = n / m.
  k: neighbours per chunk.            r: tokens per neighbour (2m).
  S: sequences per retrieval batch.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping

import numpy as np
import tensorflow as tf

from retro_jax.config import CHUNK_SIZE, EOS_ID
from retro_jax.corpus import sources
from retro_jax.data import cache_job
from retro_jax.retrieval import sequence_neighbours


def corpus_documents(split: str, shuffle_files: bool, seed=None, *,
                     corpus: str, max_bytes: Mapping[str, int],
                     meta: Mapping[str, str]) -> tf.data.Dataset:
  """{text: string, doc_id: int64} for every document of `split`, in the
  reader's order (`shuffle_files` is ignored: the cache job reads in order
  and shuffling happens online over sequences).

  Args:
    split: the corpus split.
    shuffle_files, seed: seqio's data source arguments (unused).
    corpus: a `sources.open_corpus` spec.
    max_bytes: bytes of text read per split (0 or absent: all).
    meta: keep only documents whose meta has these values.
  """
  del shuffle_files, seed
  meta = dict(meta)
  limit = max_bytes.get(split) or None

  def documents() -> Iterator[Dict[str, Any]]:
    for doc in sources.open_corpus(corpus, split=split, max_bytes=limit):
      if any(doc.meta.get(k) != v for k, v in meta.items()):
        continue
      try:  # Lone surrogates have no UTF-8 form: the DB skips them too.
        text = doc.text.encode("utf-8")
      except UnicodeEncodeError:
        continue
      yield {"text": text, "doc_id": np.int64(doc.doc_id)}

  return tf.data.Dataset.from_generator(documents, output_signature={
      "text": tf.TensorSpec((), tf.string),
      "doc_id": tf.TensorSpec((), tf.int64)})


def tokenize(ds: tf.data.Dataset, *, spm_path: str) -> tf.data.Dataset:
  """{text, doc_id} -> {tokens int32 [len], doc_id}; empty results dropped.

  Encodes with the Python SentencePiece processor, exactly as the DB build
  does (db_build.write_chunks): TF Text's tokenizer can split whitespace
  runs differently, and a chunk must have the same ids in the Task and in
  the DB for its text to embed identically.
  """
  def encode(text):
    sp = sequence_neighbours.load_processor(spm_path)
    return np.asarray(sp.encode(text.decode("utf-8")), np.int32)

  def encode_example(ex):
    tokens = tf.numpy_function(encode, [ex["text"]], tf.int32,
                               stateful=False)
    tokens.set_shape([None])
    return {"tokens": tokens, "doc_id": ex["doc_id"]}

  return ds.map(encode_example).filter(lambda ex: tf.size(ex["tokens"]) > 0)


def pack_sequences(ds: tf.data.Dataset, *, seq_len: int,
                   eos_id: int = EOS_ID) -> tf.data.Dataset:
  """Concatenates documents (each followed by EOS) into sequences.

  {tokens [len], doc_id} -> {tokens int32 [n], doc_ids int64 [n]}, the same
  sequences as `corpus.packing.pack`; the last partial sequence is dropped.
  """
  def with_ids(ex):
    tokens = tf.concat([ex["tokens"], [eos_id]], 0)  # [len + 1]
    return {"tokens": tokens,
            "doc_ids": tf.fill(tf.shape(tokens), ex["doc_id"])}
  return ds.map(with_ids).rebatch(seq_len, drop_remainder=True)


def attach_neighbours(ds: tf.data.Dataset, *, db_dir: str, spm_path: str,
                      num_neighbours: int, embedder: str = "",
                      embed_batch: int = 32, chunk_size: int = CHUNK_SIZE,
                      batch_size: int = 8) -> tf.data.Dataset:
  """Adds neighbours int32 [L, k, r] to {tokens [n], doc_ids [n]}.

  Retrieval runs in numpy (sequence_neighbours.neighbours_for_sequences)
  over batches of `batch_size` sequences, with the BERT checkpoint directory
  `embedder` ("" = the bundled default) opened once per process. Each
  example also carries `retrieval_stats` int64 [3] = (chunks, dropped,
  missing) for the cache job's summary, which the cache job strips before
  writing.
  """
  k = num_neighbours

  def retrieve(tokens, doc_ids):
    retriever, sp = sequence_neighbours.load_retriever(
        db_dir, spm_path, embedder, embed_batch)
    nb, stats = sequence_neighbours.neighbours_for_sequences(
        retriever, sp, tokens, doc_ids, k, chunk_size)  # [S, L, k, r]
    per_seq = np.stack([np.full(len(tokens), tokens.shape[1] // chunk_size),
                        stats["dropped_per_sequence"],
                        stats["missing_per_sequence"]], -1).astype(np.int64)
    if cache_job.progress_hook is not None:
      cache_job.progress_hook(len(tokens))
    return nb, per_seq

  def attach(ex):
    nb, per_seq = tf.numpy_function(retrieve, [ex["tokens"], ex["doc_ids"]],
                                    [tf.int32, tf.int64], stateful=False)
    seq_len = ex["tokens"].shape[-1]
    nb.set_shape([None, seq_len // chunk_size, k, 2 * chunk_size])
    per_seq.set_shape([None, 3])
    return dict(ex, neighbours=nb, **{cache_job.STATS_FEATURE: per_seq})

  return ds.batch(batch_size).map(attach).unbatch()
