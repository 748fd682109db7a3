"""An exported numpy shard of a cached Task: real batches without TensorFlow.

A benchmark host (a GPU box) may lack TensorFlow, seqio, ScaNN and Beam, yet
should time the step on real training batches, not synthetic ones.
scripts/export_batches.py reads the first N host batches of the cached Task
exactly as training does and writes them here as one `.npz`; `read` and
`source` give them back with numpy alone. This module imports only numpy,
json, itertools, os and the error type of `retro_jax.core.cli` (absl), never seqio or
TensorFlow, so it loads on such a host.

The file (numpy's npz, uncompressed: it is read at benchmark start, and its
bulk, the neighbour ids, compresses poorly):

  tokens      int32 [N, b, n]        N batches of b sequences of n tokens
  neighbours  int32 [N, b, L, k, r]  L = n / m chunks, k neighbours of r
  loss_mask   int32 [N, b, n]
  meta        a 0-d unicode array: JSON of where the batches came from
              (task_name, cache_dir, split, seq_len, batch_size,
              num_neighbours, neighbour_len, vocab_size, created_by, ...)
              plus "format" and "num_batches", which `write` sets.

It is written under a temporary name in the same folder and renamed into
place, so a half-written file is never taken for a complete one.
"""

from __future__ import annotations

import itertools
import json
import os
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import numpy as np

from retro_jax.core import cli

FORMAT = "retro_jax.numpy_shard/1"
KEYS = ("tokens", "neighbours", "loss_mask")   # What the training step reads.
META_KEY = "meta"
# Dimensions of one batch's arrays, by name (the stacked ones add N first).
_DIMS = {"tokens": ("b", "n"), "neighbours": ("b", "L", "k", "r"),
         "loss_mask": ("b", "n")}
# meta fields checked against the arrays' dimensions when present.
_META_DIMS = {"batch_size": "b", "seq_len": "n", "num_neighbours": "k",
              "neighbour_len": "r"}

Batch = Dict[str, np.ndarray]


class ShardError(cli.BadInput):
  """A numpy shard that cannot be written or read: `path` and `cause` (which
  names the field) make the one-line message "<path>: <cause>"."""

  def __init__(self, path: str, cause: str):
    self.path, self.cause = str(path), cause
    super().__init__(f"{path}: {cause}")

  def __reduce__(self):
    return (type(self), (self.path, self.cause))


class ShardExists(ShardError, FileExistsError):
  """`write` would replace an existing file without overwrite=True."""


def _dims(path: str, arrays: Mapping[str, np.ndarray], lead: Tuple[str, ...]
          ) -> Dict[str, int]:
  """{dimension name: size} of `arrays`, checked to agree; `lead` names the
  leading dimensions that the per-batch ones follow (() or ("N",))."""
  sizes: Dict[str, int] = {}
  for key in KEYS:
    a = arrays[key]
    names = lead + _DIMS[key]
    if a.ndim != len(names):
      raise ShardError(path, f"{key}: shape {a.shape} is not "
                       f"[{', '.join(names)}]")
    if a.dtype.kind not in "iu":
      raise ShardError(path, f"{key}: dtype {a.dtype} is not an integer type")
    for name, size in zip(names, a.shape):
      if sizes.setdefault(name, size) != size:
        raise ShardError(path, f"{key}: {name} = {size} in shape {a.shape} "
                         f"but {sizes[name]} in the arrays before it")
  if sizes["L"] == 0 or sizes["n"] % sizes["L"]:
    raise ShardError(path, f"neighbours: L = {sizes['L']} chunks do not "
                     f"divide the n = {sizes['n']} tokens")
  return sizes


def write(path: str, batches: Sequence[Mapping[str, np.ndarray]],
          meta: Mapping[str, Any], overwrite: bool = False) -> int:
  """Writes `batches` and `meta` to the npz file `path`; returns its bytes.

  Args:
    path: the file to write (its folder is made if missing).
    batches: N >= 1 dicts with at least KEYS: tokens int32 [b, n],
      neighbours int32 [b, L, k, r], loss_mask int32 [b, n], of the same
      shapes in every batch; other keys are not written.
    meta: JSON-serialisable facts about the batches (see the module
      docstring); "format" and "num_batches" are set here.
    overwrite: replace an existing file (default: raise ShardExists).
  Raises:
    ShardError naming the path and the field when the batches are not
    such dicts, `meta` is not JSON or a size in it (batch_size, seq_len,
    num_neighbours, neighbour_len) disagrees with the arrays; ShardExists
    if `path` exists.
  """
  path = os.fspath(path)
  if not batches:
    raise ShardError(path, "no batches to write")
  stacked = {}
  for key in KEYS:
    missing = [i for i, b in enumerate(batches) if key not in b]
    if missing:
      raise ShardError(path, f"{key}: missing from batch {missing[0]}")
    shapes = {np.shape(b[key]) for b in batches}
    if len(shapes) > 1:
      raise ShardError(path, f"{key}: batches of different shapes "
                       f"{sorted(shapes)}")
    stacked[key] = np.stack([np.asarray(b[key]) for b in batches])
  _check_meta(path, meta, _dims(path, stacked, ("N",)))
  try:
    text = json.dumps(dict(meta, format=FORMAT, num_batches=len(batches)),
                      sort_keys=True)
  except (TypeError, ValueError) as e:
    raise ShardError(path, f"meta: not JSON-serialisable ({e})") from e
  if not overwrite and os.path.exists(path):   # Before any work.
    raise ShardExists(path, "exists; pass overwrite=True (--overwrite) to "
                      "replace it")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"   # Not *.npz: never read.
  try:
    with open(tmp, "wb") as f:   # A file object: savez adds no ".npz".
      np.savez(f, **stacked, **{META_KEY: np.array(text)})
      f.flush()
      os.fsync(f.fileno())
    _publish(tmp, path, overwrite)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return os.path.getsize(path)


