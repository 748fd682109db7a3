"""Incremental (KV-cached) decoding of RETRO, one token per step.

Shape glossary:
  B: batch.           T: cache capacity (maximum sequence length).
  m: chunk size.      k: neighbours.      r: tokens per neighbour.
  H: heads.           K: head width.      D: decoder width.   E: encoder width.
  V: vocabulary.      c: layers in one scanned run.

`Decoder` runs the same parameters as `network.Retro`, one position at a
time, through the same wiring (`stack.decoder_logits`, with the `CachedStep`
mode in place of `network.WholeSequence`):

  step(params, state, tokens [B], neighbours [B, k, r] | None)
      -> (logits [B, V] of the next token, state')

The state holds the position to feed next ('pos') and one cache a run of
`stack.decoder_runs` ('layers'): per decoder layer, the self-attention
keys/values of every position fed so far ('k', 'v': [B, H, T, K], with a
leading [c] for a scanned run); per CCA layer, the keys/values of the
encoded neighbours of the latest completed chunk ('cca_k', 'cca_v':
[B, H, kr, K], 'cca_valid': [B, kr]); and in the first CCA layer's cache its
activations of the current chunk ('context': [B, m, D]), on which the
neighbour encoder is conditioned.

Retrieval timing matches the training forward (CCA shifted by m - 1): the
neighbours of chunk u are passed with the token at position u*m + m - 1, the
last of chunk u (its m tokens are then known). That step encodes them,
conditioned on the m activations of chunk u, and every position from there
until the next chunk's last token attends to them. Positions before m - 1
attend to nothing. Without neighbours ever passed, the CCA layers add zero:
the decode equals `Retro.apply(params, tokens, None)`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp

from retro_jax.config import RetroConfig, dtype_of
from retro_jax.model import stack

State = Dict[str, Any]


class CachedStep:
  """`stack.Mode` of one decoding step: the token at `pos` attends to the
  cached keys/values of the positions before it, and CCA to the cached
  keys/values of the latest completed chunk's neighbours."""

  remat = False  # Nothing differentiates a decoding step.

  def __init__(self, cfg: RetroConfig, pos: jax.Array,
               neighbours: Optional[jax.Array]):
    """pos: int32 scalar; neighbours: [B, k, r] of the chunk `pos` ends."""
    self.pos = pos
    self.chunk_size = cfg.chunk_size
    self.dtype = dtype_of(cfg.compute_dtype)
    # CCA layers always run: before any neighbours their memory is all
    # invalid and they add exactly zero, as in the full forward.
    self.retrieves = cfg.has_retrieval
    self.neighbours = (None if neighbours is None
                       else neighbours[:, None])  # [B, 1, k, r]: one chunk.

  def self_attention(self, attn, h, cache):
    out, k, v = attn.decode(h, self.pos, cache["k"], cache["v"])  # [B, 1, D]
    return out, {**cache, "k": k, "v": v}

  def chunk_context(self, x, cache):
    """Writes x [B, 1, D] into the current chunk's activations [B, m, D]."""
    ctx = jax.lax.dynamic_update_slice(
        cache["context"], x.astype(cache["context"].dtype),
        (0, self.pos % self.chunk_size, 0))  # [B, m, D]
    return ctx.astype(self.dtype), {**cache, "context": ctx}

  def cross_attention(self, cca, h, encoded, valid, cache):
    if encoded is not None:  # This step completes a chunk: new memory.
      keys, values, kv_valid = cca.decode_memory(
          encoded[:, 0], valid[:, 0])  # [B, H, kr, K] twice, [B, kr]
      cache = {**cache, "cca_k": keys.astype(cache["cca_k"].dtype),
               "cca_v": values.astype(cache["cca_v"].dtype),
               "cca_valid": kv_valid}
    out = cca.decode(h, self.pos, cache["cca_k"].astype(self.dtype),
                     cache["cca_v"].astype(self.dtype),
                     cache["cca_valid"])  # [B, 1, D]
    return out, cache


def _decode(cfg: RetroConfig, tokens: jax.Array, state: State,
            neighbours: Optional[jax.Array]) -> Tuple[jax.Array, State]:
  """Logits [B, V] at position state['pos'] and the updated state."""
  mode = CachedStep(cfg, state["pos"], neighbours)
  logits, layers = stack.decoder_logits(
      cfg, tokens[:, None], mode, state["layers"])  # [B, 1, V]
  return logits[:, 0], {"pos": state["pos"] + 1, "layers": layers}


class Decoder:
  """KV-cached decoding with the parameters of `Retro(config)`.

  `step` is jitted (the state's buffers are donated and updated in place);
  it compiles twice per cache shape: once for plain steps and once for the
  chunk-boundary steps that take new neighbours.
  """

  def __init__(self, config: RetroConfig):
    self.config = config
    fn = hk.without_apply_rng(
        hk.transform(lambda s, t, nb: _decode(config, t, s, nb)))
    self._apply = fn.apply
    self._step = jax.jit(self._apply, donate_argnums=(1,))

  def init_state(self, batch: int, max_len: int) -> State:
    """An empty state for `batch` sequences of up to `max_len` tokens."""
    c = self.config
    cache_dtype = dtype_of(c.compute_dtype)
    kv = (batch, c.num_heads, max_len, c.head_dim)  # [B, H, T, K]
    kr = c.num_neighbours * c.neighbour_len
    first_cca = min(c.cca_layer_indices, default=None)
    layers: List[Dict[str, jax.Array]] = []
    for first, count, has_cca in stack.decoder_runs(c):
      shape = kv if count == 1 else (count,) + kv  # CCA runs have 1.
      cache = {"k": jnp.zeros(shape, cache_dtype),
               "v": jnp.zeros(shape, cache_dtype)}
      if has_cca:
        mem = (batch, c.num_heads, kr, c.head_dim)  # [B, H, kr, K]
        cache.update(cca_k=jnp.zeros(mem, cache_dtype),
                     cca_v=jnp.zeros(mem, cache_dtype),
                     cca_valid=jnp.zeros((batch, kr), bool))
      if first == first_cca:  # The activations the encoder reads.
        cache["context"] = jnp.zeros((batch, c.chunk_size, c.d_model),
                                     cache_dtype)  # [B, m, D]
      layers.append(cache)
    return {"pos": jnp.zeros((), jnp.int32), "layers": layers}

  def step(self, params: hk.Params, state: State, tokens: jax.Array,
           neighbours: Optional[jax.Array] = None) -> Tuple[jax.Array, State]:
    """Feeds tokens [B] at position state['pos']; returns next-token logits
    [B, V] and the new state. Pass `neighbours` [B, k, r] exactly
    at the last position of a chunk. `state` is consumed (donated)."""
    if neighbours is not None:
      c = self.config
      if neighbours.shape[1:] != (c.num_neighbours, c.neighbour_len):
        raise ValueError(
            f"neighbours must be [batch, {c.num_neighbours}, "
            f"{c.neighbour_len}] for this decoder, got "
            f"{tuple(neighbours.shape)}; for another k use "
            f"Decoder(config.replace(num_neighbours=k)) (same parameters)")
    return self._step(params, state, tokens, neighbours)

  def apply(self, params: hk.Params, state: State, tokens: jax.Array,
            neighbours: Optional[jax.Array] = None):
    """`step` without jit or donation (for use inside a caller's jit)."""
    return self._apply(params, state, tokens, neighbours)
