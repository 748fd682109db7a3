"""Online input: numpy batches from a RETRO Task's cached split.

The neighbours were precomputed offline (cache_job.py); online there is only
reading, shuffling and batching. `batches` is what the training loop and
evaluation iterate:

  for batch in batches("retro_stdlib", "train", batch_size=8,
                       cache_dir="/data/cache", seed=0, start_step=step):
    batch["tokens"]      # int32 [b, n]
    batch["neighbours"]  # int32 [b, L, k, r]
    batch["loss_mask"]   # int32 [b, n]

Hosts: host i of h reads its shard (`seqio.ShardInfo(i, h)`: whole record
files when the cache has at least h of them, else every h-th example) and
yields b = batch_size / h sequences per step.

Order: epoch e of a host's shard is seqio's shuffle of it with seed
`epoch_seed(seed, e)` (files and a 10k-example buffer), so every epoch is
reshuffled and the stream is a pure function of (cache, seed, host). Epochs
are concatenated example by example (a batch may straddle two epochs) and
every host yields batches forever, whatever its shard's size. Resuming at
step s starts at example s * b of that stream: the epoch is found by
arithmetic, and only the examples before the position within that epoch are
read and skipped, so a resumed run yields exactly what an uninterrupted run
yields from step s.

Evaluation (`repeat=False, shuffle=False`): every example of the shard once,
in file order; the last partial batch is padded to b rows with tokens 0,
neighbours 0, loss_mask 0 (and doc_ids -1), so shapes stay static for jit,
and a host whose shard is smaller than another's (or empty) ends with
all-padding batches, so that every host yields the same number of batches.

Reading: each iterator opens the split's record files in the directory
`require_complete` checked, with seqio's cache format (the info JSON's
feature spec) and seqio's order (`FileDataSource`, as
`Task.get_dataset(use_cached=True)` reads), so no shared, registered Task
is pointed at one cache directory: training and an evaluation reading
another cache_dir run side by side.

Shape glossary:
  b: sequences per host batch.   n: tokens per sequence.   L = n / m.
  k: neighbours.                 r: tokens per neighbour.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterator, Union

import numpy as np
import seqio
import tensorflow as tf

from retro_jax.data import cache_job
from retro_jax.data.feature_converter import RetroFeatureConverter

_READ_BLOCK = 256  # Examples per tf.data -> numpy transfer.
_SHARD_SIZES: Dict[tuple, int] = {}


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of `epoch` (distinct per (seed, epoch), 31 bits)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]
             >> 1)


def _shard_info(shard_index: int, num_shards: int):
  return seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None


def cached_split(directory: str, split: str) -> seqio.FileDataSource:
  """The examples of `split` cached in `directory` (a task directory).

  Parses the records with the feature spec of the split's info JSON, as
  seqio's cache reader does (int32 stored as int64, cast back), and keeps
  seqio's file reading order (`FileDataSource` defaults).
  """
  info = cache_job.read_json(seqio.get_cached_info_path(directory, split))
  stats = cache_job.read_json(seqio.get_cached_stats_path(directory, split))
  features = info["features"]
  description = {}
  for key, feat in features.items():
    shape, dtype = feat["shape"], feat["dtype"]
    stored = "int64" if dtype in ("int32", "bool") else dtype
    if any(x is None for x in shape[1:]):
      raise ValueError(f"{seqio.get_cached_info_path(directory, split)}: "
                       f"feature {key!r} has shape {shape}; only the first "
                       "dimension may vary")
    if shape and shape[0] is None:
      description[key] = tf.io.FixedLenSequenceFeature(
          shape[1:], stored, allow_missing=True)
    else:
      description[key] = tf.io.FixedLenFeature(shape, stored)

  def read_file_fn(files):
    ds = tf.data.TFRecordDataset(files).map(
        lambda pb: tf.io.parse_single_example(pb, description),
        num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(lambda ex: {k: tf.cast(v, features[k]["dtype"])
                              for k, v in ex.items()},
                  num_parallel_calls=tf.data.AUTOTUNE)

  pattern = "%s-*-of-*%d" % (seqio.get_cached_tfrecord_prefix(directory,
                                                              split),
                             info["num_shards"])
  return seqio.FileDataSource(read_file_fn, {split: pattern},
                              num_input_examples={split: stats["examples"]})


def _dataset(source: seqio.FileDataSource, split: str, *, shuffle: bool,
             seed, shard_index: int, num_shards: int,
             shuffle_buffer_size: int) -> tf.data.Dataset:
  """This host's examples of one pass, as `Task.get_dataset(use_cached=True,
  num_epochs=1)` yields them: whole files per host when there are enough,
  else every num_shards-th example; then the example shuffle."""
  shard_info = _shard_info(shard_index, num_shards)
  if shard_info is None or len(source.list_shards(split)) >= num_shards:
    ds = source.get_dataset(split=split, shuffle=shuffle, seed=seed,
                            shard_info=shard_info)
  else:
    ds = source.get_dataset(split=split, shuffle=shuffle, seed=seed)
    ds = ds.shard(num_shards, shard_index)
  if shuffle:
    ds = ds.shuffle(shuffle_buffer_size, seed=seed)
  return ds


def _epoch(source: seqio.FileDataSource, split: str,
           converter: RetroFeatureConverter, lengths, *, shuffle: bool,
           seed: int, epoch: int, shard_index: int, num_shards: int,
           shuffle_buffer_size: int,
           skip: int) -> Iterator[Dict[str, np.ndarray]]:
  """Blocks of up to _READ_BLOCK examples of one epoch, after `skip`."""
  ds = _dataset(source, split, shuffle=shuffle,
                seed=epoch_seed(seed, epoch) if shuffle else None,
                shard_index=shard_index, num_shards=num_shards,
                shuffle_buffer_size=shuffle_buffer_size)
  ds = converter(ds, lengths).skip(skip).batch(_READ_BLOCK)
  yield from ds.as_numpy_iterator()


def _shard_size(source: seqio.FileDataSource, split: str, stamp: tuple,
                shard_index: int, num_shards: int, total: int) -> int:
  """Examples in this host's shard (counted once per process if seqio
  shards by file, arithmetic if it shards by example)."""
  key = stamp + (split, shard_index, num_shards)
  if key not in _SHARD_SIZES:
    files = source.list_shards(split)
    if num_shards == 1:
      size = total
    elif len(files) < num_shards:  # seqio shards by example.
      size = len(range(shard_index, total, num_shards))
    else:  # By file: count the records of this host's files.
      mine = files[shard_index::num_shards]
      size = int(tf.data.TFRecordDataset(mine).reduce(
          np.int64(0), lambda c, _: c + 1))
    _SHARD_SIZES[key] = size
  return _SHARD_SIZES[key]


def _first_block(source: seqio.FileDataSource, split: str,
                 converter: RetroFeatureConverter,
                 lengths) -> Dict[str, np.ndarray]:
  """The split's first converted example as a block of one."""
  ds = converter(source.get_dataset(split=split, shuffle=False).take(1),
                 lengths)
  return next(ds.batch(1).as_numpy_iterator())


def _pad(block: Dict[str, np.ndarray], rows: int) -> Dict[str, np.ndarray]:
  """`block` padded with `rows` empty examples (pad ids, mask 0, doc -1)."""
  out = {}
  for key, value in block.items():
    fill = -1 if key == "doc_ids" else 0
    pad = np.full((rows,) + value.shape[1:], fill, value.dtype)
    out[key] = np.concatenate([value, pad])
  return out


def batches(task: Union[str, seqio.Task], split: str, *, batch_size: int,
            cache_dir: str, seed: int = 0, shard_index: int = 0,
            num_shards: int = 1, start_step: int = 0, shuffle: bool = True,
            repeat: bool = True, with_doc_ids: bool = False
            ) -> Iterator[Dict[str, np.ndarray]]:
  """This host's batches of a cached split, as numpy.

  Args:
    task: a registered RETRO Task or its name.
    split: a cached split.
    batch_size: the global batch; this host yields batch_size / num_shards.
    cache_dir: the cache root given to `cache_task`.
    seed: the data seed (epoch e is shuffled with epoch_seed(seed, e)).
    shard_index, num_shards: this host and the host count.
    start_step: the first step to yield (resume).
    shuffle: shuffle each epoch (False: file order).
    repeat: cycle epochs forever (False: one pass, last batch padded).
    with_doc_ids: also yield doc_ids int64 [b, n].
  Yields:
    {tokens int32 [b, n], neighbours int32 [b, L, k, r], loss_mask int32
    [b, n]} (+ doc_ids).
  Raises:
    IncompleteCacheError: the split is not completely cached (the message
      names the directory and the command to run).
    ValueError: batch_size does not split over the hosts, or a host's
      shard is empty and `repeat` (an evaluation pass yields padding).
  """
  task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
  spec = cache_job.spec_of(task) or {}
  directory = cache_job.require_complete(task.name, cache_dir, (split,),
                                         spec or None)
  # Read from the directory just checked, whatever cache directories seqio
  # knows of (the registered Task is shared: it is not touched).
  source = cached_split(directory, split)
  stamp = (directory, cache_job.completion_stamp(directory))
  if batch_size % num_shards:
    raise ValueError(f"batch size {batch_size} does not split over "
                     f"{num_shards} hosts")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
  b = batch_size // num_shards
  total = int(source.num_input_examples(split))
  size = _shard_size(source, split, stamp, shard_index, num_shards, total)
  if size == 0 and repeat:
    raise ValueError(f"host {shard_index} of {num_shards} has no example of "
                     f"{task.name}:{split} ({total} in all)")
  converter = RetroFeatureConverter(with_doc_ids=with_doc_ids)
  n = spec.get("seq_len") or _first_length(source, split)
  lengths = converter.task_feature_lengths(n)

  offset = start_step * b
  first_epoch, skip = (offset // size, offset % size) if repeat else (0,
                                                                      offset)
  epochs = itertools.count(first_epoch) if repeat else [0]

  def blocks():
    for i, epoch in enumerate(epochs):
      yield from _epoch(source, split, converter, lengths, shuffle=shuffle,
                        seed=seed, epoch=epoch, shard_index=shard_index,
                        num_shards=num_shards,
                        shuffle_buffer_size=task.shuffle_buffer_size,
                        skip=skip if i == 0 else 0)

  rest = None  # Examples carried over to the next block (< b of them).
  last = None
  for block in blocks():
    last = block
    if rest is not None:
      block = {k: np.concatenate([rest[k], v]) for k, v in block.items()}
    count = len(block["tokens"])
    for start in range(0, count - b + 1, b):
      yield {k: v[start:start + b] for k, v in block.items()}
    left = count % b
    rest = {k: v[count - left:] for k, v in block.items()} if left else None
  if repeat:
    return
  yielded = -(-(size - min(skip, size)) // b)
  if rest is not None:  # The padded last batch.
    yield _pad(rest, b - len(rest["tokens"]))
  # Every host yields as many batches as the largest shard needs (hosts of
  # a multi-host evaluation step together): empty batches make up the rest,
  # all of them for a host whose shard is empty.
  largest = max(_shard_size(source, split, stamp, i, num_shards, total)
                for i in range(num_shards))
  if last is None:
    last = _first_block(source, split, converter, lengths)
  empty = {k: v[:0] for k, v in (rest or last).items()}
  for _ in range(-(-(largest - min(skip, largest)) // b) - yielded):
    yield _pad(empty, b)


def _first_length(source: seqio.FileDataSource, split: str) -> int:
  """n of a cached split, read from its first example (a Task registered
  without a spec, e.g. by other code)."""
  ds = source.get_dataset(split=split, shuffle=False)
  return int(next(iter(ds))["tokens"].shape[0])
