"""Nearest-neighbour indexes over chunk embeddings: ScaNN and exact search.

RETRO retrieves by squared L2 distance between frozen-BERT chunk embeddings.
Two searchers share one interface, `search(queries, k) -> (ids, dists)`:

  ExactSearcher   brute force in blocks (matmul + partial sort): the oracle in
                  tests and the index of small DBs (ScaNN's own rule of thumb:
                  brute force below ~20k points).
  ScannSearcher   ScaNN: k-means tree, asymmetric-hashing (AH) scoring of the
                  searched leaves, exact float32 reordering of the best
                  candidates. Distances are the reorder stage's squared L2.

`build_index` picks one by size; `save` / `load` keep a ScaNN index on disk
next to a small `index.json` (an exact index stores only its kind and is
rebuilt from the DB's embeddings). Both searchers pad with id -1 and distance
+inf when fewer than k points can be returned (k > n). An index too large
for one host is several of these, one per range of chunk ids
(index_shards.py); each shard directory is a `save` directory.

Shape glossary:
  n: DB vectors.     D: embedding width.     q: queries.
  k: neighbours.     c: candidates kept per query, k plus a margin.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from typing import Optional, Protocol, Tuple

import numpy as np

from retro_jax.core import files

EXACT_BELOW = 20_000  # build_index's default: exact search below this size.
INDEX_JSON = "index.json"
SCANN_DIR = "scann"  # ScaNN's serialized assets, inside the index directory.
_BLOCK_BYTES = 64 << 20  # Peak size of one [queries, DB block] score matrix.
_EXACT_MARGIN = 8  # Extra candidates re-scored exactly (see ExactSearcher).


class Searcher(Protocol):
  """What the neighbour search needs of an index."""

  kind: str
  n: int
  dim: int

  def search(self, queries: np.ndarray,
             k: int) -> Tuple[np.ndarray, np.ndarray]:
    """queries float32 [q, D] -> (ids int64 [q, k], dists float32 [q, k]),
    nearest first; id -1 and dist +inf where fewer than k exist."""


def check_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
  """float32 [q, D] queries, or ValueError for a bad shape or k < 1."""
  queries = np.asarray(queries, np.float32)
  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ValueError(f"queries must be [q, {dim}], got {queries.shape}")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  return queries


def pad(ids: np.ndarray, dists: np.ndarray,
        k: int) -> Tuple[np.ndarray, np.ndarray]:
  """Widens [q, c] results to [q, k] with id -1 and distance +inf."""
  q, c = ids.shape
  if c >= k:
    return ids[:, :k], dists[:, :k]
  out_ids = np.full((q, k), -1, np.int64)  # [q, k]
  out_dists = np.full((q, k), np.inf, np.float32)  # [q, k]
  out_ids[:, :c], out_dists[:, :c] = ids, dists
  return out_ids, out_dists


class ExactSearcher:
  """Exact squared-L2 k-NN: ||q||^2 - 2 q.x + ||x||^2 by blocks of the DB.

  Each [queries, block] score matrix stays under 64 MiB; a block's best c
  candidates are merged into the running best with `np.argpartition` (on a
  [1024, 16384] block: 68 ms, against 117 ms for a jitted `jax.lax.top_k`
  and 187 ms for the matmul itself, on 2 CPU cores). The expansion loses
  precision to cancellation near the query (~1e-7 * ||q||^2), so the best
  k + 8 candidates are re-scored as sum((q - x)^2) before the final sort;
  ties break towards the smaller id. `embeddings` is kept by reference (a
  memory map works) and may be float16.
  """

  kind = "exact"

  def __init__(self, embeddings: np.ndarray):
    if embeddings.ndim != 2:
      raise ValueError(f"embeddings must be [n, D], got {embeddings.shape}")
    self._db = embeddings
    self.n, self.dim = embeddings.shape
    self._rows = max(1, _BLOCK_BYTES // (4 * 1024))  # DB rows per block.
    self._norms = np.zeros(self.n, np.float32)  # [n]
    for start in range(0, self.n, self._rows):
      x = np.asarray(embeddings[start:start + self._rows], np.float32)
      self._norms[start:start + len(x)] = np.einsum("nd,nd->n", x, x)

  def search(self, queries: np.ndarray,
             k: int) -> Tuple[np.ndarray, np.ndarray]:
    queries = check_queries(queries, self.dim, k)
    c = min(k + _EXACT_MARGIN, self.n)
    ids = np.zeros((len(queries), c), np.int64)  # [q, c]
    dists = np.zeros((len(queries), c), np.float32)  # [q, c]
    step = 1024  # Queries per batch; [step, block rows] floats = 64 MiB.
    for s in range(0, len(queries), step):
      ids[s:s + step], dists[s:s + step] = self._search_batch(
          queries[s:s + step], c)
    return pad(ids, dists, k)

  def _search_batch(self, q: np.ndarray, c: int) -> Tuple[np.ndarray,
                                                          np.ndarray]:
    q_norms = np.einsum("qd,qd->q", q, q)[:, None]  # [q, 1]
    best_ids = np.zeros((len(q), 0), np.int64)  # [q, <= c]
    best = np.zeros((len(q), 0), np.float32)  # [q, <= c]
    for start in range(0, self.n, self._rows):
      x = np.asarray(self._db[start:start + self._rows], np.float32)
      scores = q_norms - 2 * (q @ x.T) + self._norms[start:start + len(x)]
      top = _smallest(scores, c)  # [q, c] column indices into the block.
      best_ids = np.concatenate([best_ids, top + start], axis=1)  # [q, <=2c]
      best = np.concatenate(
          [best, np.take_along_axis(scores, top, axis=1)], axis=1)
      keep = _smallest(best, c)  # [q, c]
      best_ids = np.take_along_axis(best_ids, keep, axis=1)
      best = np.take_along_axis(best, keep, axis=1)
    # Exact re-scoring of the survivors, a few queries at a time so that the
    # gathered [rows, c, D] block stays under _BLOCK_BYTES when c is large.
    exact = np.zeros(best.shape, np.float32)  # [q, c]
    rows = max(1, _BLOCK_BYTES // (4 * c * self.dim))
    for s in range(0, len(q), rows):
      part = best_ids[s:s + rows]  # [rows, c]
      x = np.asarray(self._db[part.ravel()], np.float32).reshape(
          *part.shape, self.dim)  # [rows, c, D]
      exact[s:s + rows] = np.square(x - q[s:s + rows, None, :]).sum(-1)
    order = np.lexsort((best_ids, exact), axis=-1)  # By dist, then by id.
    return (np.take_along_axis(best_ids, order, axis=1),
            np.take_along_axis(exact, order, axis=1))


def _smallest(scores: np.ndarray, c: int) -> np.ndarray:
  """Column indices of the c smallest entries of each row, unordered."""
  if c >= scores.shape[1]:
    return np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
  return np.argpartition(scores, c - 1, axis=1)[:, :c]


# -- ScaNN ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScannParams:
  """ScaNN build and search settings (see `ScannParams.for_size`)."""

  num_leaves: int
  leaves_to_search: int
  dims_per_block: int = 2  # ScaNN's recommendation for AH.
  reorder: int = 100  # Candidates re-scored exactly, per query, for k = 10.
  reorder_per_k: int = 10  # At query time: max(reorder, reorder_per_k * k).
  training_sample_size: int = 100_000

  @classmethod
  def for_size(cls, n: int, k: int = 10) -> ScannParams:
    """Defaults for n points: ~sqrt(n) leaves (ScaNN's rule of thumb), 10 k
    candidates reordered, and ceil(3 sqrt(leaves)) leaves searched.

    The last was fitted on MiniLM embeddings of Python source (1000-3000
    chunks, held-in queries, own id excluded): recall@10 was 0.96-0.98 at
    this rule, 0.95-0.97 at 2.5 sqrt(leaves), 0.93-0.95 at 2 sqrt(leaves);
    searching every leaf gave 1.0, so the tree, not AH + reorder, limits
    recall. The share searched shrinks with n (42% of 55 leaves, 9.5% of
    1000) but was not measured beyond 3000 points: `build_index` runs
    `calibrate`, which checks it on the DB itself and searches more leaves
    where needed.
    """
    leaves = int(min(max(1, round(math.sqrt(n))), n))
    search = min(leaves, math.ceil(3 * math.sqrt(leaves)))
    return cls(num_leaves=leaves, leaves_to_search=search, reorder=10 * k)


class ScannSearcher:
  """A ScaNN tree + AH + reorder index, squared L2.

  A query for k neighbours searches `leaves_to_search` leaves, or more when
  k is large against the leaf size (so that a request for many candidates,
  as `search_filtered` makes, can be met), and reorders
  max(reorder, reorder_per_k * k) candidates. A request for k >= n searches
  every leaf and reorders every point: it is exact.
  """

  kind = "scann"

  def __init__(self, searcher, n: int, dim: int, params: ScannParams,
               recall: Optional[float] = None):
    self._searcher = searcher
    self.n, self.dim, self.params = n, dim, params
    self.recall = recall  # Held-in recall measured by `calibrate`, if run.

  @classmethod
  def build(cls, embeddings: np.ndarray, params: Optional[ScannParams] = None,
            training_threads: int = 0) -> ScannSearcher:
    """Trains the tree and the AH codebooks on `embeddings` [n, D].

    Not deterministic: ScaNN seeds its k-means itself, even with one
    training thread (8 builds on 3000 chunks: recall@10 0.977-0.980)."""
    scann = _import_scann()
    db = np.ascontiguousarray(embeddings, np.float32)  # [n, D]
    if db.ndim != 2 or len(db) < 16:  # AH trains 16 centres per block.
      raise ValueError(f"ScaNN needs [n >= 16, D] embeddings, got "
                       f"{db.shape}: use ExactSearcher")
    p = params or ScannParams.for_size(len(db))
    if not 1 <= p.leaves_to_search <= p.num_leaves <= len(db):
      raise ValueError(f"need 1 <= leaves_to_search <= num_leaves <= n, got "
                       f"{p.leaves_to_search}, {p.num_leaves}, {len(db)}")
    builder = scann.scann_ops_pybind.builder(db, 10, "squared_l2").tree(
        num_leaves=p.num_leaves, num_leaves_to_search=p.leaves_to_search,
        training_sample_size=min(p.training_sample_size, len(db)),
        # ScaNN's default of 50 is close to the mean leaf size (~sqrt(n))
        # of DBs below ~10k points, where it cost recall: at n = 3000,
        # recall@10 was 0.94 with 50, 0.97-0.98 with 27, 0.98 with 10.
        min_partition_size=max(1, min(50, len(db) // (5 * p.num_leaves))))
    # Anisotropic quantization (noise shaping) targets inner products; for
    # squared L2 ScaNN's default (NaN, plain AH) is the right one.
    builder = builder.score_ah(
        p.dims_per_block,
        training_sample_size=min(p.training_sample_size, len(db)))
    searcher = builder.reorder(p.reorder).set_n_training_threads(
        training_threads).build()
    return cls(searcher, len(db), db.shape[1], p)

  def with_leaves_to_search(self, leaves: int) -> ScannSearcher:
    """The same trained index, searching `leaves` leaves per query."""
    return ScannSearcher(self._searcher, self.n, self.dim, dataclasses.replace(
        self.params, leaves_to_search=leaves))

  def serialize(self, directory: str) -> None:
    """Writes ScaNN's assets into `directory` (created). Their paths are
    relative to it: with ScaNN's default absolute paths a moved index fails
    to load ("Failed to open file <old path>/serialized_partitioner.pb")."""
    os.makedirs(directory)
    self._searcher.serialize(directory, relative_path=True)

  def search(self, queries: np.ndarray,
             k: int) -> Tuple[np.ndarray, np.ndarray]:
    queries = check_queries(queries, self.dim, k)
    p = self.params
    if k >= self.n:  # Everything: exact, every leaf, every point reordered.
      leaves, pre, final = p.num_leaves, self.n, self.n
    else:
      # A leaf holds ~n / num_leaves points; search twice the leaves needed
      # to hold `pre` candidates when that beats the default.
      pre = min(self.n, max(p.reorder, p.reorder_per_k * k))
      per_leaf = self.n / p.num_leaves
      leaves = min(p.num_leaves, max(p.leaves_to_search,
                                     math.ceil(2 * pre / per_leaf)))
      final = k
    # ScaNN's threads split the queries in batches of 256: no gain measured
    # on 2 shared cores, meant for the offline precompute on bigger hosts.
    ids, dists = self._searcher.search_batched_parallel(
        queries, final_num_neighbors=final, pre_reorder_num_neighbors=pre,
        leaves_to_search=leaves, batch_size=256)
    ids = np.asarray(ids, np.int64).reshape(len(queries), -1)  # [q, <= k]
    dists = np.asarray(dists, np.float32).reshape(len(queries), -1)
    # ScaNN ends a short row (too few points in the searched leaves) with id
    # 0 and distance NaN; make those -1 / +inf like ExactSearcher's padding.
    bad = (ids < 0) | (ids >= self.n) | ~np.isfinite(dists)
    ids[bad], dists[bad] = -1, np.inf
    return pad(ids, dists, k)


def _import_scann():
  try:
    import scann  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"ScaNN could not be imported ({e}); scann 1.4.2 needs tensorflow "
        f"2.20.* (see docs/design.md §7)") from e
  return scann


def resolve_kind(kind: str, num_points: int,
                 exact_below: int = EXACT_BELOW) -> str:
  """"exact" or "scann": `kind` itself, or for "auto" exact search below
  `exact_below` points."""
  if kind not in ("auto", "exact", "scann"):
    raise ValueError(f"kind must be auto, exact or scann, got {kind!r}")
  if kind == "auto":
    return "exact" if num_points < exact_below else "scann"
  return kind


def build_index(embeddings: np.ndarray, kind: str = "auto",
                exact_below: int = EXACT_BELOW,
                params: Optional[ScannParams] = None,
                target_recall: Optional[float] = 0.95) -> Searcher:
  """The index of a DB: exact below `exact_below` points when kind is
  "auto"; kind "exact" or "scann" forces one. A ScaNN index is calibrated
  to `target_recall` (see `calibrate`) unless that is None."""
  if resolve_kind(kind, len(embeddings), exact_below) == "exact":
    return ExactSearcher(embeddings)
  searcher = ScannSearcher.build(embeddings, params)
  if target_recall is None:
    return searcher
  return calibrate(searcher, embeddings, target_recall)


# -- on disk -------------------------------------------------------------------
def save(searcher: Searcher, directory: str, overwrite: bool = False) -> None:
  """Writes `searcher` to `directory`: index.json (+ ScaNN's assets in
  scann/). Everything is written into a temporary sibling directory, with
  index.json last, which is then renamed: `directory` is complete or absent.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"index directory {directory} already exists")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-",
                         dir=parent)
  os.chmod(tmp, 0o755)  # mkdtemp's 0700 would follow the rename.
  try:
    meta = {"kind": searcher.kind, "n": int(searcher.n),
            "dim": int(searcher.dim)}
    if isinstance(searcher, ScannSearcher):
      searcher.serialize(os.path.join(tmp, SCANN_DIR))
      meta["params"] = dataclasses.asdict(searcher.params)
      meta["recall"] = searcher.recall
    files.write_json(os.path.join(tmp, INDEX_JSON), meta, indent=2)
    if os.path.exists(directory):  # overwrite: swap, then drop the old one.
      old = tmp + ".old"
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load(directory: str,
         embeddings: Optional[np.ndarray] = None) -> Searcher:
  """Reads an index written by `save`. An exact index needs the DB's
  `embeddings` [n, D] to rebuild from; a ScaNN one checks them when given.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"index directory {directory} does not exist")
  meta_path = os.path.join(directory, INDEX_JSON)
  if not os.path.isfile(meta_path):
    raise ValueError(f"{directory} has no {INDEX_JSON}: not a complete index "
                     f"(an interrupted save leaves only a temporary "
                     f"directory, which is never loaded)")
  meta = files.read_json(meta_path)
  if "format" in meta:  # index_shards writes {"format": 2, "shards": ...}.
    raise ValueError(f"{meta_path} is a sharded index (format "
                     f"{meta['format']}): load it with "
                     f"retro_jax.retrieval.index_shards.load(directory, db)")
  if embeddings is not None and embeddings.shape != (meta["n"], meta["dim"]):
    raise ValueError(f"{directory} indexes [{meta['n']}, {meta['dim']}] "
                     f"embeddings, got {embeddings.shape}")
  if meta["kind"] == ExactSearcher.kind:
    if embeddings is None:
      raise ValueError(f"{directory} is an exact index: pass the DB's "
                       f"embeddings to rebuild it")
    return ExactSearcher(embeddings)
  if meta["kind"] != ScannSearcher.kind:
    raise ValueError(f"{meta_path}: unknown index kind {meta['kind']!r}")
  searcher = _import_scann().scann_ops_pybind.load_searcher(
      os.path.join(directory, SCANN_DIR))
  return ScannSearcher(searcher, meta["n"], meta["dim"],
                       ScannParams(**meta["params"]), meta.get("recall"))


# -- recall ------------------------------------------------------------------
def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
  """The share of the exact top-k ids that approx[:k] holds too, pooled over
  queries; both are [q, >= k] id arrays, and -1 (padding) never counts."""
  total = found = 0
  for a, e in zip(np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]):
    e = set(e[e >= 0].tolist())
    total += len(e)
    found += len(e & set(a[a >= 0].tolist()))
  return found / total if total else 1.0


def drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
  """[q, k + 1] -> [q, k]: each row without its query's own id (or without
  its last entry, when the own id is not among them)."""
  out = np.zeros((len(ids), k), np.int64)
  for i, (row, me) in enumerate(zip(ids, self_ids)):
    out[i] = row[row != me][:k] if me in row else row[:k]
  return out


def held_in(embeddings: np.ndarray, num_queries: int, k: int, seed: int
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids [q], queries [q, D], exact neighbour ids [q, k] without self)."""
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.choice(len(embeddings), min(num_queries, len(embeddings)),
                           replace=False))  # [q]
  queries = np.asarray(embeddings[ids], np.float32)  # [q, D]
  exact, _ = ExactSearcher(embeddings).search(queries, k + 1)
  return ids, queries, drop_self(exact, ids, k)


