"""The evaluation job of scripts/evaluate.py: a run's checkpoint scored on
the evaluation sets of `config.eval.sets` (see `sets` and configs/eval.py).

A corpus set is read whole by default (`config.eval.split` "all", no
`config.eval.max_bytes` cap), streamed (`stream`) in memory that does not
grow with the corpus, with progress lines on stderr; with `group_by`, each
value of that meta field is packed and reported on its own and the set is
their sum. The run's own Task set reads its cached `config.eval.task_split`
(validation, held out by construction).

Neighbours are retrieved online (for the run's Task too) when the DB is
swapped (--db) or `config.eval.num_neighbours` differs from the trained k.
A model without retrieval (no CCA layer) never loads the retriever: its
corpus sets (and its Task set when k or the DB differ) get all-padding
neighbours.

Each set reports loss, perplexity, bits/token and bits/byte with retrieval
on and off (corpus sets also word-level perplexity, docs/evaluation.md),
the bits per byte retrieval saves (`intervals.paired_gain`, for a model
with retrieval) and the leakage table. Every set's results, plot and
per-chunk scores go to files of their own under <workdir>/eval, named by
step, set, DB identity, k and the settings that differ from the defaults
(`result_files`), so no evaluation overwrites another's. The leakage table
filters chunks by r(C) against `config.eval.leakage_source`'s neighbours
("previous": Ret(C_{u-1}), those C_u is predicted with; "same": Ret(C_u),
paper §2.6 literally); both record it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, List, Optional

from etils import epath
import ml_collections

from retro_jax.evaluation import chunk_files
from retro_jax.evaluation import inputs
from retro_jax.evaluation import intervals
from retro_jax.evaluation import loaded_run
from retro_jax.evaluation import probes
from retro_jax.evaluation import progress as progress_lib
from retro_jax.evaluation import report
from retro_jax.evaluation import result_files
from retro_jax.evaluation import scores
from retro_jax.evaluation import sets as sets_lib
from retro_jax.evaluation import stream

# What the leakage filter compares C_u with, per config.eval.leakage_source.
LEAKAGE_NEIGHBOURS = {"previous": "Ret(C_{u-1})", "same": "Ret(C_u)"}
TASK_SPLIT = "validation"  # The Task's split unless config.eval.task_split.


@dataclasses.dataclass(frozen=True)
class Plan:
  """What every set of one evaluation shares, fixed before any is read."""

  k: int  # Neighbours per chunk at evaluation.
  trained_k: int  # Those the run trained (and its Task cached) with.
  trained_seq_len: int  # n the run trained (and its Task cached) with.
  seq_len: int  # n of the corpus sets' windows.
  stride: int  # Their window step (seq_len: no overlap).
  online: bool  # The Task's cached neighbours are replaced (DB, k or
  #               neighbours swapped).
  retrieval: bool  # The model has CCA layers (False: never open the DB).
  neighbours: str  # What chunks retrieve (probes.MODES): db | leak | random.


def plan_of(run: loaded_run.LoadedRun, eval_config: ml_collections.ConfigDict,
            db_dir: str = "") -> Plan:
  trained_k = run.model_config.num_neighbours
  k = eval_config.num_neighbours or trained_k
  trained_n = int(run.config.train.seq_len)
  n = eval_config.seq_len or trained_n
  mode = probes.check_mode(eval_config.get("neighbours", "db"))
  return Plan(k=k, trained_k=trained_k, trained_seq_len=trained_n,
              seq_len=n, stride=eval_config.stride or n,
              online=bool(db_dir) or k != trained_k or mode != "db",
              retrieval=run.model_config.has_retrieval, neighbours=mode)


def variants_of(plan: Plan, eval_config: ml_collections.ConfigDict,
                eval_set: sets_lib.EvalSet) -> List[str]:
  """The settings of a set's evaluation that differ from the defaults, as
  file-name parts (besides step, set, DB and k, see `result_files`)."""
  out = [plan.neighbours] if plan.neighbours != "db" else []
  if eval_set.is_task:
    split = eval_config.get("task_split", TASK_SPLIT)
    out += [f"split-{split}"] if split != TASK_SPLIT else []
  else:
    out += [f"n{plan.seq_len}"] if plan.seq_len != plan.trained_seq_len else []
    out += [f"stride{plan.stride}"] if plan.stride != plan.seq_len else []
    out += ([f"split-{eval_set.split}"] if eval_set.split != sets_lib.ALL
            else [])
    out += ([f"max{eval_config.max_bytes}B"] if eval_config.max_bytes
            else [])
  out += ([f"{eval_config.max_batches}batches"] if eval_config.max_batches
          else [])
  if eval_config.leakage_source != "previous":
    out.append(f"leakage-{eval_config.leakage_source}")
  return out


def neighbours_of(run: loaded_run.LoadedRun,
                  eval_config: ml_collections.ConfigDict, plan: Plan
                  ) -> Callable[[sets_lib.Batches], sets_lib.Batches]:
  """batches -> batches with the neighbours `plan.neighbours` says. The
  retriever loads only when a batch needs it."""
  m, r = run.model_config.chunk_size, run.model_config.neighbour_len

  def renew(batches):
    if not plan.retrieval:  # All padding: the model has nothing to read.
      return inputs.with_neighbours(batches, None, run.tokenizer, plan.k, m,
                                    r)
    if plan.neighbours == "random":
      return probes.with_random_neighbours(batches, run.db, plan.k)
    retriever = run.retriever
    if plan.neighbours == "leak":  # Embeds all the text before scoring.
      batches = probes.materialize(batches, eval_config.max_batches or None)
      retriever = probes.leaked_retriever(retriever, run.tokenizer, batches,
                                          m)
    return inputs.with_neighbours(batches, retriever, run.tokenizer, plan.k,
                                  m, r)
  return renew


def summary_of(run: loaded_run.LoadedRun, chunk_scores: scores.ChunkScores,
               seq_len: int, retrieval: bool,
               words: Optional[int] = None) -> Dict[str, Any]:
  """The summary with the leakage table and, for a model with retrieval,
  the paired gain of retrieval on over off."""
  summary = scores.summarize(chunk_scores, words)
  summary["leakage"] = report.leakage_table(chunk_scores)
  summary["overlap"] = report.overlap_split(chunk_scores)
  if retrieval:  # What switching retrieval on saves, with its interval.
    summary["retrieval_gain"] = intervals.paired_gain(
        chunk_scores.nll_off, chunk_scores.nll_on, chunk_scores.bytes,
        seq_len // run.model_config.chunk_size)
  return summary


def score_task(run, eval_config, plan, eval_set, token_bytes
               ) -> Dict[str, tuple]:
  """{name: (summary, chunk scores)} of the run's cached Task split."""
  renew = neighbours_of(run, eval_config, plan) if plan.online else None
  batches = sets_lib.task_batches(run.config, eval_config, renew)
  chunk_scores = scores.evaluate_batches(
      run.model, run.params, batches, token_bytes,
      max_batches=eval_config.max_batches or None,
      leakage_source=eval_config.leakage_source, token_nll=run.token_nll)
  return {eval_set.name: (summary_of(run, chunk_scores, plan.trained_seq_len,
                                     plan.retrieval), chunk_scores)}


