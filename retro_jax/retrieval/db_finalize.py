"""Finalizing a retrieval DB (stage 3) and updating its free-form fields.

`finalize` checks every shard of a built DB against its checksums and writes
manifest.json, the file that makes a DB servable; on an edited DB (one whose
manifest lists edits, db_edit.py) it checks the shards the manifest names and
keeps it, since build.json describes the DB as first built. `update_manifest`
sets fields such as `index` and `recall`, never those describing the data.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Tuple

from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval.db_build import load_build

# Fields that describe the stored data; update_manifest may not touch them.
_FROZEN_FIELDS = ("format_version", "spm_model_sha256", "embedder",
                  "chunk_size", "num_chunks", "num_tokens", "num_documents",
                  "text_bytes", "pad_tokens", "parts", "embedding", "shards",
                  "build", "content_version", "edits")


def _shard_problems(db_dir: str, num_shards: int,
                    verify: bool) -> Tuple[List[str], List[Dict[str, Any]]]:
  """(problems, records of the complete shards) for shards [0, num_shards)."""
  problems, shards = [], []
  for i in range(num_shards):
    sdir = fmt.shard_dir(db_dir, i)
    problem = fmt.chunks_problem(sdir, verify)
    chunks = fmt.read_json(os.path.join(sdir, fmt.CHUNKS_RECORD))
    problem = problem or fmt.embeddings_problem(sdir, chunks, verify)
    if problem:
      problems.append(problem)
      continue
    record = fmt.read_json(os.path.join(sdir, fmt.EMBEDDINGS_RECORD))
    shards.append({"name": fmt.shard_name(i),
                   "num_chunks": chunks["num_chunks"],
                   "files": dict(chunks["files"],
                                 **{fmt.EMBEDDINGS: record["file"]}),
                   "embedding": {k: record[k] for k in
                                 ("embedder", "dtype", "dim")}})
  return problems, shards


def finalize(db_dir: str, verify: bool = True) -> Dict[str, Any]:
  """Stage 3: checks every shard and writes manifest.json (atomically).

  Args:
    db_dir: a DB after write_chunks and embed_shards.
    verify: recompute every file's sha256 (else sizes only).
  Returns:
    The manifest. The `index` and `recall` fields of an earlier manifest are
    kept when the shards are unchanged.
  Raises:
    IncompleteDBError: naming the missing, stale or corrupted shard files.
    ValueError: an empty corpus, or shards from different embedders.
  """
  old = fmt.read_json(os.path.join(db_dir, fmt.MANIFEST)) or {}
  if old.get("edits"):
    return _check_edited(db_dir, old, verify)
  build = load_build(db_dir)
  summary = build["chunks"]
  if not summary["num_chunks"]:
    raise ValueError(f"{db_dir} holds no chunks (skipped documents: "
                     f"{summary['skipped']}): the corpus is empty")
  problems, shards = _shard_problems(db_dir, summary["num_shards"], verify)
  spm_file = os.path.join(db_dir, fmt.SPM_MODEL)
  if (not os.path.isfile(spm_file)
      or fmt.sha256_file(spm_file) != build["spm_model_sha256"]):
    problems.append(f"{fmt.SPM_MODEL} is missing or damaged")
  if problems:
    raise fmt.IncompleteDBError(
        f"{db_dir} cannot be finalized: {fmt.describe(problems)} (rerun "
        f"write_chunks / embed_shards)")
  kinds = {repr(s.pop("embedding")) for s in shards}
  if len(kinds) != 1:
    raise ValueError(f"{db_dir} mixes embeddings: {sorted(kinds)}")
  record = fmt.read_json(os.path.join(fmt.shard_dir(db_dir, 0),
                                      fmt.EMBEDDINGS_RECORD))
  if sum(s["num_chunks"] for s in shards) != summary["num_chunks"]:
    raise fmt.IncompleteDBError(f"{db_dir}: shard sizes do not add up to the "
                            f"{summary['num_chunks']} chunks written")
  same = (old.get("shards") == shards
          and old.get("embedder") == record["embedder"])
  manifest = {
      "format_version": fmt.FORMAT_VERSION,
      "spm_model_sha256": build["spm_model_sha256"],
      "embedder": record["embedder"],
      "chunk_size": build["chunk_size"],
      "num_chunks": summary["num_chunks"],
      "num_tokens": summary["num_tokens"],
      "num_documents": summary["num_documents"],
      "text_bytes": summary["text_bytes"],
      "pad_tokens": summary["pad_tokens"],
      # Contiguous chunk-id ranges by origin; "train" is the training split.
      "parts": summary["parts"],
      "embedding": {"dim": record["dim"], "dtype": record["dtype"]},
      "shards": shards,
      "content_version": fmt.content_version(shards),
      "build": {k: summary[k] for k in ("skipped", "short_documents",
                                        "shard_chunks")},
      "finalized": time.time(),
      "index": old.get("index", {}) if same else {},
      "recall": old.get("recall", {}) if same else {},
  }
  fmt.write_json_atomic(os.path.join(db_dir, fmt.MANIFEST), manifest)
  for i in range(len(shards)):
    fmt.remove_temporaries(fmt.shard_dir(db_dir, i))
  return manifest


def update_manifest(db_dir: str, **fields: Any) -> Dict[str, Any]:
  """Sets free-form manifest fields (e.g. `index`, `recall`) atomically.

  Fields that describe the stored data are refused: rebuild instead.
  """
  path = os.path.join(db_dir, fmt.MANIFEST)
  manifest = fmt.read_json(path)
  if manifest is None:
    raise fmt.IncompleteDBError(
        f"{db_dir} has no {fmt.MANIFEST}: run finalize")
  frozen = sorted(set(fields) & set(_FROZEN_FIELDS))
  if frozen:
    raise ValueError(f"manifest fields {frozen} describe the stored data and "
                     f"cannot be updated")
  manifest.update(fields)
  fmt.write_json_atomic(path, manifest)
  return manifest


def unfinalized_reason(path: str) -> str:
  """What keeps a DB directory without a manifest from being served."""
  try:
    build = load_build(path)
  except fmt.IncompleteDBError as e:
    return str(e)
  problems, _ = _shard_problems(path, build["chunks"]["num_shards"], False)
  return fmt.describe(problems) if problems else "all shards are complete"


def shard_files_problems(db_dir: str, shards: List[Dict[str, Any]],
                         verify: bool) -> List[str]:
  """Why the files of manifest shard records `shards` do not match them."""
  problems = []
  for shard in shards:
    sdir = os.path.join(db_dir, fmt.SHARDS, shard["name"])
    for fname, record in shard["files"].items():
      problem = fmt.file_problem(os.path.join(sdir, fname), record, verify)
      if problem:
        problems.append(problem)
  return problems


def _check_edited(db_dir: str, manifest: Dict[str, Any],
                  verify: bool) -> Dict[str, Any]:
  """finalize of an edited DB: its manifest, once its shards check out."""
  problems = shard_files_problems(db_dir, manifest["shards"], verify)
  if problems:
    raise fmt.IncompleteDBError(
        f"{db_dir} is an edited DB whose shards are damaged: "
        f"{fmt.describe(problems)} (rerun the edit, scripts/edit_db.py)")
  return manifest
