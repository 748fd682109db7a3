"""The paper's RETRO family (Table 2 sizes), trained as in App. C.1.

  python scripts/train.py --config=configs/retro.py:172m --workdir=... \
      --config.data.spm_path=... --config.data.db_dir=... \
      --config.data.cache_dir=...
  (sizes: 172m, 425m, 1.5b, 7.5b; a baseline: --config.model.cca_layers="()";
   RETROfit: --config.train.trainable=retrieval --config.train.init_from=DIR)
"""

import ml_collections

from retro_jax.config import PRESETS, RetroConfig

# Peak learning rates by size: our defaults (lower for the largest model);
# check them against the paper's App. C.1 schedule for your data.
_MAX_LR = {"172m": 2e-4, "425m": 2e-4, "1.5b": 2e-4, "7.5b": 1e-4}


def get_config(size: str = "172m"):
  size = size.lower()
  if size not in _MAX_LR:
    raise ValueError(f"unknown RETRO size {size!r}; sizes: {sorted(_MAX_LR)} "
                     f"(presets: {sorted(PRESETS)})")
  config = ml_collections.ConfigDict()
  # Model hyperparameters: every RetroConfig field (documented there).
  # bfloat16 compute (params and optimizer state stay float32) and per-layer
  # rematerialisation, as pod runs use them.
  config.model = RetroConfig.preset(
      size, scan_layers=True, compute_dtype="bfloat16",
      remat="full" if size in ("1.5b", "7.5b") else "none").to_dict()

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256         # Global batch (sequences, all hosts).
  config.train.seq_len = 2048           # n: tokens per sequence (paper).
  config.train.steps = 500_000          # Optimizer steps of the whole run.
  # Cosine decay horizon; follows `steps` unless set (0 = constant rate).
  config.train.total_steps = config.train.get_ref("steps")
  config.train.learning_rate = _MAX_LR[size]  # Peak AdamW learning rate.
  config.train.warmup_steps = 750       # Linear warmup steps (paper).
  config.train.end_lr_ratio = 0.1       # Cosine decays to 10% of the peak.
  config.train.weight_decay = 0.1       # AdamW weight decay (paper).
  config.train.b2 = 0.95                # AdamW second-moment decay.
  config.train.clip_norm = 1.0          # Global-norm gradient clipping.
  config.train.accum_steps = 1          # Micro-batches accumulated per step.
  config.train.trainable = "all"        # all | retrieval (RETROfit).
  config.train.init_from = ""           # RETROfit: baseline run's workdir.
  config.train.seed = 0                 # Parameter and data seed.
  config.train.allow_data_change = False  # Resume even if the data stream
                                        # (source, seed, task, shards) changed.
  config.train.log_every = 100          # Steps between metric lines.
  config.train.peak_flops = 0.0         # Device peak FLOP/s for MFU; 0 = from
                                        # the device kind.

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 1000        # Save every N steps (and at the end).
  config.checkpoint.keep = 3            # Keep the last K checkpoints.
  config.checkpoint.async_save = True   # Write checkpoints in the background.

  config.data = ml_collections.ConfigDict()
  config.data.source = "task"           # synthetic | task (seqio, real data).
  config.data.task_name = "retro_c4"    # seqio Task name to register.
  config.data.corpus = "tfds:c4/en:3.0.1"  # Corpus spec (corpus.sources).
  config.data.split = "train"           # Split the Task is read from.
  config.data.max_bytes = 0             # Text per split the Task reads; 0=all.
  config.data.meta_filter = ""          # Document meta "k=v,..."; "" = all.
  config.data.split_max_bytes = ""      # Per-split max_bytes, "validation=N".
  config.data.spm_path = ""             # SentencePiece model of the DB.
  config.data.db_dir = ""               # Retrieval DB (scripts/build_db.py).
  config.data.cache_dir = ""            # seqio cache of the Task.

  # Mesh sizes over (data, fsdp, model); -1 fills with the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, model=1))
  return config
