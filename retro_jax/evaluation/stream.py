"""A corpus evaluation set streamed: documents -> windows -> batches, in
memory that does not grow with the corpus.

`WindowPacker` cuts the stream of one group's documents (each followed by
EOS) into the windows `inputs.sequences_from_documents` gives for the whole
stream at once, but holds only the tokens of the window being filled (and
of the document being read). `labelled_batches` reads documents one at a
time, routes each to the packer of its group (the set itself, or one per
value of the set's `group_by` meta field), and yields batches whose rows
carry the index of their group, so that rows of every group share batches
and each document is scored once. `DocumentStats` counts what was read per
group: documents, UTF-8 bytes of text and words (for word-level
perplexity, see docs/evaluation.md).

Shape glossary: b batch rows, n tokens per window (seq_len).
"""

from __future__ import annotations

import dataclasses
from typing import (Callable, Dict, Iterable, Iterator, List, Optional,
                    Sequence)

import numpy as np

from retro_jax.config import CHUNK_SIZE
from retro_jax.config import EOS_ID

Window = Dict[str, np.ndarray]  # tokens [n], loss_mask [n], doc_ids [n].


def count_words(text: str) -> int:
  """Words of a text as WikiText-103's perplexities count them: its
  whitespace-separated tokens plus one per line end ("\\n"), the <eos> of
  each line in the WikiText papers."""
  return len(text.split()) + text.count("\n")


@dataclasses.dataclass
class DocumentStats:
  """What one group read: documents, UTF-8 bytes of their text, words."""

  documents: int = 0
  text_bytes: int = 0
  words: int = 0

  def add(self, text: str) -> None:
    self.documents += 1
    self.text_bytes += len(text.encode("utf-8"))
    self.words += count_words(text)

  def merged(self, other: "DocumentStats") -> "DocumentStats":
    return DocumentStats(self.documents + other.documents,
                         self.text_bytes + other.text_bytes,
                         self.words + other.words)


class WindowPacker:
  """Windows of a stream of documents, produced as the stream grows.

  Window w covers stream tokens [w*stride, w*stride + n) and scores (mask
  1) all of them if w = 0, else its last `stride` (each target once, with
  the most context); the last window is padded (mask 0, doc id -1). The
  windows, masks and doc ids equal `inputs.sequences_from_documents` of
  the same documents; only about n + stride tokens (plus the document
  being added) are held.
  """

  def __init__(self, seq_len: int, stride: int,
               chunk_size: int = CHUNK_SIZE, eos_id: int = EOS_ID):
    if (seq_len % chunk_size or stride % chunk_size
        or not 0 < stride <= seq_len):
      raise ValueError(f"seq_len {seq_len} and stride {stride} must be "
                       f"multiples of the chunk size {chunk_size}, 0 < "
                       f"stride <= seq_len")
    self.seq_len, self.stride, self.eos_id = seq_len, stride, eos_id
    self._tokens = np.zeros(0, np.int32)  # Stream tokens from _offset on.
    self._doc_ids = np.zeros(0, np.int64)
    self._offset = 0  # Stream position of _tokens[0].
    self._next_start = 0  # Stream position where the next window starts.
    self._emitted = 0  # Windows produced so far.

  @property
  def length(self) -> int:
    """Tokens of the stream so far."""
    return self._offset + len(self._tokens)

  def _window(self) -> Window:
    n, start = self.seq_len, self._next_start - self._offset
    piece = self._tokens[start:start + n]
    tokens = np.zeros(n, np.int32)
    tokens[:len(piece)] = piece
    doc_ids = np.full(n, -1, np.int64)
    doc_ids[:len(piece)] = self._doc_ids[start:start + n]
    mask = np.zeros(n, np.int32)
    mask[0 if self._emitted == 0 else n - self.stride:len(piece)] = 1
    self._emitted += 1
    self._next_start += self.stride
    drop = min(self._next_start - self._offset, len(self._tokens))
    self._tokens, self._doc_ids = self._tokens[drop:], self._doc_ids[drop:]
    self._offset += drop
    return {"tokens": tokens, "loss_mask": mask, "doc_ids": doc_ids}

  def add(self, doc_id: int, tokens: Sequence[int]) -> List[Window]:
    """Appends a document and its EOS; returns the windows now complete."""
    t = np.append(np.asarray(tokens, np.int32), np.int32(self.eos_id))
    self._tokens = np.concatenate([self._tokens, t])
    self._doc_ids = np.concatenate(
        [self._doc_ids, np.full(len(t), doc_id, np.int64)])
    out = []
    while self._next_start + self.seq_len <= self.length:
      out.append(self._window())
    return out

  def finish(self) -> List[Window]:
    """The last, padded window, if the stream's end is not yet covered."""
    last_end = self._next_start - self.stride + self.seq_len
    if self.length and (self._emitted == 0 or last_end < self.length):
      return [self._window()]
    return []


def _stack(rows: List[Window], groups: List[int]) -> Dict[str, np.ndarray]:
  batch = {key: np.stack([r[key] for r in rows])    # [b, n] each.
           for key in ("tokens", "loss_mask", "doc_ids")}
  batch["group"] = np.asarray(groups, np.int64)  # [b]
  return batch


def labelled_batches(documents: Iterable, group_of: Callable[[object], str],
                     encode: Callable[[str], Sequence[int]], seq_len: int,
                     stride: int, batch_size: int, groups: List[str],
                     stats: Dict[str, DocumentStats],
                     chunk_size: int = CHUNK_SIZE,
                     eos_id: int = EOS_ID) -> Iterator[Dict[str, np.ndarray]]:
  """Batches of the windows of `documents`, each group packed on its own.

  Args:
    documents: `sources.Document`s (doc_id, text), read once, lazily.
    group_of: a document's group name.
    encode: text -> token ids (the run's SentencePiece).
    seq_len, stride: n and the window step.
    batch_size: rows per batch (the last batch may be smaller).
    groups: filled with the group names in order of first appearance; a
      row's "group" indexes it.
    stats: filled with each group's `DocumentStats` as documents are read.
  Yields:
    {tokens int32 [b, n], loss_mask int32 [b, n], doc_ids int64 [b, n],
     group int64 [b]}.
  """
  packers: Dict[str, WindowPacker] = {}
  label_of: Dict[str, int] = {}
  rows: List[Window] = []
  labels: List[int] = []

  def take(windows, label):
    for w in windows:
      rows.append(w)
      labels.append(label)
      if len(rows) == batch_size:
        yield _stack(rows, labels)
        rows.clear()
        labels.clear()

  for doc in documents:
    name = group_of(doc)
    if name not in packers:
      packers[name] = WindowPacker(seq_len, stride, chunk_size, eos_id)
      label_of[name] = len(groups)
      groups.append(name)
      stats[name] = DocumentStats()
    stats[name].add(doc.text)
    yield from take(packers[name].add(doc.doc_id, encode(doc.text)),
                    label_of[name])
  for label, name in enumerate(groups):
    yield from take(packers[name].finish(), label)
  if rows:
    yield _stack(rows, labels)


def total_stats(stats: Dict[str, DocumentStats],
                names: Optional[Iterable[str]] = None) -> DocumentStats:
  """The sum of `stats` (of `names` only, if given)."""
  out = DocumentStats()
  for name in (stats if names is None else names):
    out = out.merged(stats[name])
  return out
