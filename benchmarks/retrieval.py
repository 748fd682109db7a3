r"""Retrieval figures on a built DB: embedding speed, index build, search.

  python benchmarks/retrieval.py --db_dir=runs/stdlib/db \
      [--peer_python=$(bash benchmarks/peer/setup.sh --with-transformers \
                       | tail -n1)]

Prints, then one JSON line last:
- BERT embedding chunks/s on `--embed_chunks` DB chunks (compiled first), and
  with --peer_python the same chunks through PyTorch + transformers in that
  environment (benchmarks/peer/embed_bert_torch.py), with the ratio;
- for 25%, 50% and 100% of the DB: ScaNN build seconds, queries/s of ScaNN and
  of exact search (blocked matmul + partial sort), and ScaNN's recall@10
  against exact search on held-in queries, so the growth with DB size shows.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from retro_jax.corpus import vocab
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import index as indexlib
from retro_jax.retrieval.embedder import BertEmbedder

_DB_DIR = flags.DEFINE_string("db_dir", "runs/stdlib/db", "A finalized DB.")
_EMBED_CHUNKS = flags.DEFINE_integer("embed_chunks", 2000,
                                     "DB chunks embedded for the speed figure.")
_QUERIES = flags.DEFINE_integer("queries", 1000, "Held-in queries per size.")
_FRACTIONS = flags.DEFINE_list("fractions", ["0.25", "0.5", "1.0"],
                               "DB prefixes to index.")
_PEER_PYTHON = flags.DEFINE_string(
    "peer_python", "", "Python of an environment with torch + transformers "
    "(benchmarks/peer/setup.sh --with-transformers prints one); empty = ours "
    "alone.")
_BATCH = flags.DEFINE_integer("batch", 32, "Embedding batch size.")


def log(msg):
  print(msg, flush=True)


def embedding_figures(db, result):
  sp = vocab.load(os.path.join(_DB_DIR.value, "spm.model"))
  ids = np.linspace(0, len(db) - 1, min(_EMBED_CHUNKS.value, len(db)))
  texts = [db.chunk_text(int(i), sp) for i in ids.astype(np.int64)]
  embedder = BertEmbedder.load(batch_size=_BATCH.value)
  embedder.embed(texts)                       # Compiles every shape used.
  t0 = time.perf_counter()
  embedder.embed(texts)
  dt = time.perf_counter() - t0
  result["embed_chunks_per_s"] = round(len(texts) / dt, 2)
  result["embed_chunks"] = len(texts)
  log(f"embedding: {len(texts)} chunks in {dt:.1f} s = "
      f"{len(texts) / dt:.1f} chunks/s ({embedder.name})")
  if _PEER_PYTHON.value:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
      json.dump(texts, f)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer",
                          "embed_bert_torch.py")
    out = subprocess.run(
        [_PEER_PYTHON.value, script, f.name, embedder.model_dir,
         str(len(os.sched_getaffinity(0))), str(_BATCH.value)],
        check=True, capture_output=True, text=True)
    peer = json.loads(out.stdout.strip().splitlines()[-1])
    os.unlink(f.name)
    result["peer_embed_chunks_per_s"] = peer["chunks_per_s"]
    result["embed_speedup_vs_peer"] = round(
        result["embed_chunks_per_s"] / peer["chunks_per_s"], 3)
    log(f"peer embedding ({peer['impl']}): {peer['chunks_per_s']} chunks/s; "
        f"ratio {result['embed_speedup_vs_peer']}x")


def timed_search(searcher, queries, k):
  searcher.search(queries[:8], k)             # Warm up.
  t0 = time.perf_counter()
  ids, _ = searcher.search(queries, k)
  return ids, time.perf_counter() - t0


def index_figures(db, result):
  embeddings = db.embeddings()                # [n, D]
  rng = np.random.default_rng(0)
  rows = []
  for fraction in map(float, _FRACTIONS.value):
    n = int(round(len(embeddings) * fraction))
    data = np.ascontiguousarray(embeddings[:n])
    q = data[rng.choice(n, min(_QUERIES.value, n), replace=False)]
    t0 = time.perf_counter()
    scann = indexlib.build_index(data, kind="scann")
    build_s = time.perf_counter() - t0
    exact = indexlib.ExactSearcher(data)
    exact_ids, exact_s = timed_search(exact, q, 10)
    scann_ids, scann_s = timed_search(scann, q, 10)
    row = {"chunks": n, "scann_build_s": round(build_s, 2),
           "scann_qps": round(len(q) / scann_s, 1),
           "exact_qps": round(len(q) / exact_s, 1),
           "recall_at_10": round(indexlib.recall_at_k(scann_ids, exact_ids,
                                                      10), 4),
           "scann_params": str(scann.params)}
    rows.append(row)
    log(f"{n:>8,} chunks: ScaNN build {build_s:.1f} s, {row['scann_qps']:,.0f}"
        f" q/s vs exact {row['exact_qps']:,.0f} q/s, recall@10 "
        f"{row['recall_at_10']:.3f}")
  result["index"] = rows
  if len(rows) > 1:
    first, last = rows[0], rows[-1]
    result["growth"] = {
        "db_size_x": round(last["chunks"] / first["chunks"], 2),
        "exact_query_cost_x": round(first["exact_qps"] / last["exact_qps"], 2),
        "scann_query_cost_x": round(first["scann_qps"] / last["scann_qps"], 2),
    }


def main(argv):
  del argv
  db = dblib.RetrievalDB.open(_DB_DIR.value)
  result = {"db_chunks": len(db), "cores": len(os.sched_getaffinity(0))}
  log(f"DB {_DB_DIR.value}: {len(db):,} chunks, dim {db.dim}")
  embedding_figures(db, result)
  index_figures(db, result)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
