r"""Evaluates a run's checkpoint: loss, perplexity, bits/token, bits/byte
(and, for corpus sets, word-level perplexity) per eval set, retrieval on and
off, and leakage-filtered bits/byte (table + PNG).

  python scripts/evaluate.py --workdir=runs/tiny \
      --config=configs/eval.py:task,stdlib [--step=N] [--db=DIR] \
      [--config.eval.num_neighbours=10]
  # A whole JSON-lines file, per pile_set_name (progress lines on stderr):
  python scripts/evaluate.py --workdir=runs/tiny --config=configs/eval.py:pile \
      --config.eval.sets.pile.corpus=jsonl:/data/wiki.jsonl.zst

See configs/eval.py for every field and the set groups the config argument
picks (task, stdlib, pile, arxiv), retro_jax/evaluation/sets.py for what a
set is, docs/evaluation.md for what is scored and how. A corpus set is
scored whole (every document, no byte cap) unless config.eval.split or
max_bytes say otherwise; the run's Task set reads its cached validation
split. Each set's results go to files of their own, never overwritten by
another set, DB or k: <workdir>/eval/step_<N>_<set>_db-<hash>_k<k>
[_<variant>...].json, ..._leakage.png, ..._chunks[_<subset>].npz (<hash>:
of the DB's manifest). `python scripts/eval_results.py --workdir=...`
prints them all as one table.
"""


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
  job.evaluate_run(_CONFIG.value, _WORKDIR.value, _STEP.value, _DB.value)


if __name__ == "__main__":
  cli.run(main)  # Bad input: one line "<script>: error: ..."; -v: traceback.
