"""seqio Tasks for RETRO: registration, and the entry points around them.

A RETRO Task runs the steps of preprocessors.py:

  chunk_sequences (the source: the DB's training part read as runs of DB
  chunks, other splits tokenized and chunked as the DB chunks)
   ─► attach_neighbours (table lookups for DB chunks, BERT otherwise)
   ─► CacheDatasetPlaceholder(required=True)
       ══ offline: cache_task (cache_job.py, Beam) writes the examples
   ─► online: batches (batches.py) reads them, RetroFeatureConverter adds
      loss_mask, numpy batches {tokens, neighbours, loss_mask}

Every Task is a `RetroTask`, which carries its spec (task_spec.py): the cache
job records it and readers compare it, so nothing is kept per Task name
outside seqio's registry. Three ways to register one:

  register_retro_task    every argument (the cache job's view)
  register_for_reading   only what identifies the cached examples (training
                         and evaluation, which never retrieve)
  register_from_config   from a run config (configs/*.py: config.data,
                         config.db, config.cache, config.train.seq_len,
                         config.model.num_neighbours)
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional

import seqio
import tensorflow as tf

from retro_jax.config import CHUNK_SIZE
from retro_jax.corpus import vocab
from retro_jax.data import preprocessors
from retro_jax.data import task_spec
from retro_jax.data.batches import batches  # pylint: disable=unused-import
from retro_jax.data.cache_job import cache_task  # pylint: disable=unused-import
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval.neighbour_table import NeighbourTable
from retro_jax.retrieval import sequence_neighbours

SHUFFLE_BUFFER_SIZE = 10_000


class RetroTask(seqio.Task):
  """A seqio Task that carries its spec (what identifies its examples)."""

  def __init__(self, *args, spec: Dict[str, Any], **kwargs):
    super().__init__(*args, **kwargs)
    self.spec = spec


def register_retro_task(name: str, *, corpus: str, spm_path: str,
                        db_dir: str, seq_len: int, num_neighbours: int,
                        max_bytes: Mapping[str, int],
                        meta: Optional[Mapping[str, str]] = None,
                        embedder: str = "", embed_batch: int = 32,
                        chunk_size: int = CHUNK_SIZE,
                        retrieval_batch: int = 8) -> RetroTask:
  """Registers (or replaces) the RETRO Task `name` and returns it.

  Args:
    name: the seqio Task name.
    corpus: a `sources.open_corpus` spec ("python_stdlib",
      "jsonl:/data/pile/*.jsonl.zst", "tfds:c4/en:3.0.1").
    spm_path: the SentencePiece model; must be the one the DB was built with.
    db_dir: a finalized retrieval DB with its index.
    seq_len: n, tokens per sequence (a multiple of `chunk_size`).
    num_neighbours: k.
    max_bytes: {split: bytes of text read (0: all)}; its keys are the
      corpus splits the Task offers, e.g. {"train": 0, "validation": 200_000}.
    meta: keep only documents whose meta has these values, e.g.
      {"pile_set_name": "ArXiv"} for one Pile subset (None or {}: all).
    embedder: the DB's BERT checkpoint directory ("": the bundled default),
      opened once per process where neighbours are retrieved.
    embed_batch: chunks per BERT forward pass.
    chunk_size: m.
    retrieval_batch: sequences per retrieval call in the cache job.
  Returns:
    The registered `RetroTask`; features tokens int32 [n], doc_ids int64
    [n], neighbours int32 [L, k, r]. A split whose text is the DB's
    training part (same corpus, split, byte cap and meta filter) is read
    from the DB as runs of its chunks and looks neighbours up in its
    table (`task.spec["from_db"]` lists those splits); the others are
    tokenized, chunked as the DB chunks, embedded and searched.
  Raises:
    ValueError: seq_len not a multiple of chunk_size, no split, or
      `spm_path` is not the DB's vocabulary (named).
    IncompleteDBError: `db_dir` is not a finalized DB.
    ValueError: a split reads the DB but its neighbour table is missing or
      stale (named, with the command that builds it).
  """
  if seq_len <= 0 or seq_len % chunk_size:
    raise ValueError(f"seq_len {seq_len} must be a positive multiple of the "
                     f"chunk size {chunk_size}")
  max_bytes, meta = dict(max_bytes), dict(meta or {})
  if not max_bytes:
    raise ValueError(f"Task {name}: max_bytes names no split")
  db = dblib.RetrievalDB.open(db_dir, spm_path=spm_path)
  if db.chunk_size != chunk_size:
    raise ValueError(f"{db_dir} holds chunks of {db.chunk_size} tokens, the "
                     f"Task uses {chunk_size}")
  vocabulary = vocab.seqio_vocabulary(spm_path)
  features = {
      "tokens": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32),
      "doc_ids": seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False,
                               dtype=tf.int64),
      "neighbours": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32,
                                  rank=3),
  }
  source = seqio.FunctionDataSource(
      functools.partial(preprocessors.chunk_sequences, corpus=corpus,
                        max_bytes=max_bytes, meta=meta, db_dir=db_dir,
                        spm_path=spm_path, seq_len=seq_len,
                        chunk_size=chunk_size),
      splits=tuple(max_bytes))
  steps = [
      functools.partial(preprocessors.attach_neighbours, db_dir=db_dir,
                        spm_path=spm_path, num_neighbours=num_neighbours,
                        embedder=embedder, embed_batch=embed_batch,
                        chunk_size=chunk_size, batch_size=retrieval_batch),
      seqio.CacheDatasetPlaceholder(required=True),
  ]
  from_db = [split for split in max_bytes if preprocessors.reads_db(
      split, corpus=corpus, max_bytes=max_bytes, meta=meta,
      db_part=db.part(preprocessors.DB_PART))]
  table = NeighbourTable.open(db_dir) if from_db else None
  spec = task_spec.task_spec(
      corpus=corpus, spm_path=spm_path, db_dir=db_dir, seq_len=seq_len,
      num_neighbours=num_neighbours, max_bytes=max_bytes, meta=meta,
      manifest=db.manifest, from_db=from_db,
      table=table.identity if table else None)
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source, preprocessors=steps, output_features=features,
      shuffle_buffer_size=SHUFFLE_BUFFER_SIZE, task_cls=RetroTask, spec=spec)


def register_for_reading(name: str, *, corpus: str, db_dir: str,
                         seq_len: int, num_neighbours: int,
                         max_bytes: Mapping[str, int], spm_path: str = "",
                         meta: Optional[Mapping[str, str]] = None
                         ) -> RetroTask:
  """Registers Task `name` to read its cache (training, evaluation).

  Takes only what identifies the cached examples, so the Task matches the
  one the cache job registered whatever its retrieval settings.

  Args:
    name: the seqio Task name.
    corpus, db_dir, seq_len, num_neighbours, max_bytes, meta: as for
      `register_retro_task`.
    spm_path: the vocabulary ("": <db_dir>/spm.model, as
      `sequence_neighbours.default_spm_path`).
  Returns:
    The registered `RetroTask`.
  """
  return register_retro_task(
      name, corpus=corpus,
      spm_path=sequence_neighbours.default_spm_path(spm_path, db_dir),
      db_dir=db_dir, seq_len=seq_len, num_neighbours=num_neighbours,
      max_bytes=max_bytes, meta=meta)


def register_run_task(config) -> RetroTask:
  """Registers the Task a run config trains on (a configs/*.py file, or a
  run's config.json as `training.run_config` reads it) to read its cache:
  config.data names it, n is config.train.seq_len and k
  config.model.num_neighbours. Training and evaluation both read it so."""
  d = config.data
  return register_for_reading(
      d.task_name, corpus=d.corpus, spm_path=d.get("spm_path", "") or "",
      db_dir=d.db_dir, seq_len=int(config.train.seq_len),
      num_neighbours=int(config.model.num_neighbours),
      max_bytes=dict(d.max_bytes), meta=dict(d.get("meta", {})))


def register_from_config(config) -> RetroTask:
  """Registers the Task a run config (configs/*.py) describes: corpus,
  splits and paths from config.data, the embedder from config.db, the
  retrieval batches from config.cache, n from config.train.seq_len and k
  from config.model.num_neighbours.

  Raises ValueError when the training split (config.data.split) is not
  the DB's training part: every training chunk must be a DB chunk."""
  data = config.data
  task = register_retro_task(
      data.task_name, corpus=data.corpus,
      spm_path=sequence_neighbours.default_spm_path(data.spm_path,
                                                    data.db_dir),
      db_dir=data.db_dir, seq_len=config.train.seq_len,
      num_neighbours=config.model.num_neighbours,
      max_bytes=dict(data.max_bytes), meta=dict(data.meta),
      embedder=config.db.embedder, embed_batch=config.cache.embed_batch,
      retrieval_batch=config.cache.retrieval_batch)
  if data.split not in task.spec["from_db"]:
    db = dblib.RetrievalDB.open(data.db_dir)
    raise ValueError(
        f"the training split {data.split!r} of Task {data.task_name!r} is "
        f"not the text of the DB's training part: {data.db_dir} holds "
        f"{db.part(preprocessors.DB_PART)['source']}, the Task reads "
        f"{preprocessors.split_source(data.split, data.corpus, dict(data.max_bytes), dict(data.meta))}"
        f"; rebuild the DB with scripts/build_db.py and this run config")
  return task
