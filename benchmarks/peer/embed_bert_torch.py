r"""Times a sentence-transformers-style PyTorch forward of a BERT checkpoint.

A yardstick for benchmarks/retrieval.py, run in the peer's environment with
transformers (never the project's own):

  PY=$(bash benchmarks/peer/setup.sh --with-transformers | tail -n1)
  $PY benchmarks/peer/embed_bert_torch.py texts.json MODEL_DIR THREADS BATCH

Sorts texts by length, pads each batch to its longest text, mean-pools the
last layer over the attention mask (what sentence-transformers does for
all-MiniLM-L6-v2 before its optional normalisation). Prints one JSON line.
"""

import argparse
import json
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("texts_path", help="JSON list of the texts to embed")
  parser.add_argument("model_dir", help="Hugging Face BERT checkpoint folder")
  parser.add_argument("threads", type=int, help="torch threads")
  parser.add_argument("batch", type=int, help="texts per forward")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  # Imported after the arguments, so --help works without them.
  # pylint: disable=g-import-not-at-top
  import numpy as np
  import torch
  import transformers

  model_dir, batch = args.model_dir, args.batch
  torch.set_num_threads(args.threads)
  with open(args.texts_path, encoding="utf-8") as f:
    texts = json.load(f)
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.AutoModel.from_pretrained(model_dir).eval()

  def run(texts, bs):
    order = np.argsort([-len(t) for t in texts], kind="stable")
    with torch.inference_mode():
      for s in range(0, len(texts), bs):
        enc = tok([texts[i] for i in order[s:s + bs]], padding=True,
                  truncation=True, max_length=512, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        _ = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

  run(texts[:batch], batch)
  t0 = time.perf_counter()
  run(texts, batch)
  dt = time.perf_counter() - t0
  print(json.dumps({"impl": f"torch {torch.__version__} + transformers",
                    "chunks": len(texts), "seconds": round(dt, 3),
                    "chunks_per_s": round(len(texts) / dt, 2),
                    "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
