"""The DB build's offline jobs as Apache Beam pipelines: embed, neighbour table.

Both jobs are embarrassingly parallel over shards, and both must scale from
this machine to Google Cloud without a code change:

  embed_pipeline   Create(DB shards left to embed) | Reshuffle
                   | ParDo(EmbedShardFn)          one DB shard per element
  table_pipeline   Create(index shards) | Reshuffle
                   | ParDo(SearchIndexShardFn)    one index shard against
                                                  every DB shard -> partials
                   | GroupByKey(DB shard)         waits for every search
                   | ParDo(MergeTableShardFn)     partials -> table shard
                   then neighbour_table.finalize in the driver (table.json)

Why Beam: a unit of work is a whole shard written whole (record last), so a
worker that dies loses only its shard and a rerun redoes only missing shards;
Beam supplies the scheduling, retries and fan-out. The Reshuffle after Create
is what lets the runner spread the elements: Create is one bundle, the
grouped output of the reshuffle is split over the workers.

Workers hold no object handed over by the driver. Every DoFn carries strings
and numbers only (DB directory, checkpoint path, batch size) and opens what
it needs once per worker in `DoFn.setup` (the BERT embedder) or per element
(one index shard at a time, so a worker's memory is one index shard, not the
whole index). The output is a pure function of the inputs: each shard's files
are the same whichever worker, and however many, computed them.

Runners (`pipeline_options`): "FnApiRunner" runs Beam's portable runner here,
in process with one worker (never the DirectRunner, which first downloads a
runner binary) and with `workers` > 1 in multi-process mode
(direct_running_mode=multi_processing, direct_num_workers=workers: that many
`python -m apache_beam.runners.worker.sdk_worker_main` subprocesses, which
import retro_jax from the installed package). Any other name, e.g.
"DataflowRunner", is passed through as --runner with --num_workers, plus
whatever `beam_args` the caller adds (project, region, temp_location, ...).

What happened comes back through Beam metrics, which every runner reports
to the driver: counters of chunks and shards done, and one counter per worker
process ("<host>:<pid>"), so a summary names the processes that did the work.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from retro_jax.retrieval import db_build

_NAMESPACE = "retro_jax"              # Counters of work done.
_WORKERS = "retro_jax.workers"        # One counter per worker process.
IN_PROCESS_RUNNER = "FnApiRunner"


def pipeline_options(workers: int = 1, runner: str = IN_PROCESS_RUNNER,
                     beam_args: Sequence[str] = ()) -> PipelineOptions:
  """Beam options for `workers` workers on `runner` (see the module doc)."""
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  args = [f"--runner={runner}"]
  if runner == IN_PROCESS_RUNNER:
    if workers > 1:
      # fn_runner.FnApiRunner.run_pipeline reads these two: a
      # SubprocessSDKEnvironment of `workers` worker processes.
      args += ["--direct_running_mode=multi_processing",
               f"--direct_num_workers={workers}"]
  elif workers > 1:
    args.append(f"--num_workers={workers}")
  return PipelineOptions(args + list(beam_args))


def _worker_id() -> str:
  return f"{socket.gethostname()}:{os.getpid()}"


def _count(name: str, value: int = 1) -> None:
  Metrics.counter(_NAMESPACE, name).inc(value)


def _shard_done(name: str) -> None:
  """Counts one shard of work, overall and for this worker process."""
  _count(name)
  Metrics.counter(_WORKERS, _worker_id()).inc()


def _run(pipeline: beam.Pipeline) -> Tuple[Dict[str, int], Dict[str, int]]:
  """Runs `pipeline` to the end; ({counter: value}, {worker: shards})."""
  result = pipeline.run()
  result.wait_until_finish()
  counters = result.metrics().query(
      MetricsFilter().with_namespaces([_NAMESPACE, _WORKERS]))["counters"]
  totals: Dict[str, int] = {}
  workers: Dict[str, int] = {}
  for c in counters:
    value = c.committed if c.committed is not None else c.attempted
    where = workers if c.key.metric.namespace == _WORKERS else totals
    where[c.key.metric.name] = where.get(c.key.metric.name, 0) + int(value)
  return totals, dict(sorted(workers.items()))


# -- the embedding stage ------------------------------------------------------
def embedder_spec(embedder: Any) -> Optional[str]:
  """The checkpoint path that `BertEmbedder.load` reloads `embedder` from
  in a worker: the path itself for a string ("" or None: the bundled
  default), else a loaded BertEmbedder's directory (None for the default)."""
  if embedder is None or isinstance(embedder, (str, os.PathLike)):
    return os.fspath(embedder) if embedder else None
  from retro_jax.retrieval import embedder as embedder_lib  # pylint: disable=g-import-not-at-top
  if (embedder.name == embedder_lib.DEFAULT_NAME
      and os.path.samefile(embedder.model_dir,
                           embedder_lib.default_model_dir())):
    return None
  return embedder.model_dir


