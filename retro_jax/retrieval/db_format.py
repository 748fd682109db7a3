"""The retrieval DB's on-disk layout: atomic files, checksums, shard records.

A DB is a directory; every byte in it is written to a temporary name and
renamed into place (`os.replace`), so a reader sees either a whole file or
none, and every array is covered by a sha256 recorded in a small JSON file
that is itself written last:

  build.json                  written first: format version, chunk size,
                              shard size and the SentencePiece model hash
                              (a rerun with another vocabulary is refused);
                              gains the stage-1 summary when write_chunks ends
  spm.model                   the vocabulary, so embedding workers need
                              nothing but the DB to detokenize chunks
  shards/shard-00000/         one directory per shard, filled by one worker:
    tokens.npy                int32 [n, m], 0-padded
    doc_ids.npy               int64 [n]
    documents.jsonl           one line per document with chunks in the
                              shard, in row order: doc_id, source (path or
                              URL), title, meta, bytes (absent in DBs built
                              before attribution: their sources are unknown)
    chunks.json               sha256 + size of the files above (last)
    embeddings.npy            float32 | float16 [n, D]
    embeddings.json           its sha256 + size, the embedder fingerprint and
                              the tokens.npy sha256 it was computed from (last)
  manifest.json               written by finalize, last of all; a DB without
                              it is never served. An edit (db_edit.py) writes
                              new shards under new names and a new index
                              directory beside the old ones, then replaces
                              this file: the switch to the edited DB.

A shard is a directory rather than a set of prefixed flat files so that one
worker's output is one prefix to copy, list or delete (also on object
stores), and leftover temporary files of a killed worker stay inside the
shard they belong to. A file is complete when its JSON record exists and its
size (cheap check) or its sha256 (full check) matches; a truncated `.npy`
under its final name or a stray `*.tmp.*` file is never taken for a shard.

Shape glossary:
  n: chunks in a shard.   m: tokens per chunk (64).   D: embedding width.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Dict, List, Optional

from etils import epath
import numpy as np

from retro_jax.core import files

# 2: a document's chunks end with EOS, and the manifest lists its parts (the
# training split first), so training sequences are runs of DB chunks.
FORMAT_VERSION = 2
BUILD = "build.json"
MANIFEST = "manifest.json"
SPM_MODEL = "spm.model"
SHARDS = "shards"
TOKENS, DOC_IDS, EMBEDDINGS = "tokens.npy", "doc_ids.npy", "embeddings.npy"
DOCUMENTS = "documents.jsonl"  # Attribution; optional (older DBs lack it).
INDEX_DIR = "index"  # The index of a built DB; an edited one names its own.
CHUNKS_RECORD, EMBEDDINGS_RECORD = "chunks.json", "embeddings.json"
TMP_MARK = files.TMP_MARK  # Temporary names: <final name>.tmp.<pid>.


class IncompleteDBError(ValueError):
  """A DB directory that is unfinished, half-written or corrupted."""


def shard_name(i: int) -> str:
  return f"shard-{i:05d}"


def shard_dir(db_dir: str, i: int) -> str:
  return os.path.join(db_dir, SHARDS, shard_name(i))


def content_version(shards: List[Dict[str, Any]]) -> str:
  """sha256 of a manifest's shard records (names, chunk counts and every
  file's sha256): the DB's content version, which any edit changes and
  which indexes, neighbour tables and caches record."""
  text = json.dumps(shards, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def index_dir_of(db_dir: str, manifest: Optional[Dict[str, Any]] = None
                 ) -> str:
  """The index directory of a DB: the one its manifest names (an edit
  builds the edited DB's index in a new directory, switched to with the
  manifest), else <db_dir>/index."""
  if manifest is None:
    manifest = read_json(os.path.join(db_dir, MANIFEST)) or {}
  name = (manifest.get("index") or {}).get("dir") or INDEX_DIR
  return os.path.join(db_dir, name)


def documents_bytes(records: List[Dict[str, Any]]) -> bytes:
  """A documents.jsonl file: one JSON object per line, keys sorted."""
  return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n"
                 for r in records).encode("utf-8")


def read_documents(path: str) -> List[Dict[str, Any]]:
  """The records of a documents.jsonl file; ValueError naming the file and
  line when one is not a JSON object with a doc_id."""
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      try:
        record = json.loads(line)
        record["doc_id"] = int(record["doc_id"])
      except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}:{n}: not a document record ({e})") from None
      out.append(record)
  return out


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:  # Local, or a gs:// vocabulary.
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def npy_bytes(array: np.ndarray) -> bytes:
  """The exact bytes `np.save(allow_pickle=False)` writes for `array`."""
  buf = io.BytesIO()
  np.save(buf, array, allow_pickle=False)
  return buf.getvalue()


def write_bytes_atomic(path: str, data: bytes) -> Dict[str, Any]:
  """Writes `data` to `path` via a temporary name (core.files.write_bytes);
  returns its file record {"sha256", "bytes"}."""
  files.write_bytes(path, data)
  return {"sha256": sha256_bytes(data), "bytes": len(data)}


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes a record: JSON with sorted keys, indent 1, trailing newline."""
  files.write_json(path, obj, indent=1)


