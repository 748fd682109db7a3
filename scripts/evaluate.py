r"""Evaluates a run's checkpoint: loss, perplexity, bits/token, bits/byte per
eval set, retrieval on and off, and leakage-filtered bits/byte (table + PNG).

  python scripts/evaluate.py --workdir=runs/tiny \
      --config=configs/eval.py:task,stdlib [--step=N] [--db=DIR] \
      [--config.eval.num_neighbours=10]

See configs/eval.py for every field and the set groups the config argument
picks (task, stdlib, pile, arxiv), retro_jax/evaluation/sets.py for what a
set is. Results: <workdir>/eval/step_<N>.json, leakage_step_<N>.png and
step_<N>_<set>_chunks.npz.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retro_jax.core import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval.py",
                                          "Evaluation config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (scripts/train.py).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default latest.")
_DB = flags.DEFINE_string("db", "", "Retrieval DB to use instead of the "
                          "run's (same vocabulary); retrieved online.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:    # Results go to stdout; -v 0
    logging.set_verbosity(logging.WARNING)   # shows orbax's INFO logs.
  from retro_jax.core import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.keep_freed_memory()  # Before the XLA backend starts.
  from retro_jax.evaluation import job  # pylint: disable=g-import-not-at-top
  try:
    job.evaluate_run(_CONFIG.value, _WORKDIR.value, _STEP.value, _DB.value)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
