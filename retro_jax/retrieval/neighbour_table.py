"""The neighbour table: every DB chunk's C nearest DB chunks, computed once.

Training chunks are DB chunks (the DB's training part), so their neighbours
need no BERT at training time: the table holds, for every DB chunk, the ids
and squared-L2 distances of its C nearest DB chunks of *other* documents,
found by searching the index with the DB's own stored embeddings. A chunk's
own document is always in its training sequence, so its chunks could never
be used; leaving them out is what lets a small C serve long documents (on
the standard library, whose files run to hundreds of chunks, the nearest 16
of any document left 48% of chunks short of k = 2 after the filter, the
nearest 16 of other documents none). The other documents of a sequence are
filtered out at lookup time (sequence_neighbours.py), which C leaves room
for.

  <db_dir>/table/
    shard-00000/          aligned with DB shard i (same rows):
      ids.npy             int64 [n_i, C], nearest first, ties to the smaller
                          id, -1 where fewer than C chunks exist
      dists.npy           float32 [n_i, C], +inf where ids is -1
      record.json         their sha256 + size, the index and DB identities
                          (written last)
    partial/<key>/        search results of (DB shard i, index shard j), while
                          the table is built; <key> names (index, DB, C)
    table.json            written last of all: C, num_chunks, the index and
                          DB identities, every shard's record

The build is steps that any scheduler runs as independent units (a Beam
pipeline, or `build_table`'s loop in one process):

  search_step(j)   loads index shard j only, searches the queries of every
                   DB shard, one DB shard at a time -> partial (i, j)
  merge_step(i)    the S partials of DB shard i -> table shard i (top C)
  finalize         checks every shard record, writes table.json

A worker holds one index shard, one DB shard of queries and one partial at a
time, so with a fixed index shard size its memory stays flat as the DB grows
(the partials on disk grow as N * S * C; they are removed by finalize).
Each result is a pure function of (DB, index, C): a DB shard's queries are
always searched together, and merging uses a total order (distance, then
id), so the bytes are the same in whatever order, or in however many
processes, the steps run.

Shape glossary:
  N: chunks in the DB.     n_i: chunks in DB shard i.    C: candidates.
  S: index shards.         D: embedding width.           ...: any shape.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from retro_jax.core import files
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval import db_stage
from retro_jax.retrieval import index_shards
from retro_jax.retrieval import neighbours
from retro_jax.retrieval.db import RetrievalDB, gather_rows

TABLE_DIR = "table"
TABLE_JSON = "table.json"
RECORD = "record.json"
IDS, DISTS = "ids.npy", "dists.npy"
PARTIAL = "partial"
INDEX_DIR = fmt.INDEX_DIR  # A built DB's index; its manifest names it.
FORMAT = 1
REBUILD = "python scripts/build_db.py --config=<run config> --stage=table"


class _Job(NamedTuple):
  """What a step needs to know: the DB, the index's shards and identity."""

  db: RetrievalDB
  candidates: int
  index: Dict[str, Any]  # table.json's "index": {"sha256", "kind", "db"}.
  db_identity: str
  index_ranges: List[Tuple[int, int]]
  key: str  # Names (index, DB, C): the partials' directory.


def _job(db_dir: str, index_dir: str, candidates: int,
         db: Optional[RetrievalDB] = None) -> _Job:
  if candidates < 1:
    raise ValueError(f"candidates must be >= 1, got {candidates}")
  db = db or RetrievalDB.open(db_dir)
  meta = index_shards.read_meta(index_dir, db)  # Refuses another DB's index.
  index = {"sha256": index_shards.identity(index_dir), "kind": meta["kind"],
           "db": meta["db"], "num_shards": len(meta["shards"])}
  ident = index_shards.db_identity(db)
  key = hashlib.sha256(f"{index['sha256']}:{ident}:{candidates}".encode()
                       ).hexdigest()[:16]
  return _Job(db, candidates, index, ident,
              [(s["first"], s["count"]) for s in meta["shards"]], key)


def _shard_dir(db_dir: str, i: int) -> str:
  return os.path.join(db_dir, TABLE_DIR, fmt.shard_name(i))


def _partial_path(db_dir: str, key: str, i: int, j: int) -> str:
  return os.path.join(db_dir, TABLE_DIR, PARTIAL, key,
                      f"db-{i:05d}.index-{j:05d}.npz")


