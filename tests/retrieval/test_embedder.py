"""Tests of the frozen BERT retriever against recorded transformers outputs.

tests/fixtures/minilm_reference.json was written once by
tools/make_bert_fixture.py (torch + transformers, outside this project's
environment) from the same all-MiniLM-L6-v2 files the default loads.
"""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import safetensors.numpy

from conftest import REPO_ROOT
from retro_jax.retrieval import embedder as embedder_lib
from retro_jax.retrieval.embedder import BertConfig, BertEmbedder

FIXTURE = os.path.join(REPO_ROOT, "tests", "fixtures",
                       "minilm_reference.json")
_SMALL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                "vocab.txt")


@pytest.fixture(scope="module")
def reference():
  with open(FIXTURE, encoding="utf-8") as f:
    return json.load(f)["sentences"]


@pytest.fixture(scope="module")
def minilm():
  return BertEmbedder.load()


def _copy_model(dst, files=_SMALL_FILES, link_weights=True):
  """A copy of the default model directory in `dst` (weights symlinked)."""
  src = embedder_lib.default_model_dir()
  os.makedirs(dst, exist_ok=True)
  for name in files:
    shutil.copy(os.path.join(src, name), dst)
  if link_weights:
    os.symlink(os.path.join(src, "model.safetensors"),
               os.path.join(dst, "model.safetensors"))
  return str(dst)


def test_default_model(minilm):
  assert minilm.name == "all-MiniLM-L6-v2"
  assert minilm.dim == 384
  assert minilm.embed([]).shape == (0, 384)
  with pytest.raises(TypeError):
    minilm.embed("one string, not a list")


def test_token_ids_match_reference(minilm, reference):
  assert any(len(r["ids"]) > 64 for r in reference)
  assert any(not r["text"].isascii() for r in reference)
  ids = minilm.tokenize([r["text"] for r in reference])
  for got, r in zip(ids, reference):
    assert got == r["ids"], r["text"]


def test_vocab_txt_tokenizer_matches_reference(tmp_path, reference):
  """Without tokenizer.json, the WordPiece tokenizer built from vocab.txt
  and tokenizer_config.json gives the same ids."""
  path = _copy_model(tmp_path / "m", files=("config.json", "vocab.txt",
                                            "tokenizer_config.json"))
  emb = BertEmbedder.load(path)
  for got, r in zip(emb.tokenize([r["text"] for r in reference]), reference):
    assert got == r["ids"], r["text"]


def test_embeddings_match_reference(minilm, reference):
  vecs = minilm.embed([r["text"] for r in reference])
  assert vecs.dtype == np.float32 and vecs.shape == (len(reference), 384)
  for vec, r in zip(vecs, reference):
    np.testing.assert_allclose(vec, np.asarray(r["vector"], np.float32),
                               atol=1e-4, rtol=0, err_msg=r["text"])


def test_padding_does_not_change_embeddings(minilm, reference):
  short = "a short sentence"
  alone = minilm.embed([short])
  others = [r["text"] for r in reference]
  batched = minilm.embed(others[:2] + [short] + others[2:])
  np.testing.assert_allclose(batched[2], alone[0], atol=1e-5, rtol=0)
  lengths = [len(x) for x in minilm.tokenize(others + [short])]
  assert lengths[-1] < 32 < max(lengths)  # Padded to 128 in the batch.


def test_padded_lengths_are_a_small_fixed_set():
  """Every length 1..512 maps to one of a dozen padded lengths (so memory
  stays bounded however many chunks are embedded), never shorter than the
  text, never more than 2x beyond the fine range."""
  lengths = {embedder_lib.padded_length(n, 512): n for n in range(1, 513)}
  assert len(lengths) <= 12
  for n in range(1, 513):
    t = embedder_lib.padded_length(n, 512)
    assert n <= t <= 512 and t in lengths
    assert t - n < embedder_lib.SEQ_BUCKET or (
        n > embedder_lib.SEQ_FINE and t < 2 * n)
  assert embedder_lib.padded_length(300, 256) == 256    # Capped.


def test_long_text_is_truncated(minilm):
  text = " ".join(["word"] * 1000)
  emb = BertEmbedder.load(max_length=40)
  assert len(emb.tokenize([text])[0]) == 40
  assert len(minilm.tokenize([text])[0]) == 512
  assert np.all(np.isfinite(emb.embed([text])))


def test_fingerprint(minilm):
  h = hashlib.sha256()
  for name in ("config.json", "model.safetensors"):
    with open(os.path.join(minilm.model_dir, name), "rb") as f:
      h.update(f.read())
  assert minilm.fingerprint == h.hexdigest()


