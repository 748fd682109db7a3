"""RETRO's cross-attentions to retrieved neighbours: chunked cross-attention
(CCA, decoder -> encoded neighbours) and the encoder's cross-attention to
its chunk's decoder activations. Building blocks and the shape glossary are
those of attention.py.

Shape glossary:
  B: batch.               N: decoder sequence length (a multiple of m).
  m: chunk size.          L: chunks per sequence, N // m.
  k: neighbours a chunk.  r: tokens a neighbour (chunk + continuation).
  H: heads.               K: head width.
  D: decoder width.       E: encoder width.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.model import fused_attention
from retro_jax.model.attention import attend
from retro_jax.model.attention import dense
from retro_jax.model.attention import dense_init
from retro_jax.model.attention import heads_first
from retro_jax.model.attention import heads_last
from retro_jax.model.attention import param
from retro_jax.model.attention import rope


@dataclasses.dataclass
class ChunkedCrossAttention(hk.Module):
  """CCA (paper §2.4): chunk u's neighbours inform tokens from u*m + m - 1 on.

  The decoder sequence is shifted left by m - 1 and cut into L chunks; shifted
  chunk u (positions u*m + m - 1 ... u*m + 2m - 2) attends to all k*r encoded
  neighbour tokens of chunk u. The output is shifted back, so the first m - 1
  positions receive nothing and causality holds: the neighbours of chunk u
  were retrieved with tokens that position u*m + m - 1 has already seen.

  Relative positions (RoPE): a query's position is its offset in the shifted
  chunk (0..m-1), a key's its offset in its own neighbour (0..r-1), so every
  neighbour is seen from the same relative frame.

  With `qk_bias`, queries and keys each add a learned per-head vector b_q,
  b_k before RoPE. The score of query offset i and key offset j then holds,
  besides content x content, the terms of Transformer-XL's relative
  attention that the paper's CCA has (Dai et al. 2019, terms b-d): content
  x position (x_i . b_k and b_q . k_j, each rotated by j - i) and position
  only (b_q . b_k rotated by j - i, a learned function of j - i alone). The
  last lets a head attend "m tokens ahead of me in the neighbour" whatever
  the text, which is how a chunk reads the continuation of a neighbour that
  matches it.
  """

  num_heads: int
  head_dim: int
  chunk_size: int
  rope_base: float
  zero_init_out: bool = False
  qk_bias: bool = False
  copy_init: bool = False
  # "reference" or a resolved fused_attention implementation ("xla",
  # "cudnn") for __call__; `decode` always runs the reference path.
  attention: str = "reference"
  name: Optional[str] = None

  def _kv_out(self, e: int, d: int, dtype):
    """w_kv [E, 2, H, K] and w_o [H, K, D]. With `copy_init`, the value
    half of w_kv and w_o start as identities (E = H*K = D), so that an
    attended neighbour token adds its own (normalised) embedding to the
    residual stream: with a tied output, that raises its own logit, and
    attention learns where to look from the first step."""
    h, kd = self.num_heads, self.head_dim
    if not self.copy_init:
      return (param("w_kv", [e, 2, h, kd], e, dtype),
              param("w_o", [h, kd, d], h * kd, dtype, self.zero_init_out))
    if not e == h * kd == d:
      raise ValueError(f"copy_init needs enc_d_model = heads x head_dim = "
                       f"d_model, got {e}, {h}x{kd}, {d}")

    def kv_init(shape, dt):
      w = dense_init(e)(shape, dt)  # [E, 2, H, K]
      return w.at[:, 1].set(jnp.eye(e, dtype=dt).reshape(e, h, kd))

    def out_init(shape, dt):
      return jnp.eye(d, dtype=dt).reshape(h, kd, d)

    w_kv = hk.get_parameter("w_kv", [e, 2, h, kd], init=kv_init)
    w_o = hk.get_parameter("w_o", [h, kd, d], init=out_init)
    return w_kv.astype(dtype), w_o.astype(dtype)

  def _biases(self, dtype):
    """(b_q, b_k) [H, 1, K], or zeros without `qk_bias`."""
    if not self.qk_bias:
      return 0.0, 0.0
    shape = [self.num_heads, 1, self.head_dim]
    # Unit scale, as the projected queries and keys of a unit-RMS input.
    return (param("b_q", shape, 1, dtype), param("b_k", shape, 1, dtype))

  def __call__(self, x: jax.Array, encoded: jax.Array,
               neighbour_valid: jax.Array) -> jax.Array:
    """Chunked cross-attention.

    Args:
      x: [B, N, D] normalised decoder activations.
      encoded: [B, L, k, r, E] encoded neighbours of the first L <= N / m
        chunks; the positions later chunks' neighbours would reach get 0.
      neighbour_valid: bool [B, L, k, r], False at padding tokens.
    Returns:
      [B, N, D] to add to the residual stream.
    """
    b, n, d = x.shape
    m, h, kd = self.chunk_size, self.num_heads, self.head_dim
    _, l, nk, r, e = encoded.shape
    span = l * m  # Shifted positions that attend: m - 1 ... m - 2 + L * m.
    w_q = param("w_q", [d, h, kd], d, x.dtype)  # [D, H, K]
    w_kv, w_o = self._kv_out(e, d, x.dtype)  # [E, 2, H, K], [H, K, D]

    shifted = x[:, m - 1:m - 1 + span]  # [B, <= Lm, D]
    shifted = jnp.pad(shifted, ((0, 0), (0, span - shifted.shape[1]), (0, 0)))
    shifted = shifted.reshape(b, l, m, d)  # [B, L, m, D]
    b_q, b_k = self._biases(x.dtype)  # [H, 1, K]
    mem = encoded.reshape(b, l, nk * r, e)  # [B, L, kr, E]
    key_pos = np.tile(np.arange(r), nk)  # [kr]
    valid = neighbour_valid.reshape(b, l, nk * r)  # [B, L, kr]
    if self.attention != "reference":
      out = self._fused(shifted, mem, key_pos, valid, w_q, w_kv, w_o, b_q,
                        b_k)  # [B, L, m, D]
    else:
      q = heads_first(dense(shifted, w_q)) + b_q  # [B, L, H, m, K]
      q = rope(q, np.arange(m), self.rope_base) * (kd ** -0.5)
      kv = heads_first(dense(mem, w_kv), groups=2)  # [2, B, L, H, kr, K]
      keys = rope(kv[0] + b_k, key_pos, self.rope_base)  # [B, L, H, kr, K]
      out = attend(q, keys, kv[1], key_valid=valid)  # [B, L, H, m, K]
      out = dense(heads_last(out), w_o, 2)  # [B, L, m, D]
    out = out.reshape(b, span, d)[:, :n - m + 1]  # [B, <= N-m+1, D]
    return jnp.pad(out, ((0, 0), (m - 1, n - m + 1 - out.shape[1]),
                         (0, 0)))  # [B, N, D]

  def _fused(self, shifted, mem, key_pos, valid, w_q, w_kv, w_o, b_q, b_k):
    """The attention of __call__ through fused_attention, token-major: the
    same parameters (the [H, 1, K] biases read as [H, K]), no transposes to
    or from the head-major layout.

    shifted: [B, L, m, D]; mem: [B, L, kr, E]; key_pos: [kr] numpy;
    valid: bool [B, L, kr]. Returns [B, L, m, D].
    """
    m, h, kd = self.chunk_size, self.num_heads, self.head_dim
    if self.qk_bias:
      b_q, b_k = b_q.reshape(h, kd), b_k.reshape(h, kd)  # [H, K]
    q = dense(shifted, w_q) + b_q  # [B, L, m, H, K]
    q = rope(q, np.arange(m), self.rope_base,
             seq_axis=-3) * (kd ** -0.5)  # [B, L, m, H, K]
    kv = dense(mem, w_kv)  # [B, L, kr, 2, H, K]
    keys = rope(kv[..., 0, :, :] + b_k, key_pos, self.rope_base,
                seq_axis=-3)  # [B, L, kr, H, K]
    out = fused_attention.attend(q, keys, kv[..., 1, :, :], self.attention,
                                 key_valid=valid)  # [B, L, m, H, K]
    return dense(out, w_o, 2)  # [B, L, m, D]

  def decode_memory(self, encoded: jax.Array, neighbour_valid: jax.Array):
    """Keys and values of one chunk's encoded neighbours, for `decode`.

    Args:
      encoded: [B, k, r, E] the encoded neighbours of the latest chunk.
      neighbour_valid: bool [B, k, r].
    Returns:
      (keys [B, H, kr, K] with RoPE, values [B, H, kr, K], valid [B, kr]).
    """
    b, nk, r, e = encoded.shape
    h, kd = self.num_heads, self.head_dim
    w_kv = param("w_kv", [e, 2, h, kd], e, encoded.dtype)  # [E, 2, H, K]
    mem = encoded.reshape(b, nk * r, e)  # [B, kr, E]
    kv = heads_first(dense(mem, w_kv), groups=2)  # [2, B, H, kr, K]
    _, b_k = self._biases(encoded.dtype)  # [H, 1, K]
    keys = rope(kv[0] + b_k, np.tile(np.arange(r), nk), self.rope_base)
    return keys, kv[1], neighbour_valid.reshape(b, nk * r)

  def decode(self, x: jax.Array, pos: jax.Array, keys: jax.Array,
             values: jax.Array, valid: jax.Array) -> jax.Array:
    """CCA of the single token at `pos` (same parameters as `__call__`), on
    the reference path whatever `attention` says (one query row; the caches
    are head-major).

    Position p attends to the neighbours of chunk (p - m + 1) // m, at query
    offset (p + 1) % m; `keys`/`values` must be that chunk's `decode_memory`
    (all-invalid before the first chunk completes: the output is then 0).

    Args:
      x: [B, 1, D] normalised decoder activation.
      pos: int32 scalar.
      keys, values: [B, H, kr, K]; valid: bool [B, kr].
    Returns:
      [B, 1, D] to add to the residual stream.
    """
    d, m = x.shape[-1], self.chunk_size
    h, kd = self.num_heads, self.head_dim
    w_q = param("w_q", [d, h, kd], d, x.dtype)  # [D, H, K]
    w_o = param("w_o", [h, kd, d], h * kd, x.dtype)  # [H, K, D]
    b_q, _ = self._biases(x.dtype)  # [H, 1, K]
    q = heads_first(dense(x, w_q)) + b_q  # [B, H, 1, K]
    offset = jnp.reshape((pos + 1) % m, (1,))
    q = rope(q, offset, self.rope_base, m) * (kd ** -0.5)  # [B, H, 1, K]
    valid = valid & (pos >= m - 1)  # [B, kr]
    out = attend(q, keys, values, key_valid=valid)  # [B, H, 1, K]
    return dense(heads_last(out), w_o, 2)  # [B, 1, D]


@dataclasses.dataclass
class NeighbourCrossAttention(hk.Module):
  """Encoder layer attending from neighbour tokens to their chunk's decoder
  activations (the conditioning of paper §2.4). No positions: a neighbour is
  not aligned with the chunk it was retrieved for."""

  num_heads: int
  head_dim: int
  # "reference" or a resolved fused_attention implementation.
  attention: str = "reference"
  name: Optional[str] = None

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x: [B, L, k*r, E] neighbour tokens; context: [B, L, m, D] chunk
    activations. Returns [B, L, k*r, E]."""
    e, d = x.shape[-1], context.shape[-1]
    h, kd = self.num_heads, self.head_dim
    w_q = param("w_q", [e, h, kd], e, x.dtype)  # [E, H, K]
    w_kv = param("w_kv", [d, 2, h, kd], d, x.dtype)  # [D, 2, H, K]
    w_o = param("w_o", [h, kd, e], h * kd, x.dtype)  # [H, K, E]
    if self.attention != "reference":  # Token-major, no transposes.
      q = dense(x, w_q) * (kd ** -0.5)  # [B, L, kr, H, K]
      kv = dense(context, w_kv)  # [B, L, m, 2, H, K]
      out = fused_attention.attend(q, kv[..., 0, :, :], kv[..., 1, :, :],
                                   self.attention)  # [B, L, kr, H, K]
      return dense(out, w_o, 2)  # [B, L, kr, E]
    q = heads_first(dense(x, w_q)) * (kd ** -0.5)  # [B, L, H, kr, K]
    kv = heads_first(dense(context, w_kv), groups=2)  # [2, B, L, H, m, K]
    out = attend(q, kv[0], kv[1])  # [B, L, H, kr, K]
    return dense(heads_last(out), w_o, 2)  # [B, L, kr, E]