def read_json(path: str) -> Optional[Dict[str, Any]]:
  """The JSON object in `path`, or None if it is absent or unreadable (a
  record that cannot be read marks its files incomplete, never an error)."""
  obj = files.read_json_or_none(path)
  return obj if isinstance(obj, dict) else None


def file_problem(path: str, record: Dict[str, Any],
                 verify: bool) -> Optional[str]:
  """Why the file at `path` does not match its record, or None if it does.

  Args:
    path: the file.
    record: {"sha256", "bytes"} as written by write_bytes_atomic.
    verify: also recompute the sha256 (else only the size is checked).
  """
  name = os.path.join(*path.split(os.sep)[-2:])
  try:
    size = os.path.getsize(path)
  except OSError:
    return f"{name} is missing"
  if size != record.get("bytes"):
    return f"{name} has {size} bytes, its record says {record.get('bytes')}"
  if verify and sha256_file(path) != record.get("sha256"):
    return f"{name} fails its sha256 checksum"
  return None


def chunks_problem(sdir: str, verify: bool) -> Optional[str]:
  """Why a shard's chunk files are incomplete, or None if they are whole."""
  record = read_json(os.path.join(sdir, CHUNKS_RECORD))
  if record is None:
    return f"{os.path.basename(sdir)}: chunks not written"
  recorded = record.get("files", {})
  for fname in (TOKENS, DOC_IDS) + ((DOCUMENTS,) if DOCUMENTS in recorded
                                    else ()):
    problem = file_problem(os.path.join(sdir, fname),
                           recorded.get(fname, {}), verify)
    if problem:
      return problem
  return None


def embeddings_problem(sdir: str, chunks_record: Dict[str, Any],
                       verify: bool) -> Optional[str]:
  """Why a shard's embeddings are missing, stale or corrupted, or None."""
  record = read_json(os.path.join(sdir, EMBEDDINGS_RECORD))
  name = os.path.basename(sdir)
  if record is None:
    return f"{name}: embeddings not written"
  if record.get("tokens_sha256") != chunks_record["files"][TOKENS]["sha256"]:
    return f"{name}: embeddings were computed from other tokens"
  return file_problem(os.path.join(sdir, EMBEDDINGS), record.get("file", {}),
                      verify)


def remove_temporaries(sdir: str) -> List[str]:
  """Deletes the temporary files a killed writer left in `sdir`."""
  removed = []
  if os.path.isdir(sdir):
    for fname in os.listdir(sdir):
      if TMP_MARK in fname:
        os.remove(os.path.join(sdir, fname))
        removed.append(fname)
  return removed


def describe(problems: List[str], limit: int = 8) -> str:
  """A one-line list of problems, at most `limit` of them spelled out."""
  more = len(problems) - limit
  text = "; ".join(problems[:limit])
  return text + (f"; and {more} more" if more > 0 else "")