def _want(job: _Job, i: int) -> Dict[str, Any]:
  """The fields of table shard i's record that say what it was made from."""
  first, count = job.db.shard_ranges()[i]
  return dict(name=fmt.shard_name(i), first=first, num_chunks=count,
              candidates=job.candidates, index=job.index["sha256"],
              db=job.db_identity)


def _record_problem(db_dir: str, i: int, want: Optional[Dict[str, Any]],
                    verify: bool) -> Optional[str]:
  """Why table shard i is not complete (for `want`, if given), or None."""
  record = fmt.read_json(os.path.join(_shard_dir(db_dir, i), RECORD))
  name = f"{TABLE_DIR}/{fmt.shard_name(i)}"
  if record is None:
    return f"{name} is not written"
  if want is not None and {k: record.get(k) for k in want} != want:
    return (f"{name} is not the shard recorded (made for another index, DB "
            f"or C, or rewritten since)")
  for fname in (IDS, DISTS):
    problem = fmt.file_problem(os.path.join(_shard_dir(db_dir, i), fname),
                               record.get("files", {}).get(fname, {}), verify)
    if problem:
      return problem
  return None


def search_step(db_dir: str, index_dir: str, j: int,
                candidates: int) -> List[int]:
  """Searches index shard j with the stored embeddings of every DB shard
  whose table shard is not complete, writing partial (i, j) per DB shard i
  (atomically; an existing one is kept).

  Returns:
    The DB shards whose partial of index shard j is ready (written now or by
    an earlier run) and whose table shard is still to merge: the keys of
    the merges this step feeds.
  """
  job = _job(db_dir, index_dir, candidates)
  key_json = os.path.join(os.path.dirname(_partial_path(db_dir, job.key, 0,
                                                        0)), "key.json")
  key_info = dict(index=job.index, db=job.db_identity, candidates=candidates)
  if files.read_json_or_none(key_json) != key_info:
    files.write_json(key_json, key_info)
  ready, todo = [], []
  for i in range(len(job.db.shard_ranges())):
    if _record_problem(db_dir, i, _want(job, i), False) is None:
      continue
    ready.append(i)
    if not os.path.isfile(_partial_path(db_dir, job.key, i, j)):
      todo.append(i)
  if todo:
    searcher = index_shards.load_shard(index_dir, j, job.db)  # Shard j only.
    first_j = job.index_ranges[j][0]
    for i in todo:
      first, count = job.db.shard_ranges()[i]
      queries = job.db.embedding_range(first, count)  # [n_i, D]
      own = job.db.doc_ids_of(np.arange(first, first + count))  # [n_i]
      # Local ids of shard j; each query's own document excluded.
      found = neighbours.search_filtered(
          searcher, queries, candidates,
          lambda local: job.db.doc_ids_of(local + first_j),
          [(int(d),) for d in own])
      ids, dists = found.ids, found.dists  # [n_i, C], local.
      buf = io.BytesIO()
      np.savez(buf, ids=np.where(ids >= 0, ids + first_j, -1), dists=dists)
      files.write_bytes(_partial_path(db_dir, job.key, i, j), buf.getvalue())
  return ready


def _find_key(db_dir: str, db: RetrievalDB,
              candidates: int) -> Tuple[str, Dict[str, Any]]:
  """The one partials directory of this DB and C (when no index is named)."""
  root = os.path.join(db_dir, TABLE_DIR, PARTIAL)
  ident = index_shards.db_identity(db)
  found = []
  for key in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    info = files.read_json_or_none(os.path.join(root, key, "key.json"))
    if (isinstance(info, dict) and info.get("db") == ident
        and info.get("candidates") == candidates):
      found.append((key, info))
  if len(found) != 1:
    raise ValueError(f"{root} holds {len(found)} sets of search results for "
                     f"C={candidates} and this DB: name the index_dir")
  return found[0]


