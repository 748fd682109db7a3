"""File lists and streaming reads: glob patterns (local or gs://) to files,
plain, gzip and zstd files read a piece at a time, and splitting into lines.

Files are read a piece at a time (never whole in memory), and a truncated or
corrupt compressed file raises a `CorpusError` (a ValueError) naming it
instead of reading as a shorter corpus.
"""

from __future__ import annotations

import glob as globlib
import gzip
import os
import zlib
from typing import Iterable, Iterator, Sequence, Union

from etils import epath

from retro_jax.corpus import errors

_CHUNK_BYTES = 1 << 16  # Compressed bytes decompressed at a time.


def expand(paths: Union[str, os.PathLike, Sequence]) -> list:
  """Files matching `paths` (glob patterns or files), sorted per pattern."""
  patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  files = {}  # Ordered; a file matched twice is read once.
  for pattern in map(os.fspath, patterns):
    # A file's own name may hold glob characters ("[", "*"): taken as is.
    if "://" in pattern:                 # gs://bucket/pile/*.jsonl.zst
      matched = _expand_url(pattern)
    else:
      matched = [pattern] if os.path.isfile(pattern) else sorted(
          p for p in globlib.glob(pattern, recursive=True)
          if os.path.isfile(p))
    if not matched:
      raise errors.NoCorpusFiles(pattern, _why_nothing_matches(pattern))
    files.update(dict.fromkeys(matched))
  return list(files)


def _why_nothing_matches(pattern: str) -> str:
  """The cause of an empty match, with what the folder holds instead."""
  if "://" not in pattern and os.path.isdir(pattern):
    return ("no file matches: it is a folder; name its files with a glob "
            f"such as {os.path.join(pattern, '*.jsonl.zst')}")
  folder = os.path.dirname(pattern)
  if "://" in pattern or globlib.has_magic(folder):
    return "no file matches"
  if not os.path.isdir(folder or "."):
    return f"no file matches (no folder {folder})"
  others = sorted(name for name in os.listdir(folder or ".")
                  if os.path.isfile(os.path.join(folder, name)))
  passed_over = errors.describe_passed_over(
      len(others), others[0] if others else None, folder or ".")
  return f"no file matches ({passed_over})"


def _expand_url(pattern: str) -> list:
  """Files matching a URL pattern (gs://...), through etils.epath: the
  folder before the first glob character, globbed with the rest."""
  if epath.Path(pattern).is_file():
    return [pattern]
  parts = pattern.split("/")
  first = next((i for i, part in enumerate(parts)
                if any(c in part for c in "*?[")), len(parts))
  if first < 3:  # The bucket itself would be a pattern.
    raise ValueError(f"{pattern!r}: a bucket name cannot be a glob pattern")
  root = epath.Path("/".join(parts[:first]))
  rest = "/".join(parts[first:])
  return sorted(os.fspath(p) for p in root.glob(rest) if p.is_file()) if (
      rest and root.exists()) else []


def zstd_chunks(path: str) -> Iterator[bytes]:
  """The decompressed bytes of a zstd file (an empty file holds none)."""
  import zstandard  # pylint: disable=g-import-not-at-top
  # Allow the long windows of `zstd --long=31`; memory grows only if used.
  dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
  dobj, frames, empty = None, 0, True
  try:
    with epath.Path(path).open("rb") as f:   # Local, or gs://.
      while data := f.read(_CHUNK_BYTES):
        empty = False
        while data:  # A file may hold several frames, one after another.
          if dobj is None:
            dobj, frames = dctx.decompressobj(), frames + 1
          out = dobj.decompress(data)
          if out:
            yield out
          data, dobj = (dobj.unused_data, None) if dobj.eof else (b"", dobj)
  except zstandard.ZstdError as e:
    raise errors.CorpusError(path, f"corrupt zstd file ({e})") from None
  # The decompressor reports no error at a cut: without this check a
  # truncated file would read as a shorter corpus. An empty file is left to
  # the reader, which says so in its own words.
  if dobj is not None or not (frames or empty):
    raise errors.CorpusError(
        path, "truncated zstd file (it ends inside a frame)")


def decompressed_chunks(path: str) -> Iterator[bytes]:
  """The bytes of `path` a piece at a time, decompressed by its suffix."""
  if path.endswith(".zst"):
    yield from zstd_chunks(path)
    return
  try:
    with epath.Path(path).open("rb") as raw, (
        gzip.open(raw, "rb") if path.endswith(".gz") else raw) as f:
      while data := f.read(_CHUNK_BYTES):
        yield data
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise errors.CorpusError(
        path, f"truncated or corrupt gzip file ({e})") from None


def lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
  """Splits a byte stream at b"\\n" only (JSON text may hold U+2028 etc.)."""
  pending = []  # Pieces of a line longer than a chunk: joined once, not grown.
  for chunk in chunks:
    parts = chunk.split(b"\n")
    if len(parts) == 1:
      pending.append(chunk)
      continue
    pending.append(parts[0])
    yield b"".join(pending)
    yield from parts[1:-1]
    pending = [parts[-1]] if parts[-1] else []
  if pending:
    yield b"".join(pending)
