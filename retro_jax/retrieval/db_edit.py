"""Editing a finalized retrieval DB in place: remove documents, add documents.

RETRO's knowledge lives in the DB, so it can be changed without retraining:

  remove_documents(db_dir, Selection.of(source_globs=["stdlib:email/*"]))
  add_documents(db_dir, docs, embedder, part="added")

How an edit stays atomic and resumable. Shards are never changed in place:

  1. New shard directories are written under new names beside the old ones
     (shards/shard-e0001-00003: edit 1's copy of shard 3). A removal copies
     the rows it keeps of each shard it touches (tokens, doc ids, stored
     embeddings, document records: no BERT runs); shards it does not touch
     are kept by name; a shard left empty is dropped. An addition writes
     new shards of the added documents (shard_writer.py, as the build) and
     embeds them with the DB's frozen BERT (db_build.embed_shard_dir).
  2. The edited DB's index is built in a new directory (index-<version>),
     by the build's code (index_shards.build), and its recall@10 measured
     against exact search (ScaNN indexes; an exact index is exact).
  3. manifest.json is replaced (one atomic rename): the switch. It lists the
     new shards, the recomputed parts and counts, the new index, a new
     `content_version` (fmt.content_version of the shard records) and the
     edit, appended to `edits`.
  4. Directories no manifest refers to any more are deleted.

Killed before 3, the old DB is whole and in use (it never refers to the new
files); rerun, the edit finds its complete shards and index shards and
keeps them. Killed after 3, the edited DB is complete and only leftovers
remain, which the next edit deletes. Rewriting only the shards an edit
touches (rather than keeping a keep-mask beside immutable shards) means
every reader sees an ordinary DB: removed chunks are not in the index, and
no continuation can run into them (a chunk's continuation is the next row of
its own document, and documents are removed whole).

Chunk ids after a removal shift down; an addition appends at the end, as a
new part or at the end of the last part. Everything computed from chunk ids
(neighbour tables, Task caches) records the content version it was made for
and is refused after an edit, with the command that refreshes it.

Shape glossary:
  n: chunks in a shard.   m: tokens per chunk (64).   D: embedding width.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional,
                    Set)

import numpy as np

from retro_jax.config import PAD_ID
from retro_jax.corpus import vocab
from retro_jax.corpus.packing import document_chunks
from retro_jax.corpus.sources import Document
from retro_jax.retrieval import db_build
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval import db_select
from retro_jax.retrieval import index_shards
from retro_jax.retrieval import shard_writer
from retro_jax.retrieval.db import RetrievalDB


def edit_shard_name(edit: int, j: int) -> str:
  """Shard j written by edit number `edit` (1 for a DB's first edit)."""
  return f"shard-e{edit:04d}-{j:05d}"


@contextlib.contextmanager
def _edit_lock(db_dir: str) -> Iterator[None]:
  """One edit of a DB at a time (on this host): a second waits."""
  if "://" in db_dir:
    raise ValueError(f"{db_dir}: edit a local DB (gs:// DBs are published "
                     f"from a local build: edit that folder, then publish)")
  if not os.path.isfile(os.path.join(db_dir, fmt.MANIFEST)):
    RetrievalDB.open(db_dir)  # Raises, saying why it is no finalized DB.
  with open(os.path.join(db_dir, ".edit.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _open_local(db_dir: str, embedder=None) -> RetrievalDB:
  """The DB, every file checked against its sha256 (an edit copies them)."""
  return RetrievalDB.open(db_dir, embedder=embedder, verify=True)


def _shard_record(sdir: str) -> Optional[Dict[str, Any]]:
  """The manifest record of a complete shard directory, or None."""
  if fmt.chunks_problem(sdir, verify=True):
    return None
  chunks = fmt.read_json(os.path.join(sdir, fmt.CHUNKS_RECORD))
  if fmt.embeddings_problem(sdir, chunks, verify=True):
    return None
  emb = fmt.read_json(os.path.join(sdir, fmt.EMBEDDINGS_RECORD))
  return {"name": os.path.basename(sdir), "num_chunks": chunks["num_chunks"],
          "files": dict(chunks["files"], **{fmt.EMBEDDINGS: emb["file"]})}


def _write_kept_rows(db: RetrievalDB, i: int, keep: np.ndarray,
                     name: str) -> Dict[str, Any]:
  """Writes the rows `keep` (bool [n]) of DB shard i as shard `name`
  (reused when complete with these bytes); returns its manifest record."""
  old_dir = os.path.join(db.path, fmt.SHARDS, db.manifest["shards"][i]["name"])
  sdir = os.path.join(db.path, fmt.SHARDS, name)
  first, _ = db.shard_ranges()[i]
  rows = np.flatnonzero(keep) + first  # [kept] global ids.
  data = {fmt.TOKENS: fmt.npy_bytes(db.chunk_tokens(rows)),  # [kept, m]
          fmt.DOC_IDS: fmt.npy_bytes(db.doc_ids_of(rows))}  # [kept]
  if fmt.DOCUMENTS in db.manifest["shards"][i]["files"]:
    kept_docs = set(np.asarray(db.doc_ids_of(rows)).tolist())
    docs = fmt.read_documents(os.path.join(old_dir, fmt.DOCUMENTS))
    data[fmt.DOCUMENTS] = fmt.documents_bytes(
        [d for d in docs if d["doc_id"] in kept_docs])
  emb = db.embedding_shards()[i]
  emb_bytes = fmt.npy_bytes(np.asarray(emb[keep]))  # [kept, D], stored dtype.
  want = {k: fmt.sha256_bytes(v) for k, v in data.items()}
  want[fmt.EMBEDDINGS] = fmt.sha256_bytes(emb_bytes)
  record = _shard_record(sdir)
  if record is not None and {k: v["sha256"] for k, v in
                             record["files"].items()} == want:
    return record  # Written by an earlier, killed run of this edit.
  os.makedirs(sdir, exist_ok=True)
  for stale in (fmt.CHUNKS_RECORD, fmt.EMBEDDINGS_RECORD):
    if os.path.exists(os.path.join(sdir, stale)):
      os.remove(os.path.join(sdir, stale))
  fmt.remove_temporaries(sdir)
  files = {k: fmt.write_bytes_atomic(os.path.join(sdir, k), v)
           for k, v in data.items()}
  fmt.write_json_atomic(os.path.join(sdir, fmt.CHUNKS_RECORD),
                        {"num_chunks": int(keep.sum()), "files": files})
  emb_record = fmt.read_json(os.path.join(old_dir, fmt.EMBEDDINGS_RECORD))
  emb_file = fmt.write_bytes_atomic(os.path.join(sdir, fmt.EMBEDDINGS),
                                    emb_bytes)
  fmt.write_json_atomic(os.path.join(sdir, fmt.EMBEDDINGS_RECORD), dict(
      emb_record, num_chunks=int(keep.sum()), file=emb_file,
      tokens_sha256=files[fmt.TOKENS]["sha256"]))
  return _shard_record(sdir)


def _token_counts(db: RetrievalDB, rows: np.ndarray) -> Dict[str, int]:
  """Chunks, documents, text tokens and padding of whole documents' rows
  (each document's chunks hold its tokens, one EOS, then padding)."""
  if not len(rows):
    return dict(num_chunks=0, num_documents=0, num_tokens=0, pad_tokens=0)
  nonpad = sum(int((db.chunk_tokens(rows[s:s + 4096]) != PAD_ID).sum())
               for s in range(0, len(rows), 4096))
  docs = len(np.unique(db.doc_ids_of(rows)))
  return dict(num_chunks=len(rows), num_documents=docs,
              num_tokens=nonpad - docs,
              pad_tokens=len(rows) * db.chunk_size - nonpad)


def _new_parts(db: RetrievalDB, removed_rows: np.ndarray
               ) -> List[Dict[str, Any]]:
  """The manifest's parts without `removed_rows` (sorted global ids)."""
  parts, first = [], 0
  for part in db.manifest["parts"]:
    lo, hi = part["first_chunk"], part["first_chunk"] + part["num_chunks"]
    gone = removed_rows[(removed_rows >= lo) & (removed_rows < hi)]
    counts = _token_counts(db, gone)
    new = dict(part, first_chunk=first)
    for key, value in counts.items():
      new[key] = part[key] - value
    parts.append(new)
    first += new["num_chunks"]
  return parts


def remove_documents(db_dir: str, selection: db_select.Selection, *,
                     recall_queries: int = 1000,
                     log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Removes the documents `selection` selects from the DB, whole.

  Returns:
    The edit's record (also appended to the manifest's `edits`): what was
    removed, counts, the old and new content versions, recall@10.
  Raises:
    ValueError: the selection matches nothing, names missing ids, or needs
      sources the DB does not keep; or it would remove every document.
    IncompleteDBError: the DB is not finalized or is damaged.
  """
  with _edit_lock(db_dir):
    return _remove(_open_local(db_dir), selection, recall_queries, log)


def _remove(db: RetrievalDB, selection: db_select.Selection,
            recall_queries: int, log: Callable[[str], None]
            ) -> Dict[str, Any]:
  db_dir = db.path
  ids, records = db_select.select(db, selection)
  if not ids:
    raise ValueError(f"{selection.describe()} matches no document of "
                     f"{db_dir}")
  edit = len(db.manifest.get("edits") or []) + 1
  banned = np.fromiter(ids, np.int64, len(ids))
  shards, removed_rows = [], []
  for i, (first, n) in enumerate(db.shard_ranges()):
    doc_ids = np.asarray(db.doc_ids_of(np.arange(first, first + n)))  # [n]
    drop = np.isin(doc_ids, banned)  # [n]
    removed_rows.append(np.flatnonzero(drop) + first)
    if not drop.any():
      shards.append(db.manifest["shards"][i])  # Kept as it is, by name.
    elif not drop.all():
      shards.append(_write_kept_rows(db, i, ~drop, edit_shard_name(edit, i)))
  if not shards:
    raise ValueError(f"{selection.describe()} selects every document of "
                     f"{db_dir}: build a new DB instead")
  removed = np.concatenate(removed_rows)  # Sorted global ids.
  gone = _token_counts(db, removed)
  known_bytes = [r["bytes"] for r in records if r.get("bytes") is not None]
  record = dict(action="remove", selection=selection.as_record(),
                documents=len(ids), chunks=gone["num_chunks"],
                text_bytes=sum(known_bytes),
                sources=sorted({r["source"] for r in records
                                if r.get("source")})[:20])
  record["summary"] = (f"edit {edit}: removed {len(ids)} documents "
                       f"({gone['num_chunks']} chunks) matching "
                       f"{selection.describe()}")
  counts = {k: db.manifest[k] - gone[k] for k in
            ("num_chunks", "num_documents", "num_tokens", "pad_tokens")}
  counts["text_bytes"] = db.manifest["text_bytes"] - sum(known_bytes)
  return _commit(db, shards, _new_parts(db, removed), counts, record,
                 recall_queries, log)


def add_documents(db_dir: str, docs: Iterable[Document], embedder, *,
                  part: str = "added", source: Optional[Dict[str, Any]] = None,
                  shard_chunks: int = 0, batch_size: int = 256,
                  recall_queries: int = 1000,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Adds `docs` to the DB: chunked by its vocabulary, embedded by
  `embedder` (which must be the DB's), appended as new shards.

  Args:
    db_dir: a finalized, local DB.
    docs: the documents; those already in the DB (by id) are skipped.
    embedder: the DB's BertEmbedder (its fingerprint is checked).
    part: the part the chunks join: a new one, or the DB's last part,
      which grows (a part's chunk ids stay contiguous).
    source: what the documents were read from (sources.text_source), kept
      with the part and the edit.
    shard_chunks: chunks per new shard (0: the DB's build setting).
    batch_size: chunks per BERT forward pass.
    recall_queries: held-in queries for the index's recall@10.
    log: progress lines.
  Returns:
    The edit's record (see `remove_documents`).
  """
  with _edit_lock(db_dir):
    return _add(_open_local(db_dir, embedder=embedder), docs, embedder, part,
                source, shard_chunks, batch_size, recall_queries, log)


def _add(db: RetrievalDB, docs: Iterable[Document], embedder, part: str,
         source: Optional[Dict[str, Any]], shard_chunks: int, batch_size: int,
         recall_queries: int, log: Callable[[str], None]) -> Dict[str, Any]:
  db_dir = db.path
  names = [p["name"] for p in db.manifest["parts"]]
  if part in names[:-1]:
    raise ValueError(f"part {part!r} of {db_dir} is not its last part "
                     f"({names}): add to the last part or a new one, so that "
                     f"every part's chunk ids stay contiguous")
  edit = len(db.manifest.get("edits") or []) + 1
  build = fmt.read_json(os.path.join(db_dir, fmt.BUILD)) or {}
  shard_chunks = shard_chunks or int(build.get("shard_chunks") or 65536)
  sp = vocab.load(os.path.join(db_dir, fmt.SPM_MODEL))
  writer = shard_writer.ShardWriter(db_dir, shard_chunks, db.chunk_size, None,
                                    lambda j: edit_shard_name(edit, j))
  skipped = shard_writer.new_skip_counts()
  seen: Set[int] = set(db_select.all_doc_ids(db).tolist())
  added = dict(num_chunks=0, num_documents=0, num_tokens=0, pad_tokens=0,
               text_bytes=0)
  for doc, ids, nbytes in shard_writer.tokenized_documents(docs, sp, skipped,
                                                           seen):
    chunks = document_chunks(np.asarray(ids, np.int32), db.chunk_size)
    writer.add(chunks, doc.doc_id, shard_writer.document_record(doc, nbytes))
    added["num_chunks"] += len(chunks)  # [c, m] chunks of the document.
    added["num_documents"] += 1
    added["num_tokens"] += len(ids)
    added["pad_tokens"] += chunks.size - len(ids) - 1
    added["text_bytes"] += nbytes
  writer.flush()
  if not added["num_chunks"]:
    raise ValueError(f"no document was added to {db_dir} (skipped: "
                     f"{skipped})")
  dtype = db.manifest["embedding"]["dtype"]
  new_shards = []
  for name in writer.names:
    sdir = os.path.join(db_dir, fmt.SHARDS, name)
    record = _shard_record(sdir)
    if record is None:  # Not embedded yet (or by a killed run).
      n = db_build.embed_shard_dir(sdir, sp, embedder, batch_size, dtype)
      log(f"edit {edit}: embedded {n} chunks of {name}")
      record = _shard_record(sdir)
    new_shards.append(record)
  parts = [dict(p) for p in db.manifest["parts"]]
  if parts and parts[-1]["name"] == part:
    last = parts[-1]
    for key in ("num_chunks", "num_documents", "num_tokens", "pad_tokens"):
      last[key] += added[key]
    last["added_sources"] = last.get("added_sources", []) + [source]
  else:
    parts.append(dict(name=part, source=source, first_chunk=db.num_chunks,
                      **{k: added[k] for k in ("num_chunks", "num_documents",
                                               "num_tokens", "pad_tokens")}))
  record = dict(action="add", source=source, part=part,
                documents=added["num_documents"], chunks=added["num_chunks"],
                text_bytes=added["text_bytes"], skipped=skipped)
  record["summary"] = (f"edit {edit}: added {added['num_documents']} "
                       f"documents ({added['num_chunks']} chunks) to part "
                       f"{part!r}")
  counts = {k: db.manifest[k] + added[k] for k in added}
  return _commit(db, db.manifest["shards"] + new_shards, parts, counts,
                 record, recall_queries, log)


def _commit(db: RetrievalDB, shards: List[Dict[str, Any]],
            parts: List[Dict[str, Any]], counts: Dict[str, int],
            record: Dict[str, Any], recall_queries: int,
            log: Callable[[str], None]) -> Dict[str, Any]:
  """Indexes the edited DB, switches the manifest to it, deletes what no
  manifest refers to any more; returns the edit's record."""
  old = db.manifest
  version = fmt.content_version(shards)
  manifest = dict(old, shards=shards, parts=parts, content_version=version,
                  **counts)
  edited = RetrievalDB.from_manifest(db.path, manifest, verify=False)
  index = old.get("index") or {}
  index_name = f"{fmt.INDEX_DIR}-{version[:12]}"
  built = index_shards.build(
      edited, os.path.join(db.path, index_name),
      kind=index.get("kind", "auto"),
      shard_chunks=int(index.get("shard_chunks") or 0),
      recall_queries=recall_queries, log=log)
  record = dict(record, time=time.time(), previous_version=db.content_version,
                version=version, num_chunks=edited.num_chunks,
                recall=built["recall"])
  manifest.update(
      index={"kind": built["kind"], "dir": index_name,
             "shards": len(built["shards"]),
             "shard_chunks": int(index.get("shard_chunks") or 0)},
      recall=built["recall"], edits=list(old.get("edits") or []) + [record])
  fmt.write_json_atomic(os.path.join(db.path, fmt.MANIFEST), manifest)
  log(f"{record['summary']}; DB version {db.content_version[:12]} -> "
      f"{version[:12]}, {edited.num_chunks:,} chunks, index {built['kind']} "
      f"recall@10 {built['recall']['recall_at_10']:.3f}")
  _remove_unreferenced(db.path, manifest)
  return record


def _remove_unreferenced(db_dir: str, manifest: Dict[str, Any]) -> None:
  """Deletes shard and index directories the manifest does not name: the
  DB before this edit, and leftovers of killed edits."""
  keep = {s["name"] for s in manifest["shards"]}
  root = os.path.join(db_dir, fmt.SHARDS)
  for name in os.listdir(root):
    if name.startswith("shard-") and name not in keep:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
  current = manifest["index"]["dir"]
  for name in os.listdir(db_dir):
    is_index = name == fmt.INDEX_DIR or name.startswith(fmt.INDEX_DIR + "-")
    if is_index and name != current and os.path.isdir(
        os.path.join(db_dir, name)):
      shutil.rmtree(os.path.join(db_dir, name), ignore_errors=True)
