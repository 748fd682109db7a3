r"""Input-pipeline throughput: offline neighbour precompute and online batches.

  python benchmarks/input_pipeline.py --config=configs/tiny.py \
      --config.data.db_dir=runs/db --config.data.max_bytes.train=1000000

1. Precompute: caches the Task's train split into a fresh temporary
   directory (removed at the end; --config.data.cache_dir is left alone) and
   prints sequences/s and chunks/s (BERT embedding + search + Beam writing,
   on this machine's CPU). With --skip_precompute, the complete cache in
   --config.data.cache_dir is read instead.
2. Online: iterates `tasks.batches` over that cache with the `bench` shape
   (batch 2, the config's train.seq_len, 512 for bench) and prints batches/s and
   the headroom over a training step of --step_seconds (the bench preset's
   measured step on 2 CPU cores is ~3 s): headroom = step time / batch time.
"""

import json
import shutil
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retro_jax.core import cli
from retro_jax.data import cache_job
from retro_jax.data import tasks

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/tiny.py", "Run config file (its data, db and cache "
    "sections name the Task).")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Global batch (bench: 2).")
_STEPS = flags.DEFINE_integer("steps", 300, "Batches timed online.")
_STEP_SECONDS = flags.DEFINE_float(
    "step_seconds", 3.0, "Training step time to compare with (bench preset).")
_SKIP_PRECOMPUTE = flags.DEFINE_bool(
    "skip_precompute", False, "Reuse a complete cache instead of timing the "
    "precompute.")


def main(argv):
  del argv
  # seqio logs whole examples at INFO (every power-of-two example).
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  task = tasks.register_from_config(config)
  results = {"task": task.name, "seq_len": config.train.seq_len,
             "num_neighbours": config.model.num_neighbours,
             "max_bytes": config.data.max_bytes.train}
  scratch = (None if _SKIP_PRECOMPUTE.value else
             tempfile.mkdtemp(prefix="benchmark_pipeline_cache_"))
  try:
    if scratch is None:
      cache_dir = config.data.cache_dir
      summary = cache_job.cached_summary(task.name, cache_dir)["train"]
    else:  # Timed into a scratch cache: the real one is never touched.
      cache_dir = scratch
      summary = tasks.cache_task(task.name, cache_dir, splits=("train",),
                                 runner=config.cache.runner,
                                 num_files=config.cache.num_files)["train"]
    _time_online(task, cache_dir, summary, results, config)
  finally:
    if scratch is not None:
      shutil.rmtree(scratch, ignore_errors=True)


def _time_online(task, cache_dir, summary, results, config):
  """Times `tasks.batches` over `cache_dir` and prints the results."""
  results["precompute"] = {
      k: summary[k] for k in ("sequences", "chunks", "dropped", "seconds",
                              "sequences_per_s")}
  results["precompute"]["chunks_per_s"] = round(
      summary["chunks"] / summary["seconds"], 1)

  it = tasks.batches(task, "train", batch_size=_BATCH.value,
                     cache_dir=cache_dir, seed=0)
  t0 = time.perf_counter()
  first = next(it)                     # Opening the cache, first read.
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    batch = next(it)
  seconds = time.perf_counter() - t0
  per_s = _STEPS.value / seconds
  results["online"] = {
      "batch_shapes": {k: list(v.shape) for k, v in batch.items()},
      "first_batch_s": round(first_s, 3), "batches": _STEPS.value,
      "batches_per_s": round(per_s, 1),
      "sequences_per_s": round(per_s * _BATCH.value, 1),
      "step_seconds": _STEP_SECONDS.value,
      "headroom": round(per_s * _STEP_SECONDS.value, 1)}
  del first
  print(json.dumps(results, indent=2))
  print(f"precompute: {results['precompute']['sequences_per_s']} "
        f"sequences/s ({results['precompute']['chunks_per_s']} chunks/s) "
        f"over {summary['sequences']} sequences of {config.train.seq_len} "
        f"tokens")
  print(f"online: {results['online']['batches_per_s']} batches/s of "
        f"{_BATCH.value} x {config.train.seq_len} = "
        f"{results['online']['headroom']}x a {_STEP_SECONDS.value} s step "
        f"(needs >= 10x)")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
