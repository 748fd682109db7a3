"""Writing DB shards: documents -> token chunks, doc ids and attribution.

Shared by the build (db_build.write_chunks, shards shard-00000, ...) and by
edits that add documents (db_edit.add_documents, shards under new names):

  tokenized_documents   documents -> (document, SentencePiece ids, bytes),
                        skipping empty, invalid and repeated documents
  ShardWriter           fills shards of `shard_chunks` chunks, each written
                        whole (tokens.npy, doc_ids.npy, documents.jsonl, then
                        chunks.json), an identical shard on disk reused

`document_record` is what the DB keeps to find a document again: its id, its
source (a path such as "stdlib:json/decoder.py", a URL, a tfds id), a title
where the corpus has one, its metadata and its size in bytes.

Shape glossary:
  n: chunks in a shard.   m: tokens per chunk (64).   c: chunks of a document.
"""

from __future__ import annotations

import os
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional,
                    Set, Tuple)

import numpy as np

from retro_jax.corpus.sources import Document
from retro_jax.retrieval import db_format as fmt

_DOC_BATCH = 256  # Documents per SentencePiece call (it tokenizes in threads).


def document_record(doc: Document, nbytes: int) -> Dict[str, Any]:
  """What documents.jsonl keeps of `doc` (everything but its text)."""
  meta = {str(k): v for k, v in dict(doc.meta).items()}
  return {"doc_id": int(doc.doc_id), "source": doc.source,
          "title": meta.get("title"), "meta": meta, "bytes": int(nbytes)}


def new_skip_counts() -> Dict[str, int]:
  return dict(empty=0, invalid_unicode=0, empty_after_tokenization=0,
              repeated_doc_id=0)


def _batches(docs: Iterable[Document], size: int) -> Iterator[List[Document]]:
  batch = []
  for doc in docs:
    batch.append(doc)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def tokenized_documents(docs: Iterable[Document], sp, skipped: Dict[str, int],
                        seen_ids: Set[int],
                        on_batch: Optional[Callable[[int], None]] = None
                        ) -> Iterator[Tuple[Document, List[int], int]]:
  """(document, token ids, UTF-8 bytes) of each document that enters a DB.

  Args:
    docs: the documents, streamed.
    sp: the SentencePieceProcessor.
    skipped: counts by reason, updated (see `new_skip_counts`).
    seen_ids: ids already in the DB, updated: a document enters once, as
      adjacent chunks with one id would read as one document.
    on_batch: called with the size of each batch read (a progress bar).
  """
  for batch in _batches(docs, _DOC_BATCH):
    if on_batch:
      on_batch(len(batch))
    kept = []
    for doc in batch:
      if not doc.text.strip():
        skipped["empty"] += 1
        continue
      try:  # Lone surrogates (surrogateescape) have no UTF-8 form.
        nbytes = len(doc.text.encode("utf-8"))
      except UnicodeEncodeError:
        skipped["invalid_unicode"] += 1
        continue
      kept.append((doc, nbytes))
    for (doc, nbytes), ids in zip(kept, sp.encode([d.text for d, _ in kept])):
      if not ids:
        skipped["empty_after_tokenization"] += 1
        continue
      if doc.doc_id in seen_ids:
        # A copy in a later part (extra text that overlaps the training
        # split) would also fill a query's k neighbours with one text twice.
        skipped["repeated_doc_id"] += 1
        continue
      seen_ids.add(doc.doc_id)
      yield doc, ids, nbytes


