r"""Peak memory of the DB build's index and neighbour-table stages vs DB size.

  python benchmarks/offline_memory.py                 # 1x = 50k chunks, 4x
  python benchmarks/offline_memory.py --chunks=20000 --scales=1,2,4

With the DB shard size and the index shard size fixed, the index stage
(finalize, ScaNN index shards, recall@10) and the table stage (the Beam
neighbour-table pipeline) should hold one shard's vectors at a time, so their
peak memory should not grow with the DB. For each scale s this builds a DB of
s x --chunks synthetic chunks, then runs each stage, exactly as
scripts/build_db.py runs it (build_job.build_database with stages=(stage,)),
in a fresh interpreter, which reports its peak RSS: its own (ru_maxrss,
exact), and with --workers > 1 that of itself plus the Beam worker processes
below it, sampled every 0.2 s from /proc. It also reports its RSS after the
imports (JAX, ScaNN, Beam), which every run pays whatever the DB size.
Prints a line per run, the ratio of each stage's peak at the largest scale
to that at the smallest, and one JSON line last.

Synthetic data stand in for text and BERT, honestly labelled: documents of
random words from a fixed list, tokenized by a SentencePiece model trained on
them, chunked by db_build.write_chunks; each chunk's embedding is a
deterministic function of its text (one of 1024 cluster centres, chosen by
the text's crc32, plus Gaussian noise seeded by it), written by
db_build.embed_shard like BERT's. The index is ScaNN (--index_kind) so that
the figure is that of the real index.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib

from absl import app
from absl import flags
import numpy as np

_CHUNKS = flags.DEFINE_integer("chunks", 50_000, "DB chunks at scale 1.")
_SCALES = flags.DEFINE_list("scales", ["1", "4"], "DB sizes, in --chunks.")
_DB_SHARD = flags.DEFINE_integer("db_shard_chunks", 10_000,
                                 "Chunks per DB shard (fixed).")
_INDEX_SHARD = flags.DEFINE_integer("index_shard_chunks", 25_000,
                                    "Chunks per index shard (fixed).")
_INDEX_KIND = flags.DEFINE_enum("index_kind", "scann",
                                ["scann", "exact", "auto"], "Index shards.")
_CANDIDATES = flags.DEFINE_integer("candidates", 16,
                                   "Neighbour-table candidates C.")
_DIM = flags.DEFINE_integer("dim", 384, "Embedding width (MiniLM's).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Beam workers of the table.")
_RECALL_QUERIES = flags.DEFINE_integer("recall_queries", 1000,
                                       "Queries of the recall@10 figure.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the DBs go (default: a "
                               "temporary directory, removed at the end).")
_STAGE = flags.DEFINE_enum("stage", "", ["", "index", "table"],
                           "Internal: run one stage on --db_dir and report.")
_DB_DIR = flags.DEFINE_string("db_dir", "", "Internal: the DB of --stage.")

_WORDS = 4000           # Distinct words of the synthetic language.
_WORDS_PER_DOC = 180    # About 4 chunks per document.


class SyntheticEmbedder:
  """Deterministic vectors standing in for BERT's (see the module doc)."""

  name = "synthetic-clusters"

  def __init__(self, dim: int):
    self.dim = dim
    self.fingerprint = f"synthetic-clusters-v1-{dim}"
    rng = np.random.default_rng(0)
    self._centres = rng.standard_normal((1024, dim)).astype(np.float32)

  def embed(self, texts):
    out = np.empty((len(texts), self.dim), np.float32)  # [n, D]
    for i, text in enumerate(texts):
      seed = zlib.crc32(text.encode("utf-8"))
      noise = np.random.default_rng(seed).standard_normal(self.dim)
      out[i] = self._centres[seed % len(self._centres)] + 0.5 * noise
    return out


def _documents(num_docs: int, seed: int = 0):
  """Synthetic documents: random words of a fixed made-up vocabulary."""
  from retro_jax.corpus.sources import Document  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1234)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = ["".join(rng.choice(letters, rng.integers(2, 9)))
           for _ in range(_WORDS)]
  rng = np.random.default_rng(seed)
  for d in range(num_docs):
    ids = rng.zipf(1.3, _WORDS_PER_DOC) % _WORDS
    yield Document(doc_id=d + 1, text=" ".join(words[i] for i in ids),
                   source=f"synthetic:{d}")


