r"""Prints one cached example as text: each chunk beside its neighbours.

  python scripts/inspect_example.py --config=configs/quickstart.py \
      --split=validation --index=3

The run config names the Task and its cache as for scripts/cache_tasks.py.

Example `--index` is counted in cache file order (unshuffled). Each of the
n/64 chunks is printed, then its k neighbours (the retrieved chunk | its
continuation), with the documents of the sequence.
"""

import itertools

from absl import flags
from ml_collections import config_flags

from retro_jax.core import cli

cli.quiet_tensorflow()  # Before TensorFlow loads (retro_jax.data).

# pylint: disable=g-import-not-at-top,wrong-import-position
from retro_jax.config import CHUNK_SIZE, PAD_ID
from retro_jax.corpus import vocab
from retro_jax.data import tasks
from retro_jax.retrieval import sequence_neighbours
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file (configs/*.py).", lock_config=True)
_SPLIT = flags.DEFINE_string("split", "validation", "Cached split.")
_INDEX = flags.DEFINE_integer("index", 0, "Example number (file order).")
_WIDTH = flags.DEFINE_integer("width", 0, "Cut texts to this many "
                              "characters (0 = whole).")


def _show(text: str) -> str:
  text = text if not _WIDTH.value else text[:_WIDTH.value]
  return "    " + text.replace("\n", "\n    ")


def main(argv):
  del argv
  config = _CONFIG.value
  task = tasks.register_from_config(config)
  sp = vocab.load(sequence_neighbours.default_spm_path(
      config.data.spm_path, config.data.db_dir))
  it = tasks.batches(task, _SPLIT.value, batch_size=1,
                     cache_dir=config.data.cache_dir, shuffle=False, repeat=False,
                     with_doc_ids=True)
  example = next(itertools.islice(it, _INDEX.value, None), None)
  if example is None or not example["loss_mask"].any():
    cli.fail(f"{task.name}:{_SPLIT.value} has no example {_INDEX.value}")
  example = {k: v[0] for k, v in example.items()}
  docs = list(dict.fromkeys(example["doc_ids"].tolist()))
  print(f"{task.name}:{_SPLIT.value} example {_INDEX.value}: "
        f"{len(example['tokens'])} tokens from documents {docs}")
  m = CHUNK_SIZE

  def decode(ids) -> str:
    return sp.decode([int(t) for t in ids if t != PAD_ID])

  chunks = example["tokens"].reshape(-1, m)                   # [L, m]
  for u, (chunk, neighbours) in enumerate(zip(chunks,
                                              example["neighbours"])):
    print(f"\n=== chunk {u} " + "=" * 60)
    print(_show(decode(chunk)))
    for j, values in enumerate(neighbours):                   # [k, r]
      if not values.any():
        print(f"--- neighbour {j}: none (all padding)")
        continue
      print(f"--- neighbour {j}")
      print(_show(decode(values[:m])))                        # The chunk.
      print("    ... continuation:")
      print(_show(decode(values[m:]) or "(end of its document)"))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)  # Bad input (a cache, a DB): one line, status 1.
