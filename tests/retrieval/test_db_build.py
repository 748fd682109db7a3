"""Chunking for the DB (retro_jax.retrieval.db_build): every document
starts a chunk, its last chunk is padded, and pad ids cannot hide in text."""

import numpy as np
import pytest

from retro_jax.config import CHUNK_SIZE, PAD_ID
from retro_jax.retrieval import db_build


def test_chunk_document_pads_the_last_chunk():
  ids = np.arange(1, 2 * CHUNK_SIZE + 6)  # Two whole chunks and 5 tokens.
  chunks = db_build.chunk_document(ids)
  assert chunks.shape == (3, CHUNK_SIZE) and chunks.dtype == np.int32
  np.testing.assert_array_equal(chunks.reshape(-1)[:len(ids)], ids)
  assert (chunks[2, 5:] == PAD_ID).all() and (chunks[2, :5] != PAD_ID).all()
  assert db_build.chunk_document(np.arange(1, 9), chunk_size=4).shape == (2, 4)


def test_chunk_document_refuses_pad_ids_and_other_ranks():
  with pytest.raises(ValueError, match="pad id"):
    db_build.chunk_document(np.array([5, PAD_ID, 7]))
  with pytest.raises(ValueError, match="1-D"):
    db_build.chunk_document(np.ones((2, 3), np.int32))
