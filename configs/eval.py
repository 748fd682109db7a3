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
  # A whole JSON-lines file (the Pile's layout), every pile_set_name
  # reported on its own, word-level perplexity included:
  python scripts/evaluate.py --workdir=runs/172m --config=configs/eval.py:pile \
      --config.eval.sets.pile.corpus=jsonl:/data/pile/val.jsonl.zst
  # Only its ArXiv documents (another subset: override the meta value):
  python scripts/evaluate.py --workdir=runs/172m \
      --config=configs/eval.py:arxiv \
      --config.eval.sets.arxiv.corpus=jsonl:/data/pile/val.jsonl.zst
  # WikiText-103's test file (one JSON line), word-level perplexity:
  python scripts/evaluate.py --workdir=runs/172m \
      --config=configs/eval.py:wikitext103 --config.eval.stride=1024 \
      --config.eval.sets.wikitext103.corpus=jsonl:/data/wt103_test.jsonl
  # A quick look instead of the whole file: a split and a byte cap.
  ... --config.eval.split=validation --config.eval.max_bytes=200000
  # Every evaluation of the run, one table (python scripts/eval_results.py):
  python scripts/eval_results.py --workdir=runs/172m

A corpus set is scored whole unless `split` or `max_bytes` say otherwise;
each evaluation's results go to files of their own (docs/evaluation.md).
Other sets (a new name, several meta fields) go in a config file of their
own: copy `get_config` and add to `config.eval.sets`.
"""

import ml_collections

# Where the Pile's validation split lies unless overridden.
PILE_VALIDATION = "jsonl:/data/pile/val.jsonl.zst"
# WikiText-103's test file as one JSON line {"text": <wiki.test.tokens>}
# (docs/evaluation.md shows the one-line conversion).
WIKITEXT103_TEST = "jsonl:/data/wikitext-103/test.jsonl"


def eval_set(corpus, group_by="", split="", **meta):
  """One evaluation set (retro_jax.evaluation.sets reads it)."""
  return ml_collections.ConfigDict(dict(
      # "task": the run's own seqio Task (its config.data.task_name), its
      # config.eval.task_split as cached by scripts/cache_tasks.py, with
      # the neighbours cached there. Otherwise a corpus spec
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
      group_by=group_by,
      # The corpus split read: all (every document) | train | validation
      # (by a stable hash of each document's source, 5%) | a TFDS split.
      # "" = config.eval.split. Not for "task" (config.eval.task_split).
      split=split))


# Set groups the config argument picks from: {group: {set name: set}}.
GROUPS = {
    "task": lambda: {"task": eval_set("task")},
    # The library's validation files: runs on it train on the rest.
    "stdlib": lambda: {"stdlib": eval_set("python_stdlib",
                                          split="validation")},
    "pile": lambda: {"pile": eval_set(PILE_VALIDATION,
                                      group_by="pile_set_name")},
    "arxiv": lambda: {"arxiv": eval_set(PILE_VALIDATION,
                                        pile_set_name="ArXiv")},
    # Word-level perplexity as the WikiText papers count words.
    "wikitext103": lambda: {"wikitext103": eval_set(WIKITEXT103_TEST)},
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
  config.eval.split = "all"          # Corpus sets' split (a set's own
                                     # `split` wins): all = every document.
  config.eval.task_split = "validation"  # The Task's cached split.
  config.eval.max_bytes = 0          # Stop a corpus set after about this
                                     # much text (whole documents); 0 = all.
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
  config.eval.progress_seconds = 10.0  # Seconds between progress lines
                                     # (stderr) of a corpus set; 0 = none.
  return config
