"""The DB build (retrieval.build_job, scripts/build_db.py) end to end on a
small slice of the standard library: real SentencePiece training, a real
BERT checkpoint loaded by path (MiniLM's first layer, `make_tiny_bert`),
index shards, the neighbour table, then a query; a rerun that redoes
nothing, and one that redoes only what was removed."""

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
from retro_jax.corpus import sources
from retro_jax.retrieval import build_job
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval.embedder import BertEmbedder
from test_beam_jobs import make_tiny_bert  # pylint: disable=g-bad-import-order

MAX_BYTES = 40_000
TINY = os.path.join(REPO_ROOT, "configs", "tiny.py")  # A run config.
PARTS = {"train": sources.text_source("python_stdlib", "train", MAX_BYTES)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("build")
  bert = make_tiny_bert(str(root / "bert-l1"))
  db_dir = str(root / "db")
  lines = []
  summary = build_job.build_database(
      db_dir, PARTS, str(root / "spm.model"), bert, vocab_size=512,
      spm_train_bytes=200_000, shard_chunks=100, index_shard_chunks=200,
      table_candidates=8, log=lines.append)
  return db_dir, bert, summary, lines


def _rerun(db_dir, bert, stages=build_job.STAGES):
  lines = []
  summary = build_job.build_database(
      db_dir, PARTS, os.path.join(os.path.dirname(db_dir), "spm.model"),
      bert, stages=stages, vocab_size=512, shard_chunks=100,
      index_shard_chunks=200, table_candidates=8, log=lines.append)
  return summary, lines


def test_summary_counts_match_the_db(built):
  db_dir, _, summary, lines = built
  db = dblib.RetrievalDB.open(db_dir)
  assert summary["num_chunks"] == len(db) > 200
  assert summary["recall_at_10"] == 1.0          # Exact index shards.
  assert summary["index_shards"] == -(-len(db) // 200)
  manifest = json.load(open(os.path.join(db_dir, "manifest.json")))
  assert manifest["recall"]["recall_at_10"] == summary["recall_at_10"]
  assert manifest["index"]["kind"] == summary["index_kind"] == "exact"
  assert manifest["index"]["shards"] == summary["index_shards"]
  assert summary["table"]["num_chunks"] == len(db)
  assert summary["table"]["candidates"] == 8
  assert set(summary["seconds"]) == {"vocabulary", "chunks", "embed",
                                     "finalize", "index", "table"}
  assert any(line.startswith("index:") for line in lines)
  assert lines[-1].startswith("seconds per stage: vocabulary")


def test_query_returns_the_chunk_itself_first(built):
  db_dir, bert, _, _ = built
  embedder = BertEmbedder.load(bert)
  db = dblib.RetrievalDB.open(db_dir)
  sp = build_job.vocab.load(os.path.join(db_dir, "spm.model"))
  rng = np.random.default_rng(0)
  for chunk_id in rng.choice(len(db), 3, replace=False):
    text = db.chunk_text(int(chunk_id), sp)
    hits = build_job.query(db_dir, text, embedder, k=3)
    assert len(hits) == 3
    assert hits[0]["text"] == text                # Its own chunk (or a twin).
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)


def _mtimes(db_dir, sub):
  root = os.path.join(db_dir, sub)
  return {os.path.join(r, n): os.stat(os.path.join(r, n)).st_mtime_ns
          for r, _, names in os.walk(root) for n in names}


def test_rerun_resumes_without_rework(built):
  db_dir, bert, summary, _ = built
  before = {sub: _mtimes(db_dir, sub) for sub in ("shards", "index", "table")}
  again, lines = _rerun(db_dir, bert)
  assert again["chunks"]["shards_written"] == 0
  assert again["embed"]["chunks_embedded"] == 0
  assert again["num_chunks"] == summary["num_chunks"]
  assert again["recall_at_10"] == summary["recall_at_10"]
  assert again["table"]["table_shards_merged"] == 0
  assert any(line.startswith("index: reusing") for line in lines)
  assert any("nothing to do" in line and line.startswith("table:")
             for line in lines)
  # Nothing was rewritten.
  for sub in ("shards", "index", "table"):
    assert _mtimes(db_dir, sub) == before[sub], sub

  # A table shard lost: the table stage merges that one alone.
  record = os.path.join(db_dir, "table", "shard-00001", "record.json")
  os.remove(record)
  kept = {p: t for p, t in before["table"].items()
          if "shard-00001" not in p and not p.endswith("table.json")}
  again, _ = _rerun(db_dir, bert, stages=("table",))
  assert again["table"]["table_shards_merged"] == 1
  assert os.path.isfile(record)
  now = _mtimes(db_dir, "table")
  assert {p: now[p] for p in kept} == kept
  assert build_job.open_for_queries(db_dir, BertEmbedder.load(bert))[1].n == (
      summary["num_chunks"])


def test_unknown_stage_raises(built):
  db_dir, bert, _, _ = built
  with pytest.raises(ValueError, match="unknown stages"):
    build_job.build_database(db_dir, PARTS, "x.model", bert,
                             stages=("chunks", "train"))


def test_empty_corpus_raises(tmp_path):
  empty = {"train": sources.text_source("textdir:" + str(tmp_path), None, 0)}
  with pytest.raises(ValueError, match="empty"):
    build_job.build_database(str(tmp_path / "db"), empty,
                             str(tmp_path / "spm.model"), embedder=None,
                             log=lambda _: None)


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
  assert "--stage=embed --shard" not in script     # Beam spreads the shards.


def test_build_vocabulary_defaults_beside_the_db():
  """No vocabulary given: the build trains one beside the DB directory (a
  rerun finds it); a given one is used as it is."""
  assert build_job.build_spm_path("", "runs/q/db") == os.path.abspath(
      "runs/q/spm.model")
  assert build_job.build_spm_path("my.model", "runs/q/db") == "my.model"


def _script(*args):
  return [sys.executable, os.path.join(REPO_ROOT, "scripts", "build_db.py"),
          "--config=" + TINY, *args]


def test_bad_input_is_one_line(tmp_path):
  """A bad flag or setting: one line on stderr naming it, exit status 2
  (the interpreters start at once)."""
  db = f"--config.data.db_dir={tmp_path / 'db'}"
  cases = {
      "--config.db.workers=many": [db, "--config.db.workers=many"],
      "--config.db.workers=0": [db, "--config.db.workers=0"],
      "--stage=embedd": [db, "--stage=embedd"],
      "shard": [db, "--shard=1"],                # The removed flags.
      "db_dir is empty": [],
  }
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  procs = {want: subprocess.Popen(_script(*args), cwd=REPO_ROOT, env=env,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for want, args in cases.items()}
  for want, proc in procs.items():
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (want, err[-2000:])
    assert "error" in lines[0] and want in lines[0], (want, lines)
  assert not os.path.exists(tmp_path / "db")


@pytest.mark.slow
def test_query_command_prints_neighbours(built):
  db_dir, bert, _, _ = built
  out = subprocess.run(
      _script(f"--config.data.db_dir={db_dir}",
              f"--config.db.embedder={bert}", "--query=def main():", "--k=2"),
      capture_output=True, text=True, cwd=REPO_ROOT, check=True,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  assert out.stdout.count("--- chunk") == 2, out.stdout[-2000:]


def _build_command(db_dir, *extra):
  return _script(f"--config.data.db_dir={db_dir}",
                 "--config.data.max_bytes.train=100000",
                 "--config.db.vocab_size=512",
                 "--config.db.spm_train_bytes=150000",
                 "--config.db.shard_chunks=40", *extra)


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
