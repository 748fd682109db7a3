"""The offline neighbour precompute: seqio's cache job for RETRO Tasks.

Retrieval (BERT on every chunk, index search) runs once, offline, in Apache
Beam, through seqio's own transforms (`beam_utils.PreprocessTask`,
`WriteExampleTfRecord`, `GetInfo`, `GetStats`), so the cache reads back with
`Task.get_dataset(use_cached=True)` like any seqio cache. Locally the runner
is Beam's in-process `FnApiRunner` (DirectRunner would first try to download
a runner binary); on Google Cloud pass `runner="DataflowRunner"`.

Layout of `<cache_dir>/<task name>/`:
  <split>.tfrecord-0000i-of-0000N   the examples (tokens, neighbours, doc_ids)
  <split>.info.json, <split>.stats.json   seqio's feature info and counts
  retro_task.json                   what was cached (task arguments, DB and
                                    vocabulary identity) and the summary
  COMPLETED                         written last, after every split finished
                                    (holds the finish time of retro_task.json)

Nothing half-written reads as complete: a crashed job leaves no COMPLETED,
and `require_complete` refuses a directory without it (or with a missing
split file, or cached for other Task arguments), naming the directory and
the command that rebuilds it. A rerun removes such a directory and starts
over; a rerun over a complete cache does nothing, or, asked for more splits,
keeps the complete ones and computes only the others.

Files go through `tf.io.gfile`, so `cache_dir` may be local, on GCS
(gs://bucket/cache), where pods read it, or on any other file system
TensorFlow knows (its in-memory ram:// in the tests).

The Task's spec (task_spec.py), carried by the `RetroTask` itself, is what
the record is compared with: nothing is looked up by Task name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from retro_jax.data import task_spec

gfile = tf.io.gfile

COMPLETED = "COMPLETED"
RETRO_TASK = "retro_task.json"
# int64 [4] per sequence: chunks, dropped, missing, searched; never written.
STATS_FEATURE = "retrieval_stats"
COMMAND = ("python scripts/cache_tasks.py --config=<the run config> "
           "--config.data.task_name={task} --config.data.cache_dir={cache_dir}")

# Called with the number of sequences each time the retrieval preprocessor
# finishes a batch (in-process runners only); set by `cache_task`.
progress_hook: Optional[Callable[[int], None]] = None


class IncompleteCacheError(RuntimeError):
  """A cache directory that is missing, unfinished or for other arguments."""


def task_dir(name: str, cache_dir: str) -> str:
  """Where seqio puts Task `name` under `cache_dir`."""
  return os.path.join(cache_dir, seqio.get_task_dir_from_name(name))


# The cache is read and written with tf.io.gfile, not retro_jax.core.files:
# seqio's own cache files go through gfile, and so does every file system
# TensorFlow registers (retro_jax.core.files knows local paths and gs://).
def _write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` under a temporary name, then renames it."""
  tmp = f"{path}.tmp.{os.getpid()}"
  with gfile.GFile(tmp, "w") as f:
    f.write(text)
  gfile.rename(tmp, path, overwrite=True)


def read_json(path: str) -> Any:
  """The JSON value of a cache file (through gfile)."""
  with gfile.GFile(path) as f:
    return json.load(f)


def spec_of(task: seqio.Task) -> Optional[Dict[str, Any]]:
  """The spec a RetroTask carries (None for a Task registered otherwise,
  whose cache is then taken as it is)."""
  return getattr(task, "spec", None)


def _problem(spec: Optional[Mapping[str, Any]], directory: str,
             splits: Sequence[str]) -> Optional[str]:
  """Why `directory` is not a complete cache of `splits` for a Task of
  `spec` (None if it is)."""
  if not gfile.isdir(directory):
    return "does not exist"
  if not gfile.exists(os.path.join(directory, COMPLETED)):
    return (f"has no {COMPLETED} file: the cache job did not finish "
            "(crashed or still running)")
  try:
    record = read_json(os.path.join(directory, RETRO_TASK))
  except (OSError, ValueError, tf.errors.OpError) as e:
    return f"has no readable {RETRO_TASK}: {e}"
  changed = (task_spec.differences(spec, record.get("spec"), splits)
             if spec is not None else ())
  if changed:
    return (f"was cached for other Task arguments (differing: "
            f"{', '.join(changed)})")
  for split in splits:
    info_path = seqio.get_cached_info_path(directory, split)
    stats_path = seqio.get_cached_stats_path(directory, split)
    for path in (info_path, stats_path):
      if not gfile.exists(path):
        return f"lacks {os.path.basename(path)} (split {split!r} not cached)"
    try:
      num_files = read_json(info_path)["num_shards"]
    except (OSError, ValueError, KeyError, tf.errors.OpError) as e:
      return f"has an unreadable {os.path.basename(info_path)}: {e}"
    prefix = seqio.get_cached_tfrecord_prefix(directory, split)
    want = {f"{os.path.basename(prefix)}-{i:05d}-of-{num_files:05d}"
            for i in range(num_files)}
    missing = want - set(gfile.listdir(directory))
    if missing:
      return f"lacks {len(missing)} of {num_files} record files of {split!r}"
  return None


