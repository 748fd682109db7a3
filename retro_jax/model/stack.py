"""The decoder stack of RETRO, wired once for every way of running it.

Shape glossary:
  B: batch.            T: positions computed in one call (N for a whole
                          sequence, 1 for a cached decoding step).
  m: chunk size.       L: chunks whose neighbours are encoded in this call.
  k: neighbours.       r: tokens per neighbour (chunk + continuation).
  D: decoder width.    E: encoder width.          V: vocabulary.

Data flow (paper §2, App. B), pre-norm RMSNorm everywhere:

  tokens [B, T] ─ embed ─► decoder layer 1 … n_layers ─ norm ─ logits [B, T, V]
  each layer: x += SelfAttn(norm x); [CCA layer: x += CCA(norm x, enc)];
              x += MLP(norm x)
  at the first CCA layer the encoder runs once on the neighbours [B, L, k, r],
  conditioned on that layer's activations of each chunk.

`decoder_logits` is that wiring: the order of the sub-layers, the Haiku
module names (hence the parameter names of checkpoints) and the grouping of
layers into scanned runs. How attention reaches other positions is left to
a `Mode`: `network.WholeSequence` attends over all N tokens at once
(training, scoring), `decoding.CachedStep` feeds one token against per-layer
key/value caches. Both therefore run the same parameters the same way.
"""

from __future__ import annotations

import functools
from typing import Any, List, Optional, Protocol, Sequence, Tuple

import haiku as hk
import jax
import jax.numpy as jnp

from retro_jax.config import PAD_ID, RetroConfig, dtype_of
from retro_jax.core import sharding
from retro_jax.model import attention
from retro_jax.model import cross_attention
from retro_jax.model import fused_attention
from retro_jax.model.layers import MLP, NeighbourEncoder, embed_neighbours

# What a mode keeps for one run of layers between calls (None when it keeps
# nothing): for a scanned run, every leaf has a leading axis of its depth.
Cache = Any


class Mode(Protocol):
  """How the decoder stack's attention layers reach other positions."""

  # Whether the CCA layers run; when False they are skipped (retrieval off)
  # and the encoder never runs.
  retrieves: bool
  # Neighbour ids [B, L, k, r] the encoder reads at the first CCA layer, or
  # None: nothing to encode in this call.
  neighbours: Optional[jax.Array]
  # Whether each layer is wrapped in `hk.remat` as `cfg.remat` asks (only
  # worth it where a backward pass follows).
  remat: bool

  def self_attention(self, attn: attention.SelfAttention, h: jax.Array,
                     cache: Cache) -> Tuple[jax.Array, Cache]:
    """Causal self-attention of h [B, T, D] -> ([B, T, D], cache)."""

  def chunk_context(self, x: jax.Array,
                    cache: Cache) -> Tuple[jax.Array, Cache]:
    """The first CCA layer's activations the encoder is conditioned on,
    [B, >= L*m, D], from its activations x [B, T, D]."""

  def cross_attention(self, cca: cross_attention.ChunkedCrossAttention,
                      h: jax.Array, encoded: Optional[jax.Array],
                      valid: Optional[jax.Array],
                      cache: Cache) -> Tuple[jax.Array, Cache]:
    """CCA of h [B, T, D] -> ([B, T, D], cache), given the neighbours encoded
    in this call ([B, L, k, r, E] and bool [B, L, k, r]) or None."""


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


