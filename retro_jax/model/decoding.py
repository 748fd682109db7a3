"""Incremental (KV-cached) decoding of RETRO, one token per step.

Shape glossary:
  B: batch.           T: cache capacity (maximum sequence length).
  m: chunk size.      k: neighbours.      r: tokens per neighbour.
  H: heads.           K: head width.      D: decoder width.   E: encoder width.
  V: vocabulary.      c: layers in one scanned run.

`Decoder` runs the same parameters as `model.Retro` (same module names; the
decode path is a second Haiku function over them), one position at a time:

  step(params, state, tokens [B], neighbours [B, k, r] | None)
      -> (logits [B, V] of the next token, state')

The state holds, per decoder layer, the self-attention keys/values of every
position fed so far ([B, H, T, K]); per CCA layer, the keys/values of the
encoded neighbours of the latest completed chunk; and the first CCA layer's
activations of the current chunk ([B, m, D]), on which the neighbour encoder
is conditioned.

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

from retro_jax.model import attention
from retro_jax.model import network as model_lib
from retro_jax.config import PAD_ID, RetroConfig, dtype_of

State = Dict[str, Any]


def _decode(cfg: RetroConfig, tokens: jax.Array, state: State,
            neighbours: Optional[jax.Array]) -> Tuple[jax.Array, State]:
  """Logits [B, V] at position state['pos'] and the updated state."""
  dtype = dtype_of(cfg.compute_dtype)
  pos = state["pos"]
  m = cfg.chunk_size
  embed = hk.Embed(cfg.vocab_size, cfg.d_model, name="embed",
                   w_init=hk.initializers.TruncatedNormal(1.0))
  table = embed.embeddings.astype(dtype)  # [V, D]
  x = table[tokens][:, None, :]  # [B, 1, D]
  if neighbours is not None:
    nb_valid = neighbours != PAD_ID  # [B, k, r]
    nb = model_lib.embed_neighbours(cfg, table, neighbours)  # [B, k, r, E]

  def self_attention_block(x, k_cache, v_cache):
    h = attention.RMSNorm(cfg.norm_eps, name="attn_norm")(x)
    out, k_cache, v_cache = attention.SelfAttention(
        cfg.num_heads, cfg.head_dim, causal=True, rope_base=cfg.rope_base,
        block=cfg.attention_block, name="self_attention").decode(
            h, pos, k_cache, v_cache)  # [B, 1, D]
    return x + out, k_cache, v_cache

  def mlp_block(x):
    return x + model_lib.MLP(cfg.d_ff, name="mlp")(
        attention.RMSNorm(cfg.norm_eps, name="mlp_norm")(x))  # [B, 1, D]

  def plain_layer(x, k_cache, v_cache):
    x, k_cache, v_cache = self_attention_block(x, k_cache, v_cache)
    return mlp_block(x), (k_cache, v_cache)

  new_state: State = {"pos": pos + 1, "context": state["context"],
                      "layers": []}
  first_cca = True
  with hk.experimental.name_scope("decoder"):
    for (first, count, has_cca), cache in zip(model_lib.decoder_runs(cfg),
                                              state["layers"]):
      cache = dict(cache)
      if has_cca:
        with hk.experimental.name_scope(f"layer_{first:02d}"):
          x, cache["k"], cache["v"] = self_attention_block(
              x, cache["k"], cache["v"])
          if first_cca:
            ctx = jax.lax.dynamic_update_slice(
                state["context"], x.astype(state["context"].dtype),
                (0, pos % m, 0))  # [B, m, D]
            new_state["context"] = ctx
            if neighbours is not None:
              encoded = model_lib.NeighbourEncoder(cfg)(
                  nb[:, None], nb_valid[:, None],
                  ctx.astype(dtype))[:, 0]  # [B, k, r, E]
            first_cca = False
          cca = attention.ChunkedCrossAttention(
              cfg.num_heads, cfg.head_dim, m, cfg.rope_base, name="cca")
          if neighbours is not None:
            keys, values, valid = cca.decode_memory(encoded, nb_valid)
            cache["cca_k"] = keys.astype(cache["cca_k"].dtype)
            cache["cca_v"] = values.astype(cache["cca_v"].dtype)
            cache["cca_valid"] = valid
          h = attention.RMSNorm(cfg.norm_eps, name="cca_norm")(x)
          x = x + cca.decode(h, pos, cache["cca_k"].astype(dtype),
                             cache["cca_v"].astype(dtype),
                             cache["cca_valid"])  # [B, 1, D]
          x = mlp_block(x)
      elif count == 1:
        with hk.experimental.name_scope(f"layer_{first:02d}"):
          x, (cache["k"], cache["v"]) = plain_layer(x, cache["k"], cache["v"])
      else:
        name = f"layers_{first:02d}_{first + count - 1:02d}"
        x, (cache["k"], cache["v"]) = hk.layer_stack(
            count, with_per_layer_inputs=True, name=name)(plain_layer)(
                x, cache["k"], cache["v"])  # caches [c, B, H, T, K]
      new_state["layers"].append(cache)

  x = attention.RMSNorm(cfg.norm_eps, name="final_norm")(x)  # [B, 1, D]
  if cfg.tie_output:
    logits = attention.dense(x, table.T)  # [B, 1, V]
  else:
    with hk.experimental.name_scope("output"):
      w = attention.param("w", [cfg.d_model, cfg.vocab_size], cfg.d_model,
                           dtype)  # [D, V]
    logits = attention.dense(x, w)  # [B, 1, V]
  return logits[:, 0].astype(jnp.float32), new_state


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
    layers: List[Dict[str, jax.Array]] = []
    for _, count, has_cca in model_lib.decoder_runs(c):
      shape = kv if count == 1 else (count,) + kv  # CCA runs have 1.
      cache = {"k": jnp.zeros(shape, cache_dtype),
               "v": jnp.zeros(shape, cache_dtype)}
      if has_cca:
        mem = (batch, c.num_heads, kr, c.head_dim)  # [B, H, kr, K]
        cache.update(cca_k=jnp.zeros(mem, cache_dtype),
                     cca_v=jnp.zeros(mem, cache_dtype),
                     cca_valid=jnp.zeros((batch, kr), bool))
      layers.append(cache)
    return {"pos": jnp.zeros((), jnp.int32),
            "context": jnp.zeros((batch, c.chunk_size, c.d_model),
                                 cache_dtype),
            "layers": layers}

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
