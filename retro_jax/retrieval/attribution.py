"""Where DB chunks came from: the per-shard document records, read lazily.

Each DB shard keeps documents.jsonl (shard_writer.document_record): for
every document with chunks in the shard its id, source (a path such as
"stdlib:email/parser.py", a URL, a tfds id), title where the corpus has one,
metadata and size. A shard's file is read the first time one of its chunks
is asked about, so opening a DB stays cheap whatever its size.

`describe_hit` is the line a query or a sampled continuation prints for a
retrieved chunk, e.g. "chunk 812 · stdlib:json/decoder.py (document 4071...)".
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterator, List, Optional

from retro_jax.retrieval import db_format as fmt


def unknown(doc_id: int) -> Dict[str, Any]:
  """The record of a document whose DB kept no attribution."""
  return {"doc_id": int(doc_id), "source": None, "title": None, "meta": {},
          "bytes": None}


class ShardDocuments:
  """{doc_id: record} per DB shard, each shard's file read once.

  Args:
    shard_dirs: per DB shard, its directory, or None when the shard has no
      documents.jsonl (a DB built before attribution).
  """

  def __init__(self, shard_dirs: List[Optional[str]]):
    self._dirs = shard_dirs
    self._loaded: Dict[int, Dict[int, Dict[str, Any]]] = {}
    self._lock = threading.Lock()

  @property
  def complete(self) -> bool:
    return all(d is not None for d in self._dirs)

  def shard(self, i: int) -> Dict[int, Dict[str, Any]]:
    """Shard i's records by document id ({} without attribution)."""
    with self._lock:
      if i not in self._loaded:
        sdir = self._dirs[i]
        records = ([] if sdir is None else
                   fmt.read_documents(f"{sdir}/{fmt.DOCUMENTS}"))
        self._loaded[i] = {r["doc_id"]: r for r in records}
      return self._loaded[i]

  def get(self, i: int, doc_id: int) -> Dict[str, Any]:
    """The record of document `doc_id`, which has chunks in shard i."""
    record = self.shard(i).get(int(doc_id))
    if record is None:
      return unknown(doc_id)
    return dict(unknown(doc_id), **record)

  def all(self, where: str) -> Iterator[Dict[str, Any]]:
    """Every document's record once (one that straddles shards is listed
    by each), shard by shard; ValueError without attribution."""
    if not self.complete:
      raise ValueError(f"{where} was built before documents were recorded "
                       f"(no {fmt.DOCUMENTS} in its shards): its documents "
                       f"are known by id only; rebuild it with "
                       f"scripts/build_db.py to select them by source")
    last = None
    for i in range(len(self._dirs)):
      for sdir_doc in fmt.read_documents(f"{self._dirs[i]}/{fmt.DOCUMENTS}"):
        if sdir_doc["doc_id"] != last:
          yield dict(unknown(sdir_doc["doc_id"]), **sdir_doc)
        last = sdir_doc["doc_id"]


def describe_document(record: Dict[str, Any]) -> str:
  """One line naming a document: "<source> · <title> (document <id>)";
  "source unknown" for a DB without attribution."""
  where = record.get("source") or "source unknown"
  title = record.get("title")
  return " · ".join([where] + ([title] if title else [])) + (
      f" (document {record['doc_id']})")


def describe_hit(chunk_id: int, record: Dict[str, Any]) -> str:
  """The line a query or a sample prints for retrieved chunk `chunk_id`:
  "chunk 812 · stdlib:json/decoder.py (document 4071...)"."""
  return f"chunk {int(chunk_id)} · {describe_document(record)}"