def decoder_logits(cfg: RetroConfig, tokens: jax.Array, mode: Mode,
                   caches: Optional[Sequence[Cache]] = None
                   ) -> Tuple[jax.Array, List[Cache]]:
  """Logits [B, T, V] (float32) of tokens [B, T], and the caches.

  Args:
    cfg: the model's config.
    tokens: [B, T] token ids.
    mode: how attention reaches other positions.
    caches: one per run of `decoder_runs(cfg)`, handed to the mode's
      attention methods (None: the mode keeps nothing).
  Returns:
    (logits [B, T, V], the caches as the mode's methods returned them).
  """
  dtype = dtype_of(cfg.compute_dtype)
  embed = hk.Embed(cfg.vocab_size, cfg.d_model, name="embed",
                   w_init=hk.initializers.TruncatedNormal(1.0))
  table = embed.embeddings.astype(dtype)  # [V, D]
  x = sharding.constrain(table[tokens], ("batch", "length", "embed"))

  nb = valid = None
  if mode.retrieves and mode.neighbours is not None:
    valid = mode.neighbours != PAD_ID  # [B, L, k, r]
    nb = embed_neighbours(cfg, table, mode.neighbours)  # [B, L, k, r, E]

  # "auto" resolved now, at trace time: on the backend the program is
  # traced on (the reference path on a CPU host compiling for TPU).
  impl = fused_attention.resolve_config(cfg)

  def self_attention_block(x, cache):                           # [B, T, D]
    h = attention.RMSNorm(cfg.norm_eps, name="attn_norm")(x)
    out, cache = mode.self_attention(attention.SelfAttention(
        cfg.num_heads, cfg.head_dim, causal=True, rope_base=cfg.rope_base,
        block=cfg.attention_block, attention=impl, name="self_attention"),
        h, cache)
    return x + out, cache

  def mlp_block(x):                                             # [B, T, D]
    x = x + MLP(cfg.d_ff, name="mlp")(
        attention.RMSNorm(cfg.norm_eps, name="mlp_norm")(x))
    return sharding.constrain(x, ("batch", "length", "embed"))

  def plain_layer(x, cache):
    x, cache = self_attention_block(x, cache)
    return mlp_block(x), cache

  def cca_layer(encodes, x, cache, encoded):
    x, cache = self_attention_block(x, cache)
    if mode.retrieves:
      if encodes:
        context, cache = mode.chunk_context(x, cache)       # [B, >= L*m, D]
        if nb is not None:
          encoded = NeighbourEncoder(cfg)(nb, valid, context)  # [B,L,k,r,E]
      h = attention.RMSNorm(cfg.norm_eps, name="cca_norm")(x)
      out, cache = mode.cross_attention(cross_attention.ChunkedCrossAttention(
          cfg.num_heads, cfg.head_dim, cfg.chunk_size, cfg.rope_base,
          cfg.zero_init_cca, cfg.cca_qk_bias, cfg.cca_copy_init, impl,
          name="cca"),
          h, encoded, valid, cache)
      x = x + out                                               # [B, T, D]
    return mlp_block(x), cache, encoded

  def layer(fn):
    return _remat(cfg, fn) if mode.remat else fn

  runs = decoder_runs(cfg)
  caches = [None] * len(runs) if caches is None else list(caches)
  first_cca = min(cfg.cca_layer_indices, default=None)
  encoded = None
  with hk.experimental.name_scope("decoder"):
    for i, (first, count, has_cca) in enumerate(runs):
      if has_cca:
        with hk.experimental.name_scope(f"layer_{first:02d}"):
          x, caches[i], encoded = layer(functools.partial(
              cca_layer, first == first_cca))(x, caches[i], encoded)
      elif count == 1:
        with hk.experimental.name_scope(f"layer_{first:02d}"):
          x, caches[i] = layer(plain_layer)(x, caches[i])
      else:
        name = f"layers_{first:02d}_{first + count - 1:02d}"
        x, caches[i] = hk.layer_stack(
            count, with_per_layer_inputs=True, name=name)(layer(plain_layer))(
                x, caches[i])

  x = attention.RMSNorm(cfg.norm_eps, name="final_norm")(x)  # [B, T, D]
  if cfg.tie_output:
    # The table's rows have unit-variance entries, so the logits are scaled
    # by 1/sqrt(D) to the size an untied output (std 1/sqrt(D)) gives.
    logits = attention.dense(x, table.T) * cfg.d_model ** -0.5  # [B, T, V]
  else:
    with hk.experimental.name_scope("output"):
      if cfg.cca_copy_init and cfg.has_retrieval:
        # The output starts as the embedding's transpose (at the untied
        # output's scale, std 1/sqrt(D)), so that the identity value path
        # of copy-initialised CCA (cross_attention.ChunkedCrossAttention) raises
        # the logit of the neighbour token it reads; the two then train
        # apart like any untied output.
        first = embed.embeddings.T * cfg.d_model ** -0.5  # [D, V]
        w = hk.get_parameter("w", [cfg.d_model, cfg.vocab_size],
                             init=lambda shape, dt: first.astype(dt))
        w = w.astype(dtype)
      else:
        w = attention.param("w", [cfg.d_model, cfg.vocab_size], cfg.d_model,
                            dtype)  # [D, V]
    logits = attention.dense(x, w)  # [B, T, V]
  return logits.astype(jnp.float32), caches
