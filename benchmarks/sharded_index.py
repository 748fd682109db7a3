r"""What sharding the index costs: one ScaNN index against S ScaNN shards.

  python benchmarks/sharded_index.py --db_dir=runs/stdlib/db [--shards=4] \
      [--queries=1000] [--out_dir=/tmp/ix]

Over a finalized DB, with ScaNN forced in both, builds (a) one index over
every chunk and (b) S index shards of equal size (retrieval/index_shards.py),
each calibrated on its own range to recall@10 >= --target_recall, into
--out_dir (default: a temporary directory, removed afterwards). Prints, then
one JSON line last: build seconds, recall@10 against exact search on the
same held-in queries (DB vectors, own id excluded, as index.measure_recall),
queries/s and ms per 1000 queries at k=10, and the recall difference.

  python benchmarks/sharded_index.py --memory [--memory_chunks=20000] \
      [--memory_scale=4] [--memory_shard_chunks=10000]

instead measures peak RSS of the index build + neighbour-table build over
synthetic DBs of N and scale x N chunks with a fixed index shard size (each
size in fresh processes: one makes the DB, one builds and reports its
ru_maxrss); `memory_figures` is the function to call from elsewhere.
"""

import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import threading
import time

from absl import app
from absl import flags
import numpy as np

from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import index as indexlib
from retro_jax.retrieval import index_shards
from retro_jax.retrieval import neighbour_table

_DB_DIR = flags.DEFINE_string("db_dir", "runs/stdlib/db", "A finalized DB.")
_SHARDS = flags.DEFINE_integer("shards", 4, "Index shards of run (b).")
_QUERIES = flags.DEFINE_integer("queries", 1000, "Held-in queries.")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", "", "Where the two indexes go (kept); empty = a temporary "
    "directory, removed at the end.")
_TARGET = flags.DEFINE_float("target_recall", 0.95,
                             "Calibration target of every ScaNN index.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed query runs (best kept).")
_MEMORY = flags.DEFINE_bool("memory", False,
                            "Run the synthetic peak-memory benchmark instead.")
_MEMORY_CHUNKS = flags.DEFINE_integer("memory_chunks", 20_000,
                                      "Chunks of the 1x synthetic DB.")
_MEMORY_SCALE = flags.DEFINE_integer("memory_scale", 4,
                                     "Size of the larger DB, in units of 1x.")
_MEMORY_SHARD = flags.DEFINE_integer("memory_shard_chunks", 10_000,
                                     "Index shard size (fixed) and DB shard "
                                     "size of the memory benchmark.")
_MEMORY_DIM = flags.DEFINE_integer("memory_dim", 384, "Synthetic width D.")
_CANDIDATES = flags.DEFINE_integer("candidates", 16,
                                   "Neighbour-table candidates C (memory).")


def log(msg):
  print(msg, flush=True)


def _query_cost(searcher, queries, k=10, repeats=3):
  """(queries/s, ms per 1000 queries) at k, best of `repeats` runs."""
  searcher.search(queries[:10], k)  # Warm up.
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    searcher.search(queries, k)
    best = min(best, time.perf_counter() - t0)
  return len(queries) / best, 1000 * best * 1000 / len(queries)


