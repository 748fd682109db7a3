r"""Generates text from a run's checkpoint, retrieving at every chunk.

  python scripts/sample.py --workdir=runs/tiny --prompt="import os" \
      [--num_tokens=256 --temperature=0.8 --top_k=40 --top_p=0.95] \
      [--db=DIR --k=4] [--no_retrieval] [--show_neighbours] [--no_cache] \
      [--html=sample.html]

KV-cached decoding; the neighbours of chunk u are retrieved when its last
token is known and condition every later token (see
retro_jax/inference/sampling.py). --show_neighbours prints each chunk's
neighbours with the DB chunk and source document they came from; --html
writes the sample as one self-contained page, each chunk beside the
neighbours the model read while writing it (retro_jax/inference/html_page.py).
"""

from absl import flags
from absl import logging

from retro_jax.core import cli
from retro_jax.core import files
from retro_jax.inference import html_page
from retro_jax.retrieval import attribution as attribution_lib

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
_HTML = flags.DEFINE_string("html", "", "Write the sample, chunk by chunk "
                            "beside its neighbours, as an HTML page here.")
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
  attribution = run.attribution(out) if _SHOW.value or _HTML.value else []
  if _SHOW.value:
    for u, (chunk, hits) in enumerate(zip(out.chunks, attribution)):
      print(f"=== chunk {u} ===\n{chunk}")
      for hit in hits:
        # A dropped neighbour's text is empty: say so rather than print
        # a blank the reader might take for an empty chunk.
        text = hit["text"] or ("(the model read none of it)"
                               if hit["dropped"] else "")
        print(f"  --- neighbour {hit['neighbour']} --- {_describe(hit)}\n  "
              + text.replace("\n", "\n  "))
  if _HTML.value:
    files.write_text(_HTML.value, html_page.render(
        out, attribution, title=f"{_WORKDIR.value} (step {run.step})"))
    print(f"wrote {_HTML.value}")


def _describe(hit) -> str:
  """"chunk 812 · stdlib:json/decoder.py (document 4071), squared L2 0.410"."""
  if hit["chunk_id"] < 0:
    return "no neighbour found"
  line = attribution_lib.describe_hit(hit["chunk_id"], hit)
  line += f", squared L2 {hit['distance']:.3f}"
  return line + (" (dropped by alignment)" if hit["dropped"] else "")


if __name__ == "__main__":
  cli.run(main)  # A bad workdir or DB: one line, status 1.
