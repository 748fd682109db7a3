"""The shared benchmark configuration (`bench` preset, random data).

Identical to the configuration benchmarks/peer/ times for retro-pytorch:
vocab 8192, 512 tokens (8 chunks of 64), batch 2, k=2 neighbours of 128
tokens, decoder 512 wide x 6 layers, CCA in layers 3 and 6, encoder 512 x 2
layers, torch AdamW's defaults at a constant rate without clipping.

  python benchmarks/train_step.py --config=configs/bench.py [--threads=1]
  python scripts/train.py --config=configs/bench.py --workdir=runs/bench

Every field and its meaning: configs/base.py; only what differs is set here.
"""

import ml_collections

from retro_jax.config import RetroConfig
from retro_jax.training import run_config


def get_config():
  config = run_config.base_config()
  config.model = RetroConfig.preset("bench").to_dict()

  config.train.batch_size = 2
  config.train.seq_len = 512
  config.train.steps = 20
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 0         # Constant rate, as the peer.
  config.train.total_steps = 0          # No decay.
  config.train.weight_decay = 0.01      # torch AdamW's default, as the peer.
  config.train.b2 = 0.999               # torch AdamW's default, as the peer.
  config.train.clip_norm = 0.0          # The peer does not clip.
  config.train.log_every = 5

  config.checkpoint.keep = 1

  # What the benchmark script times (not a training field).
  config.bench = ml_collections.ConfigDict()
  config.bench.warmup = 2               # Untimed steps (compile + warm caches).
  config.bench.steps = 5                # Timed steps; the median is reported.
  return config
