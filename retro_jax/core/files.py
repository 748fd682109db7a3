"""Whole-file writes and JSON, for local paths and gs:// URLs alike.

Every file retro_jax writes for another stage to read (DB records, index
metadata, cache stamps, evaluation results, run configs) goes through
`write_bytes`: the bytes go to a temporary name beside the target and are then
renamed into place, so a reader, or a rerun after a crash, sees either the
whole new file or the old one, never half of one. A stale temporary file
(`<name>.tmp.<pid>`) is harmless and is overwritten by the next write.

Paths are `etils.epath` paths: a local path, or a `gs://bucket/...` URL (read
and written through TensorFlow's GCS file system). On GCS an object upload is
itself atomic, so the rename is skipped there.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]
TMP_MARK = ".tmp."  # Temporary names: <name>.tmp.<pid>.


def is_local(path: PathLike) -> bool:
  """True for a path of this machine's file system (not gs:// and the like)."""
  return "://" not in os.fspath(path)


def tmp_name(path: PathLike) -> str:
  """The temporary name `write_bytes` writes `path` under before renaming."""
  return f"{os.fspath(path)}{TMP_MARK}{os.getpid()}"


def _fsync_dir(directory: str) -> None:
  """Makes a rename in `directory` durable: the rename is on disk only once
  the directory entry is (best effort: not every file system lets a
  directory be opened)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (see the module docstring), creating
  its parent folder if needed."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(path):
    target.write_bytes(data)
    return
  tmp = tmp_name(path)
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  commit(tmp, path)


def commit(tmp: PathLike, path: PathLike) -> None:
  """Renames a fully written (and fsynced) local temporary file into place,
  durably: for writers that stream a large file to `tmp_name(path)` first."""
  os.replace(os.fspath(tmp), os.fspath(path))
  _fsync_dir(os.path.dirname(os.path.abspath(os.fspath(path))))


def write_text(path: PathLike, text: str) -> None:
  """`write_bytes` of `text` in UTF-8."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, indent: Optional[int] = 1) -> None:
  """Writes `obj` as JSON (sorted keys, trailing newline), atomically."""
  write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def read_json(path: PathLike) -> Any:
  """The JSON value in `path`. A missing file raises FileNotFoundError; a
  file that is not JSON raises ValueError naming it."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"{os.fspath(path)}: no such file")
  text = p.read_text()
  try:
    return json.loads(text)
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: not valid JSON ({e})") from None


def read_json_or_none(path: PathLike) -> Optional[Any]:
  """The JSON value in `path`, or None when it is absent, unreadable or not
  JSON: for records whose absence means "not done yet", never an error."""
  try:
    return read_json(path)
  except (OSError, ValueError):
    return None
