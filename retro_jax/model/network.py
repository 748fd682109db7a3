"""The RETRO network: a decoder LM with chunked cross-attention to neighbours.

Shape glossary:
  B: batch.            N: sequence length, a multiple of m.
  m: chunk size.       L: chunks per sequence, N // m.
  k: neighbours.       r: tokens per neighbour (chunk + continuation).
  D: decoder width.    E: encoder width.      V: vocabulary.

Data flow (paper §2, App. B), pre-norm RMSNorm everywhere:

  tokens [B, N] ─ embed ─► decoder layer 1 … n_layers ─ norm ─ logits [B, N, V]
  each layer: x += SelfAttn(norm x); [CCA layer: x += CCA(norm x, enc)];
              x += MLP(norm x)
  at the first CCA layer the encoder runs once on the neighbours [B, L, k, r],
  conditioned on that layer's post-attention activations of each chunk.

Padding (token id 0) in `neighbours` is masked everywhere; a chunk whose
neighbours are all padding receives exactly zero from every CCA layer, so the
logits equal those of the same parameters with retrieval switched off
(`neighbours=None`).

The neighbours of the last chunk reach one position only, the last (CCA
shifts by m - 1), and a next-token loss has no target there. With
`retrieve_for_last_position=False` they are never encoded and that position
is computed as if they were padding: the training and evaluation losses pass
it and skip 1/L of the encoder and CCA work, with every other logit the same.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.model import attention
from retro_jax.core import sharding
from retro_jax.config import PAD_ID, RetroConfig, dtype_of

_SQRT_2_OVER_PI = 0.7978845608028654


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """tanh-approximate GELU, equal to `jax.nn.gelu(x)`, whose backward pass
  recomputes tanh from x instead of keeping it.

  Autodiff of `jax.nn.gelu` stores tanh(.) as a second [..., F] residual
  beside x and reads both back; recomputing it costs a few vector ops and
  saves two of the five passes over the largest activation of the block.
  """
  return jax.nn.gelu(x)


def _gelu_fwd(x):
  return jax.nn.gelu(x), x


def _gelu_bwd(x, g):
  inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
  t = jnp.tanh(inner)
  slope = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
  return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * slope),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@dataclasses.dataclass
class MLP(hk.Module):
  """Feed-forward block: D -> F (GELU) -> D, no biases."""

  d_ff: int
  name: Optional[str] = None

  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    w_in = attention.param("w_in", [d, self.d_ff], d, x.dtype)  # [D, F]
    w_out = attention.param("w_out", [self.d_ff, d], self.d_ff, x.dtype)
    h = gelu(attention.dense(x, w_in))  # [..., F]
    return attention.dense(h, w_out)  # [..., D]


class NeighbourEncoder(hk.Module):
  """Bidirectional encoder of retrieved neighbours (paper §2.4).

  Each neighbour's r tokens attend to each other; the layers listed in
  `enc_cross_attention_layers` also attend to the decoder activations of the
  chunk the neighbour was retrieved for.
  """

  def __init__(self, cfg: RetroConfig, name: Optional[str] = "encoder"):
    super().__init__(name=name)
    self.cfg = cfg

  def __call__(self, x: jax.Array, valid: jax.Array,
               context: jax.Array) -> jax.Array:
    """Encodes neighbours.

    Args:
      x: [B, L, k, r, E] embedded neighbour tokens.
      valid: bool [B, L, k, r], False at padding.
      context: [B, N, D] decoder activations at the first CCA layer (only
        the first L chunks are read).
    Returns:
      [B, L, k, r, E] encoded neighbours.
    """
    c = self.cfg
    b, l, nk, r, e = x.shape
    ctx = context[:, :l * c.chunk_size].reshape(
        b, l, c.chunk_size, context.shape[-1])  # [B, L, m, D]
    x = x.reshape(b * l * nk, r, e)  # [BLk, r, E]
    flat_valid = valid.reshape(b * l * nk, r)  # [BLk, r]
    for i in range(c.enc_num_layers):
      with hk.experimental.name_scope(f"layer_{i:02d}"):
        x = x + attention.SelfAttention(
            c.enc_num_heads, c.enc_head_dim, causal=False,
            rope_base=c.rope_base, name="self_attention")(
                attention.RMSNorm(c.norm_eps, name="attn_norm")(x),
                key_valid=flat_valid)  # [BLk, r, E]
        if i + 1 in c.enc_cross_attention_layers:
          q = attention.RMSNorm(c.norm_eps, name="cross_norm")(x)
          kv = attention.RMSNorm(c.norm_eps, name="context_norm")(ctx)
          y = attention.NeighbourCrossAttention(
              c.enc_num_heads, c.enc_head_dim, name="cross_attention")(
                  q.reshape(b, l, nk * r, e), kv)  # [B, L, kr, E]
          x = x + y.reshape(b * l * nk, r, e)
        x = x + MLP(c.enc_d_ff, name="mlp")(
            attention.RMSNorm(c.norm_eps, name="mlp_norm")(x))  # [BLk, r, E]
    x = attention.RMSNorm(c.norm_eps, name="final_norm")(x)
    return x.reshape(b, l, nk, r, e)  # [B, L, k, r, E]


def decoder_runs(cfg: RetroConfig) -> List[Tuple[int, int, bool]]:
  """Groups decoder layers into (first, count, has_cca) runs.

  Every CCA layer is its own run; the plain layers between them form one run
  each, which `scan_layers` turns into one `hk.layer_stack` (a scan: one
  layer body to compile however deep the run).
  """
  runs, i = [], 0
  cca = set(cfg.cca_layer_indices)
  while i < cfg.num_layers:
    if i in cca:
      runs.append((i, 1, True))
      i += 1
      continue
    j = i
    while j < cfg.num_layers and j not in cca:
      j += 1
    if cfg.scan_layers:
      runs.append((i, j - i, False))
    else:
      runs.extend((k, 1, False) for k in range(i, j))
    i = j
  return runs


def _remat(cfg: RetroConfig, fn):
  if cfg.remat == "none":
    return fn
  policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            if cfg.remat == "dots" else None)
  return hk.remat(fn, policy=policy)


def embed_neighbours(cfg: RetroConfig, table: jax.Array,
                     neighbours: jax.Array) -> jax.Array:
  """Encoder input [..., r, E] of neighbour ids [..., r]: the decoder's
  embedding table [V, D] (projected to E if the widths differ) or the
  encoder's own table. Call at the top level of the transformed function."""
  dtype = table.dtype
  if cfg.share_embeddings:
    nb = table[neighbours]  # [..., r, D]
    if cfg.enc_d_model != cfg.d_model:
      with hk.experimental.name_scope("enc_embed_proj"):
        w = attention.param("w", [cfg.d_model, cfg.enc_d_model],
                             cfg.d_model, dtype)  # [D, E]
      nb = attention.dense(nb, w)  # [..., r, E]
    return nb
  return hk.Embed(cfg.vocab_size, cfg.enc_d_model, name="enc_embed",
                  w_init=hk.initializers.TruncatedNormal(1.0)
                  )(neighbours).astype(dtype)  # [..., r, E]


