"""Per-chunk scores of RETRO: loss, perplexity, bits per token and per byte,
with retrieval on and off (paper §4), and each chunk's leakage ratio r(C)
(§2.6) for the leakage table of `report`.

Shape glossary:
  B: batch.   n: tokens per sequence.   m: chunk size.   L: n // m.
  k: neighbours.   r: tokens per neighbour.   V: vocabulary.   C: chunks.

The core, `evaluate_batches`, takes any iterable of numpy batches
{tokens [B, n], neighbours [B, L, k, r], loss_mask [B, n] (optional)} and
returns per-chunk sums (`ChunkScores`): the negative log-likelihood of the
chunk's target tokens with retrieval on and off, their count, their UTF-8
bytes and the chunk's leakage ratio r(C). Every summary (overall, per
subset, filtered by r(C) <= alpha in `report.leakage_table`, paired gains
in `intervals`) is a sum over chunks, so it is exact. `chunk_files` saves
them for comparisons across runs.

Targets: position t predicts token t + 1, so token j of a sequence is a
target when j >= 1 and loss_mask[j] is 1; it belongs to chunk j // m.
`evaluate_grouped_batches` scores batches whose rows belong to groups (the
subsets of a streamed corpus set, `stream`) and splits the scores by group.
Word-level perplexity (`summarize(..., words)`) is exp(total NLL / words),
the convention of docs/evaluation.md.

Retrieval off means the neighbours are masked (all padding): every CCA layer
then adds exactly zero and the logits are those of the same decoder with its
CCA layers and encoder removed (`Retro.apply(params, tokens, None)`).

Bits per byte = (summed NLL of the targets, in bits) / (UTF-8 bytes of the
targets' text). A token's bytes come from its SentencePiece piece
(`token_bytes`): "▁" is one space byte, a byte-fallback piece <0xNN> is one
byte, control pieces (pad, eos, unk) are 0. SentencePiece's dummy prefix
counts as the space byte it stands for (one per document: the separator).
"""

from __future__ import annotations

import dataclasses
import math
from typing import (Any, Callable, Dict, Iterable, List, Optional,
                    Sequence, Tuple)

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.evaluation import leakage as leakage_lib
from retro_jax.model.network import Retro

LN2 = math.log(2.0)  # Nats per bit.


def token_bytes(sp) -> np.ndarray:
  """int64 [V]: UTF-8 bytes of each SentencePiece piece's text."""
  out = np.zeros(sp.get_piece_size(), np.int64)
  for i in range(len(out)):
    if sp.is_control(i) or sp.is_unknown(i):
      continue
    if sp.is_byte(i):
      out[i] = 1
      continue
    out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
  return out


@dataclasses.dataclass
class ChunkScores:
  """Per-chunk sums over evaluated chunks (float64/int64 [C])."""

  nll_on: np.ndarray  # Nats, retrieval on.
  nll_off: Optional[np.ndarray]  # Nats, neighbours masked (None: skipped).
  targets: np.ndarray  # Target tokens.
  bytes: np.ndarray  # UTF-8 bytes of the targets.
  leakage: Optional[np.ndarray]  # r(C) in [0, 1] (None: not computed).

  @classmethod
  def concat(cls, parts: Sequence["ChunkScores"]) -> "ChunkScores":
    def cat(name):
      vals = [getattr(p, name) for p in parts]
      return None if any(v is None for v in vals) else np.concatenate(vals)
    return cls(*(cat(f.name) for f in dataclasses.fields(cls)))

  def select(self, keep: np.ndarray) -> "ChunkScores":
    return ChunkScores(*(None if v is None else v[keep] for v in (
        self.nll_on, self.nll_off, self.targets, self.bytes, self.leakage)))


def make_token_nll(model: Retro):
  """jitted (params, tokens [B, n], neighbours [B, L, k, r] | None) ->
  float32 [B, n]: NLL (nats) of token j given tokens < j; 0 at j = 0."""
  def fn(params, tokens, neighbours):
    logits = model.apply(params, tokens, neighbours,   # [B, n, V]
                         retrieve_for_last_position=False)  # Unscored.
    lse = jax.nn.logsumexp(logits[:, :-1], axis=-1)  # [B, n-1]
    picked = jnp.take_along_axis(logits[:, :-1], tokens[:, 1:, None],
                                 -1)[..., 0]  # [B, n-1]
    return jnp.pad(lse - picked, ((0, 0), (1, 0)))  # [B, n]
  return jax.jit(fn)