def score_corpus(run, eval_config, plan, eval_set, token_bytes
                 ) -> Dict[str, tuple]:
  """{name: (summary, chunk scores)} of a corpus set streamed whole: the
  set, then (with group_by) each group. Summaries also hold what was read
  (documents, text_bytes, words) and what no target covers (unscored_*:
  each window's first token when it is new text), so that bytes +
  unscored_bytes = text_bytes + documents (one dummy-prefix space each)."""
  groups: List[str] = []
  stats: Dict[str, stream.DocumentStats] = {}
  batches = stream.labelled_batches(
      sets_lib.documents(eval_set, eval_config.max_bytes),
      sets_lib.group_of(eval_set), run.tokenizer.encode, plan.seq_len,
      plan.stride, eval_config.batch_size, groups, stats,
      run.model_config.chunk_size)
  progress = progress_lib.Progress(
      eval_set.name, lambda: stream.total_stats(stats),
      eval_config.get("progress_seconds", 10.0))
  by_group, complete = scores.evaluate_grouped_batches(
      run.model, run.params, neighbours_of(run, eval_config, plan)(batches),
      token_bytes, leakage_source=eval_config.leakage_source,
      max_batches=eval_config.max_batches or None, token_nll=run.token_nll,
      on_batch=progress)
  progress.done()
  if not by_group:
    raise sets_lib.no_document_error(eval_set)
  scored = [(name, by_group[i]) for i, name in enumerate(groups)
            if i in by_group]  # All, unless max_batches stopped early.

  def entry(names, parts):
    chunk_scores = scores.ChunkScores.concat([p.chunks() for p in parts])
    read = stream.total_stats(stats, names)
    summary = summary_of(run, chunk_scores, plan.seq_len, plan.retrieval,
                         read.words if complete else None)
    summary.update(documents=read.documents, text_bytes=read.text_bytes,
                   unscored_tokens=sum(p.unscored_tokens for p in parts),
                   unscored_bytes=sum(p.unscored_bytes for p in parts),
                   complete=complete)
    return summary, chunk_scores

  out = {eval_set.name: entry([n for n, _ in scored],
                              [g for _, g in scored])}
  if eval_set.group_by:
    for name, group in scored:
      out[name] = entry([name], [group])
  return out