def _forward(cfg: RetroConfig, tokens: jax.Array,
             neighbours: Optional[jax.Array],
             retrieve_for_last_position: bool = True) -> jax.Array:
  """Logits [B, N, V] (float32) of tokens [B, N] given neighbours [B, L, k, r]."""
  dtype = dtype_of(cfg.compute_dtype)
  embed = hk.Embed(cfg.vocab_size, cfg.d_model, name="embed",
                   w_init=hk.initializers.TruncatedNormal(1.0))
  table = embed.embeddings.astype(dtype)  # [V, D]
  x = sharding.constrain(table[tokens], ("batch", "length", "embed"))

  retrieve = neighbours is not None and cfg.has_retrieval
  if retrieve and not retrieve_for_last_position:
    neighbours = neighbours[:, :-1]  # [B, L-1, k, r]: those CCA reads.
    retrieve = neighbours.shape[1] > 0
  if retrieve:
    valid = neighbours != PAD_ID  # [B, L, k, r]
    nb = embed_neighbours(cfg, table, neighbours)  # [B, L, k, r, E]

  def self_attention_block(x):                                  # [B, N, D]
    h = attention.RMSNorm(cfg.norm_eps, name="attn_norm")(x)
    return x + attention.SelfAttention(
        cfg.num_heads, cfg.head_dim, causal=True, rope_base=cfg.rope_base,
        block=cfg.attention_block, name="self_attention")(h)

  def mlp_block(x):                                             # [B, N, D]
    x = x + MLP(cfg.d_ff, name="mlp")(
        attention.RMSNorm(cfg.norm_eps, name="mlp_norm")(x))
    return sharding.constrain(x, ("batch", "length", "embed"))

  def plain_layer(x):
    return mlp_block(self_attention_block(x))

  def cca_layer(x, encoded):
    x = self_attention_block(x)
    if retrieve:
      if encoded is None:
        encoded = NeighbourEncoder(cfg)(nb, valid, x)           # [B, L, k, r, E]
      h = attention.RMSNorm(cfg.norm_eps, name="cca_norm")(x)
      x = x + attention.ChunkedCrossAttention(
          cfg.num_heads, cfg.head_dim, cfg.chunk_size, cfg.rope_base,
          cfg.zero_init_cca, name="cca")(h, encoded, valid)     # [B, N, D]
    return mlp_block(x), encoded

  encoded = None
  with hk.experimental.name_scope("decoder"):
    for first, count, has_cca in decoder_runs(cfg):
      if has_cca:
        with hk.experimental.name_scope(f"layer_{first:02d}"):
          x, encoded = _remat(cfg, cca_layer)(x, encoded)
      elif count == 1:
        with hk.experimental.name_scope(f"layer_{first:02d}"):
          x = _remat(cfg, plain_layer)(x)
      else:
        name = f"layers_{first:02d}_{first + count - 1:02d}"
        x = hk.layer_stack(count, name=name)(_remat(cfg, plain_layer))(x)

  x = attention.RMSNorm(cfg.norm_eps, name="final_norm")(x)  # [B, N, D]
  if cfg.tie_output:
    logits = attention.dense(x, table.T)  # [B, N, V]
  else:
    with hk.experimental.name_scope("output"):
      w = attention.param("w", [cfg.d_model, cfg.vocab_size], cfg.d_model,
                           dtype)  # [D, V]
    logits = attention.dense(x, w)  # [B, N, V]
  return logits.astype(jnp.float32)


