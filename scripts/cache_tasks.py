r"""Precomputes the neighbours of a RETRO Task's splits (seqio's cache job).

The training split is read from the DB as runs of its chunks, and every
chunk's k nearest DB chunks are looked up in the DB's neighbour table (no
BERT); held-out splits, text not in the DB, are chunked the same way,
embedded with the frozen BERT and searched. Documents of a chunk's own
sequence are excluded either way. The examples are written as a seqio cache
that training reads with `retro_jax.data.tasks.batches`. Runs Apache Beam in-process (FnApiRunner,
nothing touches the network); a rerun over a complete cache does nothing, a
crashed one is rebuilt.

  python scripts/build_db.py --config=configs/quickstart.py
  python scripts/cache_tasks.py --config=configs/quickstart.py \
      [--config.data.max_bytes.train=2000000] [--overwrite]

The run config names the Task: config.data (task name, corpus, splits and
their text in data.max_bytes, meta filter, vocabulary, DB, cache
directory), config.cache (batches, Beam runner, record files), the embedder
in config.db.embedder, n = config.train.seq_len and k =
config.model.num_neighbours; training and evaluation read the cache with
the same config.

Prints a progress bar per split and a summary: sequences, chunks, neighbours
dropped by the same-document filter, chunks searched again because their
table row ran short, chunks left short of k neighbours, seconds. Bad input
(a corpus line, a missing DB) ends it with one line on stderr; -v 1 shows
the traceback and Beam's own log lines.
"""

import json

from absl import flags
from absl import logging
from ml_collections import config_flags

from retro_jax.core import cli

cli.quiet_libraries()  # Before TensorFlow loads (retro_jax.data).

# pylint: disable=g-import-not-at-top,wrong-import-position
from retro_jax.core import host_memory
from retro_jax.data import tasks
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file (configs/*.py).", lock_config=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Rebuild even a complete cache.")


def main(argv):
  del argv
  # seqio logs whole examples at INFO (every power-of-two example).
  logging.set_verbosity(logging.WARNING)
  host_memory.keep_freed_memory()  # Before the XLA backend starts.
  config = _CONFIG.value
  if not (config.data.db_dir and config.data.cache_dir):
    cli.fail("config.data.db_dir and config.data.cache_dir must both be set",
             status=2)
  task = tasks.register_from_config(config)
  summary = tasks.cache_task(task.name, config.data.cache_dir,
                             runner=config.cache.runner,
                             overwrite=_OVERWRITE.value,
                             num_files=config.cache.num_files)
  print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)  # Bad input (a corpus line, a file): one line, status 1.
