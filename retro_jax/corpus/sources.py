"""Corpus readers that yield documents with stable ids.

The embedded default corpus is the Python standard library's own `.py` files:
present on every machine with Python, real text nobody here wrote. Its files
are split into train / validation by a stable hash of their relative path, so
the split never changes when files are added or the corpus is re-read.

The other readers stream JSON lines (the Pile's `.jsonl.zst`, C4's
`.json.gz`), text folders and prepared TFDS datasets. A document's id is a
hash of its `source` (file and line, relative path, TFDS record id), the same
on every machine and run. Bad input raises naming file and line, or is skipped
and counted by reason: never silently dropped. `open_corpus` names a corpus in
one string ("jsonl:/data/pile/*.jsonl.zst") for scripts and configs.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import sysconfig
import types
from typing import (Any, Callable, Dict, Iterable, Iterator, Mapping,
                    MutableMapping, Optional, Sequence, Tuple, Union)

from retro_jax.corpus import errors
from retro_jax.corpus import json_lines
from retro_jax.corpus import streams

SPLITS = ("train", "validation")
LAYOUTS = ("auto", "pile", "c4", "plain")
ORDERS = ("path", "shuffled")   # File orders of the folder readers.
_NOT_STDLIB = ("site-packages", "dist-packages", "__pycache__")


@dataclasses.dataclass(frozen=True)
class Document:
  """One document of a corpus; readers give doc_id == stable_id(source)."""
  doc_id: int     # Stable 63-bit id.
  text: str
  source: str     # Where it came from, e.g. "stdlib:json/decoder.py".
  # Read-only metadata kept for per-subset evaluation, e.g. the Pile's
  # {"pile_set_name": "Github"} or C4's {"url": ...}. Left out of the hash so
  # a Document stays hashable.
  meta: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({}), hash=False)

  def __post_init__(self):
    if not isinstance(self.meta, types.MappingProxyType):
      object.__setattr__(self, "meta", types.MappingProxyType(dict(self.meta)))

  def __reduce__(self):
    # A mappingproxy cannot be pickled (Beam pickles elements): send a dict.
    return (Document, (self.doc_id, self.text, self.source, dict(self.meta)))


def stable_id(key: str) -> int:
  """A 63-bit id of a string that is the same on every machine and run."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def split_of(key: str, validation_percent: int = 5) -> str:
  """'validation' for about `validation_percent`% of keys, else 'train'."""
  bucket = int(hashlib.md5(key.encode()).hexdigest(), 16) % 100
  return "validation" if bucket < validation_percent else "train"


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _count(skipped: Optional[MutableMapping[str, int]], reason: str):
  if skipped is not None:
    skipped[reason] = skipped.get(reason, 0) + 1


def _check_split(split: Optional[str]):
  if split is not None and split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")


def _until(max_bytes: Optional[int], docs: Iterable[Document]
           ) -> Iterator[Document]:
  """`docs` up to the first that brings their UTF-8 size to `max_bytes`."""
  total = 0
  for doc in docs:
    yield doc
    total += len(doc.text.encode())
    if max_bytes is not None and total >= max_bytes:
      return


@dataclasses.dataclass
class _FolderTally:
  """What a folder reader saw, so that a folder that yields nothing can say
  why: files not read (by their name) and files read but skipped."""
  matched: int = 0            # Files whose names the reader takes.
  passed_over: int = 0        # Files it does not (other suffixes, hidden).
  example: Optional[str] = None  # The first of those, relative to the root.
  documents: int = 0
  skipped: Dict[str, int] = dataclasses.field(default_factory=dict)


def _file_paths(root: str, keep_dir: Callable[[str], bool],
                keep_name: Callable[[str], bool],
                tally: Optional[_FolderTally] = None
                ) -> Iterator[Tuple[str, str]]:
  """(path, path relative to `root`) of every kept file, in sorted order."""
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if keep_dir(d))
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      if keep_name(name):
        if tally is not None:
          tally.matched += 1
        yield path, os.path.relpath(path, root).replace(os.sep, "/")
      elif tally is not None:
        tally.passed_over += 1
        if tally.example is None:
          tally.example = os.path.relpath(path, root).replace(os.sep, "/")