def compare(db, out_dir, shards, num_queries, target_recall, repeats=3):
  """Builds one ScaNN index and `shards` ScaNN shards of `db` under
  `out_dir`; returns their figures on the same held-in queries."""
  ids, queries, exact = indexlib.held_in(index_shards.EmbeddingRows(db),
                                         num_queries, 10, seed=0)
  result = {"num_chunks": db.num_chunks, "dim": db.dim,
            "queries": len(queries)}
  shard_chunks = {"single": 0, "sharded": -(-db.num_chunks // shards)}
  for name, size in shard_chunks.items():
    directory = os.path.join(out_dir, name)
    t0 = time.perf_counter()
    summary = index_shards.build(db, directory, kind="scann",
                                 shard_chunks=size, recall_queries=0,
                                 target_recall=target_recall, log=log)
    seconds = time.perf_counter() - t0
    searcher = (index_shards.load_shard(directory, 0, db) if name == "single"
                else index_shards.load(directory, db))
    approx, _ = searcher.search(queries, 11)
    recall = indexlib.recall_at_k(indexlib.drop_self(approx, ids, 10), exact,
                                  10)
    qps, ms = _query_cost(searcher, queries, 10, repeats)
    meta = index_shards.read_meta(directory, db)
    leaves = [json.load(open(os.path.join(directory, s["dir"], "index.json")))[
        "params"] for s in meta["shards"]]
    result[name] = dict(
        shards=len(summary["shards"]), build_s=round(seconds, 1),
        recall_at_10=round(recall, 4), queries_per_s=round(qps, 1),
        ms_per_1000_queries=round(ms, 1),
        shard_recall=[round(s["recall"], 4) for s in summary["shards"]],
        leaves=[f"{p['leaves_to_search']}/{p['num_leaves']}" for p in leaves])
    log(f"{name}: {len(summary['shards'])} ScaNN index(es) built in "
        f"{seconds:.1f} s (leaves searched/total {result[name]['leaves']}); "
        f"recall@10 {recall:.4f}; {qps:,.0f} queries/s = {ms:.1f} ms per "
        f"1000 queries at k=10")
  result["recall_difference"] = round(
      result["sharded"]["recall_at_10"] - result["single"]["recall_at_10"], 4)
  return result


# -- synthetic peak-memory benchmark -------------------------------------------
class _FakeEmbedder:
  """Chunk text -> a clustered random vector seeded by its sha256."""

  name, fingerprint = "synthetic-clusters", "5" * 64

  def __init__(self, dim):
    self.dim = dim
    self._centres = np.random.default_rng(0).standard_normal((64, dim))

  def embed(self, texts):
    out = np.zeros((len(texts), self.dim), np.float32)  # [n, D]
    for i, text in enumerate(texts):
      seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
      noise = np.random.default_rng(seed).standard_normal(self.dim)
      out[i] = self._centres[seed % 64] + 0.5 * noise
    return out


def synthetic_db(db_dir, num_chunks, shard_chunks, dim, seed=0):
  """A finalized DB of about `num_chunks` chunks of random-word documents in
  DB shards of `shard_chunks`, embedded by a fake embedder of width `dim`."""
  from retro_jax.corpus import vocab  # pylint: disable=g-import-not-at-top
  from retro_jax.corpus.sources import Document  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  words = [f"w{i}" for i in range(300)]
  os.makedirs(db_dir, exist_ok=True)
  spm_path = db_dir.rstrip("/") + ".spm.model"
  vocab.train([" ".join(rng.choice(words, 200)) for _ in range(100)],
              spm_path, vocab_size=272)
  sp = vocab.load(spm_path)
  per_doc = 340  # Words, ~3.8 tokens each: ~20 chunks a document.

  def docs():
    for d in range(-(-num_chunks // 20)):
      yield Document(d + 1, " ".join(rng.choice(words, per_doc)), f"s:{d}")
  dblib.write_chunks(docs(), sp, db_dir, shard_chunks=shard_chunks,
                     spm_path=spm_path, progress=False)
  dblib.embed_shards(db_dir, _FakeEmbedder(dim), progress=False)
  dblib.finalize(db_dir)


class _RssSampler:
  """Peak anonymous and file-backed resident memory (MiB), sampled every
  20 ms from /proc/self/status. ru_maxrss alone mixes the two: pages of the
  DB's memory maps that a read touched count in RSS until the kernel drops
  them, although they are clean page cache, not memory the build holds."""

  def __init__(self):
    self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _sample(self):
    with open("/proc/self/status") as f:
      for line in f:
        key = line.split(":")[0]
        if key in self.peak:
          self.peak[key] = max(self.peak[key], int(line.split()[1]) / 1024)

  def _run(self):
    while not self._stop.wait(0.02):
      self._sample()

  def stop(self):
    self._stop.set()
    self._thread.join()
    self._sample()
    return dict(self.peak)


def _build_and_measure(db_dir, kind, shard_chunks, candidates, queue):
  """In a fresh process: index build + table build; reports peak memory."""
  if kind != "exact":
    indexlib._import_scann()  # pylint: disable=protected-access
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB.
  sampler = _RssSampler()
  t0 = time.perf_counter()
  db = dblib.RetrievalDB.open(db_dir)
  index_dir = os.path.join(db_dir, "index")
  index_shards.build(db, index_dir, kind=kind, shard_chunks=shard_chunks,
                     recall_queries=0, log=lambda _: None)
  t1 = time.perf_counter()
  neighbour_table.build_table(db_dir, index_dir, candidates,
                              log=lambda _: None)
  t2 = time.perf_counter()
  peaks = sampler.stop()
  queue.put(dict(num_chunks=db.num_chunks, index_shards=len(
      index_shards.ranges(index_dir)), db_shards=len(db.shard_ranges()),
                 base_mib=base / 1024,
                 peak_mib=resource.getrusage(
                     resource.RUSAGE_SELF).ru_maxrss / 1024,
                 peak_anon_mib=peaks["RssAnon"],
                 peak_file_mib=peaks["RssFile"],
                 embeddings_mib=db.num_chunks * db.dim * 4 / 2**20,
                 index_s=t1 - t0, table_s=t2 - t1))


def _in_process(target, *args):
  """Runs target(*args, queue) in a fresh (spawned) process; its result."""
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=target, args=args + (queue,))
  proc.start()
  result = queue.get()
  proc.join()
  return result


def _make_db(db_dir, num_chunks, shard_chunks, dim, queue):
  synthetic_db(db_dir, num_chunks, shard_chunks, dim)
  queue.put(None)


def memory_figures(root, num_chunks=20_000, scale=4, shard_chunks=10_000,
                   dim=384, candidates=16, kind="scann"):
  """Peak RSS of index build + table build for synthetic DBs of
  `num_chunks` and `scale` x `num_chunks` chunks, index shards and DB shards
  of `shard_chunks` (fixed). Each DB is made in one fresh process, then
  indexed and tabled in another, which reports (MiB) its ru_maxrss ("base":
  after imports) and the peaks of its anonymous and file-backed resident
  memory. Flat memory: the anonymous peaks are about equal; the
  file-backed part holds the DB's memory-mapped pages read so far, clean
  page cache that the kernel drops under pressure."""
  out = []
  for n in (num_chunks, scale * num_chunks):
    db_dir = os.path.join(root, f"db-{n}")
    _in_process(_make_db, db_dir, n, shard_chunks, dim)
    fig = _in_process(_build_and_measure, db_dir, kind, shard_chunks,
                      candidates)
    log(f"N={fig['num_chunks']:,} ({fig['db_shards']} DB shards, "
        f"{fig['index_shards']} {kind} index shards of <= {shard_chunks:,}, "
        f"D={dim}, C={candidates}, embeddings {fig['embeddings_mib']:.0f} "
        f"MiB): peak RSS {fig['peak_mib']:.0f} MiB (after imports "
        f"{fig['base_mib']:.0f}); peak anonymous {fig['peak_anon_mib']:.0f} "
        f"MiB, peak file-backed {fig['peak_file_mib']:.0f} MiB; index "
        f"{fig['index_s']:.1f} s, table {fig['table_s']:.1f} s")
    out.append(fig)
  return out


def main(argv):
  del argv
  out_dir = _OUT_DIR.value or tempfile.mkdtemp(prefix="sharded_index-")
  try:
    if _MEMORY.value:
      result = {"memory": memory_figures(
          out_dir, _MEMORY_CHUNKS.value, _MEMORY_SCALE.value,
          _MEMORY_SHARD.value, _MEMORY_DIM.value, _CANDIDATES.value)}
    else:
      db = dblib.RetrievalDB.open(_DB_DIR.value)
      log(f"{db}: one ScaNN index against {_SHARDS.value} ScaNN shards, "
          f"{_QUERIES.value} held-in queries")
      result = compare(db, out_dir, _SHARDS.value, _QUERIES.value,
                       _TARGET.value, _REPEATS.value)
      log(f"recall@10: single {result['single']['recall_at_10']:.4f}, "
          f"{result['sharded']['shards']} shards "
          f"{result['sharded']['recall_at_10']:.4f} (difference "
          f"{result['recall_difference']:+.4f})")
  finally:
    if not _OUT_DIR.value:
      shutil.rmtree(out_dir, ignore_errors=True)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
