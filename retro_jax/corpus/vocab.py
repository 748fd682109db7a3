"""SentencePiece vocabularies: train one on a corpus, or load a `.model`."""

from __future__ import annotations

import io
from typing import Iterable

from etils import epath
import sentencepiece as spm

from retro_jax.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from retro_jax.core import files


def train(texts: Iterable[str], model_path: str, vocab_size: int,
          model_type: str = "unigram", byte_fallback: bool = True,
          max_sentence_length: int = 4192,
          input_sentence_size: int = 200_000) -> spm.SentencePieceProcessor:
  """Trains a SentencePiece model on `texts` and writes it to `model_path`.

  Every line of every text is a training sentence. Ids follow seqio's
  convention: 0 pad, 1 eos, 2 unk, no bos. The model is written to a
  temporary name and renamed, so a crash never leaves a truncated `.model`.
  """
  def sentences():
    for text in texts:
      for line in text.splitlines():
        if line.strip():
          yield line[:max_sentence_length]

  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=sentences(), model_writer=proto,
      vocab_size=vocab_size, model_type=model_type,
      byte_fallback=byte_fallback, pad_id=PAD_ID, eos_id=EOS_ID,
      unk_id=UNK_ID, bos_id=BOS_ID, character_coverage=1.0,
      max_sentence_length=max_sentence_length,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
      split_digits=True, allow_whitespace_only_pieces=True,
      remove_extra_whitespaces=False, normalization_rule_name="identity",
      minloglevel=2)
  files.write_bytes(model_path, proto.getvalue())
  return load(model_path)


def load(model_path: str) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece `.model`; names the file if it is not one."""
  path = epath.Path(model_path)    # Local, or gs://.
  if not path.is_file():
    raise FileNotFoundError(f"SentencePiece model {model_path} does not exist")
  proc = spm.SentencePieceProcessor()
  try:
    proc.LoadFromSerializedProto(path.read_bytes())
  except (RuntimeError, OSError) as e:
    raise ValueError(f"{model_path} is not a SentencePiece model: {e}") from e
  return proc


def seqio_vocabulary(model_path: str):
  """`model_path` as a `seqio.SentencePieceVocabulary` (for seqio Tasks).

  The file is checked by `load` first, so a missing or broken model names
  the file instead of failing later inside a tf.data pipeline.
  """
  import seqio  # pylint: disable=g-import-not-at-top  # seqio pulls in TF.
  load(model_path)
  return seqio.SentencePieceVocabulary(model_path)
