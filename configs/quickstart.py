"""The quickstart: a small RETRO trained on the Python standard library.

scripts/quickstart.sh runs every stage with this config; by hand:

  python scripts/build_db.py --config=configs/db_stdlib.py \
      --db_dir=runs/quickstart/db --config.corpus=python_stdlib:shuffled \
      --config.max_bytes=2000000 \
      --config.vocab_size=4096 --config.spm_train_bytes=2000000
  python scripts/cache_tasks.py --config=configs/tasks_stdlib.py \
      --config.task_name=retro_quickstart --config.corpus=python_stdlib:shuffled \
      --config.db_dir=runs/quickstart/db \
      --config.cache_dir=runs/quickstart/cache --config.max_bytes=2000000 \
      --config.split_max_bytes=validation=200000 --config.seq_len=256
  python scripts/train.py --config=configs/quickstart.py \
      --workdir=runs/quickstart/retro
  python scripts/train.py --config=configs/quickstart.py \
      --workdir=runs/quickstart/baseline --config.model.cca_layers="()"

The data fields below must name the same DB, cache and sizes as the two
commands above (the Task refuses a cache built with other arguments).
"""

import ml_collections

from retro_jax.config import RetroConfig


def get_config():
  config = ml_collections.ConfigDict()
  # Model hyperparameters: every RetroConfig field (documented there). A
  # 4-layer decoder of width 128 with CCA in layers 2 and 4 and the paper's
  # retrieval shapes (m=64, k=2, r=128): about 1.5 min per 100 steps on 2
  # CPU cores. The baseline is the same with cca_layers=() (about 3x faster).
  # CCA outputs start at zero (zero_init_cca): RETRO starts as its baseline,
  # so retrieval noise does not slow the decoder down early in this short run.
  config.model = RetroConfig.preset(
      "tiny", vocab_size=4096, d_model=128, num_heads=4, head_dim=32,
      d_ff=512, enc_d_model=128, enc_num_heads=4, enc_head_dim=32,
      enc_d_ff=512, zero_init_cca=True).to_dict()

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 8           # Global batch (sequences, all hosts).
  config.train.seq_len = 256            # Tokens per sequence (4 chunks).
  config.train.steps = 300              # Optimizer steps of the whole run.
  # Cosine decay horizon; follows `steps` unless set (0 = constant rate).
  config.train.total_steps = config.train.get_ref("steps")
  config.train.learning_rate = 2e-3     # Peak AdamW learning rate.
  config.train.warmup_steps = 30        # Linear warmup, then cosine decay.
  config.train.end_lr_ratio = 0.1       # Final rate / peak (paper: 0.1).
  config.train.weight_decay = 0.1       # AdamW weight decay (paper App. C.1).
  config.train.b2 = 0.95                # AdamW second-moment decay.
  config.train.clip_norm = 1.0          # Global-norm clipping; 0 = off.
  config.train.accum_steps = 1          # Micro-batches accumulated per step.
  config.train.trainable = "all"        # all | retrieval (RETROfit).
  config.train.init_from = ""           # RETROfit: a baseline run's workdir.
  config.train.seed = 0                 # Parameter and data seed.
  config.train.log_every = 25           # Steps between metric lines.
  config.train.peak_flops = 0.0         # Peak FLOP/s for MFU; 0 = measured.

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 100         # Save every N steps (and at the end).
  config.checkpoint.keep = 2            # Keep the last K checkpoints.
  config.checkpoint.async_save = True   # Write checkpoints in the background.

  config.data = ml_collections.ConfigDict()
  config.data.source = "task"           # The seqio Task (real neighbours).
  config.data.task_name = "retro_quickstart"  # seqio Task name.
  # Corpus spec (corpus.sources): the library's files in a stable hashed
  # order, so the 2 MB slice samples every package, not the alphabetical head.
  config.data.corpus = "python_stdlib:shuffled"
  config.data.split = "train"           # Split the Task is read from.
  config.data.max_bytes = 2_000_000     # Text per split the Task reads.
  config.data.meta_filter = ""          # Document meta "k=v,..."; "" = all.
  # Held-out text with precomputed neighbours (what evaluation scores).
  config.data.split_max_bytes = "validation=200000"
  config.data.spm_path = "runs/quickstart/db/spm.model"  # The DB's vocabulary.
  config.data.db_dir = "runs/quickstart/db"     # Retrieval DB (build_db.py).
  config.data.cache_dir = "runs/quickstart/cache"  # seqio cache of the Task.

  # Mesh sizes over (data, fsdp, model); -1 fills with the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  return config
