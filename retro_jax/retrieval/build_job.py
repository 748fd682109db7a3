"""The retrieval-database build, end to end, and the DB query used to inspect it.

  corpus ─► SentencePiece (trained if none given) ─► 64-token chunks (shards)
         ─► frozen-BERT embeddings (resumable, split over workers)
         ─► finalize (checksums, manifest) ─► index (ScaNN or exact)
         ─► recall@10 against exact search, written into the manifest

Each stage reports what it did and how long it took; `build_database`
returns the whole summary. A rerun resumes: complete shards and embeddings are
kept, only missing or damaged ones are redone.
"""

from __future__ import annotations

import os
import time
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Tuple)

import numpy as np

from retro_jax.corpus import sources
from retro_jax.corpus import vocab
from retro_jax.corpus.sources import Document
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import index as indexlib

INDEX_DIR = "index"


TRAIN_PART = "train"  # The part of the DB that training sequences are cut from.


def db_sources(config) -> Dict[str, Dict[str, Any]]:
  """{part name: `sources.text_source`} of the DB a run config describes.

  Part "train" is exactly the Task's training split: config.data.corpus,
  split config.data.split, its byte cap config.data.max_bytes.<split> and
  the meta filter config.data.meta, so that every training chunk is a DB
  chunk. Part "extra" (config.db.extra, if its corpus is set) is more text
  for retrieval only, never trained on; its split defaults to the training
  split, and held-out text enters the DB only when asked for by naming it.
  """
  data, extra = config.data, config.db.extra
  split = data.split
  parts = {TRAIN_PART: sources.text_source(
      data.corpus, split, int(dict(data.max_bytes).get(split, 0) or 0),
      dict(data.meta))}
  if extra.corpus:
    parts["extra"] = sources.text_source(
        extra.corpus, extra.split or None, int(extra.max_bytes or 0),
        dict(extra.meta))
  return parts


def build_spm_path(spm_path: str, db_dir: str) -> str:
  """The vocabulary a DB build uses: `spm_path`, else spm.model beside
  `db_dir` (<db_dir>/../spm.model), where `vocabulary` trains it when
  absent, so a rerun of the build finds it. The DB keeps a copy in
  <db_dir>/spm.model either way, which is what readers default to."""
  return spm_path or os.path.join(os.path.dirname(os.path.abspath(db_dir)),
                                  "spm.model")


def vocabulary(spm_path: str, train_docs: Callable[[], Iterable[Document]],
               vocab_size: int, train_bytes: int, log: Callable[[str], None]):
  """Loads `spm_path`, or trains it on the first `train_bytes` of text."""
  if os.path.exists(spm_path):
    log(f"vocabulary: {spm_path} (existing)")
    return vocab.load(spm_path)
  texts, budget = [], train_bytes
  for doc in train_docs():
    texts.append(doc.text)
    budget -= len(doc.text)
    if budget <= 0:
      break
  if not texts:
    raise ValueError("the corpus is empty: no text to train a vocabulary on")
  t0 = time.time()
  sp = vocab.train(texts, spm_path, vocab_size)
  log(f"vocabulary: trained {vocab_size} pieces on {sum(map(len, texts)):,} "
      f"characters in {time.time() - t0:.1f} s -> {spm_path}")
  return sp


STAGES = ("chunks", "embed", "index")


