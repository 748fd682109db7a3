r"""Builds the retrieval DB of a run config, or queries one.

Build (resumes from complete shards when rerun):
  python scripts/build_db.py --config=configs/quickstart.py

The DB holds the training split of config.data.corpus (the text the Task
trains on: data.split, data.max_bytes.<split>, data.meta), then any extra
text named by config.db.extra, in config.data.db_dir. The vocabulary is config.data.spm_path; when that is ""
one of config.db.vocab_size pieces is trained on config.db.spm_train_bytes
of text at <db_dir>/../spm.model (kept there, and reused by a rerun), and
the DB keeps a copy in <db_dir>/spm.model, which every reader of
spm_path "" uses.

Stages, in order (--stage runs one; a rerun resumes each):
  chunks   vocabulary and 64-token chunk shards
  embed    BERT over every chunk, once: a Beam pipeline over the shards
  index    finalize the DB, build config.db.index_shard_chunks-chunk index
           shards, measure recall@10
  table    the neighbour table (config.db.table_candidates per chunk): a
           Beam pipeline
The Beam stages run on config.db.workers workers of config.db.runner:
Beam's FnApiRunner on this machine (worker processes when workers > 1),
or DataflowRunner on Google Cloud, e.g.
  python scripts/build_db.py --config=configs/quickstart.py \
      --config.db.workers=4

Inspect what the DB returns for a text:
  python scripts/build_db.py --config=configs/quickstart.py \
      --query="def read_csv(path):"
"""

import json
import resource

from absl import flags
from absl import logging
from ml_collections import config_flags

from retro_jax.core import cli
from retro_jax.core import host_memory
from retro_jax.retrieval import attribution
from retro_jax.retrieval import build_job
from retro_jax.retrieval.embedder import BertEmbedder

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file (configs/*.py): its data and db "
    "sections.", lock_config=True)
_STAGE = flags.DEFINE_enum("stage", "all", ["all", *build_job.STAGES],
                           "Which stage to run.")
_QUERY = flags.DEFINE_string("query", "", "Print the DB chunks nearest to "
                             "this text instead of building.")
_K = flags.DEFINE_integer("k", 5, "Neighbours printed by --query.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:    # Progress goes to stdout; -v 0
    logging.set_verbosity(logging.WARNING)   # shows JAX's INFO logs.
  if _STAGE.value in ("all", "embed"):
    # BERT's step reuses its freed temporaries; the index and table stages
    # do not run XLA, and a heap that is never trimmed would keep every
    # index shard's freed buffers (their peak memory would grow with the
    # number of shards, not stay at one shard's).
    host_memory.keep_freed_memory()  # Before the XLA backend starts.
  config = _CONFIG.value
  data, db = config.data, config.db
  if not data.db_dir:
    cli.fail("config.data.db_dir is empty: set it (e.g. "
             "--config.data.db_dir=runs/db)", status=2)
  if db.workers < 1:
    cli.fail(f"--config.db.workers={db.workers}: Beam workers must be >= 1",
             status=2)
  if _QUERY.value:
    embedder = BertEmbedder.load(db.embedder or None,
                                 batch_size=db.embed_batch)
    for hit in build_job.query(data.db_dir, _QUERY.value, embedder,
                               k=_K.value):
      # "--- chunk 812 · stdlib:json/decoder.py (document 4071), squared L2
      # 0.410": the hit's source document, "source unknown" for a DB built
      # before attribution.
      print(f"--- {attribution.describe_hit(hit['id'], hit['document'])}, "
            f"squared L2 {hit['distance']:.3f}\n{hit['text']}")
    return
  summary = build_job.build_database(
      data.db_dir, build_job.db_sources(config),
      build_job.build_spm_path(data.spm_path, data.db_dir), db.embedder,
      stages=build_job.STAGES if _STAGE.value == "all" else (_STAGE.value,),
      vocab_size=db.vocab_size, spm_train_bytes=db.spm_train_bytes,
      shard_chunks=db.shard_chunks, embed_batch=db.embed_batch,
      index_kind=db.index, index_shard_chunks=db.index_shard_chunks,
      recall_queries=db.recall_queries,
      table_candidates=db.table_candidates, workers=db.workers,
      runner=db.runner)
  # ru_maxrss is in KiB on Linux.
  summary["peak_rss_mb"] = round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  print("summary: " + json.dumps(summary, default=str))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)  # Bad input (a corpus line, a file): one line, status 1.
