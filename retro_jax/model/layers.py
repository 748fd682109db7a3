"""Building blocks of the RETRO network above the attention layers: the
feed-forward block and the neighbour encoder with its input embedding.

Shape glossary:
  B: batch.            N: decoder sequence length, a multiple of m.
  m: chunk size.       L: chunks whose neighbours are encoded.
  k: neighbours.       r: tokens per neighbour (chunk + continuation).
  D: decoder width.    E: encoder width.      F: feed-forward width.
  V: vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp

from retro_jax.config import RetroConfig
from retro_jax.core import sharding
from retro_jax.model import attention
from retro_jax.model import cross_attention
from retro_jax.model import fused_attention

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
    # Resolved here, at trace time, as stack.decoder_logits does for the
    # decoder: one choice for the whole network.
    self.attention = fused_attention.resolve_config(cfg)

  def __call__(self, x: jax.Array, valid: jax.Array,
               context: jax.Array) -> jax.Array:
    """Encodes neighbours.

    Args:
      x: [B, L, k, r, E] embedded neighbour tokens.
      valid: bool [B, L, k, r], False at padding.
      context: [B, >= L*m, D] decoder activations at the first CCA layer
        (only the first L chunks are read).
    Returns:
      [B, L, k, r, E] encoded neighbours.
    """
    c = self.cfg
    b, l, nk, r, e = x.shape
    ctx = context[:, :l * c.chunk_size].reshape(
        b, l, c.chunk_size, context.shape[-1])  # [B, L, m, D]
    # Rows split over the batch axes, as the decoder's are. Unconstrained,
    # XLA's sharding propagation follows the embedding table (E split over
    # `fsdp`) and gathers every row of the global batch onto each chip: an
    # MLP activation of the whole batch per chip (the 172M model with
    # fsdp=16: 868 MiB per encoder layer where 54 MiB would do; found by
    # compiling for TPU ahead of time, retro_jax/training/aot.py).
    rows = ("batch", "length", "embed")
    x = sharding.constrain(x.reshape(b * l * nk, r, e), rows)  # [BLk, r, E]
    flat_valid = valid.reshape(b * l * nk, r)  # [BLk, r]
    for i in range(c.enc_num_layers):
      with hk.experimental.name_scope(f"layer_{i:02d}"):
        x = x + attention.SelfAttention(
            c.enc_num_heads, c.enc_head_dim, causal=False,
            rope_base=c.rope_base, attention=self.attention,
            name="self_attention")(
                attention.RMSNorm(c.norm_eps, name="attn_norm")(x),
                key_valid=flat_valid)  # [BLk, r, E]
        if i + 1 in c.enc_cross_attention_layers:
          q = attention.RMSNorm(c.norm_eps, name="cross_norm")(x)
          kv = attention.RMSNorm(c.norm_eps, name="context_norm")(ctx)
          y = cross_attention.NeighbourCrossAttention(
              c.enc_num_heads, c.enc_head_dim, attention=self.attention,
              name="cross_attention")(
                  q.reshape(b, l, nk * r, e), kv)  # [B, L, kr, E]
          x = x + y.reshape(b * l * nk, r, e)
        x = x + MLP(c.enc_d_ff, name="mlp")(
            attention.RMSNorm(c.norm_eps, name="mlp_norm")(x))  # [BLk, r, E]
        x = sharding.constrain(x, rows)
    x = attention.RMSNorm(c.norm_eps, name="final_norm")(x)
    return x.reshape(b, l, nk, r, e)  # [B, L, k, r, E]


def embed_neighbours(cfg: RetroConfig, table: jax.Array,
                     neighbours: jax.Array) -> jax.Array:
  """Encoder input [..., r, E] of neighbour ids [..., r]: the decoder's
  embedding table [V, D] (projected to E if the widths differ) or the
  encoder's own table. Call at the top level of the transformed function:
  the parameter names (`enc_embed`, `enc_embed_proj`) carry no scope."""
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