def make_db(db_dir: str, num_chunks: int) -> int:
  """A finalized-ready DB of about `num_chunks` synthetic chunks (chunks and
  embeddings written, not finalized: that is the index stage's)."""
  from retro_jax.corpus import vocab  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval import db_build  # pylint: disable=g-import-not-at-top
  spm_path = os.path.join(os.path.dirname(db_dir), "spm.model")
  if not os.path.exists(spm_path):
    vocab.train([d.text for d in _documents(3000, seed=99)], spm_path, 2048)
  sp = vocab.load(spm_path)
  per_doc = 4.0  # Measured below and corrected once.
  sample = db_build.write_chunks(_documents(200), sp, db_dir + ".sample",
                                 shard_chunks=_DB_SHARD.value,
                                 spm_path=spm_path, progress=False)
  shutil.rmtree(db_dir + ".sample")
  per_doc = sample["num_chunks"] / 200
  chunks = db_build.write_chunks(
      _documents(int(round(num_chunks / per_doc))), sp, db_dir,
      shard_chunks=_DB_SHARD.value, spm_path=spm_path, progress=False)
  embedder = SyntheticEmbedder(_DIM.value)
  for i in db_build.embedding_plan(db_dir, embedder)["todo"]:
    db_build.embed_shard(db_dir, i, embedder, batch_size=1024)
  return chunks["num_chunks"]


