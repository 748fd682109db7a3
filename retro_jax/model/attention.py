"""Attention of RETRO: its building blocks and causal self-attention (the
cross-attentions to neighbours are in cross_attention.py).

Shape glossary:
  B: batch.               N: decoder sequence length (a multiple of m).
  m: chunk size.          L: chunks per sequence, N // m.
  k: neighbours a chunk.  r: tokens a neighbour (chunk + continuation).
  H: heads.               K: head width.
  D: decoder width.       E: encoder width.
  T, S: query and key lengths of a generic attention.

Every attention is multi-head, has no biases (CCA's optional query and key
biases aside), applies rotary position
embeddings (RoPE) to queries and keys where positions mean something, and
computes its softmax in float32 whatever the compute dtype.

Masking convention: `key_valid` marks keys that exist (neighbour tokens that
are not padding). A query whose keys are all invalid gets an output of exactly
zero, so a chunk without any neighbour adds nothing through its CCA residual
and the network behaves as if that CCA layer were absent.

Two paths compute the same thing with the same parameters (the layers'
`attention` field): the reference one here, head-major with its own VJP,
and fused_attention.py's jax.nn.dot_product_attention, token-major.
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

from retro_jax.model import fused_attention

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
         num_positions: Optional[int] = None,
         seq_axis: int = -2) -> jax.Array:
  """Rotary position embedding, half-split layout.

  Args:
    x: [..., T, K] queries or keys, head-major (heads among the leading
      dims), or with `seq_axis=-3` token-major [..., T, H, K].
    positions: [T] integer positions: a numpy array (static, the usual case:
      the table rows become constants) or a traced array (decoding), which
      then needs `num_positions`, an upper bound on its values.
    base: rotary base frequency.
    num_positions: table size for traced positions.
    seq_axis: the axis of x that `positions` run along, counted from the
      end (-2 or -3): the fused path rotates token-major arrays in place
      rather than transposing them.
  """
  if seq_axis > -2:
    raise ValueError(f"rope: seq_axis must be -2 or lower, got {seq_axis}")
  half = x.shape[-1] // 2
  if isinstance(positions, np.ndarray):
    cos, sin = rope_table(int(positions.max()) + 1, x.shape[-1], base)
    cos, sin = cos[positions], sin[positions]  # [T, K/2]
  else:
    if num_positions is None:
      raise ValueError("rope: traced positions need num_positions")
    table = rope_table(num_positions, x.shape[-1], base)
    cos, sin = (jnp.take(t, positions, axis=0) for t in table)  # [T, K/2]
  # [T, K/2], or [T, 1, ..., K/2] aligned with x's axes after T.
  shape = (cos.shape[0],) + (1,) * (-seq_axis - 2) + (half,)
  cos = jnp.asarray(cos.reshape(shape), x.dtype)
  sin = jnp.asarray(sin.reshape(shape), x.dtype)
  x1, x2 = x[..., :half], x[..., half:]  # [..., T, (H,) K/2]
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


def dense_init(fan_in: int) -> hk.initializers.Initializer:
  return hk.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(fan_in))


def param(name: str, shape, fan_in: int, dtype,
          zero_init: bool = False) -> jax.Array:
  """A float32 weight (truncated normal, std 1/sqrt(fan_in), or zeros) cast
  to the compute dtype: parameters stay float32 under mixed precision."""
  init = jnp.zeros if zero_init else dense_init(fan_in)
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
  # "reference" (attend / causal_attend) or a fused_attention implementation
  # ("xla", "cudnn"), already resolved; `decode` always runs the reference.
  attention: str = "reference"
  name: Optional[str] = None

  def __call__(self, x: jax.Array,
               key_valid: Optional[jax.Array] = None) -> jax.Array:
    """x: [B, T, D]; key_valid: optional bool [B, T]. Returns [B, T, D]."""
    d, h, kd = x.shape[-1], self.num_heads, self.head_dim
    w_qkv = param("w_qkv", [d, 3, h, kd], d, x.dtype)  # [D, 3, H, K]
    w_o = param("w_o", [h, kd, d], h * kd, x.dtype)  # [H, K, D]
    if self.attention != "reference":
      return self._fused(x, w_qkv, w_o, key_valid)
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

  def _fused(self, x, w_qkv, w_o, key_valid):
    """__call__ through fused_attention, token-major throughout: no
    transposes to or from the head-major layout."""
    qkv = dense(x, w_qkv)  # [B, T, 3, H, K]
    pos = np.arange(x.shape[1])
    q = rope(qkv[:, :, 0], pos, self.rope_base, seq_axis=-3) * (
        self.head_dim ** -0.5)  # [B, T, H, K]
    k = rope(qkv[:, :, 1], pos, self.rope_base, seq_axis=-3)  # [B, T, H, K]
    # As on the reference path, a causal layer takes no key mask.
    out = fused_attention.attend(
        q, k, qkv[:, :, 2], self.attention, causal=self.causal,
        key_valid=None if self.causal else key_valid)  # [B, T, H, K]
    return dense(out, w_o, 2)  # [B, T, D]

  def decode(self, x: jax.Array, pos: jax.Array, k_cache: jax.Array,
             v_cache: jax.Array):
    """One causal step against a key/value cache (same parameters), on the
    reference path whatever `attention` says: a single query row gains
    nothing from a fused kernel.

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
