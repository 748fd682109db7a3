"""Per-chunk scores on disk (.npz), for comparisons across runs.

The evaluation job saves each set's `ChunkScores` beside its results
(<workdir>/eval/<tag>_<set>_chunks.npz); `intervals.paired_gain` of two
models on one evaluation set pairs them chunk by chunk. The file holds one
array per `ChunkScores` field that was computed (nll_off and leakage may be
absent), under the field's name, in its own dtype.
"""

from __future__ import annotations

import dataclasses
import io

from etils import epath
import numpy as np

from retro_jax.core import files
from retro_jax.evaluation.scores import ChunkScores


def save_chunk_scores(path: str, scores: ChunkScores) -> str:
  """Writes `scores` to a local or gs:// `path` atomically; returns `path`."""
  arrays = {f.name: getattr(scores, f.name)
            for f in dataclasses.fields(scores)
            if getattr(scores, f.name) is not None}
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  files.write_bytes(path, buf.getvalue())
  return path


def load_chunk_scores(path: str) -> ChunkScores:
  """Reads what `save_chunk_scores` wrote (absent fields come back None)."""
  with epath.Path(path).open("rb") as f:
    data = np.load(io.BytesIO(f.read()))
    return ChunkScores(*(data[f.name] if f.name in data else None
                         for f in dataclasses.fields(ChunkScores)))
