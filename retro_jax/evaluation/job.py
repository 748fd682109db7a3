"""The evaluation job of scripts/evaluate.py: a run's checkpoint on eval sets.

An eval set (one item of the comma-separated `config.eval.tasks`) is either

  task                  the run's own seqio Task (config.data.task_name), its
                        `config.eval.split` as cached by scripts/cache_tasks.py
                        (neighbours precomputed with the training DB and k);
  NAME=CORPUS[@k=v;..]  documents of a corpus spec (sources.open_corpus, e.g.
                        "python_stdlib", "jsonl:/data/pile/val.jsonl.zst",
                        "tfds:c4/en:3.0.1"), optionally only those whose meta
                        has k=v (e.g. @pile_set_name=ArXiv), tokenized,
                        windowed (seq_len, stride) and retrieved online.

Neighbours are retrieved online (for `task` too) when the DB is swapped
(--db) or `config.eval.num_neighbours` differs from the trained k. A model
without retrieval (no CCA layer) never loads the retriever: its online sets
(and its `task` set when k or the DB differ) get all-padding neighbours.
`config.eval.group_by` (e.g. pile_set_name) also reports every value of that
meta field separately (per Pile subset).

Each set reports loss, perplexity, bits/token and bits/byte with retrieval on
and off, and the leakage table; results go to
<workdir>/eval/step_<step>.json and leakage_step_<step>.png (local or gs://).
The leakage table filters chunks by r(C_u) against `config.eval.
leakage_source`'s neighbours ("previous": Ret(C_{u-1}), those C_u is
predicted with; "same": Ret(C_u), paper §2.6 literally); both record it.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from etils import epath
import ml_collections

from retro_jax.evaluation import inputs as eval_data
from retro_jax.evaluation import scores as eval_lib
from retro_jax.inference import run as run_lib
from retro_jax.corpus import sources


# What the leakage filter compares C_u with, per config.eval.leakage_source.
_LEAKAGE_NEIGHBOURS = {"previous": "Ret(C_{u-1})", "same": "Ret(C_u)"}


def parse_sets(text: str) -> List[Dict[str, Any]]:
  """"task,arxiv=jsonl:x@pile_set_name=ArXiv" -> [{name, corpus, meta}]."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    if item == "task":
      out.append({"name": "task", "corpus": None, "meta": {}})
      continue
    name, sep, spec = item.partition("=")
    if not sep or not name or not spec:
      raise ValueError(f"config.eval.tasks item {item!r}: expected 'task' or "
                       f"NAME=CORPUS_SPEC[@key=value]")
    corpus, _, flt = spec.partition("@")
    meta = {}
    for kv in filter(None, flt.split(";")):
      key, eq, value = kv.partition("=")
      if not eq:
        raise ValueError(f"config.eval.tasks item {item!r}: meta filter "
                         f"{kv!r} is not key=value")
      meta[key] = value
    out.append({"name": name, "corpus": corpus, "meta": meta})
  if not out:
    raise ValueError("config.eval.tasks is empty")
  return out


def _documents(corpus: str, split: str, max_bytes: int,
               meta: Dict[str, str]) -> List[sources.Document]:
  docs = []
  for d in sources.open_corpus(corpus, split=split,
                               max_bytes=max_bytes or None):
    if all(str(d.meta.get(k)) == v for k, v in meta.items()):
      docs.append(d)
  if not docs:
    raise ValueError(f"eval corpus {corpus!r} split {split!r} with filter "
                     f"{meta} has no document")
  return docs


def _task_batches(run: run_lib.Run, ec,
                  neighbours: Optional[Callable[[Iterator[dict]],
                                                Iterator[dict]]]
                  ) -> Iterator[dict]:
  """The run's Task split, with its cached neighbours, or those
  `neighbours` (re)places (see `eval_data.with_neighbours`)."""
  from retro_jax.data import tasks  # pylint: disable=g-import-not-at-top
  d = run.config.data
  for field in ("task_name", "corpus", "db_dir"):
    if not d.get(field):
      raise ValueError(f"eval set 'task' needs the run's config.data.{field}")
  tasks.register_for_reading(
      d.task_name, corpus=d.corpus, spm_path=d.get("spm_path", ""),
      db_dir=d.db_dir, seq_len=int(run.config.train.seq_len),
      num_neighbours=run.model_config.num_neighbours,
      max_bytes=d.get("max_bytes") or None,
      meta_filter=d.get("meta_filter", ""),
      split_max_bytes=d.get("split_max_bytes", ""))
  batches = tasks.batches(d.task_name, ec.split, batch_size=ec.batch_size,
                          cache_dir=ec.cache_dir or d.cache_dir,
                          shuffle=False, repeat=False, with_doc_ids=True)
  return neighbours(batches) if neighbours is not None else batches


