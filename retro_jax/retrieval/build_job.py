"""The retrieval-database build, end to end, and the DB query used to inspect it.

  corpus ─► SentencePiece (trained if none given) ─► 64-token chunks (shards)
         ─► frozen-BERT embeddings, once per chunk      (stage "embed")
         ─► finalize (checksums, manifest) ─► index shards (ScaNN or exact)
            ─► recall@10 against exact search, in the manifest (stage "index")
         ─► neighbour table: each chunk's C nearest chunks (stage "table")

The stages are ("chunks", "embed", "index", "table"), run in that order, all
at once or one per call. "embed" and "table" are Beam pipelines
(beam_jobs.py) over `workers` workers of `runner`: Beam's FnApiRunner here
(in process, or worker processes with workers > 1), Dataflow on Google
Cloud. They replace the former `--stage=embed --shard=i --num_shards=N`
flags: the runner spreads the shards, no worker is started by hand.

Each stage reports what it did and how long it took; `build_database`
returns the whole summary, seconds per stage included. A rerun resumes:
complete DB shards, embeddings, index shards and table shards are kept, only
missing or damaged ones are redone.
"""

from __future__ import annotations

import os
import time
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple)

from etils import epath
import numpy as np

from retro_jax.core import files
from retro_jax.corpus import sources
from retro_jax.corpus import vocab
from retro_jax.corpus.sources import Document
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval import db_stage
from retro_jax.retrieval import index as indexlib
from retro_jax.retrieval import index_shards

INDEX_DIR = fmt.INDEX_DIR  # Of a built DB; an edited one names its own.


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
  if spm_path:
    return spm_path
  if not files.is_local(db_dir):    # gs://bucket/db -> gs://bucket/spm.model
    return f"{db_dir.rstrip('/').rsplit('/', 1)[0]}/spm.model"
  return os.path.join(os.path.dirname(os.path.abspath(db_dir)), "spm.model")


def vocabulary(spm_path: str, train_docs: Callable[[], Iterable[Document]],
               vocab_size: int, train_bytes: int, log: Callable[[str], None]):
  """Loads `spm_path`, or trains it on the first `train_bytes` of text."""
  if epath.Path(spm_path).exists():
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


STAGES = ("chunks", "embed", "index", "table")