def write_set(run: loaded_run.LoadedRun, results: Dict[str, Any],
              scored: Dict[str, tuple], out_dir: epath.Path,
              file_stem: str, log: Callable[[str], None]) -> None:
  """One set's chunk files, leakage plot and results JSON (which names
  them), each written atomically."""
  set_name = results["set"]
  subsets = result_files.safe_names(n.partition("/")[2] for n in scored
                                    if n != set_name)
  for name, (summary, chunk_scores) in scored.items():
    suffix = "" if name == set_name else "_" + subsets[name.partition("/")[2]]
    summary["chunk_scores"] = chunk_files.save_chunk_scores(
        str(out_dir / f"{file_stem}_chunks{suffix}.npz"), chunk_scores)
    results["sets"][name] = summary
    log(report.format_summary(name, summary))
  results["json"] = str(out_dir / f"{file_stem}.json")
  results["plot"] = report.plot_leakage(
      {name: s["leakage"] for name, s in results["sets"].items()},
      str(out_dir / f"{file_stem}_leakage.png"),
      title=f"{os.path.basename(os.path.normpath(run.workdir))} step "
      f"{run.step} (leakage: r(C_u) vs {results['leakage_neighbours']})")
  report.write_results(results["json"], results)
  log(f"wrote {results['json']} and {results['plot']}")


def evaluate_run(config: ml_collections.ConfigDict, workdir: str,
                 step: Optional[int] = None, db_dir: str = "",
                 log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
  """Evaluates a run's checkpoint on `config.eval.sets`; writes each set's
  chunk scores, JSON and PNG. Returns the results dicts written, one per
  set."""
  ec = config.eval
  eval_sets = sets_lib.sets_of(ec)  # Checked before the checkpoint loads.
  run = loaded_run.LoadedRun.load(workdir, step, db_dir=db_dir or None)
  plan = plan_of(run, ec, db_dir)
  db_id = result_files.db_identity(run.db_dir, plan.retrieval)
  log(f"run {workdir} step {run.step}: k={plan.k} (trained {plan.trained_k}"
      f"), n={plan.seq_len}, stride={plan.stride}, DB {run.db_dir or '-'} "
      f"({db_id})")
  if run.tokenizer is None:
    raise ValueError(f"run {workdir} has no SentencePiece model: bits per "
                     f"byte need one (config.data.spm_path)")
  token_bytes = scores.token_bytes(run.tokenizer)
  out_dir = epath.Path(workdir) / "eval"
  written = []
  for eval_set in eval_sets:
    t0 = time.time()
    variants = variants_of(plan, ec, eval_set)
    task = eval_set.is_task
    results: Dict[str, Any] = {
        "workdir": workdir, "step": run.step, "set": eval_set.name,
        "corpus": eval_set.corpus,
        "split": ec.get("task_split", TASK_SPLIT) if task else eval_set.split,
        "max_bytes": 0 if task else int(ec.max_bytes),
        "max_batches": int(ec.max_batches), "db_dir": run.db_dir,
        "db_id": db_id, "num_neighbours": plan.k, "trained_k": plan.trained_k,
        "retrieval": plan.retrieval, "leakage_source": ec.leakage_source,
        "neighbours": plan.neighbours, "variants": variants,
        "leakage_neighbours": LEAKAGE_NEIGHBOURS.get(ec.leakage_source,
                                                     ec.leakage_source),
        "seq_len": plan.trained_seq_len if task else plan.seq_len,
        "stride": plan.trained_seq_len if task else plan.stride, "sets": {}}
    score = score_task if task else score_corpus
    scored = score(run, ec, plan, eval_set, token_bytes)
    results["seconds"] = time.time() - t0
    write_set(run, results, scored, out_dir,
              result_files.stem(run.step, eval_set.name, db_id, plan.k,
                                variants), log)
    written.append(results)
  return written
