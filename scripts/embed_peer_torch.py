r"""Times a sentence-transformers-style PyTorch forward of a BERT checkpoint.

A yardstick for scripts/benchmark_retrieval.py, run in a separate environment
that has torch and transformers (never the project's own):

  PEER_PYTHON texts.json MODEL_DIR THREADS BATCH

Sorts texts by length, pads each batch to its longest text, mean-pools the
last layer over the attention mask (what sentence-transformers does for
all-MiniLM-L6-v2 before its optional normalisation). Prints one JSON line.
"""

import json
import sys
import time

import numpy as np
import torch
import transformers


def main():
  texts_path, model_dir, threads, batch = sys.argv[1:5]
  torch.set_num_threads(int(threads))
  texts = json.load(open(texts_path))
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

  run(texts[:int(batch)], int(batch))
  t0 = time.perf_counter()
  run(texts, int(batch))
  dt = time.perf_counter() - t0
  print(json.dumps({"impl": f"torch {torch.__version__} + transformers",
                    "chunks": len(texts), "seconds": round(dt, 3),
                    "chunks_per_s": round(len(texts) / dt, 2),
                    "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