def require_complete(name: str, cache_dir: str, splits: Sequence[str],
                     spec: Optional[Mapping[str, Any]] = None) -> str:
  """The task directory of a complete cache of `splits`, else a clear error.

  Args:
    name: the Task name (where seqio puts its cache under `cache_dir`).
    cache_dir: the cache root.
    splits: the splits that must be cached.
    spec: the Task's spec (task_spec.task_spec); the recorded one must
      match it for `splits` (None: not compared).
  Raises:
    IncompleteCacheError: naming the directory, what is wrong, and the
      command that (re)builds it.
  """
  directory = task_dir(name, cache_dir)
  problem = _problem(spec, directory, splits)
  if problem:
    raise IncompleteCacheError(
        f"cache {directory} of Task {name!r} {problem}; (re)build it with: "
        + COMMAND.format(task=name, cache_dir=cache_dir))
  return directory


def cached_summary(name: str, cache_dir: str) -> Dict[str, Any]:
  """The summary `cache_task` recorded for a complete cache."""
  directory = require_complete(name, cache_dir, ())
  return read_json(os.path.join(directory, RETRO_TASK))["summary"]


def completion_stamp(directory: str) -> str:
  """What tells one finished cache job's output from another's in a
  complete task directory: the finish time its record holds (read from the
  file, as mtimes are not dependable on GCS)."""
  return str(read_json(os.path.join(directory, RETRO_TASK)).get("finished"))


def _remove_split(directory: str, split: str) -> None:
  """Deletes whatever a split's earlier, unfinished cache run left."""
  prefix = os.path.basename(seqio.get_cached_tfrecord_prefix(directory, split))
  for fname in gfile.listdir(directory):
    if fname.startswith(prefix) or fname in (
        os.path.basename(seqio.get_cached_info_path(directory, split)),
        os.path.basename(seqio.get_cached_stats_path(directory, split))):
      gfile.remove(os.path.join(directory, fname))


def _stats_of(ex: Mapping[str, Any]):
  """(sequences, chunks, dropped, missing, searched) of one example."""
  return (1, *(int(v) for v in ex[STATS_FEATURE]))


def _sum_tuples(rows):
  total = [0, 0, 0, 0, 0]
  for row in rows:
    total = [a + b for a, b in zip(total, row)]
  return total


def _without_stats(ex: Mapping[str, Any]) -> Dict[str, Any]:
  return {k: v for k, v in ex.items() if k != STATS_FEATURE}


