"""Documents into 64-token chunks, and chunks into training sequences.

One rule cuts every document, in the retrieval DB and in every Task split:
its tokens followed by EOS, cut into chunks of m tokens, the last chunk
0-padded (`document_chunks`). A document therefore always starts on a chunk
boundary, and a training sequence of n = L * m tokens is L consecutive
chunks (`pack_chunks`): over the DB's training part, chunk u of sequence s
is DB chunk first + s * L + u (docs/design.md §3).

Padding is the price of alignment: on average about m / 2 tokens per
document. `padding` counts it; the loss and bits per byte skip pad targets
(loss_mask is 0 where the target is the pad id).

Shape glossary:
  t: tokens of a document.   c: its chunks, ceil((t + 1) / m).
  m: tokens per chunk (64).  n: tokens per sequence.   L: chunks (n / m).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Tuple

import numpy as np

from retro_jax.config import CHUNK_SIZE, EOS_ID, PAD_ID


def chunk_document(ids: np.ndarray, chunk_size: int = CHUNK_SIZE) -> np.ndarray:
  """int [t] token ids -> int32 [ceil(t / m), m] chunks, the last 0-padded.

  Raises ValueError for ids that are not 1-D or that contain the pad id 0
  (padding must mean "no token" everywhere downstream).
  """
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
  if np.any(ids == PAD_ID):
    raise ValueError(f"ids contain the pad id {PAD_ID}")
  c = -(-len(ids) // chunk_size)
  out = np.zeros((c * chunk_size,), np.int32)  # [c * m]
  out[:len(ids)] = ids
  return out.reshape(c, chunk_size)  # [c, m]


def document_chunks(ids: np.ndarray, chunk_size: int = CHUNK_SIZE,
                    eos_id: int = EOS_ID) -> np.ndarray:
  """A document's token ids [t] -> its chunks int32 [c, m]: the tokens, then
  EOS (the model learns where documents end), the last chunk 0-padded."""
  return chunk_document(np.append(np.asarray(ids, np.int32),
                                  np.int32(eos_id)), chunk_size)


def pack_chunks(docs: Iterable[Tuple[int, np.ndarray]], seq_len: int,
                chunk_size: int = CHUNK_SIZE, eos_id: int = EOS_ID
                ) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Chunk-aligned sequences: (tokens int32 [n], doc_ids int64 [n]).

  Args:
    docs: (doc_id, token ids) pairs; an empty document is skipped.
    seq_len: n, a multiple of `chunk_size`.
    chunk_size: m.
    eos_id: ends every document.
  Every document's chunks (`document_chunks`) follow one another; a pad
  position carries the id of its chunk's document. The last partial
  sequence is dropped, as in training.
  """
  if seq_len <= 0 or seq_len % chunk_size:
    raise ValueError(f"seq_len {seq_len} must be a positive multiple of "
                     f"{chunk_size}")
  per_seq = seq_len // chunk_size
  buf_t, buf_d, size = [], [], 0
  for doc_id, ids in docs:
    if not len(ids):
      continue
    chunks = document_chunks(ids, chunk_size, eos_id)  # [c, m]
    buf_t.append(chunks)
    buf_d.append(np.full(len(chunks), doc_id, np.int64))
    size += len(chunks)
    while size >= per_seq:
      tokens, doc_ids = np.concatenate(buf_t), np.concatenate(buf_d)
      yield (tokens[:per_seq].reshape(-1),
             np.repeat(doc_ids[:per_seq], chunk_size))
      buf_t, buf_d = [tokens[per_seq:]], [doc_ids[per_seq:]]
      size -= per_seq


def padding(tokens: np.ndarray) -> Tuple[int, int]:
  """(pad positions, all positions) of chunk-aligned tokens [..., m]."""
  tokens = np.asarray(tokens)
  return int((tokens == PAD_ID).sum()), int(tokens.size)
