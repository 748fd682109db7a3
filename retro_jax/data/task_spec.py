"""What identifies the cached examples of a RETRO Task, and how to compare it.

A RETRO Task carries its spec (`RetroTask.spec`): the arguments that change
its examples (corpus, text per split, meta filter, sequence length, k) and the
identity of the DB and vocabulary it retrieves with. The cache job records the
spec beside the cache (retro_task.json); a reader compares its own Task's spec
with the record before reading, so a cache built for other arguments is
refused, naming the fields that differ.

Only what changes a split's examples is compared: not the Task's list of
splits (each split is cached and checked on its own), nor the retrieval or
embedding batch sizes, nor the text limit of another split. Records written
by earlier versions still compare equal: they held one `max_bytes` for every
split plus optional `split_max_bytes` overrides, the Task's splits, and the DB
path as given.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Sequence

from retro_jax.retrieval import db_format

# Bumped when the cached examples change meaning (tokenization, packing,
# neighbour values): caches of another version are refused and rebuilt.
# 2: sequences are runs of chunks cut as the DB cuts them (EOS, padding).
CACHE_FORMAT = 2

# Keys of a record that hold the per-split text limits (both forms).
_LIMIT_KEYS = ("max_bytes", "split_max_bytes")


def normalize_path(path: str) -> str:
  """An absolute local path (so "./runs/db" and "runs/db" compare equal);
  URLs such as gs://bucket/db as they are."""
  return path if "://" in path else os.path.abspath(path)


def task_spec(*, corpus: str, spm_path: str, db_dir: str, seq_len: int,
              num_neighbours: int, max_bytes: Mapping[str, int],
              meta: Mapping[str, str], manifest: Mapping[str, Any],
              from_db: Sequence[str] = (),
              table: Optional[str] = None) -> Dict[str, Any]:
  """The spec of a Task (JSON-serializable).

  Args:
    corpus, spm_path, db_dir, seq_len, num_neighbours, max_bytes, meta: as
      given to `tasks.register_retro_task`.
    manifest: the DB's manifest (chunk count, shards, embedder, index).
    from_db: the splits read from the DB's training part.
    table: the identity of the DB's neighbour table, if a split uses it.
  """
  return {"cache_format": CACHE_FORMAT, "corpus": corpus, "seq_len": seq_len,
          "num_neighbours": num_neighbours,
          "max_bytes": {split: int(n or 0) for split, n in
                        sorted(max_bytes.items())},
          # Named meta_filter on disk since the first cache format.
          "meta_filter": dict(meta),
          "spm_sha256": db_format.sha256_file(spm_path),
          "db_dir": normalize_path(db_dir),
          "db_num_chunks": manifest["num_chunks"],
          "db_embedder": manifest["embedder"]["fingerprint"],
          "db_index": manifest.get("index"),
          # The chunks themselves: any edit of the DB changes this.
          "db_shards": db_format.sha256_bytes(repr(
              [(sh["name"], sh["files"]) for sh in manifest["shards"]]
          ).encode()),
          "from_db": sorted(from_db), "db_table": table,
          # Only an edited DB (scripts/edit_db.py) has a version of its own,
          # so that caches of DBs never edited keep comparing equal.
          **({"db_version": manifest["content_version"]}
             if manifest.get("edits") else {})}


def split_limit(spec: Mapping[str, Any], split: str) -> Optional[int]:
  """The bytes of text `spec` reads of `split` (None: all), in either form."""
  limit = spec.get("max_bytes")
  if isinstance(limit, Mapping):
    return limit.get(split) or None
  overrides = spec.get("split_max_bytes") or {}  # Records of earlier versions.
  return overrides.get(split, limit) or None


def comparable(spec: Optional[Mapping[str, Any]],
               splits: Sequence[str]) -> Dict[str, Any]:
  """`spec` as compared when reading `splits`: the text limits of those
  splits only, the DB path absolute, without the Task's list of splits."""
  spec = spec or {}
  out = {k: v for k, v in spec.items()
         if k != "splits" and k not in _LIMIT_KEYS}
  if isinstance(out.get("db_dir"), str):
    out["db_dir"] = normalize_path(out["db_dir"])
  out["max_bytes"] = {split: split_limit(spec, split) for split in splits}
  return out


def differences(want: Mapping[str, Any], have: Optional[Mapping[str, Any]],
                splits: Sequence[str]) -> Sequence[str]:
  """The fields of a recorded spec `have` that differ from `want` for
  reading `splits` (empty when the cache serves them)."""
  a, b = comparable(want, splits), comparable(have, splits)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
