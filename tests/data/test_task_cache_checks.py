"""The RETRO Task's neighbour cache and its registration, on the session's
standard-library Task (tests/task_cache.py): a cache that is incomplete,
crashed, built for another spec or another vocabulary is refused naming the
file or field; the cache job's cache reads from every way a run registers
the Task, and from another filesystem."""

import os
import shutil

import numpy as np
import pytest
import seqio

from retro_jax.corpus import sources
from retro_jax.corpus import vocab
from retro_jax.data import cache_job
from retro_jax.data import preprocessors
from retro_jax.data import tasks

from task_cache import (K, MAX_BYTES, NAME, SEQ_LEN, SPLIT_BYTES, read_split,
                        register)


@pytest.fixture(scope="module")
def setup(stdlib_task):
  return stdlib_task


def test_incomplete_cache_is_refused(setup, tmp_path):
  src = cache_job.task_dir(NAME, setup["cache_dir"])
  for missing in ("COMPLETED",
                  os.path.basename(seqio.get_cached_stats_path(src, "train")),
                  "train.tfrecord-00000-of-00001"):
    broken = tmp_path / missing.replace(".", "_")
    shutil.copytree(src, cache_job.task_dir(NAME, str(broken)))
    os.remove(os.path.join(cache_job.task_dir(NAME, str(broken)), missing))
    with pytest.raises(cache_job.IncompleteCacheError) as e:
      next(tasks.batches(NAME, "train", batch_size=2, cache_dir=str(broken)))
    assert cache_job.task_dir(NAME, str(broken)) in str(e.value)
    assert "scripts/cache_tasks.py" in str(e.value)
  with pytest.raises(cache_job.IncompleteCacheError, match="does not exist"):
    next(tasks.batches(NAME, "train", batch_size=2,
                       cache_dir=str(tmp_path / "never")))


