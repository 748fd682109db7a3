"""The DB build's Beam pipelines (retrieval.beam_jobs): options per runner,
the embedding stage in process and resumed, and the whole build with 1 and
2 worker processes giving byte-identical shards and neighbour table.

The BERT here is all-MiniLM-L6-v2 cut to its first layer (`tiny_bert`): a
real checkpoint directory, loaded by path in every worker as in a real
build, at a sixth of the cost.
"""

import hashlib
import json
import os
import shutil

import pytest
import safetensors.numpy

from retro_jax.corpus import sources
from retro_jax.corpus import vocab
from retro_jax.retrieval import beam_jobs
from retro_jax.retrieval import build_job
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import embedder as embedder_lib

MAX_BYTES = 40_000        # About 450 chunks of the standard library.
SHARD_CHUNKS = 40         # About 10 DB shards.
INDEX_SHARD_CHUNKS = 150  # 4 index shards.
# Fields that record when, not what.
TIMESTAMPS = ("finalized", "started", "finished", "created", "seconds")


def make_tiny_bert(directory: str) -> str:
  """A one-layer BERT checkpoint: MiniLM's embeddings and first layer, its
  tokenizer. Returns the directory."""
  src = embedder_lib.default_model_dir()
  os.makedirs(directory, exist_ok=True)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
    shutil.copy(os.path.join(src, name), directory)
  with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
    config = dict(json.load(f), num_hidden_layers=1)
  with open(os.path.join(directory, "config.json"), "w",
            encoding="utf-8") as f:
    json.dump(config, f)
  tensors = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
  safetensors.numpy.save_file(
      {k: v for k, v in tensors.items()
       if not k.startswith("encoder.layer.") or k.startswith("encoder.layer.0.")},
      os.path.join(directory, "model.safetensors"))
  return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """(root, tiny BERT path, vocabulary path, DB parts)."""
  root = tmp_path_factory.mktemp("beam")
  bert = make_tiny_bert(str(root / "bert-l1"))
  spm_path = str(root / "spm.model")
  vocab.train([d.text for d in sources.python_stdlib(max_bytes=150_000)],
              spm_path, vocab_size=512)
  parts = {"train": sources.text_source("python_stdlib", "train", MAX_BYTES)}
  return root, bert, spm_path, parts


def _build(corpus, name, stages=build_job.STAGES, **kw):
  root, bert, spm_path, parts = corpus
  lines = []
  summary = build_job.build_database(
      str(root / name), parts, spm_path, bert, stages=stages,
      shard_chunks=SHARD_CHUNKS, index_shard_chunks=INDEX_SHARD_CHUNKS,
      table_candidates=8, recall_queries=50, log=lines.append, **kw)
  return str(root / name), summary, lines


def test_pipeline_options_per_runner():
  def view(options):
    return {k: v for k, v in options.get_all_options().items()
            if k in ("runner", "direct_running_mode", "direct_num_workers",
                     "num_workers")}
  assert view(beam_jobs.pipeline_options(1)) == {
      "runner": "FnApiRunner", "direct_running_mode": "in_memory",
      "direct_num_workers": 1, "num_workers": None}
  assert view(beam_jobs.pipeline_options(3)) == {
      "runner": "FnApiRunner", "direct_running_mode": "multi_processing",
      "direct_num_workers": 3, "num_workers": None}
  # Other runners pass through, with the worker count of WorkerOptions.
  options = beam_jobs.pipeline_options(
      4, "DataflowRunner", ["--project=p", "--region=r"])
  assert view(options)["runner"] == "DataflowRunner"
  assert view(options)["num_workers"] == 4
  assert options.get_all_options()["project"] == "p"
  with pytest.raises(ValueError, match="workers"):
    beam_jobs.pipeline_options(0)


