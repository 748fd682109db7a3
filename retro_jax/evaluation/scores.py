"""Evaluation of RETRO: loss, perplexity, bits per token and per byte, with
retrieval on and off, and leakage-filtered bits-per-byte (paper §2.6, §4).

Shape glossary:
  B: batch.   n: tokens per sequence.   m: chunk size.   L: n // m.
  k: neighbours.   r: tokens per neighbour.   V: vocabulary.   C: chunks.

The core, `evaluate_batches`, takes any iterable of numpy batches
{tokens [B, n], neighbours [B, L, k, r], loss_mask [B, n] (optional)} and
returns per-chunk sums (`ChunkScores`): the negative log-likelihood of the
chunk's target tokens with retrieval on and off, their count, their UTF-8
bytes and the chunk's leakage ratio r(C). Every summary (overall, per
subset, filtered by r(C) <= alpha) is a sum over chunks, so it is exact.

Targets: position t predicts token t + 1, so token j of a sequence is a
target when j >= 1 and loss_mask[j] is 1; it belongs to chunk j // m.

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
import io
import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence

from etils import epath
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.evaluation import leakage as leakage_lib
from retro_jax.model.network import Retro

ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)
LN2 = math.log(2.0)


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
  m = model.config.chunk_size
  token_nll = token_nll or make_token_nll(model)
  table = np.asarray(token_bytes_table)
  parts: List[ChunkScores] = []
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    tokens = np.asarray(batch["tokens"], np.int32)  # [B, n]
    nbs = np.asarray(batch["neighbours"], np.int32)  # [B, L, k, r]
    b, n = tokens.shape
    weight = np.ones((b, n), np.float64)
    weight[:, 0] = 0.0
    if "loss_mask" in batch:
      weight *= np.asarray(batch["loss_mask"], np.float64)

    def per_chunk(x):  # [B, n] -> [B * L]
      return x.reshape(b, n // m, m).sum(-1).reshape(-1)

    on = np.asarray(token_nll(params, tokens, nbs), np.float64)
    off = None
    if retrieval_off:
      off = np.asarray(token_nll(params, tokens, None), np.float64)
    parts.append(ChunkScores(
        nll_on=per_chunk(on * weight),
        nll_off=None if off is None else per_chunk(off * weight),
        targets=per_chunk(weight).astype(np.int64),
        bytes=per_chunk(table[tokens] * weight).astype(np.int64),
        leakage=leakage_lib.chunk_leakage(
            tokens, nbs, m, leakage_source).reshape(-1) if leakage else None))
  if not parts:
    raise ValueError("evaluate_batches: no batch to evaluate")
  return ChunkScores.concat(parts)


def _metrics_of(nll: float, targets: int, num_bytes: int) -> Dict[str, float]:
  loss = nll / max(targets, 1)
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_token": loss / LN2,
          "bits_per_byte": nll / LN2 / max(num_bytes, 1)}


def summarize(scores: ChunkScores) -> Dict[str, Any]:
  """Loss (nats/token), perplexity, bits/token and bits/byte, on and off."""
  targets, nbytes = int(scores.targets.sum()), int(scores.bytes.sum())
  out: Dict[str, Any] = {"tokens": targets, "bytes": nbytes,
                         "chunks": int((scores.targets > 0).sum()),
                         "retrieval_on": _metrics_of(
                             float(scores.nll_on.sum()), targets, nbytes)}
  if scores.nll_off is not None:
    out["retrieval_off"] = _metrics_of(float(scores.nll_off.sum()), targets,
                                       nbytes)
  return out


def paired_gain(nll_base: np.ndarray, nll_new: np.ndarray,
                num_bytes: np.ndarray, chunks_per_sequence: int,
                samples: int = 2000, seed: int = 0) -> Dict[str, Any]:
  """How many bits per byte `nll_new` saves over `nll_base` on the same
  chunks, with a 95% bootstrap interval.

  Both score the same chunks in the same order (retrieval on against off
  for one model, or two models on one evaluation set), so the difference is
  paired and the interval reflects only which text was evaluated. Chunks of
  one sequence share context and neighbours, so whole sequences
  (`chunks_per_sequence` consecutive chunks) are resampled. The interval says
  nothing about training noise: compare runs with other seeds for that.

  Args:
    nll_base, nll_new: float [C] per-chunk NLL sums (nats).
    num_bytes: int [C] per-chunk UTF-8 bytes of the targets.
    chunks_per_sequence: L; C must be a multiple of it.
    samples: bootstrap resamples.
    seed: their seed (the interval is reproducible).
  Returns:
    {"bpb_gain": base - new (> 0: new is better), "ci95": [low, high],
     "relative": gain / base bpb, "sequences": S}.
  """
  base, new = (np.asarray(x, np.float64) for x in (nll_base, nll_new))
  nbytes = np.asarray(num_bytes, np.float64)
  if not base.shape == new.shape == nbytes.shape:
    raise ValueError(f"paired_gain: per-chunk arrays differ in shape "
                     f"({base.shape}, {new.shape}, {nbytes.shape}): the two "
                     f"evaluations did not score the same chunks")
  if chunks_per_sequence <= 0 or base.size % chunks_per_sequence:
    raise ValueError(f"paired_gain: {base.size} chunks are not whole "
                     f"sequences of {chunks_per_sequence}")
  def per_seq(x):  # [C] -> [S]
    return x.reshape(-1, chunks_per_sequence).sum(-1)
  diff, seq_bytes = per_seq(base - new), per_seq(nbytes)  # [S], [S]
  if seq_bytes.sum() <= 0:
    raise ValueError("paired_gain: no target bytes")
  gain = diff.sum() / LN2 / seq_bytes.sum()
  rng = np.random.default_rng(seed)
  pick = rng.integers(0, diff.size, size=(samples, diff.size))  # [N, S]
  boot = diff[pick].sum(-1) / LN2 / np.maximum(seq_bytes[pick].sum(-1), 1)
  low, high = np.quantile(boot, [0.025, 0.975])
  return {"bpb_gain": float(gain), "ci95": [float(low), float(high)],
          "relative": float(gain / (base.sum() / LN2 / seq_bytes.sum())),
          "sequences": int(diff.size)}


def save_chunk_scores(path: str, scores: ChunkScores) -> str:
  """Writes the per-chunk scores (.npz) so that later comparisons, such as
  `paired_gain` of two models on one evaluation set, can pair them."""
  arrays = {f.name: getattr(scores, f.name)
            for f in dataclasses.fields(scores)
            if getattr(scores, f.name) is not None}
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  _write_atomic(path, buf.getvalue())
  return path


def load_chunk_scores(path: str) -> ChunkScores:
  """Reads what `save_chunk_scores` wrote."""
  with epath.Path(path).open("rb") as f:
    data = np.load(io.BytesIO(f.read()))
    return ChunkScores(*(data[f.name] if f.name in data else None
                         for f in dataclasses.fields(ChunkScores)))


def leakage_table(scores: ChunkScores,
                  alphas: Sequence[float] = ALPHAS) -> List[Dict[str, float]]:
  """Bits per byte over the chunks with r(C) <= alpha, for each alpha."""
  if scores.leakage is None:
    raise ValueError("leakage_table needs scores computed with leakage=True")
  rows = []
  counted = scores.targets > 0
  for alpha in alphas:
    keep = (scores.leakage <= alpha + 1e-9) & counted
    sub = scores.select(keep)
    nbytes = int(sub.bytes.sum())
    row = {"alpha": float(alpha), "chunks": int(keep.sum()),
           "chunk_fraction": float(keep.sum() / max(counted.sum(), 1)),
           "bytes": nbytes,
           "bpb_on": float(sub.nll_on.sum() / LN2 / nbytes) if nbytes
           else float("nan")}
    if sub.nll_off is not None:
      row["bpb_off"] = (float(sub.nll_off.sum() / LN2 / nbytes) if nbytes
                        else float("nan"))
    rows.append(row)
  return rows


def format_table(rows: List[Dict[str, float]]) -> str:
  """The leakage table as aligned text."""
  lines = [f"{'alpha':>6} {'chunks':>7} {'frac':>6} {'bpb on':>8} "
           f"{'bpb off':>8}"]
  for r in rows:
    lines.append(f"{r['alpha']:6.3f} {r['chunks']:7d} "
                 f"{r['chunk_fraction']:6.3f} {r['bpb_on']:8.4f} "
                 f"{r.get('bpb_off', float('nan')):8.4f}")
  return "\n".join(lines)


def plot_leakage(curves: Dict[str, List[Dict[str, float]]], path: str,
                 title: str = "") -> str:
  """PNG of bpb vs alpha, retrieval on (solid) and off (dashed), one colour
  per evaluation set (`curves`: name -> `leakage_table` rows)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (name, rows) in enumerate(curves.items()):
    colour = f"C{i}"
    alphas = [r["alpha"] for r in rows]
    ax.plot(alphas, [r["bpb_on"] for r in rows], "o-", color=colour,
            label=f"{name} retrieval on")
    if "bpb_off" in rows[0]:
      ax.plot(alphas, [r["bpb_off"] for r in rows], "s--", color=colour,
              label=f"{name} retrieval off")
  ax.set_xlabel("max eval/retrieved chunk overlap α (r(C) ≤ α)")
  ax.set_ylabel("bits per byte")
  ax.set_title(title or "Leakage-filtered bits per byte")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  _write_atomic(path, png.getvalue())
  return path


