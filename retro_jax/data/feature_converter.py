"""seqio feature converter: RETRO Task examples -> model features.

A RETRO Task example holds `tokens` [n], `neighbours` [L, k, r] and
`doc_ids` [n] (tasks.py). The model consumes `tokens` and `neighbours` and
the loss needs a `loss_mask` (1 on real tokens, 0 on pad). Sequences are
already packed to exactly n tokens offline, so the converter does not pack:
it checks ranks, dtypes and lengths (seqio's validation), adds the mask and
drops everything else (`doc_ids` passes through on request, for evaluation
and filtering checks).

Shape glossary:
  n: tokens per sequence.   L: chunks (n / m).   k: neighbours.
  r: tokens per neighbour (chunk + continuation, 2m).
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from retro_jax.config import PAD_ID

_Spec = seqio.FeatureConverter.FeatureSpec


class RetroFeatureConverter(seqio.FeatureConverter):
  """{tokens, neighbours[, doc_ids]} -> {tokens, neighbours, loss_mask[, doc_ids]}.

  Task feature lengths: {"tokens": n, "neighbours": L} (and "doc_ids": n
  with `with_doc_ids`). Model features: tokens int32 [n], neighbours int32
  [L, k, r], loss_mask int32 [n].
  """

  TASK_FEATURES = {
      "tokens": _Spec(dtype=tf.int32),
      "neighbours": _Spec(dtype=tf.int32, rank=3),
  }
  MODEL_FEATURES = {
      "tokens": _Spec(dtype=tf.int32),
      "neighbours": _Spec(dtype=tf.int32, rank=3),
      "loss_mask": _Spec(dtype=tf.int32),
  }
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, with_doc_ids: bool = False, **kwargs):
    passthrough = {"doc_ids": _Spec(dtype=tf.int64)} if with_doc_ids else None
    super().__init__(pack=False, passthrough_features=passthrough, **kwargs)
    self._with_doc_ids = with_doc_ids

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]
                        ) -> tf.data.Dataset:
    del task_feature_lengths  # Sequences are packed to length offline.
    with_doc_ids = self._with_doc_ids

    def convert(ex):
      out = {"tokens": ex["tokens"],                              # [n]
             "neighbours": ex["neighbours"],                      # [L, k, r]
             "loss_mask": tf.cast(ex["tokens"] != PAD_ID, tf.int32)}  # [n]
      if with_doc_ids:
        out["doc_ids"] = ex["doc_ids"]                            # [n]
      return out

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> Mapping[str, int]:
    lengths = {"tokens": task_feature_lengths["tokens"],
               "neighbours": task_feature_lengths["neighbours"],
               "loss_mask": task_feature_lengths["tokens"]}
    if self._with_doc_ids:
      lengths["doc_ids"] = task_feature_lengths["doc_ids"]
    return lengths

  def task_feature_lengths(self, seq_len: int, chunk_size: int = 64
                           ) -> Mapping[str, int]:
    """The `task_feature_lengths` for sequences of `seq_len` tokens."""
    lengths = {"tokens": seq_len, "neighbours": seq_len // chunk_size}
    if self._with_doc_ids:
      lengths["doc_ids"] = seq_len
    return lengths