class ShardWriter:
  """Fills shards of `shard_chunks` chunks and writes each when full.

  Args:
    db_dir: the DB directory.
    shard_chunks, chunk_size: n (the last shard holds the rest) and m.
    manifest: a finalized DB's manifest, whose shards may only be restored
      (a rerun of the build), never changed; None otherwise.
    name_of: shard number -> directory name under shards/ (the build's
      shard-00000, ...; an edit's own names).
  """

  def __init__(self, db_dir: str, shard_chunks: int, chunk_size: int,
               manifest: Optional[Dict[str, Any]],
               name_of: Callable[[int], str] = fmt.shard_name):
    self.db_dir, self.manifest, self.name_of = db_dir, manifest, name_of
    self.tokens = np.zeros((shard_chunks, chunk_size), np.int32)  # [n, m]
    self.doc_ids = np.zeros((shard_chunks,), np.int64)  # [n]
    self.documents: List[Dict[str, Any]] = []  # Those with rows in the shard.
    self.fill = 0
    self.index = 0
    self.written = self.reused = 0
    self.names: List[str] = []  # Of the shards written or reused, in order.

  def add(self, chunks: np.ndarray, doc_id: int,
          record: Dict[str, Any]) -> None:
    """Appends a document's chunks [c, m] and its `document_record`,
    spilling into the next shard (which records the document too)."""
    start = 0
    while start < len(chunks):
      if self.fill == 0 or self.documents[-1] is not record:
        self.documents.append(record)
      take = min(len(chunks) - start, len(self.tokens) - self.fill)
      self.tokens[self.fill:self.fill + take] = chunks[start:start + take]
      self.doc_ids[self.fill:self.fill + take] = doc_id
      self.fill += take
      start += take
      if self.fill == len(self.tokens):
        self.flush()

  def _check_restores(self, want: Dict[str, str]) -> None:
    """Refuses to change a shard of a finalized DB (compares the files its
    manifest records: a DB built before attribution has no documents)."""
    shards = self.manifest["shards"]
    have = shards[self.index]["files"] if self.index < len(shards) else {}
    if any(have.get(k, {}).get("sha256") != v for k, v in want.items()
           if k != fmt.DOCUMENTS or k in have):
      raise ValueError(
          f"{self.db_dir} is finalized and its {self.name_of(self.index)}"
          f" differs from this corpus: build into a fresh directory")

  def flush(self) -> None:
    if not self.fill:
      return
    data = {fmt.TOKENS: fmt.npy_bytes(self.tokens[:self.fill]),
            fmt.DOC_IDS: fmt.npy_bytes(self.doc_ids[:self.fill]),
            fmt.DOCUMENTS: fmt.documents_bytes(self.documents)}
    name = self.name_of(self.index)
    sdir = os.path.join(self.db_dir, fmt.SHARDS, name)
    if self.manifest is not None:
      shards = self.manifest["shards"]
      if (self.index < len(shards)
          and fmt.DOCUMENTS not in shards[self.index]["files"]):
        del data[fmt.DOCUMENTS]  # Restored as built, without attribution.
    want = {k: fmt.sha256_bytes(v) for k, v in data.items()}
    if self.manifest is not None:
      self._check_restores(want)
    record = fmt.read_json(os.path.join(sdir, fmt.CHUNKS_RECORD))
    if (record is not None and {k: v.get("sha256") for k, v in
                                record.get("files", {}).items()} == want
        and fmt.chunks_problem(sdir, verify=True) is None):
      self.reused += 1
    else:
      os.makedirs(sdir, exist_ok=True)
      # Unrecord first: while the files are replaced the shard is incomplete.
      # (Its embeddings record names the tokens' sha256, so embeddings of
      # other tokens are found stale by embed_shards and finalize.)
      if os.path.exists(os.path.join(sdir, fmt.CHUNKS_RECORD)):
        os.remove(os.path.join(sdir, fmt.CHUNKS_RECORD))
      fmt.remove_temporaries(sdir)
      stale = os.path.join(sdir, fmt.DOCUMENTS)
      if fmt.DOCUMENTS not in data and os.path.exists(stale):
        os.remove(stale)
      files = {k: fmt.write_bytes_atomic(os.path.join(sdir, k), v)
               for k, v in data.items()}
      fmt.write_json_atomic(os.path.join(sdir, fmt.CHUNKS_RECORD),
                            {"num_chunks": self.fill, "files": files})
      self.written += 1
    self.names.append(name)
    self.index += 1
    self.fill = 0
    self.documents = []
