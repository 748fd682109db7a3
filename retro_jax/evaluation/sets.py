"""Evaluation sets: what `config.eval.sets` names, and their batches.

Each item of `config.eval.sets` (see configs/eval.py) is one set:

  corpus="task"   the run's own seqio Task (its config.data.task_name), the
                  `config.eval.task_split` cached by scripts/cache_tasks.py with
                  neighbours from the training DB and k;
  corpus=SPEC     documents of a corpus spec (sources.open_corpus): its
                  `split` ("all" by default: every document) up to
                  `config.eval.max_bytes` (0 by default: no cap), only those
                  whose meta matches `meta`, streamed (`stream`),
                  tokenized, windowed and retrieved for now; with
                  `group_by`, every value of that meta field is also
                  reported on its own, "<name>/<value>".

Shape glossary: b batch rows, n tokens per sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterator, List, Mapping, Optional

import ml_collections
import numpy as np

from retro_jax.corpus import sources

TASK = "task"  # The `corpus` of the run's own cached Task.
ALL = "all"  # A corpus set's split: every document.

Batches = Iterator[Dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """One item of `config.eval.sets`."""

  name: str
  corpus: str  # TASK or a corpus spec.
  meta: Mapping[str, str]  # Document meta filter ({} = all).
  group_by: str  # Meta field reported per value ("" = none).
  split: str = ALL  # Corpus split read: all | train | validation | a TFDS
  #                   split.

  @property
  def is_task(self) -> bool:
    return self.corpus == TASK


def sets_of(eval_config: ml_collections.ConfigDict) -> List[EvalSet]:
  """The sets of `config.eval`, checked."""
  out = []
  for name, spec in eval_config.sets.items():
    s = EvalSet(name=name, corpus=spec.corpus,
                meta={k: str(v) for k, v in dict(spec.get("meta", {})).items()},
                group_by=spec.get("group_by", "") or "",
                split=spec.get("split", "") or eval_config.get("split", ALL))
    if not s.corpus:
      raise ValueError(f"config.eval.sets.{name}.corpus is empty")
    if s.is_task and (s.meta or s.group_by or spec.get("split", "")):
      raise ValueError(f"config.eval.sets.{name}: the run's Task takes no "
                       f"meta filter, group_by or split (its examples are "
                       f"cached; config.eval.task_split picks the split)")
    out.append(s)
  if not out:
    raise ValueError("config.eval.sets is empty: pick sets with "
                     "--config=configs/eval.py:task (or stdlib, pile, ...)")
  return out


def documents(eval_set: EvalSet, max_bytes: int = 0
              ) -> Iterator[sources.Document]:
  """The documents of a corpus set, streamed: its split ("all": every
  document), up to about `max_bytes` of text (0 = no cap), those whose
  meta matches its filter."""
  split = None if eval_set.split == ALL else eval_set.split
  for doc in sources.open_corpus(eval_set.corpus, split=split,
                                 max_bytes=max_bytes or None):
    if all(str(doc.meta.get(k)) == v for k, v in eval_set.meta.items()):
      yield doc


def group_of(eval_set: EvalSet) -> Callable[[sources.Document], str]:
  """document -> the name it is reported under: the set's, or with
  `group_by` "<set>/<value>" ("?" for a document without the field)."""
  if not eval_set.group_by:
    return lambda doc: eval_set.name
  return lambda doc: f"{eval_set.name}/{doc.meta.get(eval_set.group_by, '?')}"


def no_document_error(eval_set: EvalSet) -> ValueError:
  """The error of a corpus set that read no document (one line)."""
  return ValueError(f"eval set {eval_set.name!r}: corpus {eval_set.corpus!r} "
                    f"split {eval_set.split!r} with filter "
                    f"{dict(eval_set.meta)} has no document")


def _register_run_task(run_config: ml_collections.ConfigDict) -> str:
  """Registers the Task a run trained on for reading its cache (as training
  does); returns its name."""
  from retro_jax.data import tasks  # pylint: disable=g-import-not-at-top
  d = run_config.data
  for field in ("task_name", "corpus", "db_dir"):
    if not d.get(field):
      raise ValueError(f"eval set {TASK!r} needs the run's config.data."
                       f"{field}")
  # The run config as `training.run_config.load_run_config` reads it (older
  # runs' fields upgraded): data.max_bytes {split: bytes}, data.meta.
  return tasks.register_run_task(run_config).name


def task_batches(run_config: ml_collections.ConfigDict,
                 eval_config: ml_collections.ConfigDict,
                 neighbours: Optional[Callable[[Batches], Batches]] = None
                 ) -> Batches:
  """One pass over the run's Task split (`eval_config.task_split`), in file
  order, with doc_ids [b, n] and the cached neighbours, or those
  `neighbours` (re)places (`inputs.with_neighbours`).

  Args:
    run_config: the run's config.json (data.task_name, data.cache_dir, ...).
    eval_config: `config.eval` (task_split, batch_size, cache_dir).
    neighbours: batches -> batches with new neighbours; None: cached ones.
  """
  from retro_jax.data import tasks  # pylint: disable=g-import-not-at-top
  name = _register_run_task(run_config)
  batches = tasks.batches(
      name, eval_config.get("task_split", "validation"),
      batch_size=eval_config.batch_size,
      cache_dir=eval_config.cache_dir or run_config.data.cache_dir,
      shuffle=False, repeat=False, with_doc_ids=True)
  return neighbours(batches) if neighbours is not None else batches
