"""A tiny RETRO for a quick CPU run (and the tests of the training loop).

  python scripts/train.py --config=configs/tiny.py --workdir=runs/tiny
  # real data: the seqio Task of a retrieval DB built by scripts/build_db.py
  python scripts/train.py --config=configs/tiny.py --workdir=runs/tiny \
      --config.data.source=task --config.data.spm_path=runs/spm.model \
      --config.data.db_dir=runs/db --config.data.cache_dir=runs/cache
"""

import ml_collections

from retro_jax.config import RetroConfig


def get_config():
  config = ml_collections.ConfigDict()
  # Model hyperparameters: every RetroConfig field (documented there).
  # A baseline (no retrieval) is --config.model.cca_layers="()".
  config.model = RetroConfig.preset("tiny", vocab_size=2048).to_dict()

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 8           # Global batch (sequences, all hosts).
  config.train.seq_len = 256            # Tokens per sequence (multiple of 64).
  config.train.steps = 60               # Optimizer steps of the whole run.
  # Cosine decay horizon; follows `steps` unless set (0 = constant rate).
  config.train.total_steps = config.train.get_ref("steps")
  config.train.learning_rate = 3e-3     # Peak AdamW learning rate.
  config.train.warmup_steps = 10        # Linear warmup, then cosine decay.
  config.train.end_lr_ratio = 0.1       # Final rate / peak (paper: 0.1).
  config.train.weight_decay = 0.1       # AdamW weight decay (paper App. C.1).
  config.train.b2 = 0.95                # AdamW second-moment decay.
  config.train.clip_norm = 1.0          # Global-norm clipping; 0 = off.
  config.train.accum_steps = 1          # Micro-batches accumulated per step.
  config.train.trainable = "all"        # all | retrieval (RETROfit: CCA and
                                        # encoder only, the rest frozen).
  config.train.init_from = ""           # RETROfit: workdir of a trained
                                        # baseline run (cca_layers=()).
  config.train.seed = 0                 # Parameter and data seed.
  config.train.allow_data_change = False  # Resume even if the data stream
                                        # (source, seed, task, shards) changed.
  config.train.log_every = 10           # Steps between metric lines.
  config.train.peak_flops = 0.0         # Device peak FLOP/s for MFU; 0 = from
                                        # the device kind (CPU: measured).

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 20          # Save every N steps (and at the end).
  config.checkpoint.keep = 3            # Keep the last K checkpoints.
  config.checkpoint.async_save = True   # Write checkpoints in the background.

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"      # synthetic | task (seqio, real data).
  config.data.task_name = "retro_tiny"  # seqio Task name to register.
  config.data.corpus = "python_stdlib"  # Corpus spec (corpus.sources).
  config.data.split = "train"           # Split the Task is read from.
  config.data.max_bytes = 4_000_000     # Text per split the Task reads; 0=all.
  config.data.meta_filter = ""          # Document meta "k=v,..."; "" = all.
  config.data.split_max_bytes = ""      # Per-split max_bytes, "validation=N".
  config.data.spm_path = ""             # SentencePiece model of the DB.
  config.data.db_dir = ""               # Retrieval DB (scripts/build_db.py).
  config.data.cache_dir = ""            # seqio cache of the Task.

  # Mesh sizes over (data, fsdp, model); -1 fills with the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  return config
