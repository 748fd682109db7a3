"""Attention layers of RETRO: causal self-attention and chunked cross-attention.

Shape glossary:
  B: batch.               N: decoder sequence length (a multiple of m).
  m: chunk size.          L: chunks per sequence, N // m.
  k: neighbours a chunk.  r: tokens a neighbour (chunk + continuation).
  H: heads.               K: head width.
  D: decoder width.       E: encoder width.
  T, S: query and key lengths of a generic attention.

Every attention here is multi-head, has no biases, applies rotary position
embeddings (RoPE) to queries and keys where positions mean something, and
computes its softmax in float32 whatever the compute dtype.

Masking convention: `key_valid` marks keys that exist (neighbour tokens that
are not padding). A query whose keys are all invalid gets an output of exactly
zero, so a chunk without any neighbour adds nothing through its CCA residual
and the network behaves as if that CCA layer were absent.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -1e30  # Finite: a fully masked row must not produce NaN.


# -- building blocks ----------------------------------------------------------
@functools.lru_cache(maxsize=64)
def rope_table(num_positions: int, dim: int,
               base: float) -> Tuple[np.ndarray, np.ndarray]:
  """cos and sin [P, K/2] (float32) of the rotary angles of positions
  0..P-1, computed once on the host in float64.

  Built with numpy so that under jit they are constants: an angle computed in
  the graph would be fused into every consumer and its cos/sin re-evaluated
  per element, which XLA:CPU does with scalar code (~9 ns a value).
  """
  half = dim // 2
  freq = base ** (-np.arange(half, dtype=np.float64) / half)  # [K/2]
  angle = np.arange(num_positions, dtype=np.float64)[:, None] * freq  # [P, K/2]
  tables = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
  for t in tables:
    t.flags.writeable = False  # Cached and shared: no caller may edit them.
  return tables


def rope(x: jax.Array, positions, base: float,
         num_positions: Optional[int] = None) -> jax.Array:
  """Rotary position embedding, half-split layout.

  Args:
    x: [..., T, K] queries or keys, head-major (heads among the leading dims).
    positions: [T] integer positions: a numpy array (static, the usual case:
      the table rows become constants) or a traced array (decoding), which
      then needs `num_positions`, an upper bound on its values.
    base: rotary base frequency.
    num_positions: table size for traced positions.
  """
  half = x.shape[-1] // 2
  if isinstance(positions, np.ndarray):
    cos, sin = rope_table(int(positions.max()) + 1, x.shape[-1], base)
    cos, sin = cos[positions], sin[positions]  # [T, K/2]
  else:
    if num_positions is None:
      raise ValueError("rope: traced positions need num_positions")
    table = rope_table(num_positions, x.shape[-1], base)
    cos, sin = (jnp.take(t, positions, axis=0) for t in table)  # [T, K/2]
  cos = jnp.asarray(cos, x.dtype)  # [T, K/2]
  sin = jnp.asarray(sin, x.dtype)  # [T, K/2]
  x1, x2 = x[..., :half], x[..., half:]  # [..., T, K/2]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@jax.custom_vjp
def _softmax_attend(q: jax.Array, k: jax.Array, v: jax.Array,
                    bias: jax.Array) -> jax.Array:
  """softmax(q k^T + bias) v over the last two dims ([..., T, K] queries,
  [..., S, K] keys/values, bias broadcastable to [..., T, S])."""
  return _softmax_attend_fwd(q, k, v, bias)[0]


def _softmax_attend_fwd(q, k, v, bias):
  logits = jnp.einsum("...tk,...sk->...ts", q, k,
                      preferred_element_type=jnp.float32) + bias  # [.., T, S]
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [..., T, S]
  out = jnp.einsum("...ts,...sk->...tk", weights, v)  # [..., T, K]
  return out, (q, k, v, bias, weights, out)


def _softmax_attend_bwd(res, g):
  """The textbook softmax-attention gradient: it keeps only the weights,
  where autodiff of softmax keeps exp(.) and a [..., T, S] broadcast of the
  reciprocal row sums and reads both back."""
  q, k, v, bias, weights, out = res
  g = g.astype(v.dtype)  # [..., T, K]
  d_weights = jnp.einsum("...tk,...sk->...ts", g, v,
                         preferred_element_type=jnp.float32)  # [..., T, S]
  dv = jnp.einsum("...ts,...tk->...sk", weights, g)  # [..., S, K]
  # sum_s w_ts dw_ts = sum_k g_tk out_tk: a [T, K] product, not a [T, S] one.
  row = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                keepdims=True)  # [..., T, 1]
  d_logits = (weights * (d_weights - row)).astype(q.dtype)  # [..., T, S]
  dq = jnp.einsum("...ts,...sk->...tk", d_logits, k)  # [..., T, K]
  dk = jnp.einsum("...ts,...tk->...sk", d_logits, q)  # [..., S, K]
  return dq, dk, dv, jnp.zeros_like(bias)


_softmax_attend.defvjp(_softmax_attend_fwd, _softmax_attend_bwd)


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           bias: Optional[jax.Array] = None,
           key_valid: Optional[jax.Array] = None) -> jax.Array:
  """Softmax attention, head-major: batch and head dimensions lead.

  Args:
    q: [..., H, T, K] queries (already scaled by 1/sqrt(K)).
    k, v: [..., H, S, K] keys and values.
    bias: optional additive bias broadcastable to [..., H, T, S]; it is
      treated as a constant (no gradient flows into it).
    key_valid: optional bool [..., S]; queries with no valid key output 0.

  Returns:
    [..., H, T, K] attention output in q's dtype.
  """
  total = jnp.zeros((), jnp.float32) if bias is None else bias
  if key_valid is not None:
    # Adding -1e30 to a logit gives exactly -1e30 in float32, as a select
    # would, and a fully masked row stays finite (its output is zeroed below).
    total = total + jnp.where(key_valid, 0.0, _NEG_INF)[..., None, None, :]
  out = _softmax_attend(q, k, v,
                        jax.lax.stop_gradient(total.astype(jnp.float32)))
  if key_valid is not None:
    any_valid = jnp.any(key_valid, axis=-1)  # [...]
    out = out * any_valid[..., None, None, None].astype(out.dtype)
  return out


def causal_attend(q: jax.Array, k: jax.Array, v: jax.Array,
                  block: int) -> jax.Array:
  """Causal attention that skips key blocks lying wholly in the future.

  Query block i (of `block` rows) attends to keys [0, (i + 1) * block) only,
  so about half of the score and value FLOPs of a full T x T product are
  never computed. Falls back to one block when T is not a multiple of it.

  Args:
    q, k, v: [B, H, T, K].
  Returns:
    [B, H, T, K].
  """
  t = q.shape[-2]
  if t % block or t <= block:
    block = t
  diag = jnp.tril(jnp.ones((block, block), dtype=bool))  # [b, b]
  outs = []
  for i in range(t // block):
    lo, hi = i * block, (i + 1) * block
    mask = jnp.concatenate(
        [jnp.ones((block, lo), dtype=bool), diag], axis=1)  # [b, hi]
    bias = jnp.where(mask, 0.0, _NEG_INF).astype(jnp.float32)
    outs.append(attend(q[..., lo:hi, :], k[..., :hi, :], v[..., :hi, :],
                       bias=bias))  # [B, H, b, K]
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-2)


def heads_first(x: jax.Array, groups: int = 0) -> jax.Array:
  """[..., T, (G,) H, K] -> [(G,) ..., H, T, K]: one copy into the layout the
  attention products read contiguously."""
  n = x.ndim
  if groups:                                   # x: [..., T, G, H, K]
    lead = tuple(range(n - 4))
    return jnp.transpose(x, (n - 3,) + lead + (n - 2, n - 4, n - 1))
  lead = tuple(range(n - 3))                   # x: [..., T, H, K]
  return jnp.transpose(x, lead + (n - 2, n - 3, n - 1))


def heads_last(x: jax.Array) -> jax.Array:
  """[..., H, T, K] -> [..., T, H, K]."""
  n = x.ndim
  return jnp.transpose(x, tuple(range(n - 3)) + (n - 2, n - 3, n - 1))


class RMSNorm(hk.Module):
  """Root-mean-square layer norm with a learned scale, computed in float32."""

  def __init__(self, eps: float, name: Optional[str] = None):
    super().__init__(name=name)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = hk.get_parameter("scale", [x.shape[-1]], init=jnp.ones)  # [D]
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def _dense_init(fan_in: int) -> hk.initializers.Initializer:
  return hk.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(fan_in))


def param(name: str, shape, fan_in: int, dtype,
          zero_init: bool = False) -> jax.Array:
  """A float32 weight (truncated normal, std 1/sqrt(fan_in), or zeros) cast
  to the compute dtype: parameters stay float32 under mixed precision."""
  init = jnp.zeros if zero_init else _dense_init(fan_in)
  w = hk.get_parameter(name, shape, init=init)
  return w.astype(dtype)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [M, K] @ w [K, N] with a backward pass laid out for CPU matmul kernels.

  The weight gradient x^T @ g contracts the leading dimension of both
  operands, a form XLA:CPU runs at about half its matmul peak. The backward
  pass instead transposes the smaller of x and g into a contiguous copy
  (behind an optimization barrier, so XLA cannot fold it back into the dot)
  and runs a plain row-major product; when g is the one transposed, the
  [N, K] result is transposed back. Numerically the same product.
  """
  return x @ w


