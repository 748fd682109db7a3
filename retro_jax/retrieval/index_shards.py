"""The index in shards: contiguous ranges of chunk ids, built and searched apart.

A ScaNN index keeps a float32 copy of its points (for the exact reordering of
its candidates), so the index of a DB larger than one host's memory cannot be
one index. It is S index shards instead, each over a contiguous range of
global chunk ids, each an `index.save` directory built on its own from only
its range of the DB's stored embeddings (`db.embedding_range`): the build
never holds more than one shard's embeddings, and a worker that searches one
shard (the neighbour table's search step) loads only that shard. Searching
all of them and keeping the k best by distance (ties to the smaller global
id) is `ShardedSearcher`, a `Searcher` like the single indexes.

  <directory>/
    shard-00000/        index.save over chunks [first, first + count): ids in
                        it are local, [0, count)
    shard-00000.json    its record (range, kind, recall, file sizes and sha256,
                        the DB's identity), written after the directory
    index.json          written last: {"format": 2, "kind", "shards", "num_chunks",
                        "dim", "db", "target_recall", "recall"}

A shard directory is complete or absent (`index.save`), a shard counts only
with its record, and index.json is written after every shard: a killed build,
rerun, keeps the complete shards made for the same DB and plan. "db" is
`db_identity`, a hash of the DB manifest's shard records (their checksums
include the embeddings'), so an index built for other embeddings is refused.

Shape glossary:
  N: chunks in the DB.   S: index shards.   n_j: chunks in index shard j.
  D: embedding width.    q: queries.        k: neighbours.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from retro_jax.core import files
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval import index as indexlib

FORMAT = 2  # index.json of a sharded index; a single index.save has none.
INDEX_JSON = indexlib.INDEX_JSON
REBUILD = "python scripts/build_db.py --config=<run config> --stage=index"


def plan(num_chunks: int, shard_chunks: int) -> List[Tuple[int, int]]:
  """(first, count) of each index shard: ceil(N / shard_chunks) shards of
  equal sizes (within one, the larger first), none above `shard_chunks`;
  shard_chunks 0 = one shard."""
  if num_chunks < 1 or shard_chunks < 0:
    raise ValueError(f"need num_chunks >= 1 and shard_chunks >= 0, got "
                     f"{num_chunks} and {shard_chunks}")
  s = 1 if shard_chunks == 0 else -(-num_chunks // shard_chunks)
  base, extra = divmod(num_chunks, s)
  out, first = [], 0
  for j in range(s):
    count = base + (j < extra)
    out.append((first, count))
    first += count
  return out


def db_identity(db_or_manifest: Any) -> str:
  """sha256 of the DB's shard records (chunk counts and every file's sha256,
  the embeddings' included): what an index or a table was computed from."""
  manifest = getattr(db_or_manifest, "manifest", db_or_manifest)
  return fmt.content_version(manifest["shards"])  # The DB's content version.


def shard_name(j: int) -> str:
  return f"shard-{j:05d}"


def identity(directory: str) -> str:
  """sha256 of index.json: it holds every shard's file checksums, so it
  changes whenever any shard is rebuilt (a ScaNN build is not deterministic)."""
  path = os.path.join(directory, INDEX_JSON)
  if not os.path.isfile(path):
    raise ValueError(f"{path} is missing: not a complete index; rebuild it "
                     f"with `{REBUILD}`")
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


