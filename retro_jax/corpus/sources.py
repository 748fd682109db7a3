"""Corpus readers that yield documents with stable ids.

The embedded default corpus is the Python standard library's own `.py` files:
present on every machine with Python, real text nobody here wrote. Its files
are split into train / validation by a stable hash of their relative path, so
the split never changes when files are added or the corpus is re-read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from typing import Iterator, MutableMapping, Optional

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Document:
  doc_id: int     # Stable 63-bit id (hash of the source and path).
  text: str
  source: str     # Where it came from, e.g. "stdlib:json/decoder.py".


def stable_id(key: str) -> int:
  """A 63-bit id of a string that is the same on every machine and run."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def split_of(key: str, validation_percent: int = 5) -> str:
  """'validation' for about `validation_percent`% of keys, else 'train'."""
  bucket = int(hashlib.md5(key.encode()).hexdigest(), 16) % 100
  return "validation" if bucket < validation_percent else "train"


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def python_stdlib(split: Optional[str] = None, root: Optional[str] = None,
                  validation_percent: int = 5,
                  max_bytes: Optional[int] = None,
                  skipped: Optional[MutableMapping[str, int]] = None
                  ) -> Iterator[Document]:
  """Documents of the standard library's `.py` files, in sorted path order.

  Installed packages (site-packages) are not part of it. Files that are not
  valid UTF-8 are skipped.

  Args:
    split: "train", "validation" or None for all files.
    root: the library folder (default: this interpreter's).
    validation_percent: share of files held out for validation.
    max_bytes: stop after about this many bytes of text.
    skipped: if given, counts skipped files by reason ("invalid_utf8",
      "unreadable", "empty").
  """
  def skip(reason):
    if skipped is not None:
      skipped[reason] = skipped.get(reason, 0) + 1

  if split is not None and split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
  root = root or stdlib_root()
  if not os.path.isdir(root):
    raise FileNotFoundError(f"standard library folder {root} does not exist")
  total = 0
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in
                         ("site-packages", "dist-packages", "__pycache__"))
    for name in sorted(filenames):
      if not name.endswith(".py"):
        continue
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, root).replace(os.sep, "/")
      if split is not None and split_of(rel, validation_percent) != split:
        continue
      try:
        with open(path, encoding="utf-8") as f:
          text = f.read()
      except UnicodeDecodeError:
        skip("invalid_utf8")
        continue
      except OSError:
        skip("unreadable")
        continue
      if not text.strip():
        skip("empty")
        continue
      yield Document(stable_id("stdlib:" + rel), text, "stdlib:" + rel)
      total += len(text.encode())
      if max_bytes is not None and total >= max_bytes:
        return
