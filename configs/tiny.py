"""A tiny RETRO trained on the Python standard library, for a quick CPU run.

  python scripts/train.py --config=configs/tiny.py --workdir=runs/tiny
"""

import ml_collections

from retro_jax.config import RetroConfig


def get_config():
  config = ml_collections.ConfigDict()
  # Model hyperparameters: every RetroConfig field (documented there).
  config.model = RetroConfig.preset("tiny", vocab_size=2048).to_dict()

  config.data = ml_collections.ConfigDict()
  config.data.corpus = "python_stdlib"  # The embedded default corpus.
  config.data.max_bytes = 4_000_000     # Text read for training (~1M tokens).
  config.data.vocab_model = ""          # A .model to use; "" = train one.
  config.data.spm_train_bytes = 2_000_000  # Text the vocabulary trains on.

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 8           # Global batch (sequences).
  config.train.seq_len = 256            # Tokens per sequence (multiple of 64).
  config.train.steps = 60               # Optimizer steps.
  config.train.learning_rate = 3e-3     # Peak AdamW learning rate.
  config.train.warmup_steps = 10        # Linear warmup, then cosine decay.
  config.train.weight_decay = 0.1       # AdamW weight decay (paper App. C.1).
  config.train.b2 = 0.95                # AdamW second-moment decay.
  config.train.clip_norm = 1.0          # Global-norm gradient clipping.
  config.train.log_every = 10           # Steps between loss lines.
  config.train.eval_batches = 4         # Validation batches at the end.
  config.train.seed = 0                 # Parameter and data seed.

  # Mesh sizes over (data, fsdp, model); -1 fills with the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  return config
