"""The seqio feature converter of RETRO Tasks: the loss mask is 1 exactly
on real tokens, neighbours pass unchanged, doc ids only on request."""

import numpy as np
import tensorflow as tf

from retro_jax.config import PAD_ID
from retro_jax.data.feature_converter import RetroFeatureConverter


def _examples(n=8, m=4, k=2, r=8):
  tokens = np.arange(1, n + 1, dtype=np.int32)
  tokens[-3:] = PAD_ID  # The end of a document's last chunk.
  neighbours = np.arange(n // m * k * r, dtype=np.int32).reshape(n // m, k, r)
  return tf.data.Dataset.from_tensors({
      "tokens": tokens, "neighbours": neighbours,
      "doc_ids": np.full((n,), 7, np.int64)})


def test_loss_mask_and_passthrough():
  converter = RetroFeatureConverter()
  lengths = converter.task_feature_lengths(8, chunk_size=4)
  assert lengths == {"tokens": 8, "neighbours": 2}
  (ex,) = list(converter(_examples(), lengths).as_numpy_iterator())
  assert set(ex) == {"tokens", "neighbours", "loss_mask"}
  np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(ex["neighbours"],
                                np.arange(32).reshape(2, 2, 8))


def test_doc_ids_on_request():
  converter = RetroFeatureConverter(with_doc_ids=True)
  lengths = converter.task_feature_lengths(8, chunk_size=4)
  (ex,) = list(converter(_examples(), lengths).as_numpy_iterator())
  np.testing.assert_array_equal(ex["doc_ids"], np.full((8,), 7))
