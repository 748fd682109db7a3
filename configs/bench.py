"""The shared benchmark configuration (`bench` preset, random data).

Identical to the configuration `shared/peer` times for retro-pytorch: vocab
8192, 512 tokens (8 chunks of 64), batch 2, k=2 neighbours of 128 tokens,
decoder 512 wide x 6 layers, CCA in layers 3 and 6, encoder 512 x 2 layers.

  python scripts/benchmark.py --config=configs/bench.py [--threads=1]
  python scripts/train.py --config=configs/bench.py --workdir=runs/bench
"""

import ml_collections

from retro_jax.config import RetroConfig


def get_config():
  config = ml_collections.ConfigDict()
  # Model hyperparameters: every RetroConfig field (documented there).
  config.model = RetroConfig.preset("bench").to_dict()

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 2          # Global batch (sequences).
  config.train.seq_len = 512           # Tokens per sequence (multiple of 64).
  config.train.steps = 20              # Optimizer steps (scripts/train.py).
  config.train.learning_rate = 1e-4    # Peak AdamW learning rate.
  config.train.warmup_steps = 0        # No warmup: constant rate, as the peer.
  config.train.total_steps = 0         # 0 = no decay.
  config.train.end_lr_ratio = 0.1      # Unused without decay.
  config.train.weight_decay = 0.01     # torch AdamW's default, as the peer.
  config.train.b2 = 0.999              # torch AdamW's default, as the peer.
  config.train.clip_norm = 0.0         # The peer does not clip.
  config.train.accum_steps = 1         # Micro-batches accumulated per step.
  config.train.trainable = "all"       # all | retrieval (RETROfit).
  config.train.init_from = ""          # RETROfit: baseline run's workdir.
  config.train.seed = 0                # Parameter and data seed.
  config.train.log_every = 5           # Steps between metric lines.
  config.train.peak_flops = 0.0        # Device peak FLOP/s; 0 = auto.

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 1000       # Save every N steps (and at the end).
  config.checkpoint.keep = 1           # Keep the last K checkpoints.
  config.checkpoint.async_save = True  # Write checkpoints in the background.

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"     # Random tokens and neighbours.

  # Mesh sizes over (data, fsdp, model); -1 fills with the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))

  config.bench = ml_collections.ConfigDict()
  config.bench.warmup = 2              # Untimed steps (compile + warm caches).
  config.bench.steps = 5               # Timed steps; the median is reported.
  return config
