"""seqio Tasks for RETRO: documents -> packed sequences with neighbours.

  corpus (sources.open_corpus)  {text, doc_id}
   ─► tokenize (SentencePiece)   {tokens [len], doc_id}
   ─► pack_sequences             {tokens [n], doc_ids [n]}   (EOS after each doc)
   ─► attach_neighbours          + neighbours [L, k, r]      (BERT + index, the
                                                              sequence's docs
                                                              excluded)
   ─► CacheDatasetPlaceholder(required=True)
       ══ offline: task_cache.cache_task (Beam) writes the examples
   ─► online: task_batches.batches reads them, RetroFeatureConverter adds
      loss_mask, numpy batches {tokens, neighbours, loss_mask}

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

import functools
from typing import (Any, Callable, Dict, Iterator, Mapping, Optional,
                    Sequence, Union)

import numpy as np
import seqio
import tensorflow as tf

from retro_jax.config import CHUNK_SIZE, EOS_ID
from retro_jax.corpus import sources
from retro_jax.corpus import vocab
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import db_format
from retro_jax.retrieval import sequence_neighbours
from retro_jax.data import cache_job as task_cache
from retro_jax.data.batches import batches  # pylint: disable=unused-import
from retro_jax.data.cache_job import cache_task  # pylint: disable=unused-import

SHUFFLE_BUFFER_SIZE = 10_000
# Bumped when the cached examples change meaning (tokenization, packing,
# neighbour values): caches of another version are refused and rebuilt.
CACHE_FORMAT = 1

# Embedders handed to register_retro_task, by id, for the preprocessor (a
# seqio preprocessor is a function of the dataset; objects go by reference).
_EMBEDDERS: Dict[int, Any] = {}


# --- Source ---------------------------------------------------------------

def _corpus_dataset(split: str, shuffle_files: bool, seed=None, *,
                    corpus: str,
                    max_bytes: Optional[int],
                    meta_filter: Optional[Mapping[str, str]],
                    split_max_bytes: Optional[Mapping[str, int]] = None
                    ) -> tf.data.Dataset:
  """{text: string, doc_id: int64} for every document of `split`, in the
  reader's order (`shuffle_files` is ignored: the cache job reads in order
  and shuffling happens online over sequences)."""
  del shuffle_files, seed
  meta_filter = dict(meta_filter or {})
  limit = dict(split_max_bytes or {}).get(split, max_bytes) or None

  def documents() -> Iterator[Dict[str, Any]]:
    for doc in sources.open_corpus(corpus, split=split, max_bytes=limit):
      if any(doc.meta.get(k) != v for k, v in meta_filter.items()):
        continue
      try:  # Lone surrogates have no UTF-8 form: the DB skips them too.
        text = doc.text.encode("utf-8")
      except UnicodeEncodeError:
        continue
      yield {"text": text, "doc_id": np.int64(doc.doc_id)}

  return tf.data.Dataset.from_generator(documents, output_signature={
      "text": tf.TensorSpec((), tf.string),
      "doc_id": tf.TensorSpec((), tf.int64)})


# --- Preprocessors (one thing each) ---------------------------------------

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
                      num_neighbours: int, embedder_key: Optional[int],
                      chunk_size: int = CHUNK_SIZE,
                      batch_size: int = 8) -> tf.data.Dataset:
  """Adds neighbours int32 [L, k, r] to {tokens [n], doc_ids [n]}.

  Retrieval runs in numpy (sequence_neighbours.neighbours_for_sequences)
  over batches of `batch_size` sequences. Each example also carries
  `retrieval_stats` int64 [3] = (chunks, dropped, missing) for the cache
  job's summary, which the cache job strips before writing.
  """
  k = num_neighbours

  def retrieve(tokens, doc_ids):
    embedder = _EMBEDDERS.get(embedder_key) if embedder_key else None
    retriever, sp = sequence_neighbours.load_retriever(db_dir, spm_path,
                                                       embedder)
    nb, stats = sequence_neighbours.neighbours_for_sequences(
        retriever, sp, tokens, doc_ids, k, chunk_size)  # [S, L, k, r]
    per_seq = np.stack([np.full(len(tokens), tokens.shape[1] // chunk_size),
                        stats["dropped_per_sequence"],
                        stats["missing_per_sequence"]], -1).astype(np.int64)
    if task_cache.progress_hook is not None:
      task_cache.progress_hook(len(tokens))
    return nb, per_seq

  def attach(ex):
    nb, per_seq = tf.numpy_function(retrieve, [ex["tokens"], ex["doc_ids"]],
                                    [tf.int32, tf.int64], stateful=False)
    seq_len = ex["tokens"].shape[-1]
    nb.set_shape([None, seq_len // chunk_size, k, 2 * chunk_size])
    per_seq.set_shape([None, 3])
    return dict(ex, neighbours=nb, **{task_cache.STATS_FEATURE: per_seq})

  return ds.batch(batch_size).map(attach).unbatch()


# --- Registration ---------------------------------------------------------

def _spec(corpus, spm_path, db_dir, seq_len, num_neighbours, max_bytes,
          meta_filter, manifest, split_max_bytes=None) -> Dict[str, Any]:
  """What identifies the cached examples of a split (JSON-comparable).

  Only what changes the examples: not the Task's list of splits (each split
  is cached and checked on its own) nor the retrieval batch size, so a
  reader (training, evaluation) registering the Task with other splits
  reads the cache the cache job wrote.
  """
  spec = {"cache_format": CACHE_FORMAT, "corpus": corpus, "seq_len": seq_len,
          "num_neighbours": num_neighbours,
          "max_bytes": max_bytes, "meta_filter": dict(meta_filter or {}),
          "spm_sha256": db_format.sha256_file(spm_path),
          "db_dir": task_cache.normalize_path(db_dir),
          "db_num_chunks": manifest["num_chunks"],
          "db_embedder": manifest["embedder"]["fingerprint"],
          "db_index": manifest.get("index")}
  if split_max_bytes:  # Only when set: caches written without it still match.
    spec["split_max_bytes"] = dict(sorted(split_max_bytes.items()))
  return spec


def register_retro_task(name: str, *, corpus: str, spm_path: str,
                        db_dir: str, seq_len: int, num_neighbours: int,
                        splits: Sequence[str] = ("train", "validation"),
                        max_bytes: Optional[int] = None,
                        meta_filter: Optional[Mapping[str, str]] = None,
                        embedder=None, chunk_size: int = CHUNK_SIZE,
                        retrieval_batch: int = 8,
                        split_max_bytes: Union[str, Mapping[str, int],
                                               None] = None) -> seqio.Task:
  """Registers (or replaces) the RETRO Task `name` and returns it.

  Args:
    name: the seqio Task name.
    corpus: a `sources.open_corpus` spec ("python_stdlib",
      "jsonl:/data/pile/*.jsonl.zst", "tfds:c4/en:3.0.1").
    spm_path: the SentencePiece model; must be the one the DB was built with.
    db_dir: a finalized retrieval DB with its index.
    seq_len: n, tokens per sequence (a multiple of `chunk_size`).
    num_neighbours: k.
    splits: the corpus splits the Task offers.
    max_bytes: read about this many bytes of text per split (None: all).
    meta_filter: keep only documents whose meta has these values, e.g.
      {"pile_set_name": "ArXiv"} for one Pile subset.
    embedder: the DB's BertEmbedder (None: load the default when needed).
    chunk_size: m.
    retrieval_batch: sequences per retrieval call in the cache job.
    split_max_bytes: per-split overrides of `max_bytes`, e.g.
      {"validation": 200_000} or its "validation=200000,..." form.
  Returns:
    The registered `seqio.Task`; features tokens int32 [n], doc_ids int64
    [n], neighbours int32 [L, k, r].
  Raises:
    ValueError: seq_len not a multiple of chunk_size, or `spm_path` is not
      the DB's vocabulary (both named).
    IncompleteDBError: `db_dir` is not a finalized DB.
  """
  if seq_len <= 0 or seq_len % chunk_size:
    raise ValueError(f"seq_len {seq_len} must be a positive multiple of the "
                     f"chunk size {chunk_size}")
  if isinstance(split_max_bytes, str):
    split_max_bytes = parse_split_bytes(split_max_bytes)
  db = dblib.RetrievalDB.open(db_dir, spm_path=spm_path)
  if db.chunk_size != chunk_size:
    raise ValueError(f"{db_dir} holds chunks of {db.chunk_size} tokens, the "
                     f"Task uses {chunk_size}")
  vocabulary = vocab.seqio_vocabulary(spm_path)
  embedder_key = None
  if embedder is not None:
    embedder_key = id(embedder)
    _EMBEDDERS[embedder_key] = embedder
  features = {
      "tokens": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
      "doc_ids": seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False,
                               dtype=tf.int64),
      "neighbours": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32,
                                  rank=3),
  }
  source = seqio.FunctionDataSource(
      functools.partial(_corpus_dataset, corpus=corpus, max_bytes=max_bytes,
                        meta_filter=meta_filter,
                        split_max_bytes=split_max_bytes),
      splits=tuple(splits))
  preprocessors = [
      functools.partial(tokenize, spm_path=spm_path),
      functools.partial(pack_sequences, seq_len=seq_len),
      functools.partial(attach_neighbours, db_dir=db_dir, spm_path=spm_path,
                        num_neighbours=num_neighbours,
                        embedder_key=embedder_key, chunk_size=chunk_size,
                        batch_size=retrieval_batch),
      seqio.CacheDatasetPlaceholder(required=True),
  ]
  seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(
      name, source=source, preprocessors=preprocessors,
      output_features=features, shuffle_buffer_size=SHUFFLE_BUFFER_SIZE)
  task_cache.TASK_SPECS[name] = _spec(
      corpus, spm_path, db_dir, seq_len, num_neighbours, max_bytes,
      meta_filter, db.manifest, split_max_bytes)
  return task


def register_for_reading(name: str, *, corpus: str, db_dir: str,
                         seq_len: int, num_neighbours: int,
                         spm_path: str = "", max_bytes: Optional[int] = None,
                         meta_filter: Union[str, Mapping[str, str], None] = None,
                         split_max_bytes: Union[str, Mapping[str, int],
                                                None] = None) -> seqio.Task:
  """Registers Task `name` to read its cache (training, evaluation).

  Takes only what identifies the cached examples, so the Task matches the
  one `register_from_config` registered for the cache job whatever its
  splits or retrieval batch.

  Args:
    name: the seqio Task name.
    corpus, db_dir, seq_len, num_neighbours, max_bytes, split_max_bytes:
      as for `register_retro_task` (max_bytes 0 or None: all).
    spm_path: the vocabulary ("": <db_dir>/spm.model, as
      `sequence_neighbours.default_spm_path`).
    meta_filter: {key: value} or its "key=value,..." form ("" / None: all).
  Returns:
    The registered `seqio.Task`.
  """
  if isinstance(meta_filter, str):
    meta_filter = parse_meta_filter(meta_filter)
  return register_retro_task(
      name, corpus=corpus,
      spm_path=sequence_neighbours.default_spm_path(spm_path, db_dir),
      db_dir=db_dir, seq_len=seq_len, num_neighbours=num_neighbours,
      max_bytes=max_bytes or None, meta_filter=meta_filter or None,
      split_max_bytes=split_max_bytes or None)


def neighbour_texts(example: Mapping[str, np.ndarray], sp,
                    chunk_size: int = CHUNK_SIZE):
  """[(chunk text, [neighbour texts])] of one example, for inspection."""
  tokens = np.asarray(example["tokens"])
  chunks = tokens.reshape(-1, chunk_size)  # [L, m]
  out = []
  for chunk, nbs in zip(chunks, np.asarray(example["neighbours"])):
    texts = [sp.decode([int(t) for t in nb if t != dblib.PAD_ID])
             for nb in nbs]                                   # nbs [k, r]
    out.append((sp.decode([int(t) for t in chunk if t != dblib.PAD_ID]),
                texts))
  return out


def _parse_pairs(text: str, field: str, shape: str,
                 valid: Callable[[str, str], bool]) -> Dict[str, str]:
  """"a=x,b=y" -> {"a": "x", "b": "y"}; an item failing `valid` names
  `field` and the expected `shape`."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep or not key or not valid(key, value):
      raise ValueError(f"{field} item {item!r} is not {shape}")
    out[key] = value
  return out


