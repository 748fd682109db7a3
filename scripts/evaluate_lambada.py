r"""LAMBADA last-word accuracy of a run's checkpoint, retrieval on and off.

  python scripts/evaluate_lambada.py --workdir=runs/tiny \
      --file=lambada_test.jsonl [--step=N] [--db=DIR] [--num_neighbours=K] \
      [--max_examples=N] [--batch_size=8]

The file holds one JSON object {"text": ...} per line (OpenAI's
lambada_test.jsonl layout); the target is the word after the last space. A
word counts as right when greedy decoding reproduces all its tokens (see
retro_jax/evaluation/lambada.py). Prints the accuracy with retrieval on and
off, the number of examples and the mean target length in tokens; writes
<workdir>/eval/lambada_step<N>_file<hash>_db<hash>_k<K>.json.
"""


from absl import app
from absl import flags
from absl import logging

from retro_jax.core import cli

_WORKDIR = flags.DEFINE_string("workdir", None,
                                "Run folder (scripts/train.py).")
_FILE = flags.DEFINE_string("file", None, 'JSON lines, one {"text": ...} '
                            "per line (lambada_test.jsonl).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default latest.")
_DB = flags.DEFINE_string("db", "", "Retrieval DB to use instead of the "
                          "run's (same vocabulary).")
_K = flags.DEFINE_integer("num_neighbours", 0, "Neighbours per chunk; 0: "
                          "the k the run trained with.", lower_bound=0)
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "Evaluate the "
                                     "first N examples only.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Examples per forward "
                                   "pass.", lower_bound=1)
flags.mark_flags_as_required(["workdir", "file"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:    # Results go to stdout; -v 0
    logging.set_verbosity(logging.WARNING)   # shows orbax's INFO logs.
  # pylint: disable=g-import-not-at-top
  from retro_jax.core import host_memory
  host_memory.keep_freed_memory()  # Before the XLA backend starts.
  from retro_jax.evaluation import lambada
  # pylint: enable=g-import-not-at-top
  lambada.evaluate_file(_WORKDIR.value, _FILE.value, _STEP.value, _DB.value,
                        _K.value, _MAX_EXAMPLES.value, _BATCH_SIZE.value)


if __name__ == "__main__":
  cli.run(main)  # Bad input: one line "<script>: error: ..."; -v: traceback.
