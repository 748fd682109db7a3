"""Training data sources: `start_step -> iterator of host batches`.

The training loop sees a data source as one callable: given the step it
resumes from, it returns an iterator of this host's numpy batches

  {"tokens": int32 [b, n], "neighbours": int32 [b, L, k, r],
   "loss_mask": int32 [b, n]}

with b = global batch / number of row blocks the mesh gives the hosts
(`sharding.host_batch_shard`: hosts holding replicas of the same rows read
the same block). Batches are a pure function of (source, seed, step), so the
data position saved in a checkpoint is the step.

Data shards (task source): the global batch is read as S equal row blocks,
block j from seqio shard j of S of the Task (`config.data.num_shards`; 0 =
one per host block). A host reads the consecutive shards its rows are made
of, so with S fixed the batches, hence the run, are the same on 1, 2, ... S
processes (the synthetic sources are so already: each host cuts its rows
out of the global batch).

`config.data.record_rows` makes each host append what it trained on to
`<workdir>/rows/process_<i>.jsonl` (`rows_record`, one line per step), to
check the sharding.

Sources (`config.data.source`):
  synthetic  tokens from a fixed random bigram chain (learnable, so the loss
             falls) and random neighbours, drawn from (seed, step): for
             benchmarks and tests, no files needed.
  copy       a probe of whether a model learns to read its neighbours:
             uniform tokens, so nothing but retrieval beats chance, and the
             first neighbour of chunk u holds chunks u and u + 1 (the text
             the tokens from u*m + m - 1 on predict), the second is noise.
  task       the seqio Task of `retro_jax.data.tasks` (real corpus, precomputed
             neighbours), registered from the `config.data` fields and read
             with `tasks.batches(..., start_step=step)`.

Shape glossary: b host batch, n sequence length, L = n / m chunks, k
neighbours, r neighbour length, V vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import ml_collections
import numpy as np

from retro_jax.config import RetroConfig
from retro_jax.core import sharding

Batch = Dict[str, np.ndarray]
DataSource = Callable[[int], Iterator[Batch]]
SOURCES = ("synthetic", "copy", "task")
COPY_ALPHABET = 512   # Token ids of the copy probe: 1..511 (chance ln 511).


def synthetic_batch(cfg: RetroConfig, batch_size: int, seq_len: int,
                    seed: int, step: int, shard_index: int = 0,
                    num_shards: int = 1, noise: float = 0.1) -> Batch:
  """This host's rows of the synthetic global batch of `step`.

  Tokens follow `next = perm[current]` (a bigram chain fixed by `seed`),
  replaced by a uniform token with probability `noise`; neighbours are
  uniform tokens. Ids are in 1..V-1 (0 is padding).
  """
  v = cfg.vocab_size
  perm = np.random.default_rng([seed, 0xC4A1]).permutation(np.arange(1, v))
  rng = np.random.default_rng([seed, step])
  tokens = np.empty((batch_size, seq_len), np.int32)       # [B, n]
  tokens[:, 0] = rng.integers(1, v, batch_size)
  for t in range(1, seq_len):
    tokens[:, t] = perm[tokens[:, t - 1] - 1]
  flip = rng.random((batch_size, seq_len)) < noise
  tokens[flip] = rng.integers(1, v, int(flip.sum()))
  l = seq_len // cfg.chunk_size
  neighbours = rng.integers(
      1, v, (batch_size, l, cfg.num_neighbours, cfg.neighbour_len),
      dtype=np.int32)                                     # [B, L, k, r]
  b = batch_size // num_shards
  rows = slice(shard_index * b, (shard_index + 1) * b)
  return {"tokens": tokens[rows], "neighbours": neighbours[rows],
          "loss_mask": np.ones((b, seq_len), np.int32)}


def copy_batch(cfg: RetroConfig, batch_size: int, seq_len: int, seed: int,
               step: int, shard_index: int = 0, num_shards: int = 1) -> Batch:
  """This host's rows of the copy-probe batch of `step` (see the module
  docstring): neighbour 0 of chunk u is tokens [u*m, u*m + r) of a stream
  that runs on past the sequence; neighbour 1 is uniform noise."""
  v = min(COPY_ALPHABET, cfg.vocab_size)
  m, r = cfg.chunk_size, cfg.neighbour_len
  if cfg.num_neighbours < 1 or r < 2 * m:
    raise ValueError("the copy probe needs num_neighbours >= 1 and "
                     f"neighbour_len >= 2 * chunk_size, got "
                     f"{cfg.num_neighbours} and {r}")
  rng = np.random.default_rng([seed, step, 0xC0B1])
  l = seq_len // m
  stream = rng.integers(1, v, (batch_size, (l - 1) * m + r), np.int32)
  neighbours = rng.integers(
      1, v, (batch_size, l, cfg.num_neighbours, r), np.int32)  # [B, L, k, r]
  for u in range(l):
    neighbours[:, u, 0] = stream[:, u * m:u * m + r]
  b = batch_size // num_shards
  rows = slice(shard_index * b, (shard_index + 1) * b)
  return {"tokens": stream[rows, :seq_len], "neighbours": neighbours[rows],
          "loss_mask": np.ones((b, seq_len), np.int32)}


def synthetic_source(cfg: RetroConfig, batch_size: int, seq_len: int,
                     seed: int, *, shard: Tuple[int, int],
                     make_batch=synthetic_batch) -> DataSource:
  """`start_step -> iterator` of `make_batch` batches for this host; `shard`
  is its (index, count) from `sharding.host_batch_shard`."""
  shard, shards = shard

  def iterate(start_step: int) -> Iterator[Batch]:
    step = start_step
    while True:
      yield make_batch(cfg, batch_size, seq_len, seed, step, shard, shards)
      step += 1
  return iterate


def shards_read(config: ml_collections.ConfigDict, shard: Tuple[int, int]
                ) -> Tuple[range, int]:
  """(the data shards a host reads, their number S): S equal row blocks of
  the global batch (`config.data.num_shards`, 0 = one per host block), of
  which the host whose rows are block `shard` = (index, count) reads the
  consecutive ones that tile its rows."""
  index, count = shard
  total = int(config.data.num_shards) or count
  if total < 0 or total % count or config.train.batch_size % total:
    raise ValueError(
        f"config.data.num_shards={config.data.num_shards} must divide the "
        f"batch ({config.train.batch_size}) and be a multiple of the {count} "
        f"row blocks the mesh gives the hosts (0: one shard per block)")
  per = total // count
  return range(index * per, (index + 1) * per), total


def task_source(config: ml_collections.ConfigDict, *,
                shard: Tuple[int, int]) -> DataSource:
  """`start_step -> iterator` over the seqio Task named by `config.data`;
  `shard` is this host's (index, count) from `sharding.host_batch_shard`;
  the host reads the data shards `shards_read` gives it."""
  from retro_jax.data import tasks  # pylint: disable=g-import-not-at-top
  d, tc = config.data, config.train
  for field in ("task_name", "corpus", "db_dir", "cache_dir"):
    if not d.get(field):
      raise ValueError(f"config.data.{field} must be set when "
                       f"config.data.source='task'")
  tasks.register_run_task(config)
  share = float(d.get("copy_share", 0.0))
  if not 0.0 <= share <= 1.0:
    raise ValueError(f"config.data.copy_share must be in [0, 1], got {share}")

  mine, total = shards_read(config, shard)

  def iterate(start_step: int) -> Iterator[Batch]:
    streams = [tasks.batches(
        d.task_name, d.split, batch_size=tc.batch_size, cache_dir=d.cache_dir,
        seed=tc.seed, shard_index=j, num_shards=total, start_step=start_step)
               for j in mine]
    batches = streams[0] if len(streams) == 1 else (
        {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for parts in zip(*streams))
    if not share:
      return batches
    return (with_own_text(batch, share, tc.seed, step, shard,
                          int(d.get("copy_shift", 0)))
            for step, batch in enumerate(batches, start_step))
  return iterate


def with_own_text(batch: Batch, share: float, seed: int, step: int,
                  shard: Tuple[int, int] = (0, 1), max_shift: int = 0
                  ) -> Batch:
  """`batch` with, in a `share` of its rows, neighbour 0 of every chunk u
  replaced by the row's own tokens [u*m + s, u*m + s + r): chunk u and its
  continuation, the text that CCA predicts from them (0 outside the
  sequence; the last chunk's neighbours reach no target). The shift s is
  drawn per row in [-max_shift, max_shift]: with s = 0 a head that reads
  "m tokens ahead" copies, with other shifts only one that matches content
  does, as for a near-duplicate in a DB. The other neighbours stay those
  retrieved. Which rows, and their shifts, are a function of (seed, step)
  over the global batch, so every host agrees."""
  tokens = batch["tokens"]  # [b, n]
  nbs = batch["neighbours"].copy()  # [b, L, k, r]
  b, n = tokens.shape
  _, l, _, r = nbs.shape
  m = n // l
  index, count = shard
  rng = np.random.default_rng([seed, step, 0x5E1F])
  rows = (rng.random(b * count) < share)[index * b:(index + 1) * b]  # [b]
  shifts = rng.integers(-max_shift, max_shift + 1, b * count)[
      index * b:(index + 1) * b]  # [b]
  pad = max_shift
  padded = np.pad(tokens, ((0, 0), (pad, r + pad)))  # [b, n + r + 2 pad]
  for i in np.flatnonzero(rows):
    for u in range(l):
      start = pad + u * m + shifts[i]
      nbs[i, u, 0] = padded[i, start:start + r]
  return dict(batch, neighbours=nbs)


def make_source(config: ml_collections.ConfigDict,
                mesh: Optional[sharding.Mesh] = None) -> DataSource:
  """The data source `config.data.source` names, reading this host's rows
  of the batch as laid out on `mesh` (default: `config.mesh` over all
  devices)."""
  source = config.data.source
  if source not in SOURCES:
    raise ValueError(f"config.data.source must be one of {SOURCES}, got "
                     f"{source!r}")
  if mesh is None:
    mesh = sharding.make_mesh(dict(config.mesh))
  shard = sharding.host_batch_shard(mesh, config.train.batch_size)
  shards_read(config, shard)   # Checked for every source.
  if source == "task":
    return task_source(config, shard=shard)
  cfg = RetroConfig.from_dict(config.model)
  make_batch = {"synthetic": synthetic_batch, "copy": copy_batch}[source]
  return synthetic_source(cfg, config.train.batch_size, config.train.seq_len,
                          config.train.seed, shard=shard,
                          make_batch=make_batch)


def data_position(config: ml_collections.ConfigDict, step: int) -> dict:
  """What a checkpoint records of the input position (batches are a
  function of the step, so the step suffices; the rest identifies the
  stream)."""
  d = config.data
  return {"step": int(step), "source": d.source, "seed": int(config.train.seed),
          "task_name": d.get("task_name", ""), "split": d.get("split", "")}


def row_fingerprint(tokens: np.ndarray) -> str:
  """A short id of one sequence (its tokens int32 [n])."""
  return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()[
      :16]


def rows_record(step: int, batch: Batch) -> dict:
  """The rows record of one batch: {"step": the step it trains (the state
  goes from step to step + 1), "rows": `row_fingerprint` of each row}."""
  return {"step": int(step),
          "rows": [row_fingerprint(t) for t in batch["tokens"]]}


def append_record(path: str, record: dict) -> None:
  """Appends one rows record to the local file `path` as a JSON line."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:   # Whole lines, flushed:
    f.write(json.dumps(record) + "\n")           # a kill -9 loses none.
