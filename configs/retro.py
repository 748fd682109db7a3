"""The paper's RETRO family (Table 2 sizes), trained as in App. C.1.

  python scripts/train.py --config=configs/retro.py:172m --workdir=... \
      --config.data.spm_path=... --config.data.db_dir=... \
      --config.data.cache_dir=...
  (sizes: 172m, 425m, 1.5b, 7.5b; a baseline: --config.model.cca_layers="()";
   RETROfit: --config.train.trainable=retrieval --config.train.init_from=DIR)

Every field and its meaning: configs/base.py (the paper's recipe); only what
differs is set here.
"""

from retro_jax.config import PRESETS, RetroConfig
from retro_jax.training import run_config

# Peak learning rates by size: our defaults (lower for the largest model);
# check them against the paper's App. C.1 schedule for your data.
_MAX_LR = {"172m": 2e-4, "425m": 2e-4, "1.5b": 2e-4, "7.5b": 1e-4}


def get_config(size: str = "172m"):
  size = size.lower()
  if size not in _MAX_LR:
    raise ValueError(f"unknown RETRO size {size!r}; sizes: {sorted(_MAX_LR)} "
                     f"(presets: {sorted(PRESETS)})")
  config = run_config.base_config()
  # bfloat16 compute (params and optimizer state stay float32) and per-layer
  # rematerialisation, as pod runs use them.
  config.model = RetroConfig.preset(
      size, scan_layers=True, compute_dtype="bfloat16",
      remat="full" if size in ("1.5b", "7.5b") else "none").to_dict()

  config.train.learning_rate = _MAX_LR[size]

  config.data.source = "task"           # The seqio Task (real data).
  config.data.task_name = "retro_c4"
  config.data.corpus = "tfds:c4/en:3.0.1"

  # Parameters and optimizer state sharded over every device.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  return config
