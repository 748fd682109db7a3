r"""Records reference BERT embeddings for tests/retrieval/test_embedder.py.

Run once, in an environment with torch + transformers (NOT a dependency of
retro_jax; its own environment has neither; benchmarks/peer/setup.sh
--with-transformers makes one outside the repository), on the default model
directory:

  MODEL_DIR=$(.venv/bin/python -c "from retro_jax.retrieval.embedder import \
      default_model_dir; print(default_model_dir())")
  PY=$(bash benchmarks/peer/setup.sh --with-transformers | tail -n1)
  $PY tools/make_bert_fixture.py \
      --model_dir "$MODEL_DIR" --out tests/fixtures/minilm_reference.json

It runs `transformers.AutoModel` + `AutoTokenizer` on each sentence alone (no
padding, no truncation), mean-pools the last hidden state over the attention
mask, and writes the sentences, their token ids and the expected float32
vectors (as full float lists) to a JSON fixture.
"""

import argparse
import json
import os

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "def embed(self, texts: Sequence[str]) -> np.ndarray:  # mean-pooled",
    ("Retrieval-enhanced language models condition on document chunks "
     "retrieved from a large corpus, based on local similarity with preceding "
     "tokens. With a two trillion token database, the model obtains "
     "comparable performance to much larger models on the Pile, despite "
     "using 25 times fewer parameters; after fine-tuning, its performance "
     "translates to downstream knowledge-intensive tasks such as question "
     "answering, and it retrieves neighbours that are frozen BERT embeddings "
     "of sixty-four token chunks, compared by squared L2 distance."),
    "Zürich café — naïve 東京 Ünïcödé ß",
    "a",
    "  Mixed CASE, punctuation!? and numbers: 3.14159, 2048 tokens.  ",
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model_dir", required=True,
                      help="Hugging Face BERT checkpoint directory")
  parser.add_argument("--out", default="tests/fixtures/minilm_reference.json")
  args = parser.parse_args()
  # Imported after the flags, so --help works in an environment without them.
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(2)
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_dir)
  model = transformers.AutoModel.from_pretrained(args.model_dir)
  model.eval()
  records = []
  with torch.no_grad():
    for text in SENTENCES:
      enc = tokenizer(text, padding=False, truncation=False,
                      return_tensors="pt")
      hidden = model(**enc).last_hidden_state  # [1, T, D]
      mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [1, T, 1]
      vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [1, D]
      records.append({"text": text,
                      "ids": enc["input_ids"][0].tolist(),
                      "vector": [float(v) for v in vec[0].tolist()]})
  out = {"model": "all-MiniLM-L6-v2",
         "made_by": "tools/make_bert_fixture.py",
         "torch": torch.__version__,
         "transformers": transformers.__version__,
         "pooling": "mean over attention mask, unnormalised",
         "sentences": records}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
    f.write("\n")
  for r in records:
    print(f"{len(r['ids']):4d} wordpieces  {r['text'][:60]!r}")


if __name__ == "__main__":
  main()
