r"""Evaluation of a trained run (scripts/evaluate.py).

The argument after the colon picks the evaluation sets, by group name (one,
or several joined by commas); every field of a picked set stays overridable:

  python scripts/evaluate.py --workdir=runs/tiny --config=configs/eval.py:task
  python scripts/evaluate.py --workdir=runs/tiny \
      --config=configs/eval.py:task,stdlib [--db=runs/db_other] \
      [--config.eval.num_neighbours=10 --config.eval.stride=128]
  # Does the model read its neighbours? The leakage probe, and the control:
  python scripts/evaluate.py --workdir=runs/tiny --config=configs/eval.py:task \
      --config.eval.neighbours=leak       # (or =random)
  # The Pile's validation split, every subset reported on its own:
  python scripts/evaluate.py --workdir=runs/172m --config=configs/eval.py:pile \
      --config.eval.sets.pile.corpus=jsonl:/data/pile/val.jsonl.zst
  # Only its ArXiv documents (another subset: override the meta value):
  python scripts/evaluate.py --workdir=runs/172m \
      --config=configs/eval.py:arxiv \
      --config.eval.sets.arxiv.corpus=jsonl:/data/pile/val.jsonl.zst

Other sets (a new name, several meta fields) go in a config file of their
own: copy `get_config` and add to `config.eval.sets`.
"""

import ml_collections

# Where the Pile's validation split lies unless overridden.
PILE_VALIDATION = "jsonl:/data/pile/val.jsonl.zst"


def eval_set(corpus, group_by="", **meta):
  """One evaluation set (retro_jax.evaluation.sets reads it)."""
  return ml_collections.ConfigDict(dict(
      # "task": the run's own seqio Task (its config.data.task_name), the
      # split below as cached by scripts/cache_tasks.py, with the
      # neighbours cached there. Otherwise a corpus spec
      # (retro_jax.corpus.sources.open_corpus, e.g. "python_stdlib",
      # "jsonl:/data/pile/val.jsonl.zst", "tfds:c4/en:3.0.1"), tokenized,
      # windowed and retrieved for at evaluation.
      corpus=corpus,
      # Only the documents whose meta has these values ({} = all), e.g.
      # pile_set_name="ArXiv". Not for "task".
      meta=ml_collections.ConfigDict(meta),
      # Also report every value of this meta field as a set of its own
      # ("<name>/<value>"), e.g. pile_set_name for the Pile's subsets.
      # "" = the set as a whole only. Not for "task".
      group_by=group_by))


# Set groups the config argument picks from: {group: {set name: set}}.
GROUPS = {
    "task": lambda: {"task": eval_set("task")},
    "stdlib": lambda: {"stdlib": eval_set("python_stdlib")},
    "pile": lambda: {"pile": eval_set(PILE_VALIDATION,
                                      group_by="pile_set_name")},
    "arxiv": lambda: {"arxiv": eval_set(PILE_VALIDATION,
                                        pile_set_name="ArXiv")},
}


def get_config(groups: str = "task"):
  """`groups`: names of GROUPS, comma-separated (the config argument)."""
  config = ml_collections.ConfigDict()
  config.eval = ml_collections.ConfigDict()
  # The evaluation sets, by name (results and chunk files are named after
  # it); each is an `eval_set`.
  config.eval.sets = ml_collections.ConfigDict()
  for group in filter(None, groups.split(",")):
    if group not in GROUPS:
      raise ValueError(f"configs/eval.py: no set group {group!r}; groups: "
                       f"{', '.join(GROUPS)}")
    for name, spec in GROUPS[group]().items():
      config.eval.sets[name] = spec
  config.eval.split = "validation"   # Corpus / Task split evaluated.
  config.eval.max_bytes = 200_000    # Text read per corpus set; 0 = all.
  config.eval.seq_len = 0            # n; 0 = the run's train.seq_len.
  config.eval.stride = 0             # Sliding-window step (multiple of 64);
                                     # 0 = n (no overlap).
  config.eval.num_neighbours = 0     # k at evaluation; 0 = the trained k.
  config.eval.batch_size = 4         # Sequences per forward pass.
  config.eval.max_batches = 0        # Stop after this many batches; 0 = all.
  # What the evaluated chunks retrieve (retro_jax/evaluation/probes.py):
  # db (the run's DB, other documents only, as in training) | leak (the DB
  # plus the evaluated text itself, kept retrievable: the leakage probe) |
  # random (k random DB chunks per chunk: the control).
  config.eval.neighbours = "db"
  config.eval.leakage_source = "previous"  # r(C_u) against Ret(C_{u-1})
                                     # (what C_u is predicted with) | same.
  config.eval.cache_dir = ""         # seqio cache of "task"; "" = the run's.
  return config