class EmbedShardFn(beam.DoFn):
  """Embeds whole DB shards (db_build.embed_shard); BERT loads once per
  worker, in `setup`, from its checkpoint path."""

  def __init__(self, db_dir: str, embedder_path: Optional[str],
               batch_size: int, dtype: str):
    super().__init__()
    self._db_dir, self._path = db_dir, embedder_path
    self._batch_size, self._dtype = batch_size, dtype
    self._embedder = None

  def setup(self):
    from retro_jax.retrieval.embedder import BertEmbedder  # pylint: disable=g-import-not-at-top
    self._embedder = BertEmbedder.load(self._path,
                                       batch_size=self._batch_size)

  def process(self, shard: int):
    t0 = time.time()
    n = db_build.embed_shard(self._db_dir, shard, self._embedder,
                             self._batch_size, self._dtype)
    _count("chunks_embedded", n)
    _shard_done("shards_embedded")
    print(f"embed: shard {shard} ({n:,} chunks) in {time.time() - t0:.1f} s "
          f"by {_worker_id()}", flush=True)
    yield shard


def embed_pipeline(db_dir: str, embedder_path: Optional[str],
                   batch_size: int = 32, dtype: str = "float32",
                   workers: int = 1, runner: str = IN_PROCESS_RUNNER,
                   beam_args: Sequence[str] = (), loaded: Any = None,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Embeds the DB shards whose embeddings are missing, stale or damaged.

  Args:
    db_dir: a DB whose write_chunks has finished (a directory every worker
      can reach).
    embedder_path: the BERT checkpoint directory; None or "" = the bundled
      all-MiniLM-L6-v2.
    batch_size: chunks per BERT forward pass.
    dtype: "float32" or "float16" storage.
    workers, runner, beam_args: where it runs (`pipeline_options`).
    loaded: the same embedder, already loaded in the driver: the plan
      reads its fingerprint (else it is loaded here for that). Workers
      never receive it; they load `embedder_path`.
    log: where the plan and the summary line go (workers print a line per
      shard).
  Returns:
    {"embedded": shards embedded now, "skipped": complete ones,
     "chunks_embedded", "seconds", "chunks_per_s", "workers": {worker
     process: shards it embedded}}.
  Raises:
    ValueError: a shard was embedded with another embedder or dtype.
    IncompleteDBError: stage 1 is unfinished or a chunk file is damaged.
  """
  from retro_jax.retrieval.embedder import BertEmbedder  # pylint: disable=g-import-not-at-top
  path = embedder_path or None
  # The driver loads it too: the plan compares its fingerprint with the
  # shards' records (an embedder change is refused, not mixed in).
  plan = db_build.embedding_plan(
      db_dir, loaded or BertEmbedder.load(path, batch_size=batch_size), dtype)
  todo = plan["todo"]
  summary: Dict[str, Any] = {"embedded": todo, "skipped": plan["done"],
                             "chunks_embedded": 0, "seconds": 0.0,
                             "chunks_per_s": None, "workers": {}}
  if not todo:
    log(f"embed: all {len(plan['done'])} shards complete, nothing to do")
    return summary
  total = sum(plan["num_chunks"][i] for i in todo)
  log(f"embed: {len(todo)} of {len(todo) + len(plan['done'])} shards "
      f"({total:,} chunks) on {workers} {runner} worker(s)")
  t0 = time.time()
  p = beam.Pipeline(options=pipeline_options(workers, runner, beam_args))
  _ = (p | "shards" >> beam.Create(todo) | "spread" >> beam.Reshuffle()
       | "embed" >> beam.ParDo(EmbedShardFn(db_dir, path, batch_size,
                                            dtype)))
  totals, used = _run(p)
  seconds = time.time() - t0
  done = totals.get("chunks_embedded", total)  # (Counted by the workers.)
  summary.update(chunks_embedded=done, seconds=round(seconds, 2),
                 chunks_per_s=round(done / seconds, 1), workers=used)
  return summary


# -- the neighbour table ------------------------------------------------------
class SearchIndexShardFn(beam.DoFn):
  """Searches every DB chunk in index shard j (neighbour_table.search_step:
  one index shard loaded at a time, partial results written per DB shard);
  emits (DB shard i, j) for each DB shard it wrote partials for."""

  def __init__(self, db_dir: str, index_dir: str, candidates: int):
    super().__init__()
    self._db_dir, self._index_dir = db_dir, index_dir
    self._candidates = candidates

  def process(self, j: int):
    from retro_jax.retrieval import neighbour_table  # pylint: disable=g-import-not-at-top
    t0 = time.time()
    db_shards = neighbour_table.search_step(self._db_dir, self._index_dir, j,
                                            self._candidates)
    _shard_done("index_shards_searched")
    print(f"table: index shard {j} searched in {time.time() - t0:.1f} s by "
          f"{_worker_id()}", flush=True)
    for i in db_shards:
      yield i, j


class MergeTableShardFn(beam.DoFn):
  """Merges the partials of DB shard i (one per index shard) into table
  shard i (neighbour_table.merge_step)."""

  def __init__(self, db_dir: str, index_dir: str, candidates: int):
    super().__init__()
    self._db_dir, self._index_dir = db_dir, index_dir
    self._candidates = candidates

  def process(self, element: Tuple[int, Any]):
    from retro_jax.retrieval import neighbour_table  # pylint: disable=g-import-not-at-top
    i, _ = element
    neighbour_table.merge_step(self._db_dir, i, self._candidates,
                               self._index_dir)
    _shard_done("table_shards_merged")
    yield i


def _complete_table(db_dir: str, index_dir: str,
                    candidates: int) -> Optional[Dict[str, Any]]:
  """table.json of a finished table of this DB, index and C, or None."""
  from retro_jax.retrieval import neighbour_table  # pylint: disable=g-import-not-at-top
  try:
    table = neighbour_table.NeighbourTable.open(db_dir, index_dir)
  except ValueError:
    return None
  return table.table if table.candidates == candidates else None


def table_pipeline(db_dir: str, index_dir: str, candidates: int = 16,
                   workers: int = 1, runner: str = IN_PROCESS_RUNNER,
                   beam_args: Sequence[str] = (),
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Builds the neighbour table of a finalized, indexed DB.

  Index shard j is searched with every DB chunk's stored embedding (no
  BERT) by one element; the GroupByKey on DB shard i holds each merge back
  until every search has written its partial of shard i (a batch
  GroupByKey emits only when its input is complete); table.json is written
  last, by the driver.

  Args:
    db_dir: the DB (finalized, its index built).
    index_dir: the sharded index (index_shards.build).
    candidates: C, nearest chunks kept per DB chunk.
    workers, runner, beam_args: where it runs (`pipeline_options`).
    log: the plan and summary lines (workers print a line per index shard).
  Returns:
    {"num_chunks", "candidates", "shards" (table shards), and of this run
     "index_shards_searched", "table_shards_merged", "seconds",
     "chunks_per_s", "workers": {worker process: shards it searched or
     merged}}; a complete table is kept (nothing run).
  """
  from retro_jax.retrieval import index_shards  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval import neighbour_table  # pylint: disable=g-import-not-at-top
  shards = list(range(len(index_shards.ranges(index_dir))))
  done = _complete_table(db_dir, index_dir, candidates)
  if done is not None:
    log(f"table: complete for this DB, index and C = {candidates}, nothing "
        f"to do")
    return _table_summary(done, {}, {}, 0.0)
  log(f"table: {len(shards)} index shard(s) to search, C = {candidates}, on "
      f"{workers} {runner} worker(s)")
  t0 = time.time()
  p = beam.Pipeline(options=pipeline_options(workers, runner, beam_args))
  _ = (p | "index_shards" >> beam.Create(shards)
       | "spread" >> beam.Reshuffle()
       | "search" >> beam.ParDo(SearchIndexShardFn(db_dir, index_dir,
                                                   candidates))
       | "by_db_shard" >> beam.GroupByKey()
       | "merge" >> beam.ParDo(MergeTableShardFn(db_dir, index_dir,
                                                 candidates)))
  totals, used = _run(p)
  table = neighbour_table.finalize(db_dir, index_dir, candidates)
  return _table_summary(table, totals, used, time.time() - t0)


def _table_summary(table: Dict[str, Any], totals: Dict[str, int],
                   used: Dict[str, int], seconds: float) -> Dict[str, Any]:
  n = table["num_chunks"] if totals else 0
  return {"num_chunks": table["num_chunks"],
          "candidates": table["candidates"],
          "shards": len(table["shards"]),
          "index_shards_searched": totals.get("index_shards_searched", 0),
          "table_shards_merged": totals.get("table_shards_merged", 0),
          "seconds": round(seconds, 2),
          "chunks_per_s": round(n / seconds, 1) if n and seconds else None,
          "workers": used}