class EmbeddingRows:
  """float32 [count, D] embeddings of DB chunks [first, first + count), read
  on demand: an `embeddings` array for ExactSearcher and measure_recall that
  never loads the range (slices come from `db.embedding_range`, index arrays
  from `db.embeddings_of`)."""

  ndim = 2
  dtype = np.dtype(np.float32)

  def __init__(self, db, first: int = 0, count: Optional[int] = None):
    self._db, self._first = db, first
    self.shape = (db.num_chunks - first if count is None else count, db.dim)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      start, stop, step = key.indices(self.shape[0])
      if step != 1:
        raise IndexError("EmbeddingRows slices have step 1")
      return self._db.embedding_range(self._first + start, max(0, stop - start))
    ids = np.asarray(key)
    if ids.dtype.kind not in "iu":
      raise TypeError(f"row ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
      raise IndexError(f"row ids must lie in [0, {self.shape[0]})")
    return self._db.embeddings_of(ids.astype(np.int64) + self._first)


def merge(parts: Sequence[Tuple[np.ndarray, np.ndarray]],
          k: int) -> Tuple[np.ndarray, np.ndarray]:
  """The k best of per-shard results with global ids: [q, k_j] pairs ->
  (ids int64 [q, k], dists float32 [q, k]) by distance, ties to the smaller
  id, -1 / +inf padding last. A total order, so the result does not depend
  on the order of `parts` or on merging them in several steps."""
  ids = np.concatenate([p[0] for p in parts], axis=1)  # [q, sum k_j]
  dists = np.concatenate([p[1] for p in parts], axis=1)  # [q, sum k_j]
  key = np.where(ids < 0, np.iinfo(np.int64).max, ids)  # Padding sorts last.
  order = np.lexsort((key, dists), axis=-1)[:, :k]  # [q, <= k]
  return indexlib.pad(np.take_along_axis(ids, order, axis=1),
                      np.take_along_axis(dists, order, axis=1), k)


class ShardedSearcher:
  """A Searcher over index shards: each shard j is asked for min(k, n_j) of
  its local ids, which are shifted to global ids and merged (`merge`).

  A shard asked for all its points is exhaustive (both searchers are), so a
  request with k >= N is exhaustive, as `neighbours.search_filtered` needs.
  `get_shard(j)` returns shard j's searcher: the loaded shards, or a loader
  that reads one shard per call (memory of one shard, for one-off searches
  such as a recall measurement over a DB larger than memory).
  """

  def __init__(self, ranges: Sequence[Tuple[int, int]],
               get_shard: Callable[[int], indexlib.Searcher], dim: int,
               kind: str):
    self.ranges = list(ranges)
    self._get = get_shard
    self.n = sum(c for _, c in self.ranges)
    self.dim, self.kind = dim, kind

  def search(self, queries: np.ndarray,
             k: int) -> Tuple[np.ndarray, np.ndarray]:
    queries = indexlib.check_queries(queries, self.dim, k)
    parts = []
    for j, (first, count) in enumerate(self.ranges):
      ids, dists = self._get(j).search(queries, min(k, count))  # [q, k_j]
      parts.append((np.where(ids >= 0, ids + first, -1), dists))
    return merge(parts, k)


# -- build ---------------------------------------------------------------------
class _ExactStub:
  """What index.save writes of an exact index (kind and size): no need to
  read the shard's embeddings to save it."""

  kind = indexlib.ExactSearcher.kind

  def __init__(self, n: int, dim: int):
    self.n, self.dim = n, dim


def _files_record(sdir: str) -> Dict[str, Any]:
  """{"files": {relative path: bytes}, "sha256": over paths and contents}."""
  sizes, h = {}, hashlib.sha256()
  for root, _, names in sorted(os.walk(sdir)):
    for name in sorted(names):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, sdir)
      sizes[rel] = os.path.getsize(path)
      h.update(rel.encode() + b"\0")
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
          h.update(block)
      h.update(b"\0")
  return {"files": sizes, "sha256": h.hexdigest()}


def _shard_problem(directory: str, record: Dict[str, Any],
                   verify: bool) -> Optional[str]:
  """Why a recorded shard's files are not those of its record, or None."""
  sdir = os.path.join(directory, record["dir"])
  for rel, size in record["files"].items():
    path = os.path.join(sdir, rel)
    if not os.path.isfile(path) or os.path.getsize(path) != size:
      return f"{record['dir']}/{rel} is missing or has the wrong size"
  if verify and _files_record(sdir)["sha256"] != record["sha256"]:
    return f"{record['dir']} fails its sha256 checksum"
  return None


