r"""What chunk alignment costs: padding tokens per corpus.

Every document is cut into 64-token chunks after its EOS, the last chunk
padded (corpus/packing.document_chunks), so that training chunks are DB
chunks. This prints, per corpus, the documents, their tokens (with EOS),
the padding added and its share of all chunk positions.

  python benchmarks/chunk_padding.py --spm=runs/quickstart/spm.model \
      --corpus=python_stdlib --corpus=jsonl:/data/pile/val.jsonl.zst
"""

import json

from absl import app
from absl import flags
import numpy as np

from retro_jax.corpus import packing
from retro_jax.corpus import sources
from retro_jax.corpus import vocab


def padding_of(corpus: str, sp, split, max_bytes: int) -> dict:
  """Documents, tokens (EOS included), pad tokens and pad % of `corpus`."""
  docs = tokens = pad = 0
  for doc in sources.source_documents(
      sources.text_source(corpus, split, max_bytes)):
    ids = sp.encode(doc.text)
    if not ids:
      continue
    chunks = packing.document_chunks(np.asarray(ids, np.int32))  # [c, m]
    p, _ = packing.padding(chunks)
    docs, tokens, pad = docs + 1, tokens + len(ids) + 1, pad + p
  return {"corpus": corpus, "split": split, "documents": docs,
          "tokens": tokens, "pad_tokens": pad,
          "pad_percent": round(100 * pad / max(tokens + pad, 1), 2),
          "pad_per_document": round(pad / max(docs, 1), 1)}


_SPM = flags.DEFINE_string("spm", "runs/quickstart/spm.model",
                           "SentencePiece .model file.")
_CORPUS = flags.DEFINE_multi_string(
    "corpus", ["python_stdlib"], "Corpus spec (sources.open_corpus); "
    "repeatable.")
_SPLIT = flags.DEFINE_string("split", "train", '"" = every split.')
_MAX_BYTES = flags.DEFINE_integer("max_bytes", 0, "Text read; 0 = all.")


def main(argv):
  del argv
  sp = vocab.load(_SPM.value)
  for corpus in _CORPUS.value:
    print(json.dumps(padding_of(corpus, sp, _SPLIT.value or None,
                                _MAX_BYTES.value)))


if __name__ == "__main__":
  app.run(main)
