"""Evaluation inputs retrieved online: documents -> sequences -> neighbours.

The seqio Tasks (tasks.py) cache neighbours from the DB and k a run trained
with. Evaluation may instead use another DB (the paper's Table 4 swaps
Wikipedia, C4 and MassiveText) or another k (up to 40): this module builds
such batches on the fly with `sequence_neighbours.neighbours_for_sequences`
(same-document filtering as in training).

Shape glossary: S sequences, n tokens each, L = n // m chunks, k neighbours,
r tokens per neighbour.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

from retro_jax.evaluate import sliding_windows
from retro_jax.retrieval import sequence_neighbours

EOS_ID = 1


def sequences_from_documents(docs: Iterable[Tuple[int, np.ndarray]],
                             seq_len: int, stride: Optional[int] = None,
                             chunk_size: int = 64,
                             eos_id: int = EOS_ID) -> Dict[str, np.ndarray]:
  """Concatenates documents (each followed by EOS) into evaluation windows.

  Unlike training packing, the last partial window is kept (padded, with
  loss_mask 0 on the padding) so every token is scored.

  Args:
    docs: (doc_id, token ids) pairs.
    seq_len: n.
    stride: window step (multiple of m, <= n); None = n (no overlap).
    chunk_size: m.
  Returns:
    {tokens int32 [S, n], loss_mask int32 [S, n], doc_ids int64 [S, n]};
    doc id -1 marks padding.
  """
  toks, ids = [], []
  for doc_id, t in docs:
    t = np.append(np.asarray(t, np.int32), np.int32(eos_id))
    toks.append(t)
    ids.append(np.full(len(t), doc_id, np.int64))
  if not toks:
    raise ValueError("no document to evaluate")
  stream, stream_ids = np.concatenate(toks), np.concatenate(ids)
  windows, mask, starts = sliding_windows(stream, seq_len, stride or seq_len,
                                          chunk_size)
  doc_ids = np.full(windows.shape, -1, np.int64)
  for w, s in enumerate(starts):
    piece = stream_ids[s:s + seq_len]
    doc_ids[w, :len(piece)] = piece
  return {"tokens": windows, "loss_mask": mask, "doc_ids": doc_ids}


def online_batches(sequences: Dict[str, np.ndarray], retriever, sp, k: int,
                   batch_size: int, chunk_size: int = 64
                   ) -> Iterator[Dict[str, np.ndarray]]:
  """Batches of `sequences` with k neighbours per chunk retrieved now.

  Args:
    sequences: from `sequences_from_documents` (or a Task's numpy split).
    retriever: a `retrieval.neighbours.Retriever` over any DB.
    sp: the SentencePiece processor (the DB's vocabulary).
    k: neighbours per chunk (independent of the k trained with).
    batch_size: sequences per batch (the last batch may be smaller).
  Yields:
    {tokens [b, n], loss_mask [b, n], doc_ids [b, n], neighbours
    [b, L, k, r]}.
  """
  total = len(sequences["tokens"])
  for lo in range(0, total, batch_size):
    batch = {key: v[lo:lo + batch_size] for key, v in sequences.items()}
    nbs, _ = sequence_neighbours.neighbours_for_sequences(
        retriever, sp, batch["tokens"], batch["doc_ids"], k, chunk_size)
    yield dict(batch, neighbours=np.asarray(nbs, np.int32))
