r"""Exports the first training batches of a cached Task as a numpy shard.

  python scripts/export_batches.py --config=configs/quickstart.py \
      --out=/tmp/quickstart_batches.npz --batches=8 [--config.x=...] \
      [--start_step=0] [--overwrite]

Reads the Task's cache exactly as training with config.data.source="task"
does (`train_sources.make_source`: the same seqio Task, split, seed, data
shards and copy_share), takes N global batches from --start_step on, and
writes them with their provenance to one .npz (retro_jax/data/numpy_shard.py).
A benchmark host without TensorFlow, seqio, ScaNN or Beam reads it with
`numpy_shard.read` and trains on real batches (`numpy_shard.source`).

This process reads the whole global batch (config.train.batch_size rows),
as the data shards config.data.num_shards names (0: one); a multi-process
run with num_shards=0 reads one shard per process, so set num_shards to
that run's value to export the batches it trained on.

Prints one line: the path, N batches x batch size x sequence length, bytes.
Bad input (a config that does not read a Task, an incomplete cache, an
existing --out without --overwrite) is one line on stderr.
"""

import itertools
import os
import shlex
import sys
import time

from absl import flags
from ml_collections import config_flags

from retro_jax.core import cli
from retro_jax.data import numpy_shard

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file (configs/*.py) whose Task to read.")
_OUT = flags.DEFINE_string("out", None, "The .npz file to write.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Global batches to export.",
                                lower_bound=1)
_START = flags.DEFINE_integer("start_step", 0, "The training step whose "
                              "batch comes first.", lower_bound=0)
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace an existing --out file.")


def provenance(config, num_shards: int, start_step: int) -> dict:
  """The meta of the exported shard: which config's batches they are."""
  d, tc, m = config.data, config.train, config.model
  return dict(
      task_name=d.task_name, cache_dir=d.cache_dir, split=d.split,
      corpus=d.corpus, seed=int(tc.seed), num_shards=int(num_shards),
      copy_share=float(d.get("copy_share", 0.0)),
      copy_shift=int(d.get("copy_shift", 0)), start_step=int(start_step),
      seq_len=int(tc.seq_len), batch_size=int(tc.batch_size),
      chunk_size=int(m.chunk_size), num_neighbours=int(m.num_neighbours),
      neighbour_len=int(m.neighbour_len), vocab_size=int(m.vocab_size),
      created_by=" ".join(shlex.quote(a) for a in sys.argv),
      created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}", status=2)
  config, out = _CONFIG.value, _OUT.value
  if config.data.source != "task":
    cli.fail(f"config.data.source is {config.data.source!r}: the export "
             f"reads the cached Task; pass --config.data.source=task and "
             f"its config.data fields", status=2)
  if not _OVERWRITE.value and os.path.exists(out):  # Early.
    raise numpy_shard.ShardExists(out, "exists; pass --overwrite to "
                                  "replace it")
  cli.quiet_tensorflow()  # Before the data pipeline imports TensorFlow.
  # pylint: disable=g-import-not-at-top
  import jax
  from retro_jax.core import sharding
  from retro_jax.data import cache_job
  from retro_jax.data import train_sources
  # pylint: enable=g-import-not-at-top
  # One device: this process holds, so reads, every row of the batch.
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  _, num_shards = train_sources.shards_read(config, (0, 1))
  try:
    stream = train_sources.make_source(config, mesh)(_START.value)
    batches = list(itertools.islice(stream, _BATCHES.value))
  except cache_job.IncompleteCacheError as e:
    if cli.verbose():
      raise
    cli.fail(str(e))
  size = numpy_shard.write(out, batches,
                           provenance(config, num_shards, _START.value),
                           overwrite=_OVERWRITE.value)
  n, b, seq = len(batches), *batches[0]["tokens"].shape
  _, l, k, r = batches[0]["neighbours"].shape
  print(f"wrote {out}: {n} batches x {b} x {seq} tokens (neighbours "
        f"[{l}, {k}, {r}]) of {config.data.task_name}/{config.data.split}, "
        f"{size:,} bytes", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "out"])
  cli.run(main)  # Bad input (a config value, a file): one line, status 1.
