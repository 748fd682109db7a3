"""Evaluation of a trained run (scripts/evaluate.py).

  python scripts/evaluate.py --workdir=runs/tiny \
      --config.eval.tasks="stdlib=python_stdlib" [--db=runs/db_other] \
      [--config.eval.num_neighbours=10 --config.eval.stride=128]
  # Pile subsets: one set per subset, or every subset via group_by
  --config.eval.tasks="arxiv=jsonl:/data/pile/val.jsonl.zst@pile_set_name=ArXiv"
  --config.eval.tasks="pile=jsonl:/data/pile/val.jsonl.zst" \
      --config.eval.group_by=pile_set_name
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.eval = ml_collections.ConfigDict()
  # Comma-separated eval sets: "task" (the run's own cached seqio Task) or
  # NAME=CORPUS_SPEC[@key=value;...] (documents retrieved for online).
  config.eval.tasks = "task"
  config.eval.split = "validation"   # Corpus / Task split evaluated.
  config.eval.max_bytes = 200_000    # Text read per online set; 0 = all.
  config.eval.group_by = ""          # Also report per value of this meta
                                     # field, e.g. pile_set_name.
  config.eval.seq_len = 0            # n; 0 = the run's train.seq_len.
  config.eval.stride = 0             # Sliding-window step (multiple of 64);
                                     # 0 = n (no overlap).
  config.eval.num_neighbours = 0     # k at evaluation; 0 = the trained k.
  config.eval.batch_size = 4         # Sequences per forward pass.
  config.eval.max_batches = 0        # Stop after this many batches; 0 = all.
  config.eval.leakage_source = "previous"  # r(C_u) against Ret(C_{u-1})
                                     # (what C_u is predicted with) | same.
  config.eval.cache_dir = ""         # seqio cache of "task"; "" = the run's.
  return config
