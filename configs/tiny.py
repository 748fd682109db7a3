"""A tiny RETRO for a quick CPU run (and the tests of the training loop).

  python scripts/train.py --config=configs/tiny.py --workdir=runs/tiny
  # real data: the seqio Task of a retrieval DB built by scripts/build_db.py
  python scripts/train.py --config=configs/tiny.py --workdir=runs/tiny \
      --config.data.source=task --config.data.spm_path=runs/spm.model \
      --config.data.db_dir=runs/db --config.data.cache_dir=runs/cache

Every field and its meaning: configs/base.py; only what differs is set here.
"""

from retro_jax.config import RetroConfig
from retro_jax.training import run_config


def get_config():
  config = run_config.base_config()
  # The "tiny" preset (4 layers of width 64, CCA in layers 2 and 4, the
  # paper's m=64, k=2, r=128). A baseline: --config.model.cca_layers="()".
  config.model = RetroConfig.preset("tiny", vocab_size=2048).to_dict()

  config.train.batch_size = 8
  config.train.seq_len = 256            # 4 chunks.
  config.train.steps = 60
  config.train.learning_rate = 3e-3     # A small model takes a larger rate.
  config.train.warmup_steps = 10
  config.train.log_every = 10

  config.checkpoint.every = 20

  config.data.task_name = "retro_tiny"
  config.data.max_bytes.train = 4_000_000
  config.data.max_bytes.validation = 4_000_000
  return config
