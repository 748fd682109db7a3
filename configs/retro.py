"""The paper's RETRO family (Table 2 sizes), trained as in App. C.1.

  python scripts/train.py --config=configs/retro.py:172m --workdir=...
  (sizes: 172m, 425m, 1.5b, 7.5b)
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
  config.model = RetroConfig.preset(size, scan_layers=True).to_dict()

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 256         # Global batch (sequences).
  config.train.seq_len = 2048           # n: tokens per sequence (paper).
  config.train.learning_rate = _MAX_LR[size]  # Peak AdamW learning rate.
  config.train.warmup_steps = 750       # Linear warmup steps.
  config.train.total_steps = 500_000    # Cosine decay horizon.
  config.train.weight_decay = 0.1       # AdamW weight decay.
  config.train.b2 = 0.95                # AdamW second-moment decay.
  config.train.clip_norm = 1.0          # Global-norm gradient clipping.
  config.train.seed = 0                 # Parameter and data seed.

  # Mesh sizes over (data, fsdp, model); -1 fills with the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, model=1))
  return config