def check_inputs(cfg: RetroConfig, tokens, neighbours) -> None:
  """Raises ValueError if tokens/neighbours do not fit the config."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape "
                     f"{tuple(tokens.shape)}")
  b, n = tokens.shape
  m = cfg.chunk_size
  if n == 0 or n % m:
    raise ValueError(f"sequence length {n} is not a positive multiple of the "
                     f"chunk size {m} (tokens shape {tuple(tokens.shape)})")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integers, got {tokens.dtype}")
  _check_ids("tokens", tokens, cfg.vocab_size)
  if neighbours is None:
    return
  want = f"[batch={b}, chunks={n // m}, k, r]"
  if neighbours.ndim != 4:
    raise ValueError(f"neighbours must be {want}, got shape "
                     f"{tuple(neighbours.shape)}")
  if neighbours.shape[:2] != (b, n // m):
    raise ValueError(f"neighbours must be {want} for tokens of shape "
                     f"{tuple(tokens.shape)}, got {tuple(neighbours.shape)}")
  if not jnp.issubdtype(neighbours.dtype, jnp.integer):
    raise ValueError(f"neighbours must be integers, got {neighbours.dtype}")
  _check_ids("neighbours", neighbours, cfg.vocab_size)


def _check_ids(name: str, ids, vocab_size: int) -> None:
  """Ids outside [0, V) would be clamped silently by the embedding lookup.
  Checked only for concrete arrays (under jit the values are unknown)."""
  if isinstance(ids, jax.core.Tracer) or ids.size == 0:
    return
  lo, hi = int(np.min(ids)), int(np.max(ids))
  if lo < 0 or hi >= vocab_size:
    raise ValueError(f"{name} hold ids in [{lo}, {hi}] but the vocabulary "
                     f"has {vocab_size} entries (valid ids 0..{vocab_size - 1})")


class Retro:
  """RETRO as a pair of pure functions (Haiku-transformed, no apply rng).

  `init(rng, tokens, neighbours)` returns params; `apply(params, tokens,
  neighbours)` returns float32 logits [B, N, V]. `neighbours=None` runs the
  decoder without retrieval (every CCA layer and the encoder skipped).
  """

  def __init__(self, config: RetroConfig):
    self.config = config
    self._fn = hk.without_apply_rng(
        hk.transform(lambda t, nb, last=True: _forward(config, t, nb, last)))

  def init(self, rng: jax.Array, tokens: jax.Array,
           neighbours: Optional[jax.Array] = None) -> hk.Params:
    check_inputs(self.config, tokens, neighbours)
    if neighbours is None and self.config.has_retrieval:
      b, n = tokens.shape
      c = self.config
      neighbours = jnp.zeros((b, n // c.chunk_size, c.num_neighbours,
                              c.neighbour_len), jnp.int32)
    return self._fn.init(rng, tokens, neighbours)

  def apply(self, params: hk.Params, tokens: jax.Array,
            neighbours: Optional[jax.Array] = None, *,
            retrieve_for_last_position: bool = True) -> jax.Array:
    """Logits [B, N, V]. With `retrieve_for_last_position=False` the last
    chunk's neighbours are not encoded and the last position (the only one
    they reach) attends to none; losses without a target there pass it."""
    check_inputs(self.config, tokens, neighbours)
    return self._fn.apply(params, tokens, neighbours,
                          retrieve_for_last_position)

  def dummy_inputs(self, batch: int = 1, length: Optional[int] = None):
    """Zero tokens and neighbours of the right shapes, e.g. for `init`."""
    c = self.config
    n = length or c.chunk_size
    tokens = jnp.zeros((batch, n), jnp.int32)
    neighbours = jnp.zeros((batch, n // c.chunk_size, c.num_neighbours,
                            c.neighbour_len), jnp.int32)
    return tokens, neighbours


EMBEDDING_PARAMS = ("embed", "enc_embed", "output")


def count_params(params_or_config, exclude_embeddings: bool = False) -> int:
  """Number of parameters of a params tree or of a config (via eval_shape).

  With `exclude_embeddings`, the token embedding tables and the output
  (unembedding) matrix are left out, as in the paper's Table 2.
  """
  if isinstance(params_or_config, RetroConfig):
    model = Retro(params_or_config)
    params = jax.eval_shape(model.init, jax.random.key(0),
                            *model.dummy_inputs())
  else:
    params = params_or_config
  total = 0
  for mod, name, leaf in hk.data_structures.traverse(params):
    if exclude_embeddings and mod.split("/")[-1] in EMBEDDING_PARAMS:
      continue
    total += int(np.prod(leaf.shape))
  return total