def _rss_mib(pid: int) -> float:
  """Resident set of process `pid` now (MiB; 0 once it has exited)."""
  try:
    with open(f"/proc/{pid}/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, IndexError, ValueError):
    return 0.0


def _rss_split_mib() -> tuple:
  """(anonymous, file-backed) resident memory of this process now (MiB):
  file-backed pages are memory-mapped files, e.g. the DB's embeddings."""
  fields = {}
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(("RssAnon:", "RssFile:")):
        key, value = line.split(":")
        fields[key] = int(value.split()[0]) / 1024
  return fields.get("RssAnon", 0.0), fields.get("RssFile", 0.0)


def _descendants(root: int) -> list:
  """Pids of every process below `root` (from /proc/*/stat)."""
  parent = {}
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        with open(f"/proc/{name}/stat") as f:
          parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        pass
  found, frontier = [], [root]
  while frontier:
    kids = [p for p, pp in parent.items() if pp in frontier]
    found += kids
    frontier = kids
  return found


class TreeSampler(threading.Thread):
  """Samples the RSS of this process and of its descendants (the Beam
  worker processes with --workers > 1) every `every` seconds. Needed
  because ru_maxrss of children is no measure of a worker's memory: a
  child forked and exec'd keeps the parent's high-water mark."""

  def __init__(self, every: float = 0.2):
    super().__init__(daemon=True)
    self.every, self.stop = every, threading.Event()
    self.peak_total = self.peak_workers = 0.0
    self.peak_anon = self.peak_file = 0.0
    self.max_workers = 0

  def run(self):
    me = os.getpid()
    while not self.stop.wait(self.every):
      anon, mapped = _rss_split_mib()
      self.peak_anon = max(self.peak_anon, anon)
      self.peak_file = max(self.peak_file, mapped)
      kids = _descendants(me)
      workers = sum(_rss_mib(p) for p in kids)
      self.peak_workers = max(self.peak_workers, workers)
      self.peak_total = max(self.peak_total, _rss_mib(me) + workers)
      self.max_workers = max(self.max_workers, len(kids))


def _hwm_mib() -> float:
  """This process's peak RSS so far (MiB; ru_maxrss is in KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_stage(stage: str, db_dir: str) -> None:
  """One stage as scripts/build_db.py runs it, then one JSON line."""
  # build_db.py keeps glibc's freed memory only for the embed stage.
  from retro_jax.retrieval import build_job  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval import index  # pylint: disable=g-import-not-at-top
  import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
  index._import_scann()  # pylint: disable=protected-access
  base = _hwm_mib()      # After the imports: what the stage adds is above.
  sampler = TreeSampler()
  sampler.start()
  t0 = time.time()
  summary = build_job.build_database(
      db_dir, {}, "", None, stages=(stage,), index_kind=_INDEX_KIND.value,
      index_shard_chunks=_INDEX_SHARD.value,
      recall_queries=_RECALL_QUERIES.value,
      table_candidates=_CANDIDATES.value, workers=_WORKERS.value,
      log=lambda line: print(line, file=sys.stderr, flush=True))
  seconds = time.time() - t0
  sampler.stop.set()
  sampler.join()
  own = _hwm_mib()
  out = dict(stage=stage, seconds=round(seconds, 1),
             base_mib=round(base, 1), driver_peak_mib=round(own, 1),
             driver_anon_peak_mib=round(sampler.peak_anon, 1),
             driver_file_peak_mib=round(sampler.peak_file, 1),
             workers_peak_mib=round(sampler.peak_workers, 1),
             worker_processes=sampler.max_workers,
             # The driver's exact peak, or driver + workers as sampled.
             peak_mib=round(max(own, sampler.peak_total), 1))
  if stage == "index":
    out.update(recall_at_10=summary["recall_at_10"],
               index_shards=summary["index_shards"])
  print(json.dumps(out), flush=True)


def main(argv):
  del argv
  if _STAGE.value:
    run_stage(_STAGE.value, _DB_DIR.value)
    return
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="offline_memory-")
  scales = [int(s) for s in _SCALES.value]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  results = []
  try:
    for scale in scales:
      db_dir = os.path.join(workdir, f"db_{scale}x")
      t0 = time.time()
      n = make_db(db_dir, scale * _CHUNKS.value)
      print(f"{scale}x: DB of {n:,} synthetic chunks ({n * _DIM.value * 4 / 2**20:.0f} "
            f"MiB of float32 embeddings) in {time.time() - t0:.0f} s",
            flush=True)
      for stage in ("index", "table"):
        cmd = [sys.executable, os.path.abspath(__file__), f"--stage={stage}",
               f"--db_dir={db_dir}", f"--index_kind={_INDEX_KIND.value}",
               f"--index_shard_chunks={_INDEX_SHARD.value}",
               f"--candidates={_CANDIDATES.value}",
               f"--workers={_WORKERS.value}",
               f"--recall_queries={_RECALL_QUERIES.value}"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
          sys.exit(f"{stage} at {scale}x failed:\n{done.stderr[-3000:]}")
        row = dict(json.loads(done.stdout.strip().splitlines()[-1]),
                   scale=scale, num_chunks=n)
        results.append(row)
        print(f"{scale}x {stage}: peak RSS {row['peak_mib']:.0f} MiB "
              f"(after imports {row['base_mib']:.0f} MiB; driver anonymous "
              f"{row['driver_anon_peak_mib']:.0f} MiB, file-mapped "
              f"{row['driver_file_peak_mib']:.0f} MiB; "
              f"{row['worker_processes']} processes below it (Beam workers "
              f"and their shells), {row['workers_peak_mib']:.0f} MiB "
              f"together), "
              f"{row['seconds']:.0f} s"
              + (f", recall@10 {row['recall_at_10']:.3f} over "
                 f"{row['index_shards']} index shards"
                 if stage == "index" else ""), flush=True)
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir, ignore_errors=True)
  ratios = {}
  for stage in ("index", "table"):
    rows = [r for r in results if r["stage"] == stage]
    lo, hi = rows[0], rows[-1]
    ratios[stage] = round(hi["peak_mib"] / lo["peak_mib"], 3)
    grew = (hi["peak_mib"] - hi["base_mib"]) - (lo["peak_mib"] - lo["base_mib"])
    print(f"{stage}: peak at {hi['scale']}x / peak at {lo['scale']}x = "
          f"{ratios[stage]:.3f} ({'within' if ratios[stage] <= 1.25 else 'ABOVE'}"
          f" 1.25); above the imports it grew by {grew:.0f} MiB")
  print(json.dumps({"runs": results, "ratio": ratios,
                    "db_shard_chunks": _DB_SHARD.value,
                    "index_shard_chunks": _INDEX_SHARD.value,
                    "index_kind": _INDEX_KIND.value,
                    "workers": _WORKERS.value}))


if __name__ == "__main__":
  app.run(main)