def test_embedder_spec_is_a_path():
  """Workers get a checkpoint path, never the driver's object."""
  assert beam_jobs.embedder_spec("") is None
  assert beam_jobs.embedder_spec(None) is None
  assert beam_jobs.embedder_spec("/ckpt/bert") == "/ckpt/bert"

  class Loaded:  # What the spec reads of a loaded BertEmbedder.
    name = embedder_lib.DEFAULT_NAME
    model_dir = embedder_lib.default_model_dir()
  assert beam_jobs.embedder_spec(Loaded()) is None
  Loaded.name, Loaded.model_dir = "bert-l1", "/ckpt/bert-l1"
  assert beam_jobs.embedder_spec(Loaded()) == "/ckpt/bert-l1"


def test_embed_pipeline_in_process_then_rerun_skips(corpus):
  db_dir, summary, _ = _build(corpus, "in_process", stages=("chunks",))
  shards = summary["chunks"]["num_shards"]
  assert shards >= 5
  # Two shards lose their embeddings record: a rerun redoes only those.
  lines = []
  first = beam_jobs.embed_pipeline(db_dir, corpus[1], 32, log=lines.append)
  assert first["embedded"] == list(range(shards))
  assert first["chunks_embedded"] == summary["chunks"]["num_chunks"]
  assert first["workers"] == {f"{os.uname().nodename}:{os.getpid()}": shards}
  assert first["chunks_per_s"] > 0
  for i in (1, 3):
    os.remove(os.path.join(db_dir, "shards", f"shard-{i:05d}",
                           "embeddings.json"))
  again = beam_jobs.embed_pipeline(db_dir, corpus[1], 32, log=lines.append)
  assert again["embedded"] == [1, 3]
  assert again["skipped"] == [i for i in range(shards) if i not in (1, 3)]
  done = beam_jobs.embed_pipeline(db_dir, corpus[1], 32, log=lines.append)
  assert done["embedded"] == [] and done["chunks_embedded"] == 0
  assert lines[-1].endswith("nothing to do")
  assert len(dblib.finalize(db_dir)["shards"]) == shards


def _data_files(db_dir):
  """{relative path: sha256} of every .npy under shards/ and table/."""
  out = {}
  for sub in ("shards", "table"):
    for root, _, names in os.walk(os.path.join(db_dir, sub)):
      for name in names:
        if name.endswith(".npy"):
          path = os.path.join(root, name)
          with open(path, "rb") as f:
            out[os.path.relpath(path, db_dir)] = hashlib.sha256(
                f.read()).hexdigest()
  return out


def _without_timestamps(value):
  if isinstance(value, dict):
    return {k: _without_timestamps(v) for k, v in value.items()
            if k not in TIMESTAMPS}
  if isinstance(value, list):
    return [_without_timestamps(v) for v in value]
  return value


def _json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow   # Two builds; each worker process loads Beam, JAX, BERT.
def test_two_worker_processes_build_the_same_db_and_table(corpus):
  one, s1, _ = _build(corpus, "one_worker", workers=1)
  two, s2, _ = _build(corpus, "two_workers", workers=2)
  # Multi-processing really used two worker processes, neither this one.
  me = f"{os.uname().nodename}:{os.getpid()}"
  for stage in ("embed", "table"):
    assert list(s1[stage]["workers"]) == [me], stage
    assert len(s2[stage]["workers"]) == 2 and me not in s2[stage]["workers"]
  assert sum(s2["embed"]["workers"].values()) == s2["chunks"]["num_shards"]
  assert s2["index_shards"] == -(-s2["num_chunks"] // INDEX_SHARD_CHUNKS) > 1

  files_one, files_two = _data_files(one), _data_files(two)
  assert len([p for p in files_one if p.startswith("table")]) >= 1
  assert len([p for p in files_one if p.startswith("shards")]) == (
      3 * s1["chunks"]["num_shards"])
  assert files_one == files_two
  for name in ("manifest.json", "build.json", os.path.join("table",
                                                           "table.json")):
    a, b = _json(os.path.join(one, name)), _json(os.path.join(two, name))
    assert _without_timestamps(a) == _without_timestamps(b), name