def _publish(tmp: str, path: str, overwrite: bool) -> None:
  """Moves the complete file `tmp` to `path` in one step."""
  if overwrite:
    os.replace(tmp, path)
    return
  try:   # A hard link fails if `path` appeared meanwhile: no clobbering.
    os.link(tmp, path)
  except FileExistsError as e:
    raise ShardExists(path, "exists; pass overwrite=True (--overwrite) to "
                      "replace it") from e
  except OSError:   # A filesystem without hard links: check, then rename.
    if os.path.exists(path):
      raise ShardExists(path, "exists; pass overwrite=True (--overwrite) "  # pylint: disable=raise-missing-from
                        "to replace it")
    os.replace(tmp, path)


def read(path: str) -> Tuple[Dict[str, Any], List[Batch]]:
  """(meta, batches) of the numpy shard `path`.

  Returns:
    meta: the dict `write` was given, with "format" and "num_batches".
    batches: N dicts {tokens int32 [b, n], neighbours int32 [b, L, k, r],
      loss_mask int32 [b, n]}, in the order they were written.
  Raises:
    ShardError, one line naming the file and the field, for a missing file,
    one that is not an npz (truncated, garbage), a missing array, arrays of
    inconsistent shapes, or meta that disagrees with them.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ShardError(path, "no such file (scripts/export_batches.py "
                     "writes one)")
  with open(path, "rb") as f:   # np.load would guess at other formats.
    magic = f.read(6)
  if magic.startswith(b"\x93NUMPY"):
    raise ShardError(path, "a single .npy array, not a numpy shard (npz)")
  if not magic.startswith(b"PK"):
    raise ShardError(path, "not a numpy shard: not an npz (zip) file" +
                     (" (empty)" if not magic else ""))
  try:
    with np.load(path, allow_pickle=False) as npz:
      for key in (META_KEY,) + KEYS:
        if key not in npz.files:
          raise ShardError(path, f"{key}: missing (the file holds "
                           f"{sorted(npz.files)}, a numpy shard "
                           f"{sorted((META_KEY,) + KEYS)})")
      arrays = {key: npz[key] for key in KEYS}
      meta_array = npz[META_KEY]
  except ShardError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # numpy and zipfile raise many types for a file that is not an npz
    # (ValueError, OSError, EOFError, BadZipFile, ...): all are bad input.
    cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ShardError(path, f"not a readable numpy shard (a damaged or "
                     f"truncated npz): "
                     f"{type(e).__name__}{': ' + cause if cause else ''}"
                     ) from e
  meta = _meta(path, meta_array)
  sizes = _dims(path, arrays, ("N",))
  if meta.get("format") != FORMAT:
    raise ShardError(path, f"meta: format {meta.get('format')!r} is not "
                     f"{FORMAT!r}")
  if meta.get("num_batches") != sizes["N"]:
    raise ShardError(path, f"meta: num_batches {meta.get('num_batches')!r} "
                     f"but the arrays hold {sizes['N']}")
  _check_meta(path, meta, sizes)
  batches = [{key: arrays[key][i] for key in KEYS}
             for i in range(sizes["N"])]
  return meta, batches


def _check_meta(path: str, meta: Mapping[str, Any],
                sizes: Mapping[str, int]) -> None:
  """Raises ShardError if a meta field disagrees with the arrays."""
  for field, dim in _META_DIMS.items():
    if field in meta and meta[field] != sizes[dim]:
      raise ShardError(path, f"meta: {field} {meta[field]!r} but the arrays "
                       f"have {dim} = {sizes[dim]}")


def _meta(path: str, meta_array: np.ndarray) -> Dict[str, Any]:
  if meta_array.ndim != 0 or meta_array.dtype.kind != "U":
    raise ShardError(path, f"meta: not a JSON string (a {meta_array.dtype} "
                     f"array of shape {meta_array.shape})")
  try:
    meta = json.loads(str(meta_array[()]))
  except ValueError as e:
    raise ShardError(path, f"meta: not JSON ({e})") from e
  if not isinstance(meta, dict):
    raise ShardError(path, f"meta: JSON {type(meta).__name__}, not an object")
  return meta


def cycle(batches: Sequence[Batch], start: int = 0) -> Iterator[Batch]:
  """batches[start % N], batches[(start + 1) % N], ... forever."""
  if not batches:   # Here, not at the first next().
    raise ValueError("numpy_shard.cycle: no batches")
  return (batches[step % len(batches)] for step in itertools.count(start))


def source(batches: Sequence[Batch]):
  """A training data source (`start_step -> iterator`, as
  `train_sources.DataSource`) over `batches`: step s trains batches[s % N],
  so a resumed run continues where it stopped."""
  batches = list(batches)
  cycle(batches)   # An empty list fails here, not at the first step.
  return lambda start_step: cycle(batches, start_step)
