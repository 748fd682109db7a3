"""Evaluation inputs retrieved online: documents -> sequences -> neighbours.

The seqio Tasks (tasks.py) cache neighbours from the DB and k a run trained
with. Evaluation may instead use another DB (the paper's Table 4 swaps
Wikipedia, C4 and MassiveText) or another k (up to 40): this module builds
such batches on the fly with `sequence_neighbours.neighbours_for_sequences`
(same-document filtering as in training), or, for a model without
retrieval (no CCA layer), with all-padding neighbours and no retriever at
all.

Shape glossary: S sequences, n tokens each, L = n // m chunks, k neighbours,
r tokens per neighbour.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

from retro_jax.corpus import vocab
from retro_jax.evaluation.scores import sliding_windows
from retro_jax.retrieval import sequence_neighbours



def sequences_from_documents(docs: Iterable[Tuple[int, np.ndarray]],
                             seq_len: int, stride: Optional[int] = None,
                             chunk_size: int = 64,
                             eos_id: int = vocab.EOS_ID) -> Dict[str, np.ndarray]:
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


def with_neighbours(batches: Iterable[Dict[str, np.ndarray]], retriever, sp,
                    k: int, chunk_size: int = 64,
                    neighbour_len: Optional[int] = None
                    ) -> Iterator[Dict[str, np.ndarray]]:
  """`batches` with their neighbours (re)placed by k retrieved now.

  Args:
    batches: {tokens [b, n], doc_ids [b, n], ...} (any other keys kept).
    retriever: a `retrieval.neighbours.Retriever` over any DB; None: no
      retrieval (a model without CCA), all-padding neighbours instead.
    sp: the SentencePiece processor (the DB's vocabulary; unused without a
      retriever).
    k: neighbours per chunk (independent of the k trained with).
    chunk_size: m.
    neighbour_len: r for all-padding neighbours (default 2m).
  Yields:
    each batch with neighbours int32 [b, L, k, r].
  """
  r = neighbour_len or 2 * chunk_size
  for batch in batches:
    tokens = batch["tokens"]                                 # [b, n]
    if retriever is None:
      nbs = np.zeros((len(tokens), tokens.shape[1] // chunk_size, k, r),
                     np.int32)                               # [b, L, k, r]
    else:
      nbs, _ = sequence_neighbours.neighbours_for_sequences(
          retriever, sp, tokens, batch["doc_ids"], k, chunk_size)
    yield dict(batch, neighbours=np.asarray(nbs, np.int32))


def online_batches(sequences: Dict[str, np.ndarray], retriever, sp, k: int,
                   batch_size: int, chunk_size: int = 64,
                   neighbour_len: Optional[int] = None
                   ) -> Iterator[Dict[str, np.ndarray]]:
  """Batches of `sequences` with k neighbours per chunk retrieved now.

  Args:
    sequences: from `sequences_from_documents` (or a Task's numpy split).
    retriever: a `retrieval.neighbours.Retriever` over any DB; None: no
      retrieval, all-padding neighbours (see `with_neighbours`).
    sp: the SentencePiece processor (the DB's vocabulary).
    k: neighbours per chunk (independent of the k trained with).
    batch_size: sequences per batch (the last batch may be smaller).
    chunk_size: m.
    neighbour_len: r for all-padding neighbours (default 2m).
  Yields:
    {tokens [b, n], loss_mask [b, n], doc_ids [b, n], neighbours
    [b, L, k, r]}.
  """
  total = len(sequences["tokens"])
  batches = ({key: v[lo:lo + batch_size] for key, v in sequences.items()}
             for lo in range(0, total, batch_size))
  return with_neighbours(batches, retriever, sp, k, chunk_size,
                         neighbour_len)