def score_batch(model: Retro, params: hk.Params, batch: Dict[str, np.ndarray],
                token_bytes_table: np.ndarray, token_nll, *,
                retrieval_off: bool = True, leakage: bool = True,
                leakage_source: str = "previous") -> ChunkScores:
  """Per-chunk scores of one batch, chunks in row-major order [b * L]
  (see `evaluate_batches` for the arguments)."""
  m = model.config.chunk_size
  tokens = np.asarray(batch["tokens"], np.int32)  # [B, n]
  nbs = np.asarray(batch["neighbours"], np.int32)  # [B, L, k, r]
  b, n = tokens.shape
  weight = np.ones((b, n), np.float64)
  weight[:, 0] = 0.0  # Position 0 predicts nothing of this window.
  if "loss_mask" in batch:
    weight *= np.asarray(batch["loss_mask"], np.float64)

  def per_chunk(x):  # [B, n] -> [B * L]
    return x.reshape(b, n // m, m).sum(-1).reshape(-1)

  on = np.asarray(token_nll(params, tokens, nbs), np.float64)  # [B, n]
  off = None
  if retrieval_off:
    off = np.asarray(token_nll(params, tokens, None), np.float64)  # [B, n]
  return ChunkScores(
      nll_on=per_chunk(on * weight),
      nll_off=None if off is None else per_chunk(off * weight),
      targets=per_chunk(weight).astype(np.int64),
      bytes=per_chunk(np.asarray(token_bytes_table)[tokens]
                      * weight).astype(np.int64),
      leakage=leakage_lib.chunk_leakage(
          tokens, nbs, m, leakage_source).reshape(-1) if leakage else None)


def evaluate_batches(model: Retro, params: hk.Params,
                     batches: Iterable[Dict[str, np.ndarray]],
                     token_bytes_table: np.ndarray, *,
                     retrieval_off: bool = True, leakage: bool = True,
                     leakage_source: str = "previous",
                     max_batches: Optional[int] = None,
                     token_nll=None) -> ChunkScores:
  """Per-chunk NLL (retrieval on and off), targets, bytes and r(C).

  Args:
    model: the Retro model (any k: the neighbours' shape decides).
    params: its parameters.
    batches: numpy dicts with tokens [B, n], neighbours [B, L, k, r] and
      optionally loss_mask [B, n] (1 = the token is a target).
    token_bytes_table: int [V], see `token_bytes`.
    retrieval_off: also score with the neighbours masked.
    leakage: compute r(C) per chunk (see `leakage.chunk_leakage`).
    leakage_source: "previous" or "same", see `leakage`.
    max_batches: stop after this many batches.
    token_nll: a `make_token_nll(model)` to reuse (compiled) across calls.
  Returns:
    ChunkScores over every chunk of every sequence (chunks without targets
    contribute zeros).
  """
  token_nll = token_nll or make_token_nll(model)
  parts: List[ChunkScores] = []
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    parts.append(score_batch(model, params, batch, token_bytes_table,
                             token_nll, retrieval_off=retrieval_off,
                             leakage=leakage, leakage_source=leakage_source))
  if not parts:
    raise ValueError("evaluate_batches: no batch to evaluate")
  return ChunkScores.concat(parts)


@dataclasses.dataclass
class GroupScores:
  """A group's per-chunk scores and the tokens of its windows that no
  target covers (each window's position 0 when it is new text)."""

  parts: List[ChunkScores] = dataclasses.field(default_factory=list)
  unscored_tokens: int = 0
  unscored_bytes: int = 0

  def chunks(self) -> ChunkScores:
    return ChunkScores.concat(self.parts)


def evaluate_grouped_batches(
    model: Retro, params: hk.Params, batches: Iterable[Dict[str, np.ndarray]],
    token_bytes_table: np.ndarray, *, leakage_source: str = "previous",
    max_batches: Optional[int] = None, token_nll=None,
    on_batch: Optional[Callable[[int], None]] = None
) -> Tuple[Dict[int, GroupScores], bool]:
  """`evaluate_batches` of batches whose rows carry a group index (int
  [B] "group", see `stream.labelled_batches`), split by group.

  A stream token with loss_mask 1 at a window's position 0 is text that
  this window brings but predicts nothing of (no context): it is counted
  as unscored, so a group's scored plus unscored bytes are all its text's.

  Returns:
    ({group index: GroupScores}, complete: False if max_batches stopped
    the evaluation before the batches ran out).
  """
  token_nll = token_nll or make_token_nll(model)
  table = np.asarray(token_bytes_table)
  m = model.config.chunk_size
  out: Dict[int, GroupScores] = {}
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      return out, False
    scores = score_batch(model, params, batch, table, token_nll,
                         leakage_source=leakage_source)
    tokens = np.asarray(batch["tokens"])  # [B, n]
    first = np.asarray(batch["loss_mask"])[:, 0]  # [B] 1: new, unscored.
    chunk_rows = np.repeat(np.arange(len(tokens)), tokens.shape[1] // m)
    for g in np.unique(batch["group"]):
      rows = np.asarray(batch["group"]) == g  # [B]
      group = out.setdefault(int(g), GroupScores())
      group.parts.append(scores.select(rows[chunk_rows]))
      group.unscored_tokens += int(first[rows].sum())
      group.unscored_bytes += int((table[tokens[rows, 0]] * first[rows]).sum())
    if on_batch is not None:
      on_batch(i + 1)
  return out, True


def _metrics_of(nll: float, targets: int, num_bytes: int,
                words: Optional[int]) -> Dict[str, float]:
  loss = nll / max(targets, 1)
  out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
         "bits_per_token": loss / LN2,
         "bits_per_byte": nll / LN2 / max(num_bytes, 1)}
  if words:
    out["word_perplexity"] = math.exp(min(nll / words, 700.0))
  return out


def summarize(scores: ChunkScores,
              words: Optional[int] = None) -> Dict[str, Any]:
  """Loss (nats/token), perplexity, bits/token and bits/byte, on and off;
  with `words` (the scored text's words, `stream.count_words`) also the
  word-level perplexity exp(total NLL / words) (docs/evaluation.md)."""
  targets, nbytes = int(scores.targets.sum()), int(scores.bytes.sum())
  out: Dict[str, Any] = {"tokens": targets, "bytes": nbytes,
                         "chunks": int((scores.targets > 0).sum()),
                         "retrieval_on": _metrics_of(
                             float(scores.nll_on.sum()), targets, nbytes,
                             words)}
  if words:
    out["words"] = int(words)
  if scores.nll_off is not None:
    out["retrieval_off"] = _metrics_of(float(scores.nll_off.sum()), targets,
                                       nbytes, words)
  return out