def _file_documents(root: str, keep_dir: Callable[[str], bool],
                    keep_name: Callable[[str], bool], prefix: str,
                    split: Optional[str], validation_percent: int,
                    skipped: Optional[MutableMapping[str, int]],
                    order: str = "path",
                    tally: Optional[_FolderTally] = None
                    ) -> Iterator[Document]:
  """One document per kept file under `root`; the source is `prefix` + the
  relative path, the split is by relative path.

  `order` "path" walks sorted paths; "shuffled" sorts them by a stable hash,
  so that every `max_bytes` prefix is a uniform sample of the folder.
  """
  if order not in ORDERS:
    raise ValueError(f"unknown file order {order!r}; orders are {ORDERS}")
  tally = tally or _FolderTally()
  paths = _file_paths(root, keep_dir, keep_name, tally)
  if order == "shuffled":
    paths = sorted(paths, key=lambda p: hashlib.sha256(p[1].encode()).digest())
  for path, rel in paths:
    if split is not None and split_of(rel, validation_percent) != split:
      continue
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError:
      reason = "invalid_utf8"
    except OSError:
      reason = "unreadable"
    else:
      reason = "" if text.strip() else "empty"
    if reason:
      _count(skipped, reason)
      _count(tally.skipped, reason)
      continue
    tally.documents += 1
    yield Document(stable_id(prefix + rel), text, prefix + rel)


def python_stdlib(split: Optional[str] = None, root: Optional[str] = None,
                  validation_percent: int = 5,
                  max_bytes: Optional[int] = None,
                  skipped: Optional[MutableMapping[str, int]] = None,
                  order: str = "path") -> Iterator[Document]:
  """Documents of the standard library's `.py` files.

  Installed packages (site-packages) are not part of it. Files that are not
  valid UTF-8 are skipped.

  Args:
    split: "train", "validation" or None for all files.
    root: the library folder (default: this interpreter's).
    validation_percent: share of files held out for validation.
    max_bytes: stop after about this many bytes of text.
    skipped: if given, counts skipped files by reason ("invalid_utf8",
      "unreadable", "empty").
    order: "path" (sorted paths: a `max_bytes` prefix is the alphabetical
      head, a few packages) or "shuffled" (sorted by a stable hash of the
      path: a prefix is a uniform sample of the whole library).
  """
  _check_split(split)
  root = root or stdlib_root()
  if not os.path.isdir(root):
    raise errors.NoCorpusFiles(root, "the standard library folder does not "
                               "exist")
  yield from _until(max_bytes, _file_documents(
      root, lambda d: d not in _NOT_STDLIB,
      lambda name: name.endswith(".py"), "stdlib:", split, validation_percent,
      skipped, order))


# --- JSON lines: plain, gzip, zstd (streams.py) --------------------------------

def _names(files: Sequence[str], root: Optional[str]) -> list:
  """Machine-independent names of files: relative to `root`, or basenames."""
  if root is not None:
    names = [os.path.relpath(p, root).replace(os.sep, "/") for p in files]
  else:
    names = [os.path.basename(p) for p in files]
  seen = {}
  for path, name in zip(files, names):
    if name in seen:  # Would give two documents the same id.
      raise ValueError(f"{seen[name]} and {path} are both named {name!r}: "
                       "pass root= so names keep their folders")
    seen[name] = path
  return names


