"""Packing tokenized documents into fixed-length training sequences.

Documents are concatenated (each followed by EOS) and cut into sequences of
n tokens; every position keeps the id of the document it came from, which
same-document neighbour filtering needs later.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Tuple

import numpy as np


def pack(docs: Iterable[Tuple[int, np.ndarray]], seq_len: int,
         eos_id: int = 1) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Yields (tokens int32 [n], doc_ids int64 [n]) sequences.

  Args:
    docs: (doc_id, token ids) pairs.
    seq_len: n, tokens per sequence.
    eos_id: appended after every document.
  The last partial sequence is dropped.
  """
  buf_t, buf_d, size = [], [], 0
  for doc_id, ids in docs:
    ids = np.append(np.asarray(ids, np.int32), np.int32(eos_id))
    buf_t.append(ids)
    buf_d.append(np.full(len(ids), doc_id, np.int64))
    size += len(ids)
    while size >= seq_len:
      tokens, doc_ids = np.concatenate(buf_t), np.concatenate(buf_d)
      yield tokens[:seq_len], doc_ids[:seq_len]
      buf_t, buf_d = [tokens[seq_len:]], [doc_ids[seq_len:]]
      size -= seq_len


def chunks_of(tokens: np.ndarray, chunk_size: int) -> np.ndarray:
  """[n] tokens -> [n // m, m] chunks (n must be a multiple of m)."""
  if tokens.shape[-1] % chunk_size:
    raise ValueError(f"{tokens.shape[-1]} tokens are not a multiple of the "
                     f"chunk size {chunk_size}")
  return tokens.reshape(*tokens.shape[:-1], -1, chunk_size)
