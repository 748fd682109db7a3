r"""Generates text from a run's checkpoint, retrieving at every chunk.

  python scripts/sample.py --workdir=runs/tiny --prompt="import os" \
      [--num_tokens=256 --temperature=0.8 --top_k=40 --top_p=0.95] \
      [--db=DIR --k=4] [--no_retrieval] [--show_neighbours] [--no_cache]

KV-cached decoding; the neighbours of chunk u are retrieved when its last
token is known and condition every later token (see
retro_jax/inference/sampling.py).
"""

from absl import flags
from absl import logging

from retro_jax.core import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (scripts/train.py).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default latest.")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text.")
_NUM = flags.DEFINE_integer("num_tokens", 128, "Tokens to generate.")
_TEMP = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k likeliest; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass; 1 = all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DB = flags.DEFINE_string("db", "", "Retrieval DB instead of the run's.")
_K = flags.DEFINE_integer("k", 0, "Neighbours per chunk; 0 = trained k.")
_NO_RETRIEVAL = flags.DEFINE_bool("no_retrieval", False, "Turn retrieval off.")
_SHOW = flags.DEFINE_bool("show_neighbours", False,
                          "Print each chunk's neighbours beside it.")
_NO_CACHE = flags.DEFINE_bool("no_cache", False, "Re-run the full forward "
                              "every token (reference; slow).")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}", status=2)
  if not flags.FLAGS["verbosity"].present:    # Results go to stdout; -v 0
    logging.set_verbosity(logging.WARNING)   # shows orbax's INFO logs.
  from retro_jax.core import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.keep_freed_memory()  # Before the XLA backend starts.
  import retro_jax  # pylint: disable=g-import-not-at-top
  run = retro_jax.load(_WORKDIR.value, _STEP.value, db_dir=_DB.value or None)
  out = run.generate(_PROMPT.value or "\n", _NUM.value,
                     retrieval=not _NO_RETRIEVAL.value, k=_K.value or None,
                     temperature=_TEMP.value, top_k=_TOP_K.value,
                     top_p=_TOP_P.value, seed=_SEED.value,
                     use_cache=not _NO_CACHE.value)
  print(f"--- prompt ---\n{out.prompt}\n--- generated ({_NUM.value} tokens, "
        f"{out.seconds:.2f} s, {_NUM.value / out.seconds:.1f} tokens/s) ---")
  print(out.text)
  if _SHOW.value:
    for u, (chunk, nbs) in enumerate(zip(out.chunks, out.neighbours)):
      print(f"=== chunk {u} ===\n{chunk}")
      for j, nb in enumerate(nbs):
        print(f"  --- neighbour {j} ---\n  " + nb.replace("\n", "\n  "))


if __name__ == "__main__":
  cli.run(main)  # A bad workdir or DB: one line, status 1.
