"""The quickstart: a small RETRO trained on the Python standard library.

scripts/quickstart.sh runs every stage with this config; by hand:

  python scripts/build_db.py --config=configs/quickstart.py
  python scripts/cache_tasks.py --config=configs/quickstart.py
  python scripts/train.py --config=configs/quickstart.py \
      --workdir=runs/quickstart/retro
  python scripts/train.py --config=configs/quickstart.py \
      --workdir=runs/quickstart/baseline --config.model.cca_layers="()"

Every stage reads the same data, db and cache fields, so the DB, the cache
and training agree (the Task refuses a cache built with other arguments).
Every field and its meaning: configs/base.py; only what differs is set here.
"""

from retro_jax.config import RetroConfig
from retro_jax.training import run_config


def get_config():
  config = run_config.base_config()
  # A 4-layer decoder of width 128 with CCA in layers 2 and 4 and the paper's
  # retrieval shapes (m=64, k=2, r=128): about 1.1 min per 100 steps on 2
  # CPU cores. The baseline is the same with cca_layers=() (about 3x faster).
  # So that 300 steps learn to read neighbours (docs/results.md §2): CCA's
  # value path starts as a copy (cca_copy_init; without it the model sits
  # at chance for 200 steps of the copy probe), its queries and keys carry
  # the position terms of the paper's relative attention (cca_qk_bias), and
  # the retrieval path trains at 4x the rate (train.retrieval_lr_scale).
  # So that what it learnt reaches held-out text, each neighbour is shifted
  # onto its query chunk where at least 16 of its 64 tokens match, and
  # dropped where none does (neighbour_alignment; docs/results.md §3): the
  # DB's copies of held-out text rarely start at a chunk boundary.
  config.model = RetroConfig.preset(
      "tiny", vocab_size=4096, d_model=128, num_heads=4, head_dim=32,
      d_ff=512, enc_d_model=128, enc_num_heads=4, enc_head_dim=32,
      enc_d_ff=512, cca_copy_init=True, cca_qk_bias=True,
      neighbour_alignment=16).to_dict()

  config.train.batch_size = 8
  config.train.seq_len = 256            # 4 chunks.
  config.train.steps = 300
  config.train.learning_rate = 2e-3     # A small model takes a larger rate.
  config.train.warmup_steps = 30
  config.train.log_every = 25
  config.train.retrieval_lr_scale = 4.0

  config.checkpoint.every = 100         # The 3 kept (base) are steps 100,
                                        # 200, 300: the leakage probe of each
                                        # shows reading grow.

  config.data.source = "task"           # The seqio Task (real neighbours).
  config.data.task_name = "retro_quickstart"
  # The library's files in a stable hashed order, so the 2 MB slice samples
  # every package, not the alphabetical head.
  config.data.corpus = "python_stdlib:shuffled"
  config.data.max_bytes.train = 2_000_000
  # Held-out text with precomputed neighbours (what evaluation scores).
  config.data.max_bytes.validation = 200_000
  # data.spm_path stays "": the DB build trains the vocabulary at
  # runs/quickstart/spm.model and keeps the copy in the DB that the other
  # stages read.
  config.data.db_dir = "runs/quickstart/db"
  config.data.cache_dir = "runs/quickstart/cache"
  # A quarter of the training sequences see their own text as the first
  # neighbour of every chunk: neighbours of other documents rarely hold a
  # chunk's continuation in 2 MB of code, so without these the model has
  # nothing to learn reading from in 300 steps (docs/results.md §2). The
  # paper's setting, and the library's default, is 0.
  config.data.copy_share = 0.25

  config.db.vocab_size = 4096           # = model.vocab_size.
  config.db.shard_chunks = 2048         # ~5 shards (units of Beam work).
  config.db.spm_train_bytes = 2_000_000
  return config