def _jsonl_documents(files: Sequence[str], names: Sequence[str],
                     text_field: str, layout: str, on_error: str,
                     split: Optional[str], validation_percent: int,
                     skipped: Optional[MutableMapping[str, int]]
                     ) -> Iterator[Document]:
  for path, name in zip(files, names):
    empty = True  # No line holds anything but whitespace, in any split.
    for number, line in json_lines.numbered_lines(path):
      blank = not line or line.isspace()  # isspace: no copy of a long line.
      empty = empty and blank
      source = f"{name}:{number}"
      # Filtering first keeps a small split cheap; a bad line is then reported
      # by the split that owns it.
      if split is not None and split_of(source, validation_percent) != split:
        continue
      if blank:
        _count(skipped, "blank_line")
        continue
      try:
        text, meta = json_lines.parse(line, text_field, layout)
      except json_lines.BadLine as e:
        reason, cause = e.args
        if on_error == "raise":
          raise errors.CorpusError(path, cause, number) from None
        _count(skipped, reason)
        continue
      if not text.strip():
        _count(skipped, "empty")
        continue
      yield Document(stable_id(source), text, source, meta)
    if empty:  # A cut download, or the wrong file: never a silent no-op.
      if on_error == "raise":
        raise errors.CorpusError(path, "empty file (no documents)")
      _count(skipped, "empty_file")