def build_database(db_dir: str, parts: Mapping[str, Mapping[str, Any]],
                   spm_path: str, embedder: Any = None, *, stages=STAGES,
                   vocab_size: int = 8192, spm_train_bytes: int = 20_000_000,
                   shard_chunks: int = 65536,
                   embed_batch: Optional[int] = None,
                   index_kind: str = "auto", index_shard_chunks: int = 0,
                   recall_queries: int = 1000, table_candidates: int = 16,
                   workers: int = 1,
                   runner: str = "FnApiRunner",
                   beam_args: Sequence[str] = (),
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Builds (or resumes) the retrieval DB in `db_dir`.

  Run every stage at once, or one at a time, in order: "embed" and "table"
  are Beam pipelines over `workers` workers of `runner`; "chunks" and
  "index" run here.

  Args:
    db_dir: the DB directory.
    parts: {part name: `sources.text_source`}, written in order (see
      `db_sources`); the vocabulary trains on the first part.
    spm_path: SentencePiece model to use, trained there if it does not exist.
    embedder: the BERT checkpoint directory ("" or None: the bundled
      all-MiniLM-L6-v2), or a loaded `BertEmbedder` (workers reload it from
      its directory).
    stages: which of "chunks" (vocabulary + chunk shards), "embed", "index"
      (finalize, index shards, recall) and "table" (the neighbour table)
      to run, in that order.
    vocab_size, spm_train_bytes: vocabulary training settings.
    shard_chunks: chunks per DB shard.
    embed_batch: chunks per BERT forward pass (default: a loaded embedder's
      batch size, else 32).
    index_kind: "auto" (exact below 20k chunks per index shard, else
      ScaNN), "scann", "exact".
    index_shard_chunks: chunks per index shard at most; 0 = one index.
    recall_queries: held-in queries for the recall@10 measurement.
    table_candidates: C, the nearest chunks the table keeps per DB chunk.
    workers, runner, beam_args: where the Beam stages run
      (`beam_jobs.pipeline_options`).
    log: where progress lines go.
  Returns:
    The summary: counts, bytes, seconds per stage, chunks/s, recall.
  """
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise ValueError(f"unknown stages {sorted(unknown)}; stages: {STAGES}")
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  summary: Dict[str, Any] = {"db_dir": db_dir, "seconds": {},
                             "corpus_files_skipped": {}}
  # A gs:// DB is built in a local folder (memory maps, atomic renames,
  # Beam's workers all want local files) and published when it is whole:
  # its stages must then run on one host, whose folder a rerun resumes.
  url = None if files.is_local(db_dir) else db_dir
  if url:
    db_dir = db_stage.staging_dir(url, "build")
    log(f"building {url} in {db_dir}, published when finalized")
  skipped = summary["corpus_files_skipped"]  # Reader skips, by reason.
  first = next(iter(parts.values()), None)
  seconds = summary["seconds"]
  index_dir = fmt.index_dir_of(db_dir)  # Where the manifest says, if any.

  def timed(name, fn):
    t0 = time.time()
    out = fn()
    seconds[name] = round(time.time() - t0, 2)
    return out

  if "chunks" in stages:
    sp = timed("vocabulary", lambda: vocabulary(
        spm_path, lambda: sources.source_documents(first) if first else (),
        vocab_size, spm_train_bytes, log))
    chunks = timed("chunks", lambda: dblib.write_chunks(
        {name: sources.source_documents(src, skipped)
         for name, src in parts.items()}, sp, db_dir,
        shard_chunks=shard_chunks, spm_path=spm_path, sources=parts))
    summary["chunks"] = chunks
    log(f"chunks: {_describe(chunks)} in {seconds['chunks']:.1f} s")

  if {"embed", "table"} & set(stages):
    # Imported here: Apache Beam is heavy, and the other stages and the
    # query do not need it.
    from retro_jax.retrieval import beam_jobs  # pylint: disable=g-import-not-at-top

  if "embed" in stages:
    loaded = (None if embedder is None
              or isinstance(embedder, (str, os.PathLike)) else embedder)
    batch = embed_batch or getattr(loaded, "batch_size", 32)
    embedded = timed("embed", lambda: beam_jobs.embed_pipeline(
        db_dir, beam_jobs.embedder_spec(embedder), batch, workers=workers,
        runner=runner, beam_args=beam_args, loaded=loaded, log=log))
    summary["embed"] = embedded
    summary["embed_chunks_per_s"] = embedded["chunks_per_s"]
    log(f"embeddings: {embedded['chunks_embedded']:,} chunks of "
        f"{len(embedded['embedded'])} shard(s) embedded, "
        f"{len(embedded['skipped'])} complete shard(s) kept, in "
        f"{seconds['embed']:.1f} s"
        + (f" ({embedded['chunks_per_s']} chunks/s on "
           f"{len(embedded['workers'])} worker process(es))"
           if embedded["chunks_embedded"] else ""))

  if "index" in stages:
    manifest = timed("finalize", lambda: dblib.finalize(db_dir))
    db = dblib.RetrievalDB.open(db_dir)
    built = timed("index", lambda: index_shards.build(
        db, index_dir, kind=index_kind, shard_chunks=index_shard_chunks,
        recall_queries=recall_queries, log=log))
    recall = built["recall"]
    dblib.update_manifest(
        db_dir, index={"kind": built["kind"],
                       "dir": os.path.relpath(index_dir, db_dir),
                       "shards": len(built["shards"]),
                       "shard_chunks": index_shard_chunks},
        recall=recall)
    log(f"index: {built['kind']} over {len(db):,} chunks in "
        f"{len(built['shards'])} shard(s) ({built['built']} built, "
        f"{built['reused']} reused) in {seconds['index']:.1f} s, recall@10 "
        f"{recall['recall_at_10']:.3f} "
        + (f"over {recall['queries']} held-in queries" if recall["queries"]
           else "(exact search)"))
    summary.update(num_chunks=len(db), num_tokens=manifest["num_tokens"],
                   num_documents=manifest["num_documents"],
                   text_bytes=manifest["text_bytes"],
                   recall_at_10=recall["recall_at_10"],
                   index_kind=built["kind"],
                   index_shards=len(built["shards"]))

  if "table" in stages:
    table = timed("table", lambda: beam_jobs.table_pipeline(
        db_dir, index_dir, table_candidates, workers=workers, runner=runner,
        beam_args=beam_args, log=log))
    summary["table"] = table
    log(f"table: {table['num_chunks']:,} chunks x {table['candidates']} "
        f"neighbours in {table['shards']} shard(s); this run searched "
        f"{table['index_shards_searched']} index shard(s) and merged "
        f"{table['table_shards_merged']} table shard(s) in "
        f"{seconds['table']:.1f} s"
        + (f" on {len(table['workers'])} worker process(es)"
           if table["workers"] else ""))
  if url and os.path.isfile(os.path.join(db_dir, fmt.MANIFEST)):
    timed("publish", lambda: db_stage.publish(db_dir, url))
    log(f"published {db_dir} to {url}")
  log("seconds per stage: " + ", ".join(f"{k} {v:.1f}"
                                        for k, v in seconds.items()))
  return summary


def _describe(d: Any) -> str:
  if not isinstance(d, dict):
    return str(d)
  return ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                   for k, v in d.items() if not isinstance(v, (list, dict)))


def open_for_queries(db_dir: str, embedder
                     ) -> Tuple[dblib.RetrievalDB, indexlib.Searcher]:
  """The finalized DB and its index (every shard, merged: global ids),
  checked against `embedder`."""
  db_dir = db_stage.local_dir(db_dir)   # A gs:// DB: its staged copy.
  db = dblib.RetrievalDB.open(db_dir, embedder=embedder)
  return db, index_shards.load(fmt.index_dir_of(db_dir, db.manifest), db)


def query(db_dir: str, text: str, embedder, k: int = 5) -> List[Dict]:
  """The k DB chunks nearest to `text`: id, document id, distance, text,
  and where the chunk came from ("document": source, title, meta; source
  None in a DB built before attribution)."""
  db, searcher = open_for_queries(db_dir, embedder)
  sp = vocab.load(os.path.join(db.path, "spm.model"))
  ids, dists = searcher.search(embedder.embed([text]), k)      # [1, k]
  return [{"id": int(i), "doc_id": int(db.doc_ids_of(np.array([i]))[0]),
           "distance": float(d), "text": db.chunk_text(int(i), sp),
           "document": db.document_of(int(i))}
          for i, d in zip(ids[0], dists[0]) if i >= 0]
