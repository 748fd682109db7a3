"""The evaluation job of scripts/evaluate.py: a run's checkpoint scored on
the evaluation sets of `config.eval.sets` (see `sets` and configs/eval.py).

Neighbours are retrieved online (for the run's Task too) when the DB is
swapped (--db) or `config.eval.num_neighbours` differs from the trained k.
A model without retrieval (no CCA layer) never loads the retriever: its
corpus sets (and its Task set when k or the DB differ) get all-padding
neighbours.

Each set reports loss, perplexity, bits/token and bits/byte with retrieval
on and off, the bits per byte retrieval saves (`intervals.paired_gain`, for
a model with retrieval) and the leakage table; its per-chunk scores go to
<workdir>/eval/<tag>_<set>_chunks.npz, the results to <tag>.json and the
plot to leakage_<tag>.png (local or gs://), with <tag> = step_<step>, then
_k<k> when k is not the trained one, then _<DB folder> with --db. The
leakage table filters chunks by r(C_u) against `config.eval.
leakage_source`'s neighbours ("previous": Ret(C_{u-1}), those C_u is
predicted with; "same": Ret(C_u), paper §2.6 literally); both record it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from etils import epath
import ml_collections
import numpy as np

from retro_jax.evaluation import chunk_files
from retro_jax.evaluation import inputs
from retro_jax.evaluation import intervals
from retro_jax.evaluation import loaded_run
from retro_jax.evaluation import probes
from retro_jax.evaluation import report
from retro_jax.evaluation import scores
from retro_jax.evaluation import sets as sets_lib

# What the leakage filter compares C_u with, per config.eval.leakage_source.
LEAKAGE_NEIGHBOURS = {"previous": "Ret(C_{u-1})", "same": "Ret(C_u)"}


@dataclasses.dataclass(frozen=True)
class Plan:
  """What every set of one evaluation shares, fixed before any is read."""

  k: int  # Neighbours per chunk at evaluation.
  trained_k: int  # Those the run trained (and its Task cached) with.
  seq_len: int  # n of the corpus sets' windows.
  stride: int  # Their window step (seq_len: no overlap).
  online: bool  # The Task's cached neighbours are replaced (DB, k or
  #               neighbours swapped).
  retrieval: bool  # The model has CCA layers (False: never open the DB).
  neighbours: str  # What chunks retrieve (probes.MODES): db | leak | random.
  tag: str  # Names the output files: step_<step>[_k<k>][_<DB folder>]
  #           [_leak | _random].


def plan_of(run: loaded_run.LoadedRun, eval_config: ml_collections.ConfigDict,
            db_dir: str = "") -> Plan:
  trained_k = run.model_config.num_neighbours
  k = eval_config.num_neighbours or trained_k
  n = eval_config.seq_len or int(run.config.train.seq_len)
  mode = probes.check_mode(eval_config.get("neighbours", "db"))
  tag = f"step_{run.step}" + (f"_k{k}" if k != trained_k else "") + (
      "_" + os.path.basename(os.path.normpath(db_dir)) if db_dir else "") + (
          f"_{mode}" if mode != "db" else "")
  return Plan(k=k, trained_k=trained_k, seq_len=n,
              stride=eval_config.stride or n,
              online=bool(db_dir) or k != trained_k or mode != "db",
              retrieval=run.model_config.has_retrieval, neighbours=mode,
              tag=tag)


def set_batches(run: loaded_run.LoadedRun,
                eval_config: ml_collections.ConfigDict, plan: Plan,
                eval_set: sets_lib.EvalSet
                ) -> Iterator[Tuple[str, sets_lib.Batches, int]]:
  """(reported name, batches, their n) for a set and each of its groups.
  The retriever loads only when a batch needs it."""
  m, r = run.model_config.chunk_size, run.model_config.neighbour_len

  def renew(batches):  # Neighbours for `batches`, as plan.neighbours says.
    if not plan.retrieval:  # All padding: the model has nothing to read.
      return inputs.with_neighbours(batches, None, run.tokenizer, plan.k, m,
                                    r)
    if plan.neighbours == "random":
      return probes.with_random_neighbours(batches, run.db, plan.k)
    retriever = run.retriever
    if plan.neighbours == "leak":
      batches = probes.materialize(batches, eval_config.max_batches or None)
      retriever = probes.leaked_retriever(retriever, run.tokenizer, batches,
                                          m)
    return inputs.with_neighbours(batches, retriever, run.tokenizer, plan.k,
                                  m, r)

  if eval_set.is_task:
    # The Task's sequences keep the length they were cached at.
    yield eval_set.name, sets_lib.task_batches(
        run.config, eval_config, renew if plan.online else None), int(
            run.config.train.seq_len)
    return
  docs = sets_lib.documents(eval_set, eval_config.split,
                            eval_config.max_bytes)
  for name, group in sets_lib.groups_of(eval_set, docs).items():
    sequences = inputs.sequences_from_documents(
        [(d.doc_id, run.tokenizer.encode(d.text)) for d in group],
        plan.seq_len, plan.stride, m)
    yield name, renew(inputs.sequence_batches(
        sequences, eval_config.batch_size)), plan.seq_len


def score_batches(run: loaded_run.LoadedRun,
                  eval_config: ml_collections.ConfigDict,
                  batches: sets_lib.Batches, token_bytes: np.ndarray,
                  seq_len: int, retrieval: bool
                  ) -> Tuple[Dict[str, Any], scores.ChunkScores]:
  """(summary with the leakage table and, for a model with retrieval, the
  paired gain of retrieval on over off; the per-chunk scores)."""
  chunk_scores = scores.evaluate_batches(
      run.model, run.params, batches, token_bytes,
      max_batches=eval_config.max_batches or None,
      leakage_source=eval_config.leakage_source, token_nll=run.token_nll)
  summary = scores.summarize(chunk_scores)
  summary["leakage"] = report.leakage_table(chunk_scores)
  summary["overlap"] = report.overlap_split(chunk_scores)
  if retrieval:  # What switching retrieval on saves, with its interval.
    summary["retrieval_gain"] = intervals.paired_gain(
        chunk_scores.nll_off, chunk_scores.nll_on, chunk_scores.bytes,
        seq_len // run.model_config.chunk_size)
  return summary, chunk_scores


def write_outputs(run: loaded_run.LoadedRun, results: Dict[str, Any],
                  out_dir: epath.Path, tag: str) -> None:
  """The leakage plot and the results JSON (which names both)."""
  against = results["leakage_neighbours"]
  results["json"] = str(out_dir / f"{tag}.json")
  results["plot"] = report.plot_leakage(
      {name: s["leakage"] for name, s in results["sets"].items()},
      str(out_dir / f"leakage_{tag}.png"),
      title=f"{os.path.basename(os.path.normpath(run.workdir))} step "
      f"{run.step} (leakage: r(C_u) vs {against})")
  report.write_results(results["json"], results)


def evaluate_run(config: ml_collections.ConfigDict, workdir: str,
                 step: Optional[int] = None, db_dir: str = "",
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Evaluates a run's checkpoint on `config.eval.sets`; writes the chunk
  scores, JSON and PNG. Returns the results dict that was written."""
  ec = config.eval
  eval_sets = sets_lib.sets_of(ec)  # Checked before the checkpoint loads.
  run = loaded_run.LoadedRun.load(workdir, step, db_dir=db_dir or None)
  plan = plan_of(run, ec, db_dir)
  log(f"run {workdir} step {run.step}: k={plan.k} (trained {plan.trained_k}"
      f"), n={plan.seq_len}, stride={plan.stride}, DB {run.db_dir or '-'}")
  if run.tokenizer is None:
    raise ValueError(f"run {workdir} has no SentencePiece model: bits per "
                     f"byte need one (config.data.spm_path)")
  token_bytes = scores.token_bytes(run.tokenizer)
  results: Dict[str, Any] = {
      "workdir": workdir, "step": run.step, "db_dir": run.db_dir,
      "num_neighbours": plan.k, "retrieval": plan.retrieval,
      "leakage_source": ec.leakage_source, "neighbours": plan.neighbours,
      "leakage_neighbours": LEAKAGE_NEIGHBOURS.get(ec.leakage_source,
                                                   ec.leakage_source),
      "seq_len": plan.seq_len, "stride": plan.stride, "sets": {}}
  out_dir = epath.Path(workdir) / "eval"
  for eval_set in eval_sets:
    t0 = time.time()
    for name, batches, seq_len in set_batches(run, ec, plan, eval_set):
      summary, chunk_scores = score_batches(run, ec, batches, token_bytes,
                                            seq_len, plan.retrieval)
      # Per-chunk scores, for paired comparisons with other runs.
      summary["chunk_scores"] = chunk_files.save_chunk_scores(
          str(out_dir / f"{plan.tag}_{name.replace('/', '_')}_chunks.npz"),
          chunk_scores)
      summary["seconds"] = time.time() - t0
      t0 = time.time()
      results["sets"][name] = summary
      log(report.format_summary(name, summary))
  write_outputs(run, results, out_dir, plan.tag)
  log(f"wrote {results['json']} and {results['plot']}")
  return results