def _matmul_fwd(x, w):
  return x @ w, (x, w)


def _matmul_bwd(res, g):
  x, w = res                                                   # [M, K], [K, N]
  dx = g @ w.T                                                 # [M, K]
  barrier = jax.lax.optimization_barrier
  if x.shape[1] <= g.shape[1]:
    dw = barrier(x.T) @ g                                      # [K, N]
  else:
    dw = barrier(barrier(g.T) @ x).T                           # [K, N]
  return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x: jax.Array, w: jax.Array, in_dims: int = 1) -> jax.Array:
  """x [..., *w.shape[:in_dims]] @ w -> [..., *w.shape[in_dims:]].

  Computed as one 2-D matmul over the flattened leading dimensions: with a
  single contracting dimension the backward pass needs no transposed copies
  of the large activations (on CPU, XLA otherwise materialises them).
  """
  lead = x.shape[:x.ndim - in_dims]
  k = math.prod(w.shape[:in_dims])
  y = matmul(x.reshape(-1, k), w.reshape(k, -1))
  return y.reshape(*lead, *w.shape[in_dims:])


# -- layers -------------------------------------------------------------------
@dataclasses.dataclass
class SelfAttention(hk.Module):
  """Multi-head self-attention with RoPE, causal or bidirectional."""

  num_heads: int
  head_dim: int
  causal: bool
  rope_base: float
  block: int = 128
  name: Optional[str] = None

  def __call__(self, x: jax.Array,
               key_valid: Optional[jax.Array] = None) -> jax.Array:
    """x: [B, T, D]; key_valid: optional bool [B, T]. Returns [B, T, D]."""
    d, h, kd = x.shape[-1], self.num_heads, self.head_dim
    w_qkv = param("w_qkv", [d, 3, h, kd], d, x.dtype)  # [D, 3, H, K]
    w_o = param("w_o", [h, kd, d], h * kd, x.dtype)  # [H, K, D]
    qkv = heads_first(dense(x, w_qkv), groups=3)  # [3, B, H, T, K]
    pos = np.arange(x.shape[1])
    q = rope(qkv[0], pos, self.rope_base) * (kd ** -0.5)  # [B, H, T, K]
    k = rope(qkv[1], pos, self.rope_base)  # [B, H, T, K]
    v = qkv[2]  # [B, H, T, K]
    if self.causal:
      out = causal_attend(q, k, v, self.block)  # [B, H, T, K]
    else:
      out = attend(q, k, v, key_valid=key_valid)  # [B, H, T, K]
    return dense(heads_last(out), w_o, 2)  # [B, T, D]

  def decode(self, x: jax.Array, pos: jax.Array, k_cache: jax.Array,
             v_cache: jax.Array):
    """One causal step against a key/value cache (same parameters).

    Args:
      x: [B, 1, D] the normalised activation of the token at `pos`.
      pos: int32 scalar, its position.
      k_cache, v_cache: [B, H, T, K] keys (RoPE applied) and values of
        positions 0..pos-1; T is the cache's capacity.
    Returns:
      ([B, 1, D] output, k_cache, v_cache with position `pos` written).
    """
    d, h, kd = x.shape[-1], self.num_heads, self.head_dim
    w_qkv = param("w_qkv", [d, 3, h, kd], d, x.dtype)  # [D, 3, H, K]
    w_o = param("w_o", [h, kd, d], h * kd, x.dtype)  # [H, K, D]
    qkv = heads_first(dense(x, w_qkv), groups=3)  # [3, B, H, 1, K]
    at = jnp.reshape(pos, (1,))
    cap = k_cache.shape[2]
    q = rope(qkv[0], at, self.rope_base, cap) * (kd ** -0.5)  # [B, H, 1, K]
    k = rope(qkv[1], at, self.rope_base, cap)  # [B, H, 1, K]
    start = (0, 0, pos, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype),
                                           start)  # [B, H, T, K]
    v_cache = jax.lax.dynamic_update_slice(
        v_cache, qkv[2].astype(v_cache.dtype), start)  # [B, H, T, K]
    seen = jnp.arange(k_cache.shape[2]) <= pos  # [T]
    out = attend(q, k_cache.astype(x.dtype), v_cache.astype(x.dtype),
                 key_valid=seen)  # [B, H, 1, K]
    return dense(heads_last(out), w_o, 2), k_cache, v_cache  # [B, 1, D]


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
      w = _dense_init(e)(shape, dt)  # [E, 2, H, K]
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
    q = heads_first(dense(shifted, w_q)) + b_q  # [B, L, H, m, K]
    q = rope(q, np.arange(m), self.rope_base) * (kd ** -0.5)
    mem = encoded.reshape(b, l, nk * r, e)  # [B, L, kr, E]
    kv = heads_first(dense(mem, w_kv), groups=2)  # [2, B, L, H, kr, K]
    key_pos = np.tile(np.arange(r), nk)  # [kr]
    keys = rope(kv[0] + b_k, key_pos, self.rope_base)  # [B, L, H, kr, K]
    valid = neighbour_valid.reshape(b, l, nk * r)  # [B, L, kr]
    out = attend(q, keys, kv[1], key_valid=valid)  # [B, L, H, m, K]
    out = dense(heads_last(out), w_o, 2)  # [B, L, m, D]
    out = out.reshape(b, span, d)[:, :n - m + 1]  # [B, <= N-m+1, D]
    return jnp.pad(out, ((0, 0), (m - 1, n - m + 1 - out.shape[1]),
                         (0, 0)))  # [B, N, D]

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
    """CCA of the single token at `pos` (same parameters as `__call__`).

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
  name: Optional[str] = None

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x: [B, L, k*r, E] neighbour tokens; context: [B, L, m, D] chunk
    activations. Returns [B, L, k*r, E]."""
    e, d = x.shape[-1], context.shape[-1]
    h, kd = self.num_heads, self.head_dim
    w_q = param("w_q", [e, h, kd], e, x.dtype)  # [E, H, K]
    w_kv = param("w_kv", [d, 2, h, kd], d, x.dtype)  # [D, 2, H, K]
    w_o = param("w_o", [h, kd, e], h * kd, x.dtype)  # [H, K, E]
    q = heads_first(dense(x, w_q)) * (kd ** -0.5)  # [B, L, H, kr, K]
    kv = heads_first(dense(context, w_kv), groups=2)  # [2, B, L, H, m, K]
    out = attend(q, kv[0], kv[1])  # [B, L, H, kr, K]
    return dense(heads_last(out), w_o, 2)  # [B, L, kr, E]