def test_crashed_cache_job_leaves_no_complete_cache(setup, tmp_path):
  import zstandard
  lines = b"".join(b'{"text": "def f%d(x):\\n    return x * %d\\n" , '
                   b'"meta": {"pile_set_name": "Github"}}\n' % (i, i)
                   for i in range(3000))
  data = zstandard.ZstdCompressor().compress(lines)
  path = tmp_path / "cut.jsonl.zst"
  path.write_bytes(data[:len(data) // 2])      # A truncated download.
  tasks.register_retro_task(
      "retro_test_cut", corpus=f"jsonl:{path}", spm_path=setup["spm_path"],
      db_dir=setup["db_dir"], seq_len=SEQ_LEN, num_neighbours=K,
      max_bytes={"train": 0})
  cache_dir = str(tmp_path / "cache")
  with pytest.raises(Exception, match="cut.jsonl.zst"):
    tasks.cache_task("retro_test_cut", cache_dir, log=lambda _: None)
  directory = cache_job.task_dir("retro_test_cut", cache_dir)
  assert not os.path.exists(os.path.join(directory, "COMPLETED"))
  with pytest.raises(cache_job.IncompleteCacheError, match="did not finish"):
    next(tasks.batches("retro_test_cut", "train", batch_size=2,
                       cache_dir=cache_dir))


def test_vocabulary_not_matching_the_db_names_the_file(setup, tmp_path):
  other = str(tmp_path / "other.model")
  vocab.train([d.text for d in sources.python_stdlib(max_bytes=100_000)],
              other, vocab_size=600)
  with pytest.raises(ValueError, match="other.model"):
    tasks.register_retro_task(
        "retro_test_other_vocab", corpus="python_stdlib", spm_path=other,
        db_dir=setup["db_dir"], seq_len=SEQ_LEN, num_neighbours=K,
        max_bytes=SPLIT_BYTES)


def test_registering_twice_replaces(setup):
  again = register(setup["spm_path"], setup["db_dir"])
  assert seqio.get_mixture_or_task(NAME) is again
  batch = next(tasks.batches(NAME, "train", batch_size=2,
                             cache_dir=setup["cache_dir"]))  # Still valid.
  assert batch["tokens"].shape == (2, SEQ_LEN)
  with pytest.raises(ValueError, match="multiple of the chunk size"):
    tasks.register_retro_task(
        NAME, corpus="python_stdlib", spm_path=setup["spm_path"],
        db_dir=setup["db_dir"], seq_len=100, num_neighbours=K,
        max_bytes=SPLIT_BYTES)


def test_readers_match_the_cache_job_whatever_splits_and_paths(
    setup, tmp_path, monkeypatch):
  """Training and evaluation register the Task without retrieval settings,
  with the DB's copy of the vocabulary and a DB path spelled differently:
  the cache job's cache reads; a record of an earlier version (one
  max_bytes, per-split overrides, the Task's splits, the DB path as given)
  still reads; another meta filter is refused, naming the field."""
  import json
  monkeypatch.chdir(setup["root"])
  spec = dict(seqio.get_mixture_or_task(NAME).spec)
  assert os.path.exists(os.path.join(setup["db_dir"], "spm.model"))
  try:
    task = tasks.register_for_reading(
        NAME, corpus="python_stdlib", db_dir="./db//", seq_len=SEQ_LEN,
        num_neighbours=K, max_bytes=SPLIT_BYTES, meta={})
    assert task.spec == spec
    batch = next(tasks.batches(NAME, "validation", batch_size=2,
                               cache_dir=setup["cache_dir"]))
    assert batch["neighbours"].shape == (2, SEQ_LEN // 64, K, 128)
    # Only the train split, other retrieval settings: train still reads.
    tasks.register_retro_task(
        NAME, corpus="python_stdlib", spm_path=setup["spm_path"],
        db_dir="db", seq_len=SEQ_LEN, num_neighbours=K,
        max_bytes={"train": MAX_BYTES}, retrieval_batch=3, embed_batch=5)
    assert cache_job.require_complete(
        NAME, setup["cache_dir"], ("train",),
        seqio.get_mixture_or_task(NAME).spec)
    # A record of an earlier version.
    old = cache_job.task_dir(NAME, str(tmp_path))
    shutil.copytree(cache_job.task_dir(NAME, setup["cache_dir"]), old)
    record_path = os.path.join(old, cache_job.RETRO_TASK)
    record = json.load(open(record_path))
    record["spec"].update(splits=["train", "validation"], db_dir="db",
                          max_bytes=MAX_BYTES,
                          split_max_bytes={"validation": MAX_BYTES})
    json.dump(record, open(record_path, "w"))
    register(setup["spm_path"], setup["db_dir"])
    assert tasks.cache_task(NAME, str(tmp_path), log=lambda _: None)[
        "skipped"]
    tasks.register_for_reading(
        NAME, corpus="python_stdlib", db_dir=setup["db_dir"],
        seq_len=SEQ_LEN, num_neighbours=K, max_bytes=SPLIT_BYTES,
        meta={"pile_set_name": "ArXiv"})
    with pytest.raises(cache_job.IncompleteCacheError, match="meta_filter"):
      next(tasks.batches(NAME, "validation", batch_size=2,
                         cache_dir=setup["cache_dir"]))
  finally:
    register(setup["spm_path"], setup["db_dir"])


def test_a_cache_on_another_filesystem_reads_through_gfile(setup):
  """The cache copied to TF's in-memory filesystem (as to gs://) checks,
  reads and is reused like the local one."""
  import tensorflow as tf
  src = cache_job.task_dir(NAME, setup["cache_dir"])
  root = f"ram://retro_test_{os.getpid()}/cache"
  dst = cache_job.task_dir(NAME, root)
  tf.io.gfile.makedirs(dst)
  try:
    for fname in os.listdir(src):
      tf.io.gfile.copy(os.path.join(src, fname), f"{dst}/{fname}")
    assert tasks.cache_task(NAME, root, log=lambda _: None)["skipped"]
    remote = list(tasks.batches(NAME, "validation", batch_size=8,
                                cache_dir=root, shuffle=False, repeat=False,
                                with_doc_ids=True))
    local = read_split(setup["cache_dir"], "validation")
    for key in local:
      np.testing.assert_array_equal(
          np.concatenate([r[key] for r in remote]), local[key])
  finally:
    tf.io.gfile.rmtree(f"ram://retro_test_{os.getpid()}")


def test_max_bytes_limits_each_split_and_is_part_of_its_identity(setup):
  """A split's limit reads that much text of that split only; a reader with
  another validation limit is refused the validation cache, naming the
  field, and still reads the train cache."""
  def text_bytes(split, **limits):
    source = preprocessors.split_source(
        split, "python_stdlib",
        dict(dict(train=60_000, validation=60_000), **limits), {})
    return sum(len(d.text) for d in sources.source_documents(source))

  small = text_bytes("validation", validation=5_000)
  assert 5_000 <= small < text_bytes("validation")
  assert text_bytes("train", validation=5_000) == text_bytes("train")
  try:
    tasks.register_for_reading(
        NAME, corpus="python_stdlib", db_dir=setup["db_dir"],
        seq_len=SEQ_LEN, num_neighbours=K,
        max_bytes={"train": MAX_BYTES, "validation": 5_000})
    with pytest.raises(cache_job.IncompleteCacheError, match="max_bytes"):
      next(tasks.batches(NAME, "validation", batch_size=2,
                         cache_dir=setup["cache_dir"]))
    batch = next(tasks.batches(NAME, "train", batch_size=2,
                               cache_dir=setup["cache_dir"]))
    assert batch["tokens"].shape == (2, SEQ_LEN)
  finally:
    register(setup["spm_path"], setup["db_dir"])


def test_a_run_config_registers_the_task_its_cache_was_built_for(setup):
  """Training and evaluation register a run's Task from its config
  (`register_run_task`): the same spec the cache job recorded, so the run
  reads the cache (`batches` refuses a cache built for another spec)."""
  from retro_jax.training import run_config  # pylint: disable=g-import-not-at-top
  config = run_config.base_config()
  config.data.update(dict(task_name=NAME, corpus="python_stdlib",
                          db_dir=setup["db_dir"], spm_path=setup["spm_path"]))
  config.data.max_bytes.update(SPLIT_BYTES)
  config.train.seq_len, config.model.num_neighbours = SEQ_LEN, K
  task = tasks.register_run_task(config)
  assert task.spec == setup["task"].spec
  batch = next(iter(tasks.batches(NAME, "train", batch_size=2,
                                  cache_dir=setup["cache_dir"])))
  assert batch["neighbours"].shape == (2, SEQ_LEN // 64, K, 128)


def test_a_training_split_outside_the_db_is_refused_naming_both(setup):
  """The cache job's registration from a run config insists that the
  training split is the DB's training part: every training chunk must be
  a DB chunk."""
  from retro_jax.training import run_config  # pylint: disable=g-import-not-at-top
  config = run_config.base_config()
  config.data.update(dict(task_name="retro_test_outside",
                          corpus="python_stdlib", db_dir=setup["db_dir"],
                          spm_path=setup["spm_path"]))
  config.data.max_bytes.update(dict(train=2 * MAX_BYTES, validation=0))
  config.train.seq_len, config.model.num_neighbours = SEQ_LEN, K
  with pytest.raises(ValueError, match="not the text of the DB") as e:
    tasks.register_from_config(config)
  assert "40000" in str(e.value) and "20000" in str(e.value)
