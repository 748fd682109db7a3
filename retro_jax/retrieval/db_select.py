"""Choosing documents of a retrieval DB: by id, source, source glob or meta.

A `Selection` is what `db_edit.remove_documents` removes and what
scripts/edit_db.py --list shows. A document is selected when it matches ANY
of the given criteria:

  doc_ids          its id (the only criterion a DB built before attribution
                   supports: it keeps document ids, not sources)
  sources          its source exactly, e.g. "stdlib:json/decoder.py"
  source_globs     a shell pattern over its source (fnmatch, case-sensitive;
                   `*` also matches "/"), e.g. "stdlib:email/*" or
                   "https://example.com/*"
  meta             {field: shell pattern} over its metadata, all fields of
                   one mapping together, e.g. {"pile_set_name": "Github"};
                   the field "title" matches the title too
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Set, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Selection:
  """Documents to select (see the module docstring)."""

  doc_ids: Tuple[int, ...] = ()
  sources: Tuple[str, ...] = ()
  source_globs: Tuple[str, ...] = ()
  meta: Tuple[Tuple[str, str], ...] = ()  # (field, pattern), all must match.

  @classmethod
  def of(cls, doc_ids: Iterable[int] = (), sources: Iterable[str] = (),
         source_globs: Iterable[str] = (),
         meta: Mapping[str, str] = None) -> Selection:
    return cls(tuple(int(d) for d in doc_ids), tuple(sources),
               tuple(source_globs), tuple(sorted((meta or {}).items())))

  @property
  def empty(self) -> bool:
    return not (self.doc_ids or self.sources or self.source_globs
                or self.meta)

  @property
  def needs_sources(self) -> bool:
    """Whether matching needs the DB's document records."""
    return bool(self.sources or self.source_globs or self.meta)

  def matches(self, record: Mapping[str, Any]) -> bool:
    """Whether the document `record` (attribution.ShardDocuments) is
    selected."""
    if record["doc_id"] in self.doc_ids:
      return True
    source = record.get("source") or ""
    if source and (source in self.sources or any(
        fnmatch.fnmatchcase(source, g) for g in self.source_globs)):
      return True
    if self.meta:
      fields = dict(record.get("meta") or {})
      if record.get("title") is not None:
        fields.setdefault("title", record["title"])
      return all(key in fields and fnmatch.fnmatchcase(str(fields[key]), pat)
                 for key, pat in self.meta)
    return False

  def describe(self) -> str:
    """One line, as recorded in the manifest's list of edits."""
    parts = []
    if self.doc_ids:
      parts.append(f"doc_ids {list(self.doc_ids)}")
    if self.sources:
      parts.append(f"sources {list(self.sources)}")
    if self.source_globs:
      parts.append(f"source globs {list(self.source_globs)}")
    if self.meta:
      parts.append("meta " + " and ".join(f"{k}={v}" for k, v in self.meta))
    return " or ".join(parts) or "nothing"

  def as_record(self) -> Dict[str, Any]:
    return {"doc_ids": list(self.doc_ids), "sources": list(self.sources),
            "source_globs": list(self.source_globs), "meta": dict(self.meta)}


def parse_meta(items: Sequence[str], flag: str) -> Dict[str, str]:
  """["key=pattern", ...] -> {key: pattern}; ValueError naming `flag`."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"{flag}={item!r}: expected field=pattern, e.g. "
                       f"pile_set_name=Github")
    out[key] = value
  return out


def all_doc_ids(db) -> np.ndarray:
  """int64 [documents]: the distinct document ids of a RetrievalDB,
  read shard by shard."""
  ids = [np.unique(np.asarray(db.doc_ids_of(np.arange(first, first + n))))
         for first, n in db.shard_ranges()]
  return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def select(db, selection: Selection) -> Tuple[Set[int], List[Dict[str, Any]]]:
  """(ids, records) of the documents of `db` that `selection` selects;
  records are those of the DB's attribution (only ids for a DB without).

  Raises:
    ValueError: an empty selection, a selection by source or meta of a DB
      built before attribution, or ids that are not in the DB (named).
  """
  if selection.empty:
    raise ValueError("the selection is empty: name documents by id, source, "
                     "source glob or meta")
  if selection.needs_sources and not db.has_sources:
    raise ValueError(f"{db.path} was built before documents were recorded: "
                     f"select its documents by id (--remove_doc_id), or "
                     f"rebuild it with scripts/build_db.py")
  present = all_doc_ids(db)  # [documents]
  missing = sorted(set(selection.doc_ids) - set(present.tolist()))
  if missing:
    raise ValueError(f"{db.path} holds no document with id "
                     f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
  if not db.has_sources:
    ids = set(selection.doc_ids)
    return ids, [{"doc_id": d, "source": None, "title": None, "meta": {},
                  "bytes": None} for d in sorted(ids)]
  records = [r for r in db.documents() if selection.matches(r)]
  return {r["doc_id"] for r in records}, records
