"""corpus/packing.py: documents cut into chunks one way, chunks into sequences."""

import numpy as np
import pytest

from retro_jax.config import EOS_ID, PAD_ID
from retro_jax.corpus import packing

M = 4


def test_document_chunks_end_with_eos_then_padding():
  chunks = packing.document_chunks(np.arange(2, 7), chunk_size=M)  # 5 tokens
  np.testing.assert_array_equal(chunks, [[2, 3, 4, 5], [6, EOS_ID, 0, 0]])
  # A document that fills its chunks exactly gets a chunk of EOS + padding.
  chunks = packing.document_chunks(np.arange(2, 6), chunk_size=M)
  np.testing.assert_array_equal(chunks, [[2, 3, 4, 5], [EOS_ID, 0, 0, 0]])
  with pytest.raises(ValueError, match="pad id"):
    packing.document_chunks(np.array([3, PAD_ID, 4]), chunk_size=M)


def test_pack_chunks_starts_every_document_on_a_chunk_boundary():
  docs = [(10, np.arange(2, 5)),      # 3 tokens + EOS: one chunk, no pad
          (11, np.arange(20, 25)),    # 5 + EOS: two chunks, 2 pads
          (12, []),                   # skipped
          (13, np.arange(30, 31)),    # 1 + EOS: one chunk, 2 pads
          (14, np.arange(40, 49))]    # 9 + EOS: three chunks; cut off
  seqs = list(packing.pack_chunks(docs, seq_len=2 * M, chunk_size=M))
  assert len(seqs) == 3  # 7 chunks -> 3 sequences of 2, the last dropped.
  tokens = np.stack([t for t, _ in seqs]).reshape(-1, M)  # [6, m]
  doc_ids = np.stack([d for _, d in seqs]).reshape(-1, M)  # [6, m]
  np.testing.assert_array_equal(tokens[:4], [
      [2, 3, 4, EOS_ID], [20, 21, 22, 23], [24, EOS_ID, 0, 0],
      [30, EOS_ID, 0, 0]])
  # Every position of a chunk carries the chunk's document.
  assert (doc_ids == doc_ids[:, :1]).all()
  np.testing.assert_array_equal(doc_ids[:, 0], [10, 11, 11, 13, 14, 14])
  # Each document's first token opens a chunk.
  starts = [np.flatnonzero(tokens.reshape(-1) == t)[0] for t in (2, 20, 30, 40)]
  assert all(s % M == 0 for s in starts)
  assert packing.padding(tokens[:4]) == (4, 16)
  with pytest.raises(ValueError, match="multiple"):
    next(packing.pack_chunks(docs, seq_len=6, chunk_size=M))