def test_bert_prefixed_checkpoint(tmp_path, minilm, reference):
  """The `bert-base-cased` layout: `bert.` prefix, LayerNorm gamma/beta,
  pooler and `cls.` heads present (and ignored)."""
  path = _copy_model(tmp_path / "bert-like", link_weights=False)
  tensors = safetensors.numpy.load_file(
      os.path.join(minilm.model_dir, "model.safetensors"))
  renamed = {}
  for key, value in tensors.items():
    if key.startswith("pooler."):
      continue
    key = key.replace("LayerNorm.weight", "LayerNorm.gamma")
    key = key.replace("LayerNorm.bias", "LayerNorm.beta")
    renamed["bert." + key] = value
  rng = np.random.default_rng(0)
  renamed["bert.pooler.dense.weight"] = rng.normal(
      size=(384, 384)).astype(np.float32)
  renamed["bert.pooler.dense.bias"] = np.zeros(384, np.float32)
  renamed["cls.predictions.bias"] = np.zeros(30522, np.float32)
  safetensors.numpy.save_file(renamed, os.path.join(path, "model.safetensors"))
  emb = BertEmbedder.load(path)
  assert emb.name == "bert-like"
  texts = [r["text"] for r in reference]
  np.testing.assert_allclose(emb.embed(texts), minilm.embed(texts),
                             atol=1e-6, rtol=0)


def test_missing_directory(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope"):
    BertEmbedder.load(missing)


def test_missing_weights(tmp_path):
  path = _copy_model(tmp_path / "m", link_weights=False)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    BertEmbedder.load(path)


def test_config_missing_field(tmp_path):
  path = _copy_model(tmp_path / "m")
  config = os.path.join(path, "config.json")
  with open(config) as f:
    raw = json.load(f)
  del raw["hidden_size"]
  with open(config, "w") as f:
    json.dump(raw, f)
  with pytest.raises(ValueError, match=r"config\.json.*hidden_size"):
    BertEmbedder.load(path)


@pytest.mark.parametrize("field,value", [("hidden_act", "relu"),
                                         ("num_hidden_layers", 0),
                                         ("model_type", "roberta")])
def test_config_unsupported_value(tmp_path, field, value):
  config = tmp_path / "config.json"
  with open(os.path.join(embedder_lib.default_model_dir(),
                         "config.json")) as f:
    raw = json.load(f)
  raw[field] = value
  config.write_text(json.dumps(raw))
  with pytest.raises(ValueError, match=rf"config\.json.*{field}"):
    BertConfig.from_json(str(config))


def _tiny_checkpoint(path, drop=None, reshape=None):
  """A random 1-layer BERT of width 8 in the plain Hugging Face layout."""
  os.makedirs(path, exist_ok=True)
  config = {"vocab_size": 12, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16,
            "max_position_embeddings": 16, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  shapes = {"embeddings.word_embeddings.weight": (12, 8),
            "embeddings.position_embeddings.weight": (16, 8),
            "embeddings.token_type_embeddings.weight": (2, 8),
            "embeddings.LayerNorm.weight": (8,),
            "embeddings.LayerNorm.bias": (8,)}
  layer = "encoder.layer.0."
  for name, out, inp in (("attention.self.query", 8, 8),
                         ("attention.self.key", 8, 8),
                         ("attention.self.value", 8, 8),
                         ("attention.output.dense", 8, 8),
                         ("intermediate.dense", 16, 8),
                         ("output.dense", 8, 16)):
    shapes[layer + name + ".weight"] = (out, inp)
    shapes[layer + name + ".bias"] = (out,)
  for name in ("attention.output.LayerNorm", "output.LayerNorm"):
    shapes[layer + name + ".weight"] = (8,)
    shapes[layer + name + ".bias"] = (8,)
  if reshape:
    shapes[reshape] = shapes[reshape][::-1] + (1,)
  rng = np.random.default_rng(0)
  tensors = {k: rng.normal(size=s).astype(np.float32)
             for k, s in shapes.items() if k != drop}
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a",
                       "b", "c", "##a", "##b", "##c", "."]) + "\n")
  weights = os.path.join(path, "model.safetensors")
  safetensors.numpy.save_file(tensors, weights)
  return weights


def test_tiny_checkpoint_loads(tmp_path):
  _tiny_checkpoint(str(tmp_path / "tiny"))
  emb = BertEmbedder.load(str(tmp_path / "tiny"), batch_size=4)
  assert emb.tokenize(["ab c"]) == [[2, 5, 9, 7, 3]]
  vecs = emb.embed(["ab c", "a", "cab. " * 20])  # The last one truncated.
  assert vecs.shape == (3, 8) and np.all(np.isfinite(vecs))


def test_missing_tensor(tmp_path):
  key = "encoder.layer.0.attention.self.key.weight"
  weights = _tiny_checkpoint(str(tmp_path / "tiny"), drop=key)
  with pytest.raises(ValueError, match=rf"{re.escape(weights)}.*{key}"):
    BertEmbedder.load(str(tmp_path / "tiny"))


def test_wrong_tensor_shape(tmp_path):
  key = "encoder.layer.0.intermediate.dense.weight"
  weights = _tiny_checkpoint(str(tmp_path / "tiny"), reshape=key)
  with pytest.raises(ValueError, match=rf"{re.escape(weights)}.*{key}.*shape"):
    BertEmbedder.load(str(tmp_path / "tiny"))


def test_corrupt_weights(tmp_path):
  path = _copy_model(tmp_path / "m", link_weights=False)
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write(b"not a safetensors file")
  with pytest.raises(ValueError, match="model.safetensors"):
    BertEmbedder.load(path)


def test_default_not_installed(monkeypatch):
  monkeypatch.setattr(embedder_lib.importlib.util, "find_spec",
                      lambda name: None)
  with pytest.raises(FileNotFoundError, match="setup_env.sh"):
    BertEmbedder.load()