def merge_step(db_dir: str, i: int, candidates: int,
               index_dir: Optional[str] = None) -> None:
  """Merges the S partials of DB shard i into table shard i: the top C of
  each row by distance, ties to the smaller id. Its files are written whole,
  record last; a complete shard is kept. Without `index_dir`, the index is
  the one the search steps recorded beside their partials."""
  db = RetrievalDB.open(db_dir)
  if index_dir is not None:
    job = _job(db_dir, index_dir, candidates, db)
    index, key = job.index, job.key
  else:
    key, info = _find_key(db_dir, db, candidates)
    index = info["index"]
    job = _Job(db, candidates, index, info["db"], [], key)
  want = _want(job, i)
  if _record_problem(db_dir, i, want, False) is None:
    return
  best = None  # ids int64 [n_i, C], dists float32 [n_i, C]
  for j in range(index["num_shards"]):
    path = _partial_path(db_dir, key, i, j)
    if not os.path.isfile(path):
      raise ValueError(f"{path} is missing: run search_step for index shard "
                       f"{j} first")
    with np.load(path, allow_pickle=False) as part:
      pair = (part["ids"], part["dists"])
    if pair[0].shape != (want["num_chunks"], candidates):
      raise ValueError(f"{path} holds {pair[0].shape} results, want "
                       f"{(want['num_chunks'], candidates)}")
    best = index_shards.merge([pair] if best is None else [best, pair],
                              candidates)
  sdir = _shard_dir(db_dir, i)
  os.makedirs(sdir, exist_ok=True)
  # Unrecord first: table.json and this record no longer describe the files.
  for stale in (os.path.join(db_dir, TABLE_DIR, TABLE_JSON),
                os.path.join(sdir, RECORD)):
    if os.path.exists(stale):
      os.remove(stale)
  fmt.remove_temporaries(sdir)
  record = dict(want, files={
      IDS: fmt.write_bytes_atomic(os.path.join(sdir, IDS),
                                  fmt.npy_bytes(best[0].astype(np.int64))),
      DISTS: fmt.write_bytes_atomic(os.path.join(sdir, DISTS),
                                    fmt.npy_bytes(best[1].astype(np.float32)))})
  fmt.write_json_atomic(os.path.join(sdir, RECORD), record)


def _table(job: _Job, records: List[Dict[str, Any]]) -> Dict[str, Any]:
  return {"format": FORMAT, "candidates": job.candidates,
          "num_chunks": job.db.num_chunks, "db": job.db_identity,
          "index": job.index, "shards": records}


def finalize(db_dir: str, index_dir: str, candidates: int,
             verify: bool = True) -> Dict[str, Any]:
  """Checks every table shard's record and files (sha256 when `verify`),
  writes table.json, removes the partials; returns table.json's content."""
  job = _job(db_dir, index_dir, candidates)
  problems = [p for p in (_record_problem(db_dir, i, _want(job, i), verify)
                          for i in range(len(job.db.shard_ranges()))) if p]
  if problems:
    raise ValueError(f"{db_dir}: the neighbour table cannot be finalized: "
                     f"{fmt.describe(problems)} (run the merge steps)")
  records = [fmt.read_json(os.path.join(_shard_dir(db_dir, i), RECORD))
             for i in range(len(job.db.shard_ranges()))]
  table = _table(job, records)
  fmt.write_json_atomic(os.path.join(db_dir, TABLE_DIR, TABLE_JSON), table)
  shutil.rmtree(os.path.join(db_dir, TABLE_DIR, PARTIAL), ignore_errors=True)
  return table


def build_table(db_dir: str, index_dir: str, candidates: int,
                log: Callable[[str], None] = print) -> Dict[str, Any]:
  """The whole table in this process: every search step, every merge step,
  finalize. Resumable: complete shards, and partials of this index, DB and
  C, are kept. Returns table.json's content."""
  job = _job(db_dir, index_dir, candidates)
  table = fmt.read_json(os.path.join(db_dir, TABLE_DIR, TABLE_JSON))
  if table is not None and table.get("candidates") == candidates and {
      k: table.get(k) for k in ("index", "db")} == {
          "index": job.index, "db": job.db_identity}:
    if not any(_record_problem(db_dir, i, _want(job, i), False)
               for i in range(len(job.db.shard_ranges()))):
      log(f"table: {db_dir} already has its neighbour table (C={candidates})")
      return table
  root = os.path.join(db_dir, TABLE_DIR, PARTIAL)
  for key in os.listdir(root) if os.path.isdir(root) else []:
    if key != job.key:  # Results of another index, DB or C.
      shutil.rmtree(os.path.join(root, key))
  num = len(job.index_ranges)
  for j in range(num):
    merges = search_step(db_dir, index_dir, j, candidates)
    log(f"table: index shard {j + 1}/{num} searched for {len(merges)} DB "
        f"shard(s)")
  for i in range(len(job.db.shard_ranges())):
    merge_step(db_dir, i, candidates, index_dir)
  table = finalize(db_dir, index_dir, candidates)
  log(f"table: {job.db.num_chunks:,} chunks x {candidates} neighbours")
  return table


