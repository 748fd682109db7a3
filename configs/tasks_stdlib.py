"""RETRO seqio Task over the Python standard library (the embedded default).

Precompute the neighbours of its splits (after scripts/build_db.py built the
DB in --config.db_dir), then inspect an example:

  python scripts/cache_tasks.py --config=configs/tasks_stdlib.py
  python scripts/inspect_example.py --config=configs/tasks_stdlib.py
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.task_name = "retro_stdlib"    # seqio Task name.
  config.corpus = "python_stdlib"      # sources.open_corpus spec, e.g.
                                       # "jsonl:/data/pile/*.jsonl.zst".
  config.splits = "train,validation"   # Comma-separated corpus splits.
  config.max_bytes = 0                 # Text read per split; 0 = all.
  config.split_max_bytes = ""          # Per-split overrides of max_bytes,
                                       # e.g. "validation=200000".
  config.meta_filter = ""              # "key=value,..." on document meta,
                                       # e.g. "pile_set_name=ArXiv"; "" = all.
  config.db_dir = "runs/db"            # Finalized retrieval DB (build_db.py).
  config.spm_model = ""                # Vocabulary; "" = <db_dir>/spm.model,
                                       # the copy the DB build keeps.
  config.seq_len = 512                 # n, tokens per sequence (multiple of
                                       # 64; the paper trains with 2048).
  config.num_neighbours = 2            # k, neighbours per 64-token chunk.
  config.embedder = ""                 # BERT checkpoint dir; "" = the DB's
                                       # default all-MiniLM-L6-v2.
  config.embed_batch = 32              # Chunks per BERT forward pass.
  config.retrieval_batch = 16          # Sequences per retrieval call.
  config.cache_dir = "runs/cache"      # seqio cache root of the Task.
  config.runner = "FnApiRunner"        # Beam runner (in-process, offline);
                                       # DataflowRunner on Google Cloud.
  config.num_files = 1                 # Record files per cached split; a
                                       # multiple of the host count lets each
                                       # host read whole files.
  return config