def measure_recall(searcher: Searcher, embeddings: np.ndarray,
                   num_queries: int = 1000, k: int = 10,
                   seed: int = 0) -> float:
  """recall@k of `searcher` against exact search, with `num_queries` DB
  vectors (drawn without replacement) as queries.

  A DB vector's nearest neighbour is itself, found by any index and at
  distance 0: counting it would inflate recall by ~1/k. Each query's own id
  is therefore dropped from both answers (k + 1 are fetched), so this is the
  recall of the other k neighbours: the honest measure.
  """
  ids, queries, exact = held_in(embeddings, num_queries, k, seed)
  approx, _ = searcher.search(queries, k + 1)
  return recall_at_k(drop_self(approx, ids, k), exact, k)


def calibrate(searcher: ScannSearcher, embeddings: np.ndarray,
              target_recall: float = 0.95, k: int = 10,
              num_queries: int = 1000, seed: int = 0) -> ScannSearcher:
  """The searcher with the fewest leaves searched, from its own number up
  in steps of x1.5 (every leaf at worst), whose `measure_recall` reaches
  `target_recall`; the recall reached is in its `.recall`. Only a query-time
  setting changes: the trained index is shared, nothing is rebuilt."""
  ids, queries, exact = held_in(embeddings, num_queries, k, seed)
  leaves = searcher.params.leaves_to_search
  while True:
    tuned = searcher.with_leaves_to_search(leaves)
    approx, _ = tuned.search(queries, k + 1)
    tuned.recall = recall_at_k(drop_self(approx, ids, k), exact, k)
    if tuned.recall >= target_recall or leaves == searcher.params.num_leaves:
      return tuned
    leaves = min(searcher.params.num_leaves, math.ceil(1.5 * leaves))