def parse_meta_filter(text: str) -> Dict[str, str]:
  """"pile_set_name=ArXiv,..." -> {"pile_set_name": "ArXiv", ...}."""
  return _parse_pairs(text, "meta filter", "key=value", lambda k, v: True)


def parse_split_bytes(text: str) -> Dict[str, int]:
  """"validation=200000,..." -> {"validation": 200000, ...}."""
  pairs = _parse_pairs(text, "split_max_bytes", "split=bytes",
                       lambda k, v: v.strip().isdigit())
  return {split: int(value) for split, value in pairs.items()}


def register_from_config(config, embedder=None) -> seqio.Task:
  """Registers the Task a configs/tasks_*.py config describes."""
  spm_path = spm_path_of(config)
  return register_retro_task(
      config.task_name, corpus=config.corpus, spm_path=spm_path,
      db_dir=config.db_dir, seq_len=config.seq_len,
      num_neighbours=config.num_neighbours,
      splits=tuple(s for s in config.splits.split(",") if s),
      max_bytes=config.max_bytes or None,
      meta_filter=parse_meta_filter(config.meta_filter) or None,
      embedder=embedder, retrieval_batch=config.retrieval_batch,
      split_max_bytes=config.get("split_max_bytes", "") or None)


def load_embedder(config):
  """The BERT embedder a Task config names (the default if none)."""
  from retro_jax.retrieval.embedder import BertEmbedder  # pylint: disable=g-import-not-at-top
  return BertEmbedder.load(config.embedder or None,
                           batch_size=config.embed_batch)


def spm_path_of(config) -> str:
  """The vocabulary file a Task config uses."""
  return sequence_neighbours.default_spm_path(config.spm_model,
                                             config.db_dir)
