"""Real chunk embeddings for the index and neighbour tests.

The Python standard library is cut into 256-character chunks; every 30th
chunk (spread over the whole library, exact duplicates such as licence
headers dropped) up to 3000 is embedded with the default frozen BERT,
all-MiniLM-L6-v2. Embedding takes about 1.5 minutes on 2 CPU cores, so the
vectors are cached in pytest's cache directory under the sha256 of the texts
and the embedder's fingerprint: a cold cache still works, only slower.
"""

import hashlib
import os
from typing import List, Tuple

import numpy as np
import pytest

from retro_jax.corpus.sources import python_stdlib
from retro_jax.retrieval.embedder import BertEmbedder

CHUNK_CHARS = 256
NUM_CHUNKS = 3000
STRIDE = 30


def stdlib_chunks(num_chunks: int = NUM_CHUNKS, stride: int = STRIDE
                  ) -> Tuple[List[str], np.ndarray]:
  """(texts, doc_index int64 [n]): chunks and the index of their file."""
  texts, docs, seen, i = [], [], set(), 0
  for d, doc in enumerate(python_stdlib()):
    for start in range(0, len(doc.text), CHUNK_CHARS):
      i += 1
      text = doc.text[start:start + CHUNK_CHARS]
      if i % stride or not text.strip() or text in seen:
        continue
      seen.add(text)
      texts.append(text)
      docs.append(d)
      if len(texts) == num_chunks:
        return texts, np.asarray(docs, np.int64)
  return texts, np.asarray(docs, np.int64)


def embed_cached(texts: List[str], cache_dir: str) -> np.ndarray:
  """float32 [n, D] embeddings of `texts`, from `cache_dir` when there."""
  embedder = BertEmbedder.load()
  h = hashlib.sha256(embedder.fingerprint.encode())
  for t in texts:
    h.update(t.encode())
    h.update(b"\0")
  path = os.path.join(cache_dir, f"minilm-{h.hexdigest()[:16]}.npy")
  if os.path.isfile(path):
    return np.load(path, allow_pickle=False)
  vecs = embedder.embed(texts)  # [n, D]
  tmp = f"{path}.tmp-{os.getpid()}.npy"
  np.save(tmp, vecs, allow_pickle=False)
  os.replace(tmp, path)  # A killed run never leaves a truncated cache file.
  return vecs


def load(request) -> Tuple[List[str], np.ndarray, np.ndarray]:
  """(texts, doc_index [n], embeddings float32 [n, D]) for a test module."""
  texts, docs = stdlib_chunks()
  cache = getattr(request.config, "cache", None)  # None: -p no:cacheprovider.
  if cache is not None:
    cache_dir = str(cache.mkdir("retro_jax_embeddings"))
  else:
    cache_dir = str(request.getfixturevalue("tmp_path_factory").mktemp(
        "embeddings"))
  return texts, docs, embed_cached(texts, cache_dir)


# Fixtures of the index and neighbour tests, shared by the session so the
# library is read and embedded once.
@pytest.fixture(scope="session")
def data(request):
  return load(request)


@pytest.fixture(scope="session")
def embeddings(data):  # pylint: disable=redefined-outer-name
  return data[2]