def build_database(db_dir: str, parts: Mapping[str, Mapping[str, Any]],
                   spm_path: str, embedder, *, stages=STAGES,
                   vocab_size: int = 8192, spm_train_bytes: int = 20_000_000,
                   shard_chunks: int = 65536, shard_index: int = 0,
                   num_shards: int = 1, index_kind: str = "auto",
                   recall_queries: int = 1000,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Builds (or resumes) the retrieval DB in `db_dir`.

  On one machine run every stage. Spread over machines: run stage "chunks"
  once, then stage "embed" on each worker with its `shard_index` (worker i
  embeds shards j with j % num_shards == i), then stage "index" once.

  Args:
    db_dir: the DB directory.
    parts: {part name: `sources.text_source`}, written in order (see
      `db_sources`); the vocabulary trains on the first part.
    spm_path: SentencePiece model to use, trained there if it does not exist.
    embedder: a `BertEmbedder`.
    stages: which of "chunks" (vocabulary + chunk shards), "embed" and
      "index" (finalize, index, recall) to run, in that order.
    vocab_size, spm_train_bytes: vocabulary training settings.
    shard_chunks: chunks per shard.
    shard_index, num_shards: this worker's part of the embedding stage.
    index_kind: "auto" (exact below 20k chunks, else ScaNN), "scann", "exact".
    recall_queries: held-in queries for the recall@10 measurement.
    log: where progress lines go.
  Returns:
    The summary: counts, bytes, seconds per stage, chunks/s, recall.
  """
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise ValueError(f"unknown stages {sorted(unknown)}; stages: {STAGES}")
  summary: Dict[str, Any] = {"db_dir": db_dir, "seconds": {},
                             "corpus_files_skipped": {}}
  skipped = summary["corpus_files_skipped"]  # Reader skips, by reason.
  first = next(iter(parts.values()))
  seconds = summary["seconds"]

  def timed(name, fn):
    t0 = time.time()
    out = fn()
    seconds[name] = round(time.time() - t0, 2)
    return out

  if "chunks" in stages:
    sp = timed("vocabulary", lambda: vocabulary(
        spm_path, lambda: sources.source_documents(first), vocab_size,
        spm_train_bytes, log))
    chunks = timed("chunks", lambda: dblib.write_chunks(
        {name: sources.source_documents(src, skipped)
         for name, src in parts.items()}, sp, db_dir,
        shard_chunks=shard_chunks, spm_path=spm_path, sources=parts))
    summary["chunks"] = chunks
    log(f"chunks: {_describe(chunks)} in {seconds['chunks']:.1f} s")

  if "embed" in stages:
    embedded = timed("embed", lambda: dblib.embed_shards(
        db_dir, embedder, shard_index=shard_index, num_shards=num_shards))
    summary["embed"] = embedded
    done = embedded.get("chunks_embedded", 0)
    summary["embed_chunks_per_s"] = (
        round(done / seconds["embed"], 1) if done and seconds["embed"] else None)
    log(f"embeddings: {_describe(embedded)} in {seconds['embed']:.1f} s"
        + (f" ({summary['embed_chunks_per_s']} chunks/s)" if done else ""))

  if "index" in stages:
    manifest = timed("finalize", lambda: dblib.finalize(db_dir))
    db = dblib.RetrievalDB.open(db_dir)
    embeddings = db.embeddings()                               # [n, D]
    searcher = timed("index", lambda: _saved_index(
        db_dir, manifest, embeddings, index_kind))
    if searcher is not None:
      recall, queries = (manifest["recall"]["recall_at_10"],
                         manifest["recall"]["queries"])
      seconds["recall"] = 0.0
      log(f"index: reusing the saved {searcher.kind} index over {len(db):,} "
          f"chunks (shards unchanged), recall@10 {recall:.3f}")
    else:
      searcher = timed("index", lambda: indexlib.build_index(
          embeddings, kind=index_kind))
      indexlib.save(searcher, os.path.join(db_dir, INDEX_DIR), overwrite=True)
      queries = min(recall_queries, len(db))
      recall = timed("recall", lambda: indexlib.measure_recall(
          searcher, embeddings, num_queries=queries, k=10))
      dblib.update_manifest(db_dir, index={"kind": searcher.kind,
                                           "dir": INDEX_DIR},
                            recall={"recall_at_10": recall, "queries": queries})
      log(f"index: {searcher.kind} over {len(db):,} chunks in "
          f"{seconds['index']:.1f} s, recall@10 {recall:.3f} over {queries} "
          f"held-in queries ({seconds['recall']:.1f} s)")
    summary.update(num_chunks=len(db), num_tokens=manifest["num_tokens"],
                   num_documents=manifest["num_documents"],
                   text_bytes=manifest["text_bytes"], recall_at_10=recall,
                   index_kind=searcher.kind)
  return summary


def _saved_index(db_dir: str, manifest: Dict[str, Any],
                 embeddings: np.ndarray, kind: str
                 ) -> Optional[indexlib.Searcher]:
  """The index a finished build saved, if it still serves: `finalize` keeps
  the manifest's index and recall only while every shard is unchanged, and
  the saved kind must be the one asked for (for "auto", the one
  `build_index` would pick now). None means: build it."""
  saved = manifest.get("index") or {}
  if ("recall" not in manifest
      or saved.get("kind") != indexlib.resolve_kind(kind, len(embeddings))):
    return None
  try:
    return indexlib.load(os.path.join(db_dir, INDEX_DIR), embeddings=embeddings)
  except (FileNotFoundError, ValueError):
    return None   # Missing or damaged: rebuilt and saved again.


def _describe(d: Any) -> str:
  if not isinstance(d, dict):
    return str(d)
  return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                   for k, v in d.items() if not isinstance(v, (list, dict)))


def open_for_queries(db_dir: str, embedder
                     ) -> Tuple[dblib.RetrievalDB, indexlib.Searcher]:
  """The finalized DB and its saved index, checked against `embedder`."""
  db = dblib.RetrievalDB.open(db_dir, embedder=embedder)
  searcher = indexlib.load(os.path.join(db_dir, INDEX_DIR),
                           embeddings=db.embeddings())
  return db, searcher


def query(db_dir: str, text: str, embedder, k: int = 5) -> List[Dict]:
  """The k DB chunks nearest to `text`: id, document id, distance, text."""
  db, searcher = open_for_queries(db_dir, embedder)
  sp = vocab.load(os.path.join(db_dir, "spm.model"))
  ids, dists = searcher.search(embedder.embed([text]), k)      # [1, k]
  return [{"id": int(i), "doc_id": int(db.doc_ids_of(np.array([i]))[0]),
           "distance": float(d), "text": db.chunk_text(int(i), sp)}
          for i, d in zip(ids[0], dists[0]) if i >= 0]
