"""The errors of the corpus readers: bad input named by file and line.

Every reader reports bad input as a `CorpusError`, a ValueError whose message
is one line, "<file>:<line>: <cause>" or "<file>: <cause>", so that an entry
script (and anything that catches ValueError) can print it as it is. A
corpus whose files are missing altogether raises `NoCorpusFiles`, which is
also a FileNotFoundError, as the readers raised before.
"""

from __future__ import annotations

from typing import Optional

from retro_jax.core import cli


class CorpusError(cli.BadInput):
  """Bad corpus input: `where` (a file, or a corpus spec) and `line`
  (1-based, or None for the whole file) say where, `cause` what."""

  def __init__(self, where: str, cause: str, line: Optional[int] = None):
    self.where, self.cause, self.line = where, cause, line
    at = f"{where}:{line}" if line is not None else where
    super().__init__(f"{at}: {cause}")

  def __reduce__(self):
    # Beam and multiprocessing pickle exceptions: keep the fields.
    return (type(self), (self.where, self.cause, self.line))


class NoCorpusFiles(CorpusError, FileNotFoundError):
  """A corpus spec that matches no file to read (FileNotFoundError too)."""


def describe_passed_over(count: int, example: Optional[str],
                         folder: str = "") -> str:
  """'passed over 14 other files[ in <folder>], e.g. a.py'."""
  files = "file" if count == 1 else "files"
  return f"passed over {count} other {files}" + (
      f" in {folder}" if folder else "") + (
          f", e.g. {example}" if example else "")
