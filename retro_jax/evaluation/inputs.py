"""Evaluation inputs retrieved online: documents -> windows -> neighbours.

The seqio Tasks (tasks.py) cache neighbours from the DB and k a run trained
with. Evaluation may instead use another DB (the paper's Table 4 swaps
Wikipedia, C4 and MassiveText) or another k (up to 40): this module builds
such batches on the fly with `sequence_neighbours.neighbours_for_sequences`
(same-document filtering as in training), or, for a model without
retrieval (no CCA layer), with all-padding neighbours and no retriever at
all.

Shape glossary: S sequences, n tokens each, L = n // m chunks, k neighbours,
r tokens per neighbour, W windows, T tokens of a stream.
"""

from __future__ import annotations

from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

from retro_jax.config import CHUNK_SIZE
from retro_jax.config import EOS_ID
from retro_jax.retrieval import sequence_neighbours


def sliding_windows(tokens: np.ndarray, seq_len: int, stride: int,
                    chunk_size: int = CHUNK_SIZE):
  """Windows of a token stream for strided evaluation.

  Window w covers tokens [w*stride, w*stride + seq_len); each target is
  scored once, in the first window where it has the most context: the first
  window scores all its targets, later ones only their last `stride`
  tokens. The last window is padded (loss_mask 0).

  Args:
    tokens: int [T] one stream (e.g. a document, or packed documents).
    seq_len: n, a multiple of chunk_size.
    stride: a multiple of chunk_size in (0, n] (n = no overlap).
  Returns:
    (windows int32 [W, n], loss_mask int32 [W, n], starts int64 [W]).
  """
  if seq_len % chunk_size or stride % chunk_size or not 0 < stride <= seq_len:
    raise ValueError(f"seq_len {seq_len} and stride {stride} must be "
                     f"multiples of the chunk size {chunk_size}, 0 < stride "
                     f"<= seq_len")
  tokens = np.asarray(tokens, np.int32)
  t = len(tokens)
  starts = [0]
  while starts[-1] + seq_len < t:
    starts.append(starts[-1] + stride)
  windows = np.zeros((len(starts), seq_len), np.int32)
  mask = np.zeros((len(starts), seq_len), np.int32)
  for w, s in enumerate(starts):
    piece = tokens[s:s + seq_len]
    windows[w, :len(piece)] = piece
    first = 0 if w == 0 else seq_len - stride
    mask[w, first:len(piece)] = 1
  return windows, mask, np.asarray(starts, np.int64)


def sequences_from_documents(docs: Iterable[Tuple[int, np.ndarray]],
                             seq_len: int, stride: Optional[int] = None,
                             chunk_size: int = CHUNK_SIZE,
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


def with_neighbours(batches: Iterable[Dict[str, np.ndarray]], retriever, sp,
                    k: int, chunk_size: int = CHUNK_SIZE,
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
                   batch_size: int, chunk_size: int = CHUNK_SIZE,
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
  return with_neighbours(sequence_batches(sequences, batch_size), retriever,
                         sp, k, chunk_size, neighbour_len)


def sequence_batches(sequences: Dict[str, np.ndarray], batch_size: int
                     ) -> Iterator[Dict[str, np.ndarray]]:
  """`sequences` ({key: [S, ...]}) in batches of `batch_size` rows (the
  last may be smaller), without neighbours."""
  total = len(sequences["tokens"])
  return ({key: v[lo:lo + batch_size] for key, v in sequences.items()}
          for lo in range(0, total, batch_size))


def document_batches(texts: Iterable[Tuple[int, str]], sp, seq_len: int,
                     stride: Optional[int], retriever, k: int,
                     batch_size: int, chunk_size: int = CHUNK_SIZE,
                     neighbour_len: Optional[int] = None
                     ) -> Iterator[Dict[str, np.ndarray]]:
  """Texts tokenized, windowed and retrieved for now: the batches of an
  evaluation of documents (`sequences_from_documents`, then
  `online_batches`).

  Args:
    texts: (doc_id, text) pairs; a doc id also keeps a sequence from
      retrieving its own document.
    sp: the SentencePiece processor (the DB's vocabulary).
    seq_len, stride: n and the window step (None: n).
    retriever, k, batch_size, chunk_size, neighbour_len: as for
      `online_batches`.
  """
  seqs = sequences_from_documents(
      [(doc_id, sp.encode(text)) for doc_id, text in texts], seq_len, stride,
      chunk_size)
  return online_batches(seqs, retriever, sp, k, batch_size, chunk_size,
                        neighbour_len)
