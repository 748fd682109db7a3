r"""Every evaluation of a run, read back as one table: one row per (step,
set, subset, DB, k, variant) with bits per byte and word-level perplexity,
retrieval on and off ("nan": not measured, e.g. word perplexity of the Task).

  python scripts/eval_results.py --workdir=runs/tiny
  python scripts/eval_results.py --workdir=runs/tiny --format=json

The rows come from every <workdir>/eval/*.json that scripts/evaluate.py
wrote (retro_jax/evaluation/result_files.py; docs/evaluation.md).
"""

import json

from absl import app
from absl import flags

from retro_jax.core import cli

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run folder (scripts/train.py).")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json"],
                            "table: aligned text; json: one object per row.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Deferred: --help answers before the package (and JAX) loads.
  from retro_jax.evaluation import result_files  # pylint: disable=g-import-not-at-top
  rows = result_files.collect(_WORKDIR.value)
  if _FORMAT.value == "json":
    for row in rows:  # Not measured: null (JSON has no NaN).
      print(json.dumps({k: None if v != v else v for k, v in row.items()},
                       sort_keys=True))
  else:
    print(result_files.format_table(rows))


if __name__ == "__main__":
  cli.run(main)  # Bad input: one line "<script>: error: ..."; -v: traceback.