def _run_split(task: seqio.Task, split: str, directory: str, runner: str,
               num_files: int) -> Dict[str, Any]:
  """One Beam pipeline that caches one split; returns its counts."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  from seqio import beam_utils  # pylint: disable=g-import-not-at-top

  # A bucket with a runner on this host: Beam writes to local disk and the
  # files are copied up through tf.io.gfile. Beam's own GCS client commits
  # its output with batched copy and delete requests, which are slower than
  # one copy per file here and which no local GCS stand-in serves; a
  # DataflowRunner's workers share no disk, so they write to the bucket.
  target = directory
  if "://" in directory and runner != "DataflowRunner":
    directory = tempfile.mkdtemp(prefix=f"retro_cache_{split}_")
  counts_path = os.path.join(directory, f"{split}.retro_counts.json")
  options = PipelineOptions([f"--runner={runner}"])
  with beam.Pipeline(options=options) as p:
    examples = (p | f"{split}_preprocess" >> beam_utils.PreprocessTask(
        task, split) | f"{split}_shuffle" >> beam.Reshuffle())
    _ = (examples | f"{split}_counts" >> beam.Map(_stats_of)
         | f"{split}_sum" >> beam.CombineGlobally(_sum_tuples)
         | f"{split}_write_counts" >> beam_utils.WriteJson(counts_path))
    clean = examples | f"{split}_strip" >> beam.Map(_without_stats)
    _ = clean | f"{split}_write" >> beam_utils.WriteExampleTfRecord(
        seqio.get_cached_tfrecord_prefix(directory, split),
        num_shards=num_files)
    _ = (clean | f"{split}_info" >> beam_utils.GetInfo(num_files)
         | f"{split}_write_info" >> beam_utils.WriteJson(
             seqio.get_cached_info_path(directory, split)))
    _ = (clean | f"{split}_stats" >> beam_utils.GetStats(task.output_features)
         | f"{split}_write_stats" >> beam_utils.WriteJson(
             seqio.get_cached_stats_path(directory, split)))
  sequences, chunks, dropped, missing, searched = read_json(counts_path)
  gfile.remove(counts_path)
  if directory != target:
    for fname in sorted(gfile.listdir(directory)):
      gfile.copy(os.path.join(directory, fname), os.path.join(target, fname),
                 overwrite=True)
    shutil.rmtree(directory)
  return {"sequences": sequences, "chunks": chunks, "dropped": dropped,
          "missing": missing, "searched": searched,
          "from_db": split in (spec_of(task) or {}).get("from_db", ())}


def cache_task(name: str, cache_dir: str,
               splits: Optional[Sequence[str]] = None,
               runner: str = "FnApiRunner", overwrite: bool = False,
               num_files: int = 1,
               log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Precomputes the neighbours of Task `name`'s splits into `cache_dir`.

  Args:
    name: a registered RETRO Task (tasks.register_retro_task); its spec is
      recorded beside the cache.
    cache_dir: the cache root (seqio's `output_cache_dir`).
    splits: the splits to cache (default: all the Task's).
    runner: the Beam runner; "FnApiRunner" runs in-process, offline.
    overwrite: rebuild even if a complete cache exists (else its complete
      splits are kept and only missing ones computed).
    num_files: record files per split (a multiple of the host count lets
      every host read whole files; 1 shards by example).
    log: where progress and the summary go.
  Returns:
    The summary: per split {sequences, chunks, dropped, missing (neighbour
    slots left empty), searched (chunks searched again because the table
    row ran short), from_db, seconds, sequences_per_s}, plus "skipped":
    True when a complete cache was reused.
  Raises:
    ValueError: a split yields no sequence (corpus slice too small).
  """
  task = seqio.get_mixture_or_task(name)
  spec = spec_of(task)
  splits = tuple(splits or task.splits)
  directory = task_dir(name, cache_dir)
  if not overwrite and _problem(spec, directory, splits) is None:
    summary = dict(cached_summary(name, cache_dir), skipped=True)
    log(f"{name}: complete cache in {directory}, nothing to do")
    return summary
  kept: Dict[str, Any] = {}  # Complete splits of a complete cache: reused.
  if not overwrite and _problem(spec, directory, ()) is None:
    kept = {split: counts for split, counts in
            cached_summary(name, cache_dir).items()
            if _problem(spec, directory, (split,)) is None}
  if kept:
    log(f"{name}: reusing cached splits {sorted(kept)} in {directory}")
    gfile.remove(os.path.join(directory, COMPLETED))  # Incomplete from now.
    for split in splits:
      if split not in kept:
        _remove_split(directory, split)
  else:
    if gfile.exists(directory):
      log(f"{name}: removing {directory} "
          f"({_problem(spec, directory, splits) or 'overwrite requested'})")
      gfile.rmtree(directory)
    gfile.makedirs(directory)
  global progress_hook
  summary: Dict[str, Any] = dict(kept)
  for split in (s for s in splits if s not in kept):
    import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm.tqdm(desc=f"{name}:{split} neighbours", unit="seq")
    progress_hook = bar.update
    t0 = time.time()
    try:
      counts = _run_split(task, split, directory, runner, num_files)
    finally:
      progress_hook = None
      bar.close()
    seconds = time.time() - t0
    if not counts["sequences"]:
      raise ValueError(f"{name}: split {split!r} gave no sequence; the "
                       "corpus slice is shorter than one sequence")
    counts.update(seconds=round(seconds, 2),
                  sequences_per_s=round(counts["sequences"] / seconds, 2))
    summary[split] = counts
    how = (f"DB chunks, neighbours looked up in the table; "
           f"{counts['searched']:,} chunks searched again, their row short"
           if counts["from_db"] else "text outside the DB, every chunk "
           "embedded and searched")
    log(f"{name}:{split}: {counts['sequences']:,} sequences ({how}), "
        f"{counts['chunks']:,} chunks, {counts['dropped']:,} neighbours "
        f"dropped by the document filter, {counts['missing']:,} chunks "
        f"short of k neighbours, {seconds:.1f} s "
        f"({counts['sequences_per_s']} sequences/s)")
  record = {"task": name, "splits": sorted(summary), "summary": summary,
            "spec": spec, "finished": time.time()}
  _write_atomic(os.path.join(directory, RETRO_TASK),
                json.dumps(record, indent=2, sort_keys=True))
  _write_atomic(os.path.join(directory, COMPLETED),  # Last of all.
                f"{record['finished']}\n")
  log(f"{name}: cached in {directory}")
  return summary