def _remove_stale(directory: str, num_shards: int) -> None:
  """Shards beyond the plan, and temporaries of killed saves and writes."""
  for name in os.listdir(directory):
    stem = name[:-5] if name.endswith(".json") else name
    stale = (stem.startswith("shard-") and stem[6:].isdigit()
             and int(stem[6:]) >= num_shards)
    if stale or ".tmp-" in name or files.TMP_MARK in name:
      path = os.path.join(directory, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def build(db, directory: str, kind: str = "auto", shard_chunks: int = 0,
          target_recall: float = 0.95, log: Callable[[str], None] = print,
          recall_queries: int = 1000,
          exact_below: int = indexlib.EXACT_BELOW) -> Dict[str, Any]:
  """Builds the sharded index of `db` into `directory` (resumable).

  Args:
    db: a RetrievalDB (num_chunks, dim, manifest, embedding_range).
    directory: the index directory (created).
    kind: "auto", "exact" or "scann". "auto" is `index.resolve_kind` on the
      plan's largest shard, so every shard is of one kind.
    shard_chunks: chunks per index shard at most (`plan`); 0 = one shard.
    target_recall: each ScaNN shard's calibration target (recall@10).
    log: progress lines.
    recall_queries: held-in queries for the global recall@10 of the merged
      index against exact search over all chunks, measured one shard at a
      time; 0 = not measured (an exact index has 1.0 by construction).
    exact_below: the "auto" size rule.
  Returns:
    A summary: kind, shards [{first, count, kind, recall (the shard's own,
    from calibration), seconds, reused}], built, reused, seconds, recall.
  """
  start = time.perf_counter()
  ranges = plan(db.num_chunks, shard_chunks)
  shard_kind = indexlib.resolve_kind(kind, max(c for _, c in ranges),
                                     exact_below)
  ident = db_identity(db)
  target = target_recall if shard_kind == "scann" else None
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, INDEX_JSON)
  old = files.read_json_or_none(meta_path)
  if (isinstance(old, dict) and old.get("format") == FORMAT
      and old.get("db") == ident and old.get("kind") == shard_kind
      and old.get("target_recall") == target
      and [(s["first"], s["count"]) for s in old["shards"]] == ranges
      and not any(_shard_problem(directory, s, False) for s in old["shards"])):
    log(f"index: reusing the {shard_kind} index of {len(ranges)} shard(s) in "
        f"{directory}")
    return dict(kind=shard_kind, built=0, reused=len(ranges), seconds=0.0,
                recall=old["recall"], shards=[dict(s, seconds=0.0, reused=True)
                                             for s in old["shards"]])
  if isinstance(old, dict) and "format" not in old:
    # A single index.save index here before (index.json + scann/): replaced.
    shutil.rmtree(os.path.join(directory, indexlib.SCANN_DIR),
                  ignore_errors=True)
  if os.path.exists(meta_path):
    os.remove(meta_path)  # Unrecord first: the shards are about to change.
  _remove_stale(directory, len(ranges))
  records, summary = [], []
  for j, (first, count) in enumerate(ranges):
    sdir, rpath = (os.path.join(directory, shard_name(j)),
                   os.path.join(directory, shard_name(j) + ".json"))
    want = dict(dir=shard_name(j), first=first, count=count, kind=shard_kind,
                db=ident, target_recall=target)
    record = files.read_json_or_none(rpath)
    if (isinstance(record, dict)
        and {k: record.get(k) for k in want} == want
        and _shard_problem(directory, record, False) is None):
      records.append(record)
      summary.append(dict(first=first, count=count, kind=shard_kind,
                          recall=record["recall"], seconds=0.0, reused=True))
      continue
    t0 = time.perf_counter()
    if os.path.exists(rpath):
      os.remove(rpath)
    if shard_kind == "exact":  # Rebuilt from the DB's embeddings at load.
      searcher, recall = _ExactStub(count, db.dim), 1.0
    else:
      embeddings = db.embedding_range(first, count)  # [n_j, D]: one shard.
      searcher = indexlib.build_index(embeddings, "scann",
                                      target_recall=target_recall)
      del embeddings
      recall = searcher.recall
    indexlib.save(searcher, sdir, overwrite=True)
    del searcher
    record = dict(want, recall=recall, **_files_record(sdir))
    files.write_json(rpath, record)
    seconds = time.perf_counter() - t0
    records.append(record)
    summary.append(dict(first=first, count=count, kind=shard_kind,
                        recall=recall, seconds=seconds, reused=False))
    log(f"index shard {j + 1}/{len(ranges)}: {shard_kind} over chunks "
        f"[{first:,}, {first + count:,}) in {seconds:.1f} s, shard recall@10 "
        f"{recall:.3f}")
  recall = {"recall_at_10": 1.0, "queries": 0}
  if shard_kind != "exact" and recall_queries:
    streaming = _searcher(directory, records, db, lazy=True)
    queries = min(recall_queries, db.num_chunks)
    recall = {"recall_at_10": indexlib.measure_recall(
        streaming, EmbeddingRows(db), queries, k=10), "queries": queries}
    log(f"index: recall@10 {recall['recall_at_10']:.3f} of the {len(ranges)} "
        f"merged shard(s) over {queries} held-in queries")
  files.write_json(meta_path, {
      "format": FORMAT, "kind": shard_kind, "num_chunks": db.num_chunks,
      "dim": db.dim, "db": ident, "target_recall": target, "recall": recall,
      "shards": [{k: r[k] for k in ("dir", "first", "count", "kind", "recall",
                                    "files", "sha256")} for r in records]},
                   indent=1)
  built = sum(not s["reused"] for s in summary)
  return dict(kind=shard_kind, built=built, reused=len(ranges) - built,
              seconds=time.perf_counter() - start, recall=recall,
              shards=summary)