def sliding_windows(tokens: np.ndarray, seq_len: int, stride: int,
                    chunk_size: int = 64):
  """Windows of a token stream for strided evaluation.

  Window w covers tokens [w*stride, w*stride + seq_len); each target is
  scored once, in the first window where it has the most context: the first
  window scores all its targets, later ones only their last `stride`
  tokens. The last window is padded (loss_mask 0).

  Args:
    tokens: int [T] one stream (e.g. a document, or packed documents).
    seq_len: n, a multiple of chunk_size.
    stride: a multiple of chunk_size in (0, n] (n = no overlap).
  Returns:
    (windows int32 [W, n], loss_mask int32 [W, n], starts int64 [W]).
  """
  if seq_len % chunk_size or stride % chunk_size or not 0 < stride <= seq_len:
    raise ValueError(f"seq_len {seq_len} and stride {stride} must be "
                     f"multiples of the chunk size {chunk_size}, 0 < stride "
                     f"<= seq_len")
  tokens = np.asarray(tokens, np.int32)
  t = len(tokens)
  starts = [0]
  while starts[-1] + seq_len < t:
    starts.append(starts[-1] + stride)
  windows = np.zeros((len(starts), seq_len), np.int32)
  mask = np.zeros((len(starts), seq_len), np.int32)
  for w, s in enumerate(starts):
    piece = tokens[s:s + seq_len]
    windows[w, :len(piece)] = piece
    first = 0 if w == 0 else seq_len - stride
    mask[w, first:len(piece)] = 1
  return windows, mask, np.asarray(starts, np.int64)


def _write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to a local or gs:// `path` (temporary name, rename)."""
  tmp = epath.Path(f"{path}.tmp-{os.getpid()}")
  tmp.write_bytes(data)
  tmp.replace(epath.Path(path))


def write_json(path: str, obj: Any) -> str:
  """Writes JSON to a local or gs:// path atomically."""
  _write_atomic(path, json.dumps(obj, indent=2, sort_keys=True).encode())
  return path
