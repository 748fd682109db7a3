"""The DB build (retrieval.build_job, scripts/build_db.py) end to end on a
small slice of the standard library: real SentencePiece training, real BERT,
real index, then a query."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import build_job
from retro_jax.retrieval.embedder import BertEmbedder

MAX_BYTES = 40_000
TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")  # A run config.


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("build")
  db_dir = str(root / "db")
  embedder = BertEmbedder.load()
  lines = []
  summary = build_job.build_database(
      db_dir, lambda: build_job.documents("python_stdlib", MAX_BYTES),
      str(root / "spm.model"), embedder, vocab_size=512,
      spm_train_bytes=200_000, shard_chunks=100, log=lines.append)
  return db_dir, embedder, summary, lines


def test_summary_counts_match_the_db(built):
  db_dir, _, summary, lines = built
  db = dblib.RetrievalDB.open(db_dir)
  assert summary["num_chunks"] == len(db) > 100
  assert summary["recall_at_10"] == 1.0          # Exact index below 20k.
  manifest = json.load(open(os.path.join(db_dir, "manifest.json")))
  assert manifest["recall"]["recall_at_10"] == summary["recall_at_10"]
  assert manifest["index"]["kind"] == summary["index_kind"] == "exact"
  assert set(summary["seconds"]) >= {"vocabulary", "chunks", "embed",
                                     "finalize", "index", "recall"}
  assert any(line.startswith("index:") for line in lines)


def test_query_returns_the_chunk_itself_first(built):
  db_dir, embedder, _, _ = built
  db = dblib.RetrievalDB.open(db_dir)
  sp = build_job.vocab.load(os.path.join(db_dir, "spm.model"))
  rng = np.random.default_rng(0)
  for chunk_id in rng.choice(len(db), 3, replace=False):
    text = db.chunk_text(int(chunk_id), sp)
    hits = build_job.query(db_dir, text, embedder, k=3)
    assert len(hits) == 3
    assert hits[0]["text"] == text                # Its own chunk (or a twin).
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)


def test_rerun_resumes_without_rework(built):
  db_dir, embedder, summary, _ = built
  index_json = os.path.join(db_dir, "index", "index.json")
  saved_at = os.stat(index_json).st_mtime_ns

  def rerun():
    lines = []
    again = build_job.build_database(
        db_dir, lambda: build_job.documents("python_stdlib", MAX_BYTES),
        os.path.join(os.path.dirname(db_dir), "spm.model"), embedder,
        vocab_size=512, shard_chunks=100, log=lines.append)
    return again, lines

  again, lines = rerun()
  assert again["chunks"]["shards_written"] == 0
  assert again["embed"]["chunks_embedded"] == 0
  assert again["num_chunks"] == summary["num_chunks"]
  # The saved index serves the unchanged shards: not rebuilt.
  assert os.stat(index_json).st_mtime_ns == saved_at
  assert any(line.startswith("index: reusing the saved exact index")
             for line in lines)
  assert again["recall_at_10"] == summary["recall_at_10"]
  # A damaged index is rebuilt, not trusted.
  os.remove(index_json)
  again, lines = rerun()
  assert os.path.isfile(index_json)
  assert not any("reusing" in line for line in lines)
  assert build_job.open_for_queries(db_dir, embedder)[1].kind == "exact"


def test_unknown_stage_and_corpus_raise(built):
  db_dir, embedder, _, _ = built
  with pytest.raises(ValueError, match="unknown stages"):
    build_job.build_database(db_dir, lambda: [], "x.model", embedder,
                            stages=("chunks", "train"))
  with pytest.raises(ValueError, match="unknown corpus"):
    build_job.documents("wikipedia")


def test_empty_corpus_raises(tmp_path):
  with pytest.raises(ValueError, match="empty"):
    build_job.build_database(str(tmp_path / "db"), lambda: iter(()),
                            str(tmp_path / "spm.model"), embedder=None,
                            log=lambda _: None)


@pytest.mark.slow
def test_query_command_prints_neighbours(built):
  db_dir, _, _, _ = built
  out = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "scripts", "build_db.py"),
       "--config=" + TINY, f"--config.data.db_dir={db_dir}",
       "--query=def main():", "--k=2"],
      capture_output=True, text=True, cwd=REPO_ROOT, check=True,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  assert out.stdout.count("--- chunk") == 2, out.stdout[-2000:]


def test_run_config_db_fields_reach_the_build():
  """Every field of the run config's db section, and the data fields the
  build needs, are read by scripts/build_db.py."""
  spec = importlib.util.spec_from_file_location(
      "base_config", os.path.join(REPO_ROOT, "configs", "base.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  script = open(os.path.join(REPO_ROOT, "scripts", "build_db.py")).read()
  for field in config.db:
    assert f"db.{field}" in script, f"db.{field} is never read"
  for field in ("corpus", "spm_path", "db_dir"):
    assert f"data.{field}" in script, f"data.{field} is never read"


def test_build_vocabulary_defaults_beside_the_db():
  """No vocabulary given: the build trains one beside the DB directory (a
  rerun finds it); a given one is used as it is."""
  assert build_job.build_spm_path("", "runs/q/db") == os.path.abspath(
      "runs/q/spm.model")
  assert build_job.build_spm_path("my.model", "runs/q/db") == "my.model"


def _build_command(db_dir, *extra):
  return [sys.executable, os.path.join(REPO_ROOT, "scripts", "build_db.py"),
          "--config=" + TINY, f"--config.data.db_dir={db_dir}",
          "--config.db.max_bytes=100000", "--config.db.vocab_size=512",
          "--config.db.spm_train_bytes=150000",
          "--config.db.shard_chunks=40", *extra]


@pytest.mark.slow
def test_sigkill_mid_embedding_then_rerun_resumes(tmp_path):
  """A real `kill -9` of the build while it embeds: the DB refuses to open,
  and a rerun keeps the shards that were complete and embeds only the rest."""
  db_dir = str(tmp_path / "db")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  proc = subprocess.Popen(_build_command(db_dir), cwd=REPO_ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = os.path.join(db_dir, "shards", "shard-00000", "embeddings.json")
  deadline = time.time() + 300
  while not os.path.exists(first) and proc.poll() is None:
    assert time.time() < deadline, "the build never embedded a shard"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the build ended before the kill"

  shards = sorted(os.listdir(os.path.join(db_dir, "shards")))
  complete = [i for i, s in enumerate(shards) if os.path.exists(
      os.path.join(db_dir, "shards", s, "embeddings.json"))]
  assert 0 in complete and len(complete) < len(shards)
  with pytest.raises(dblib.IncompleteDBError, match="not a finalized"):
    dblib.RetrievalDB.open(db_dir)
  kept = {i: os.stat(os.path.join(db_dir, "shards", shards[i],
                                  "embeddings.npy")).st_mtime_ns
          for i in complete}

  out = subprocess.run(_build_command(db_dir), cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, check=True)
  summary = json.loads(out.stdout.split("summary: ", 1)[1])
  assert summary["chunks"]["shards_written"] == 0     # Stage 1 had finished.
  assert sorted(summary["embed"]["skipped"]) == complete
  assert sorted(summary["embed"]["embedded"]) == sorted(
      set(range(len(shards))) - set(complete))
  for i, mtime in kept.items():  # Complete shards were not redone.
    assert os.stat(os.path.join(db_dir, "shards", shards[i],
                                "embeddings.npy")).st_mtime_ns == mtime
  db = dblib.RetrievalDB.open(db_dir, verify=True)
  assert len(db) == summary["num_chunks"]
  assert not [f for _, _, files in os.walk(db_dir) for f in files
              if ".tmp." in f]                        # No leftovers.
