"""Packing tokenized documents into fixed-length training sequences.

Documents are concatenated (each followed by EOS) and cut into sequences of
n tokens; every position keeps the id of the document it came from, which
same-document neighbour filtering needs later.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Tuple

import numpy as np

from retro_jax.config import EOS_ID


def pack(docs: Iterable[Tuple[int, np.ndarray]], seq_len: int,
         eos_id: int = EOS_ID) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
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

