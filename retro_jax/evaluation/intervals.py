"""Paired bits-per-byte gains with a bootstrap interval over sequences.

Two scorings of the same chunks (retrieval on against off for one model, or
two models on one evaluation set, see `chunk_files`) differ chunk by chunk;
`paired_gain` turns that difference into bits per byte saved and a 95%
interval for it that reflects which text was evaluated (not training noise).

Shape glossary: C chunks, S sequences (C = S * L), L chunks per sequence,
N bootstrap resamples.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from retro_jax.evaluation.scores import LN2


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
  # Resamples drawn in blocks: memory ~ 16 * block * S bytes, not N * S
  # (gigabytes for the Pile's 10^5 sequences).
  block = max(1, min(samples, 2 ** 24 // diff.size))
  boot = []
  for lo in range(0, samples, block):
    pick = rng.integers(0, diff.size,
                        size=(min(block, samples - lo), diff.size))  # [N', S]
    boot.append(diff[pick].sum(-1) / LN2
                / np.maximum(seq_bytes[pick].sum(-1), 1))
  boot = np.concatenate(boot)  # [N]
  low, high = np.quantile(boot, [0.025, 0.975])
  return {"bpb_gain": float(gain), "ci95": [float(low), float(high)],
          "relative": float(gain / (base.sum() / LN2 / seq_bytes.sum())),
          "sequences": int(diff.size)}