class NeighbourTable:
  """A finalized neighbour table, memory-mapped; `NeighbourTable.open`.

  Attributes:
    path: its table.json.   candidates: C.   num_chunks: N.
    identity: sha256 of table.json (it holds every shard's checksums), what
      a Task records of the neighbours it was cached with.
  """

  def __init__(self, path: str, table: Dict[str, Any], identity: str,
               ids: List[np.ndarray], dists: List[np.ndarray]):
    self.path, self.table, self.identity = path, table, identity
    self.candidates = int(table["candidates"])
    self.num_chunks = int(table["num_chunks"])
    self._ids, self._dists = ids, dists
    self._offsets = np.asarray([0] + [s["first"] + s["num_chunks"]
                                      for s in table["shards"]],
                               np.int64)  # [shards + 1]

  @classmethod
  def open(cls, db_dir: str, index_dir: Optional[str] = None,
           verify: bool = False) -> NeighbourTable:
    """Opens <db_dir>/table. Refuses (ValueError, one line naming the file
    and the rebuild command) a missing or unfinished table, one made for
    other DB shards, or for another index than the one in `index_dir`
    (default <db_dir>/index, checked when it exists). verify: recompute
    the sha256 of the table's files (else sizes only)."""
    db_dir = db_stage.local_dir(db_dir)   # A gs:// DB: its staged copy.
    path = os.path.join(db_dir, TABLE_DIR, TABLE_JSON)
    fix = f": rebuild it with `{REBUILD}`"
    table = fmt.read_json(path)
    if table is None or table.get("format") != FORMAT:
      raise ValueError(f"{path} is missing: the neighbour table was not "
                       f"built or not finished; build it with `{REBUILD}`")
    manifest = fmt.read_json(os.path.join(db_dir, fmt.MANIFEST))
    if manifest is None:
      raise ValueError(f"{db_dir} is not a finalized DB (no {fmt.MANIFEST})")
    version = index_shards.db_identity(manifest)
    if version != table["db"]:
      edits = manifest.get("edits") or []
      why = (f"; the DB was edited since ({edits[-1]['summary']})"
             if edits else "")
      raise ValueError(f"{path} was made for other DB shards than those of "
                       f"{db_dir} (DB version {table['db'][:12]}, the DB is "
                       f"version {version[:12]}{why}){fix}")
    index_dir = index_dir or fmt.index_dir_of(db_dir, manifest)
    if (os.path.isfile(os.path.join(index_dir, index_shards.INDEX_JSON))
        and index_shards.identity(index_dir) != table["index"]["sha256"]):
      raise ValueError(f"{path} was made with another index than the one in "
                       f"{index_dir}{fix}")
    ids, dists = [], []
    for i, record in enumerate(table["shards"]):
      problem = _record_problem(db_dir, i, record, verify)
      if problem:
        raise ValueError(f"{path}: {problem}{fix}")
      sdir = _shard_dir(db_dir, i)
      ids.append(np.load(os.path.join(sdir, IDS), mmap_mode="r"))
      dists.append(np.load(os.path.join(sdir, DISTS), mmap_mode="r"))
      shape = (record["num_chunks"], table["candidates"])
      if ids[-1].shape != shape or dists[-1].shape != shape:
        raise ValueError(f"{path}: {fmt.shard_name(i)} holds arrays of the "
                         f"wrong shape{fix}")
    with open(path, "rb") as f:
      identity = hashlib.sha256(f.read()).hexdigest()
    return cls(path, table, identity, ids, dists)

  def lookup(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Global chunk ids int [...] -> (neighbour ids int64 [..., C], squared
    L2 distances float32 [..., C]), nearest first, from documents other
    than the chunk's own; read from the memory maps."""
    return (gather_rows(self._ids, self._offsets, ids),
            gather_rows(self._dists, self._offsets, ids))
