"""Generation with retrieval at every chunk boundary.

Shape glossary:
  B: batch.      P: prompt length.      G: tokens generated.
  m: chunk size. k: neighbours.         r: tokens per neighbour.   V: vocab.

`generate` feeds the prompt and then its own samples through the KV-cached
`decoding.Decoder`, one token per step. Whenever the token just fed completes
chunk u (position u*m + m - 1), `retrieve(chunk tokens [B, m])` is asked for
that chunk's neighbours [B, k, r] before the step runs: the encoder encodes
them and every later position attends to them (the training forward's CCA
timing). `retrieve=None` generates without retrieval.

`generate(..., use_cache=False)` is the reference: every step re-runs the full
forward (`Retro.apply`) on the prefix, padded to a multiple of m, with the
neighbours retrieved so far. Both paths draw token t with the key
`fold_in(rng, t)`, so given equal logits they sample equal tokens.

`make_retrieve(retriever, sp, k)` builds the `retrieve` function from a
retrieval DB: decode the chunk's tokens, embed with BERT, search, and return
the neighbours' tokens (chunk + continuation) with their DB chunk ids and
distances (`Retrieved`), which `Generation` keeps per chunk so that every
continuation can be traced to the DB chunks, and so the documents, it was
conditioned on. A `retrieve` may also return the bare tokens [B, k, r]; its
chunks' ids are then unknown (-1).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, List, NamedTuple, Optional, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.model import neighbour_alignment
from retro_jax.model.decoding import Decoder
from retro_jax.model.network import Retro



class Retrieved(NamedTuple):
  """The neighbours of one chunk per row, and which DB chunks they are."""

  values: np.ndarray  # int32 [B, k, r]: chunk + continuation tokens.
  ids: np.ndarray  # int64 [B, k]: DB chunk ids; -1 = no neighbour.
  distances: np.ndarray  # float32 [B, k]: squared L2; +inf where ids is -1.


# Chunk tokens [B, m] -> neighbour tokens int32 [B, k, r], or `Retrieved`.
RetrieveFn = Callable[[np.ndarray], Union[np.ndarray, Retrieved]]


@dataclasses.dataclass
class Generation:
  """The output of `generate`."""

  tokens: np.ndarray  # int32 [B, P + G]: prompt then samples.
  prompt_len: int  # P.
  # Per completed chunk u: int32 [B, k, r], as the model read them (after
  # neighbour alignment, when the model aligns).
  neighbours: List[np.ndarray]
  seconds: float  # Wall time of the generation loop.
  # Per completed chunk u: the DB chunks behind `neighbours[u]`, int64
  # [B, k] (-1: none, or a `retrieve` that returned bare tokens), and their
  # squared L2 distances, float32 [B, k] (NaN where unknown).
  neighbour_ids: List[np.ndarray] = dataclasses.field(default_factory=list)
  neighbour_distances: List[np.ndarray] = dataclasses.field(
      default_factory=list)

  @property
  def generated(self) -> np.ndarray:
    """int32 [B, G]."""
    return self.tokens[:, self.prompt_len:]


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Next tokens [B] from logits [B, V].

  temperature 0 is greedy (argmax); top_k > 0 keeps the k likeliest tokens;
  top_p < 1 keeps the smallest set whose probability reaches top_p (nucleus).
  """
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature  # [B, V]
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)  # [B, V]
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Mass strictly above.
    keep_sorted = before < top_p  # The top token is always kept.
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def make_retrieve(retriever, sp, k: int) -> Callable[[np.ndarray],
                                                     Retrieved]:
  """A `retrieve` function over a retrieval DB.

  Args:
    retriever: `retrieval.neighbours.Retriever` (embedder, index, DB values).
    sp: the SentencePiece processor of the model (and of the DB).
    k: neighbours per chunk.
  Returns:
    chunk tokens [B, m] -> `Retrieved` (tokens [B, k, r], ids, distances).
  """
  def retrieve(chunks: np.ndarray) -> Retrieved:
    texts = [sp.decode([int(t) for t in row if t > 0]) for row in chunks]
    found, values = retriever.retrieve_texts(texts, k)  # [B, k], [B, k, r]
    return Retrieved(np.asarray(values, np.int32),
                     np.asarray(found.ids, np.int64),
                     np.asarray(found.dists, np.float32))
  return retrieve


def as_retrieved(got: Union[np.ndarray, Retrieved]) -> Retrieved:
  """`Retrieved` from what a `retrieve` returned: bare tokens [B, k, r]
  get unknown ids (-1) and distances (NaN)."""
  if isinstance(got, Retrieved):
    return Retrieved(np.asarray(got.values, np.int32),
                     np.asarray(got.ids, np.int64),
                     np.asarray(got.distances, np.float32))
  values = np.asarray(got, np.int32)
  shape = values.shape[:2]
  return Retrieved(values, np.full(shape, -1, np.int64),
                   np.full(shape, np.nan, np.float32))


