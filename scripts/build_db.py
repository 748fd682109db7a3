r"""Builds the retrieval DB, or queries one.

Build (resumes from complete shards when rerun):
  python scripts/build_db.py --config=configs/db_stdlib.py --db_dir=runs/db

Across machines: --stage=chunks once, then --stage=embed --shard=i
--num_shards=N on every worker, then --stage=index once.

Inspect what the DB returns for a text:
  python scripts/build_db.py --db_dir=runs/db --query="def read_csv(path):"
"""

import json
import os
import resource

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retro_jax.core import host_memory
from retro_jax.retrieval import build_job as pipeline
from retro_jax.retrieval.embedder import BertEmbedder

_CONFIG = config_flags.DEFINE_config_file("config", "configs/db_stdlib.py",
                                          "DB build config file.")
_DB_DIR = flags.DEFINE_string("db_dir", "runs/db", "The DB directory.")
_STAGE = flags.DEFINE_enum("stage", "all", ["all", *pipeline.STAGES],
                           "Which stage to run.")
_SHARD = flags.DEFINE_integer("shard", 0, "This worker (embed stage).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Workers (embed stage).")
_QUERY = flags.DEFINE_string("query", "", "Print the DB chunks nearest to "
                             "this text instead of building.")
_K = flags.DEFINE_integer("k", 5, "Neighbours printed by --query.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:    # Progress goes to stdout; -v 0
    logging.set_verbosity(logging.WARNING)   # shows JAX's INFO logs.
  host_memory.keep_freed_memory()  # Before the XLA backend starts.
  config, db_dir = _CONFIG.value, _DB_DIR.value
  embedder = BertEmbedder.load(config.embedder or None,
                               batch_size=config.embed_batch)
  if _QUERY.value:
    for hit in pipeline.query(db_dir, _QUERY.value, embedder, k=_K.value):
      print(f"--- chunk {hit['id']} (document {hit['doc_id']}), squared L2 "
            f"{hit['distance']:.3f}\n{hit['text']}")
    return
  spm_path = config.spm_model or os.path.join(
      os.path.dirname(os.path.abspath(db_dir)), "spm.model")
  skipped = {}   # Files the corpus reader skipped, by reason.
  summary = pipeline.build_database(
      db_dir,
      lambda: pipeline.documents(config.corpus, config.max_bytes or None,
                                 skipped=skipped),
      spm_path, embedder,
      stages=pipeline.STAGES if _STAGE.value == "all" else (_STAGE.value,),
      vocab_size=config.vocab_size, spm_train_bytes=config.spm_train_bytes,
      shard_chunks=config.shard_chunks, shard_index=_SHARD.value,
      num_shards=_NUM_SHARDS.value, index_kind=config.index,
      recall_queries=config.recall_queries)
  summary["corpus_files_skipped"] = skipped
  # ru_maxrss is in KiB on Linux.
  summary["peak_rss_mb"] = round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
  print("summary: " + json.dumps(summary, default=str))


if __name__ == "__main__":
  app.run(main)