def jsonl(paths: Union[str, os.PathLike, Sequence], text_field: str = "text",
          layout: str = "auto",
          skipped: Optional[MutableMapping[str, int]] = None,
          on_error: str = "raise", split: Optional[str] = None,
          root: Optional[str] = None, validation_percent: int = 5,
          max_bytes: Optional[int] = None) -> Iterator[Document]:
  """Documents of JSON-lines files, one JSON object per line, streamed.

  `.zst` files are zstd (the Pile), `.gz` gzip (C4), others plain. A
  document's source is "name:line" (1-based), its id `stable_id(source)`;
  name is the path relative to `root`, else the basename (two files with one
  basename raise). Bad lines raise a `CorpusError` (a ValueError) naming file
  and line ("a.jsonl:3: not valid JSON (...)"), or with on_error="skip" are
  counted by reason: "malformed_json", "invalid_utf8" (also an escaped lone
  surrogate), "missing_text", "text_not_string". Empty texts and blank lines
  are always skipped ("empty", "blank_line"); a file without a non-blank line
  raises ("empty file"), or is counted as "empty_file". A cut or corrupt
  compressed file always raises, naming it and the whole lines before the
  damage. A pattern that matches no file raises `errors.NoCorpusFiles` (also
  a FileNotFoundError).

  Args:
    paths: a file or glob pattern ("**" recurses), or a sequence of them.
    text_field: the field holding the text.
    layout: which other fields become `Document.meta`: "pile" (the scalar
      entries of "meta": pile_set_name), "c4" (url, timestamp), "plain"
      (none) or "auto" (scalar top-level fields and "meta" entries).
    skipped: if given, counts skipped lines by reason.
    on_error: "raise" or "skip".
    split: "train", "validation" (by `split_of(source)`) or None for all.
    root: folder that file names are taken relative to.
    validation_percent: share of lines held out for validation.
    max_bytes: stop after about this many bytes of text.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; layouts are {LAYOUTS}")
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
  _check_split(split)
  files = streams.expand(paths)
  return _until(max_bytes, _jsonl_documents(
      files, _names(files, root), text_field, layout, on_error, split,
      validation_percent, skipped))


# --- Folders of text files ----------------------------------------------------

def text_folder(root: str, suffixes: Optional[Sequence[str]] = (".txt",),
                split: Optional[str] = None, validation_percent: int = 5,
                max_bytes: Optional[int] = None,
                skipped: Optional[MutableMapping[str, int]] = None
                ) -> Iterator[Document]:
  """One document per file under `root`, in sorted path order.

  A document's source is the file's path relative to the folder ("a/b.txt"),
  its id `stable_id(source)`. Hidden files and folders (".git") are left out.
  `root` may end in a file-name pattern, as the corpus spec
  "textdir:/data/code/*.py" does: the files so named in that folder and
  below are read, whatever `suffixes` says. A folder without a file to read
  raises a `CorpusError` that names what was looked for and the files passed
  over; so does one whose files of the split were all skipped.

  Args:
    root: the folder, optionally followed by "/<pattern>" (fnmatch: *, ?,
      [seq]) on file names.
    suffixes: file name endings to read; None or () for every file.
    split: "train", "validation" (by `split_of(source)`) or None for all.
    validation_percent: share of files held out for validation.
    max_bytes: stop after about this many bytes of text.
    skipped: if given, counts skipped files by reason ("invalid_utf8",
      "unreadable", "empty").
  """
  _check_split(split)
  folder, pattern = _folder_and_name_pattern(root)
  if not os.path.isdir(folder):
    raise errors.NoCorpusFiles(f"textdir:{root}", "the folder does not exist")
  suffixes = tuple(suffixes or ())
  if pattern:
    wanted = lambda name: fnmatch.fnmatchcase(name, pattern)
  else:
    wanted = lambda name: name.endswith(suffixes or ("",))  # All end in "".
  tally = _FolderTally()
  yield from _until(max_bytes, _file_documents(
      folder, lambda d: not d.startswith("."),
      lambda name: not name.startswith(".") and wanted(name),
      "", split, validation_percent, skipped, tally=tally))
  if not tally.matched:
    raise errors.NoCorpusFiles(f"textdir:{root}",
                               _no_files_read(folder, pattern, suffixes, tally))
  if not tally.documents and tally.skipped:
    reasons = ", ".join(f"{n} {reason}" for reason, n in
                        sorted(tally.skipped.items()))
    raise errors.CorpusError(
        f"textdir:{root}", f"no documents: every file read was skipped "
        f"({reasons})")


def _folder_and_name_pattern(root: str) -> Tuple[str, Optional[str]]:
  """"/data/code/*.py" -> ("/data/code", "*.py"); "/data/books" -> (itself,
  None). Only the last part of the path may hold a pattern."""
  folder, last = os.path.split(root.rstrip("/") or root)
  if any(c in last for c in "*?["):
    return folder or ".", last
  return root, None


def _no_files_read(folder: str, pattern: Optional[str],
                   suffixes: Sequence[str], tally: _FolderTally) -> str:
  """Why a folder gave no file: what was looked for, what was passed over,
  and how to name the files passed over ("textdir:<folder>/*.py")."""
  if pattern:
    looked_for, reads = f"files named {pattern}", ""
  elif suffixes:
    looked_for = " or ".join(suffixes) + " files"
    reads = "reads " + ", ".join(f"*{x}" for x in suffixes) + "; "
  else:
    looked_for, reads = "files", "reads every file but hidden ones; "
  if not tally.passed_over:
    return f"no {looked_for} ({reads}the folder is empty)"
  why = errors.describe_passed_over(tally.passed_over, tally.example)
  name = os.path.basename(tally.example or "")
  extension = os.path.splitext(name)[1]
  if extension and not name.startswith("."):
    why += f"; textdir:{folder}/*{extension} reads those"
  return f"no {looked_for} ({reads}{why})"


# --- Prepared TFDS datasets ---------------------------------------------------

def tfds_dataset(name: str, split: Optional[str] = "train",
                 data_dir: Optional[str] = None, text_field: str = "text",
                 max_bytes: Optional[int] = None,
                 skipped: Optional[MutableMapping[str, int]] = None
                 ) -> Iterator[Document]:
  """Documents of an already prepared TFDS dataset, e.g. "c4/en:3.0.1".

  Nothing is downloaded or prepared here. A document's source is
  "tfds:<name/config/version>:<tfds_id>" (the record's file and position), so
  ids do not depend on read order. The other text and scalar features (C4's
  url, timestamp) become `Document.meta`.

  Args:
    name: the dataset, "name[/config][:version]".
    split: a TFDS split ("train", "validation[:1%]"), or None for every split.
    data_dir: where it was prepared (default: TFDS's, ~/tensorflow_datasets).
    text_field: the feature holding the text.
    max_bytes: stop after about this many bytes of text.
    skipped: if given, counts skipped records ("invalid_utf8", "empty").
  """
  # TensorFlow takes seconds to import: only readers of TFDS pay for it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():  # Say so now, not at the first read.
    raise FileNotFoundError(f"TFDS dataset {name} is not prepared in "
                            f"{builder.data_dir}")
  splits = [split] if split is not None else sorted(builder.info.splits)

  def documents():
    for one_split in splits:
      dataset = builder.as_dataset(
          split=one_split, shuffle_files=False,
          read_config=tfds.ReadConfig(add_tfds_id=True))
      for record in dataset.as_numpy_iterator():
        try:
          text = record[text_field].decode("utf-8")
        except UnicodeDecodeError:
          _count(skipped, "invalid_utf8")
          continue
        if not text.strip():
          _count(skipped, "empty")
          continue
        source = f"tfds:{builder.info.full_name}:{record['tfds_id'].decode()}"
        scalars = {k: v for k, v in record.items() if getattr(v, "ndim", 0) == 0
                   and k not in (text_field, "tfds_id")}
        meta = {k: v.decode("utf-8", "replace") if isinstance(v, bytes)
                else str(v) for k, v in scalars.items()}
        yield Document(stable_id(source), text, source, meta)

  return _until(max_bytes, documents())


# --- One string per corpus ----------------------------------------------------

_KINDS: Dict[str, Callable[..., Iterator[Document]]] = {
    "jsonl": jsonl, "textdir": text_folder, "tfds": tfds_dataset}
KNOWN_SPECS = ("python_stdlib", "python_stdlib:shuffled", "jsonl:<glob>",
               "textdir:<path>[/<name pattern>]", "tfds:<name>[:<version>]")


def open_corpus(spec: str, **kwargs) -> Iterator[Document]:
  """The documents of a corpus named in one string, for scripts and configs.

  "python_stdlib" is the embedded default (sorted paths) and
  "python_stdlib:shuffled" the same files in a stable hashed order, so that a
  `max_bytes` prefix samples the whole library. "jsonl:/data/pile/*.jsonl.zst",
  "textdir:/data/books" (its *.txt files; "textdir:/data/code/*.py" names
  others) and "tfds:c4/en:3.0.1" pass the rest of the string to
  `jsonl`, `text_folder` and `tfds_dataset`. Keyword arguments (split,
  max_bytes, skipped, data_dir, ...) go to the reader.
  """
  kind, sep, arg = spec.partition(":")
  if spec == "python_stdlib":
    return python_stdlib(**kwargs)
  if kind == "python_stdlib" and arg in ORDERS:
    return python_stdlib(order=arg, **kwargs)
  if kind in _KINDS and sep and arg:
    return _KINDS[kind](arg, **kwargs)
  raise ValueError(f"unknown corpus {spec!r}; known kinds: "
                   f"{', '.join(KNOWN_SPECS)}")


def text_source(corpus: str, split: Optional[str] = None, max_bytes: int = 0,
                meta: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
  """The record that names a slice of a corpus: its spec, split (None: every
  split), byte cap (0: all) and meta filter. The DB keeps one per part, a
  Task compares its training split with the DB's "train" part, and
  `source_documents` reads it back."""
  return {"corpus": corpus, "split": split, "max_bytes": int(max_bytes or 0),
          "meta": {str(k): str(v) for k, v in dict(meta or {}).items()}}


def source_documents(source: Mapping[str, Any],
                     skipped: Optional[MutableMapping[str, int]] = None
                     ) -> Iterator[Document]:
  """The documents of a `text_source` record, in the reader's order: the
  first `max_bytes` of the split, then those whose meta matches."""
  meta = source.get("meta") or {}
  for doc in open_corpus(source["corpus"], split=source.get("split"),
                         max_bytes=source.get("max_bytes") or None,
                         skipped=skipped):
    if all(doc.meta.get(k) == v for k, v in meta.items()):
      yield doc