class Sampler:
  """Generation for one model: compiled steps are kept between calls."""

  def __init__(self, model: Retro, num_neighbours: Optional[int] = None):
    cfg = model.config
    if num_neighbours:
      cfg = cfg.replace(num_neighbours=num_neighbours)
    self.model = model
    self.config = cfg
    self.decoder = Decoder(cfg)
    self._cached_step = jax.jit(self._cached_step_impl,
                                static_argnums=(5, 6, 7),
                                donate_argnums=(1,))
    # Uncached step (whole prefix, no KV cache): used by generate without
    # a cache, and timed on its own by scripts/benchmark_eval.py.
    self.full_step = jax.jit(self._full_step_impl,
                             static_argnums=(5, 6, 7))

  # -- jitted bodies ----------------------------------------------------------
  def _cached_step_impl(self, params, state, tokens, neighbours, key,
                        temperature, top_k, top_p):
    logits, state = self.decoder.apply(params, state, tokens, neighbours)
    pos = state["pos"] - 1
    nxt = sample_logits(logits, jax.random.fold_in(key, pos + 1),
                        temperature, top_k, top_p)
    return nxt, state

  def _full_step_impl(self, params, tokens, neighbours, pos, key,
                      temperature, top_k, top_p):
    logits = self.model.apply(params, tokens, neighbours)  # [B, N, V]
    logits = jax.lax.dynamic_index_in_dim(logits, pos, axis=1,
                                          keepdims=False)  # [B, V]
    return sample_logits(logits, jax.random.fold_in(key, pos + 1),
                         temperature, top_k, top_p)

  # -- generation -------------------------------------------------------------
  def generate(self, params: hk.Params, prompt: np.ndarray, num_tokens: int,
               retrieve: Optional[RetrieveFn] = None, *,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               rng: Optional[jax.Array] = None, use_cache: bool = True,
               max_steps: Optional[int] = None) -> Generation:
    """Generates `num_tokens` tokens after `prompt` (int [B, P], P >= 1).

    Args:
      params: the model's parameters.
      prompt: int [B, P] prompt token ids (no padding).
      num_tokens: G, tokens to generate.
      retrieve: chunk tokens [B, m] -> neighbours int32 [B, k, r] or
        `Retrieved` (with their DB chunk ids, kept in the Generation);
        None disables retrieval.
      temperature, top_k, top_p: see `sample_logits` (0 = greedy).
      rng: PRNG key for sampling (default key 0).
      use_cache: False runs the full forward on the prefix at every step
        (the reference; slow).
      max_steps: stop after this many steps of the loop (benchmarks of the
        slow reference); the remaining tokens stay 0.
    """
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
      raise ValueError(f"prompt must be [batch, length >= 1], got "
                       f"{prompt.shape}")
    c = self.config
    m = c.chunk_size
    b, p = prompt.shape
    total = p + num_tokens
    tokens = np.zeros((b, total), np.int32)
    tokens[:, :p] = prompt
    rng = jax.random.key(0) if rng is None else rng
    sampling = (float(temperature), int(top_k), float(top_p))
    neighbours: List[np.ndarray] = []
    neighbour_ids: List[np.ndarray] = []
    neighbour_distances: List[np.ndarray] = []

    def boundary_neighbours(pos: int) -> Optional[np.ndarray]:
      """Retrieves for chunk pos // m if position pos completes it."""
      if retrieve is None or (pos + 1) % m:
        return None
      got = as_retrieved(retrieve(tokens[:, pos + 1 - m:pos + 1]))
      nb = got.values
      if nb.shape != (b, c.num_neighbours, c.neighbour_len):
        raise ValueError(f"retrieve returned {nb.shape}, expected "
                         f"{(b, c.num_neighbours, c.neighbour_len)}")
      if got.ids.shape != nb.shape[:2]:
        raise ValueError(f"retrieve returned ids {got.ids.shape} for "
                         f"neighbours {nb.shape}")
      if c.neighbour_alignment:  # Kept as the model reads them.
        nb = np.asarray(neighbour_alignment.align_chunk(
            tokens[:, pos + 1 - m:pos + 1], nb, c.neighbour_alignment))
      neighbours.append(nb)
      neighbour_ids.append(got.ids)
      neighbour_distances.append(got.distances)
      return nb

    t0 = time.perf_counter()
    steps = 0
    if use_cache:
      cap = -(-total // m) * m
      state = self.decoder.init_state(b, cap)
      for pos in range(total - 1):
        nb = boundary_neighbours(pos)
        nxt, state = self._cached_step(
            params, state, jnp.asarray(tokens[:, pos]),
            None if nb is None else jnp.asarray(nb), rng, *sampling)
        if pos + 1 >= p:
          tokens[:, pos + 1] = np.asarray(nxt)
          steps += 1
          if max_steps and steps >= max_steps:
            break
    else:
      for pos in range(total - 1):
        nb = boundary_neighbours(pos)
        del nb  # Kept in `neighbours`.
        if pos + 1 < p:
          continue
        n = -(-(pos + 1) // m) * m
        prefix = np.zeros((b, n), np.int32)
        prefix[:, :pos + 1] = tokens[:, :pos + 1]
        nbs = None
        if retrieve is not None:
          nbs = np.zeros((b, n // m, c.num_neighbours, c.neighbour_len),
                         np.int32)
          for u, chunk_nb in enumerate(neighbours):
            nbs[:, u] = chunk_nb
        nxt = self.full_step(params, jnp.asarray(prefix),
                             None if nbs is None else jnp.asarray(nbs),
                             jnp.int32(pos), rng, *sampling)
        tokens[:, pos + 1] = np.asarray(nxt)
        steps += 1
        if max_steps and steps >= max_steps:
          break
    return Generation(tokens=tokens, prompt_len=p, neighbours=neighbours,
                      seconds=time.perf_counter() - t0,
                      neighbour_ids=neighbour_ids,
                      neighbour_distances=neighbour_distances)


@functools.lru_cache(maxsize=8)
def _sampler(model: Retro, num_neighbours: Optional[int]) -> Sampler:
  return Sampler(model, num_neighbours)


def generate(model: Retro, params: hk.Params, prompt: np.ndarray,
             num_tokens: int, retrieve: Optional[RetrieveFn] = None,
             num_neighbours: Optional[int] = None, **kwargs) -> Generation:
  """`Sampler(model, num_neighbours).generate(...)`, reusing compiled steps
  across calls for the same model object."""
  return _sampler(model, num_neighbours).generate(
      params, prompt, num_tokens, retrieve, **kwargs)