# -- read ----------------------------------------------------------------------
def problem(directory: str, db=None, verify: bool = False) -> Optional[str]:
  """Why `directory` is not a complete sharded index (of `db`, if given),
  or None. verify: recompute the shards' sha256 (else sizes only)."""
  path = os.path.join(directory, INDEX_JSON)
  meta = files.read_json_or_none(path)
  if not isinstance(meta, dict):
    return f"{path} is missing"
  if meta.get("format") != FORMAT:
    return f"{path} is not a sharded index (format {FORMAT})"
  if db is not None and meta["db"] != db_identity(db):
    return (f"{path} was built for other DB shards than those of "
            f"{getattr(db, 'path', 'this DB')}")
  for record in meta["shards"]:
    found = _shard_problem(directory, record, verify)
    if found:
      return found
  return None


def is_complete(directory: str, db=None, verify: bool = False) -> bool:
  return problem(directory, db, verify) is None


def read_meta(directory: str, db=None) -> Dict[str, Any]:
  """index.json of a complete sharded index (of `db` if given); ValueError
  naming the problem and the rebuild command otherwise."""
  found = problem(directory, db)
  if found:
    raise ValueError(f"{found}: rebuild the index with `{REBUILD}`")
  return files.read_json(os.path.join(directory, INDEX_JSON))


def ranges(directory: str) -> List[Tuple[int, int]]:
  """(first, count) of each index shard."""
  return [(s["first"], s["count"]) for s in read_meta(directory)["shards"]]


def _load(directory: str, record: Dict[str, Any], db) -> indexlib.Searcher:
  rows = EmbeddingRows(db, record["first"], record["count"])
  searcher = indexlib.load(os.path.join(directory, record["dir"]), rows)
  if searcher.n != record["count"]:
    raise ValueError(f"{directory}/{record['dir']} holds {searcher.n} points, "
                     f"its record {record['count']}: rebuild with `{REBUILD}`")
  return searcher


def load_shard(directory: str, j: int, db) -> indexlib.Searcher:
  """Index shard j alone; its ids are LOCAL, [0, count)."""
  return _load(directory, read_meta(directory, db)["shards"][j], db)


def _searcher(directory: str, records: List[Dict[str, Any]], db,
              lazy: bool) -> ShardedSearcher:
  get = ((lambda j: _load(directory, records[j], db)) if lazy else
         [_load(directory, r, db) for r in records].__getitem__)
  kinds = {r["kind"] for r in records}
  return ShardedSearcher([(r["first"], r["count"]) for r in records], get,
                         db.dim, kinds.pop() if len(kinds) == 1 else "mixed")


def load(directory: str, db, lazy: bool = False) -> ShardedSearcher:
  """The merged index, global ids. lazy: load one shard at a time, on every
  search (memory of one shard; for one-off searches of many queries)."""
  return _searcher(directory, read_meta(directory, db)["shards"], db, lazy)


def measure_recall(directory: str, db, num_queries: int = 1000, k: int = 10,
                   seed: int = 0) -> float:
  """recall@k of the merged index against exact search over every chunk
  (`index.measure_recall`, own id excluded), one shard in memory at a time."""
  return indexlib.measure_recall(load(directory, db, lazy=True),
                                 EmbeddingRows(db), num_queries, k, seed)