def evaluate_run(config: ml_collections.ConfigDict, workdir: str,
                 step: Optional[int] = None, db_dir: str = "",
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Evaluates a run's checkpoint on `config.eval.tasks`; writes JSON + PNG.

  Returns the results dict that was written.
  """
  ec = config.eval
  run = run_lib.load(workdir, step, db_dir=db_dir or None)
  trained_k = run.model_config.num_neighbours
  k = ec.num_neighbours or trained_k
  m, r = run.model_config.chunk_size, run.model_config.neighbour_len
  n = ec.seq_len or int(run.config.train.seq_len)
  online = bool(db_dir) or k != trained_k
  retrieval = run.model_config.has_retrieval  # False: never load the DB.
  log(f"run {workdir} step {run.step}: k={k} (trained {trained_k}), n={n}, "
      f"stride={ec.stride or n}, DB {run.db_dir or '-'}")
  if run.tokenizer is None:
    raise ValueError(f"run {workdir} has no SentencePiece model: bits per "
                     f"byte need one (config.data.spm_path)")
  table = eval_lib.token_bytes(run.tokenizer)
  against = _LEAKAGE_NEIGHBOURS.get(ec.leakage_source, ec.leakage_source)

  def retriever():
    return run.retriever if retrieval else None  # Loads on first use.

  def task_neighbours(batches):
    return eval_data.with_neighbours(batches, retriever(), run.tokenizer, k,
                                     m, r)

  results: Dict[str, Any] = {"workdir": workdir, "step": run.step,
                             "db_dir": run.db_dir, "num_neighbours": k,
                             "retrieval": retrieval,
                             "leakage_source": ec.leakage_source,
                             "leakage_neighbours": against,
                             "seq_len": n, "stride": ec.stride or n,
                             "sets": {}}
  out_dir = epath.Path(workdir) / "eval"
  out_dir.mkdir(parents=True, exist_ok=True)
  tag = f"step_{run.step}" + (f"_k{k}" if k != trained_k else "") + (
      "_" + os.path.basename(os.path.normpath(db_dir)) if db_dir else "")
  curves = {}
  for spec in parse_sets(ec.tasks):
    t0 = time.time()
    groups: Dict[str, Any] = collections.OrderedDict()
    seq_len = n  # The Task's sequences keep the length they were cached at.
    if spec["name"] == "task":
      seq_len = int(run.config.train.seq_len)
      groups["task"] = _task_batches(run, ec,
                                     task_neighbours if online else None)
    else:
      docs = _documents(spec["corpus"], ec.split, ec.max_bytes, spec["meta"])
      by = collections.OrderedDict({spec["name"]: docs})
      if ec.group_by:
        for d in docs:
          key = f"{spec['name']}/{d.meta.get(ec.group_by, '?')}"
          by.setdefault(key, []).append(d)
      for name, group in by.items():
        seqs = eval_data.sequences_from_documents(
            [(d.doc_id, run.tokenizer.encode(d.text)) for d in group], n,
            ec.stride or None, m)
        groups[name] = eval_data.online_batches(
            seqs, retriever(), run.tokenizer, k, ec.batch_size, m, r)
    for name, batches in groups.items():
      scores = eval_lib.evaluate_batches(
          run.model, run.params, batches, table,
          max_batches=ec.max_batches or None,
          leakage_source=ec.leakage_source, token_nll=run.token_nll)
      summary = eval_lib.summarize(scores)
      summary["leakage"] = eval_lib.leakage_table(scores)
      if retrieval:  # What switching retrieval on saves, with its interval.
        summary["retrieval_gain"] = eval_lib.paired_gain(
            scores.nll_off, scores.nll_on, scores.bytes, seq_len // m)
      # Per-chunk scores, for paired comparisons with other runs.
      summary["chunk_scores"] = eval_lib.save_chunk_scores(
          str(out_dir / f"{tag}_{name.replace('/', '_')}_chunks.npz"), scores)
      summary["seconds"] = time.time() - t0
      results["sets"][name] = summary
      curves[name] = summary["leakage"]
      on, off = summary["retrieval_on"], summary["retrieval_off"]
      log(f"{name}: {summary['tokens']} tokens, {summary['bytes']} bytes | "
          f"retrieval on: loss {on['loss']:.4f} ppl {on['perplexity']:.2f} "
          f"bpb {on['bits_per_byte']:.4f} | off: loss {off['loss']:.4f} "
          f"ppl {off['perplexity']:.2f} bpb {off['bits_per_byte']:.4f}")
      if retrieval:
        g = summary["retrieval_gain"]
        log(f"{name}: retrieval saves {g['bpb_gain']:.4f} bpb "
            f"({100 * g['relative']:.2f}%), 95% interval over the "
            f"{g['sequences']} sequences [{g['ci95'][0]:.4f}, "
            f"{g['ci95'][1]:.4f}]")
      log(eval_lib.format_table(summary["leakage"]))
  results["json"] = str(out_dir / f"{tag}.json")
  results["plot"] = eval_lib.plot_leakage(
      curves, str(out_dir / f"leakage_{tag}.png"),
      title=f"{os.path.basename(os.path.normpath(workdir))} step {run.step}"
      f" (leakage: r(C_u) vs {against})")
  eval_lib.write_json(results["json"], results)
  log(f"wrote {results['json']} and {results['plot']}")
  return results
