"""A small real RETRO Task with its neighbour cache, built once per session.

A slice of the standard library: a freshly trained SentencePiece model, a
real DB over the training split (real MiniLM, exact index, neighbour table)
and the neighbour precompute in Beam (FnApiRunner): table lookups for the
training split, BERT for held-out text. About a minute on 2 CPU cores, so
`tests/conftest.py` offers it as one session fixture, `stdlib_task`, to the
Task tests (tests/data/test_tasks.py, tests/data/test_task_cache_checks.py)
and to the training runs that read it
(tests/training/test_multiprocess.py). Nothing may write into it: a test
that needs a broken cache copies it first.
"""

import numpy as np

from retro_jax.corpus import sources
from retro_jax.corpus import vocab
from retro_jax.data import tasks
from retro_jax.retrieval import build_job
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval.embedder import BertEmbedder

MAX_BYTES = 20_000     # Per Task split; the DB holds the training split.
SPLIT_BYTES = {"train": MAX_BYTES, "validation": MAX_BYTES}
SEQ_LEN = 256
K = 2
VOCAB_SIZE = 512
NAME = "retro_test_stdlib"


def build(root) -> dict:
  """Builds the DB and the cache under `root`; returns what tests read:
  root, db_dir, spm_path, cache_dir, task (registered as NAME), embedder,
  summary and log lines of the cache job, db (opened), sp (the vocabulary).
  """
  db_dir, spm_path = str(root / "db"), str(root / "spm.model")
  embedder = BertEmbedder.load()
  vocab.train([d.text for d in sources.python_stdlib(max_bytes=150_000)],
              spm_path, vocab_size=VOCAB_SIZE)
  build_job.build_database(
      db_dir, {"train": sources.text_source("python_stdlib", "train",
                                            MAX_BYTES)},
      spm_path, embedder, shard_chunks=100, log=lambda _: None)
  task = register(spm_path, db_dir)
  cache_dir = str(root / "cache")
  lines = []
  summary = tasks.cache_task(NAME, cache_dir, log=lines.append)
  return dict(root=root, db_dir=db_dir, spm_path=spm_path, task=task,
              embedder=embedder, cache_dir=cache_dir, summary=summary,
              lines=lines, db=dblib.RetrievalDB.open(db_dir),
              sp=vocab.load(spm_path))


def register(spm_path: str, db_dir: str):
  """Registers NAME as the cache job does (tests that register it otherwise
  call this again when they end)."""
  return tasks.register_retro_task(
      NAME, corpus="python_stdlib", spm_path=spm_path, db_dir=db_dir,
      seq_len=SEQ_LEN, num_neighbours=K, max_bytes=SPLIT_BYTES,
      retrieval_batch=16)


def read_split(cache_dir: str, split: str, **kw) -> dict:
  """Every example of a cached split, once, in file order, with doc ids."""
  rows = list(tasks.batches(NAME, split, batch_size=8, cache_dir=cache_dir,
                            shuffle=False, repeat=False, with_doc_ids=True,
                            **kw))
  return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def training_flags(task: dict) -> list:
  """scripts/train.py flags that train on this Task's training split."""
  return ["--config.data.source=task", f"--config.data.task_name={NAME}",
          "--config.data.corpus=python_stdlib",
          f"--config.data.max_bytes.train={MAX_BYTES}",
          f"--config.data.max_bytes.validation={MAX_BYTES}",
          f"--config.data.db_dir={task['db_dir']}",
          f"--config.data.spm_path={task['spm_path']}",
          f"--config.data.cache_dir={task['cache_dir']}",
          f"--config.train.seq_len={SEQ_LEN}",
          f"--config.model.num_neighbours={K}",
          f"--config.model.vocab_size={VOCAB_SIZE}"]
