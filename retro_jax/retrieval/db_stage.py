"""A retrieval DB on gs:// (or any URL etils.epath reads): staged to local disk.

The DB is read through memory maps (db.py, the index, the neighbour table),
and a memory map needs a local file. So a DB whose `db_dir` is a URL is
copied once per host to a local staging folder, its checksums verified, and
every reader opens that copy; a DB whose `db_dir` is local is used in place.
The build works the other way round: it writes a local folder and publishes
it to the URL, the manifest last, so that a reader of the bucket sees a
finalized DB or none (`manifest.json` is what finalizes a DB).

  local = db_stage.local_dir("gs://bucket/db")   # ~/.cache/... on this host
  db_stage.publish(local_build_dir, "gs://bucket/db")

The staging folder is `$RETRO_JAX_STAGE_DIR` (default
~/.cache/retro_jax/stage), one subfolder per URL. A copy is reused while
the bucket's manifest is byte-identical to the one it was staged from; any
change (a rebuild, an edit) stages again, reusing files of the same size
and checksum. Processes of one host stage under a file lock: the first
copies, the others wait and reuse its copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from typing import Dict, Iterator, List, Tuple

from etils import epath

from retro_jax.core import files
from retro_jax.retrieval import db_format as fmt

STAGE_ENV = "RETRO_JAX_STAGE_DIR"
STAMP = ".staged"   # In a staged copy: the sha256 of the manifest it holds.


def stage_root() -> str:
  """Where URLs are staged on this host."""
  return os.environ.get(STAGE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "retro_jax", "stage")


def staging_dir(url: str, kind: str = "db") -> str:
  """The local folder for `url`: a readable name plus a hash of the URL, so
  two buckets' `db` folders never share one."""
  name = os.path.basename(url.rstrip("/")) or "root"
  digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
  return os.path.join(stage_root(), f"{kind}-{name}-{digest}")


@contextlib.contextmanager
def _host_lock(path: str) -> Iterator[None]:
  """An exclusive lock of this host's processes on `path`.lock."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _remote_files(url: str) -> List[Tuple[str, epath.Path]]:
  """(relative path, path) of every file under `url`, temporary ones left
  out (a writer's `<name>.tmp.<pid>` is not part of the DB)."""
  root = epath.Path(url)
  out, folders = [], [root]
  while folders:   # One listing per folder (gs:// has no recursive glob).
    for p in folders.pop().iterdir():
      if p.is_dir():
        folders.append(p)
      elif fmt.TMP_MARK not in p.name:
        out.append((os.path.relpath(os.fspath(p), os.fspath(root)), p))
  return sorted(out)


def _shard_records(manifest: Dict) -> Dict[str, Dict]:
  """{relative path: {"sha256", "bytes"}} of the DB's shard files."""
  return {os.path.join(fmt.SHARDS, s["name"], fname): record
          for s in manifest.get("shards", [])
          for fname, record in s["files"].items()}


def local_dir(db_dir: str) -> str:
  """`db_dir` itself when it is local; else its staged copy on this host.

  Raises:
    IncompleteDBError: the URL holds no finalized DB (no manifest), or a
      staged shard file fails the checksum of the manifest (named).
  """
  if files.is_local(db_dir):
    return db_dir
  try:
    manifest_bytes = (epath.Path(db_dir) / fmt.MANIFEST).read_bytes()
  except (FileNotFoundError, OSError) as e:
    raise fmt.IncompleteDBError(
        f"{db_dir} is not a finalized retrieval DB (no {fmt.MANIFEST}: "
        f"{type(e).__name__}); build it with scripts/build_db.py") from None
  stamp = fmt.sha256_bytes(manifest_bytes)
  local = staging_dir(db_dir)
  with _host_lock(local):
    stamp_path = os.path.join(local, STAMP)
    if os.path.isfile(stamp_path) and open(stamp_path).read() == stamp:
      return local
    _stage(db_dir, local, manifest_bytes)
    files.write_text(stamp_path, stamp)
  return local


def _stage(url: str, local: str, manifest_bytes: bytes) -> None:
  """Copies the DB at `url` to `local` (manifest last) and verifies every
  shard file's sha256 against the manifest."""
  import json  # pylint: disable=g-import-not-at-top
  manifest = json.loads(manifest_bytes)
  records = _shard_records(manifest)
  if os.path.exists(os.path.join(local, STAMP)):
    os.remove(os.path.join(local, STAMP))
  manifest_path = os.path.join(local, fmt.MANIFEST)
  if os.path.exists(manifest_path):  # Unfinalized while it is restaged.
    os.remove(manifest_path)
  wanted = set()
  for rel, src in _remote_files(url):
    if rel == fmt.MANIFEST or rel == STAMP:
      continue
    wanted.add(rel)
    dst = os.path.join(local, rel)
    record = records.get(rel)
    if record and not fmt.file_problem(dst, record, verify=True):
      continue                    # Staged before, unchanged.
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = files.tmp_name(dst)
    with src.open("rb") as fin, open(tmp, "wb") as fout:
      shutil.copyfileobj(fin, fout, 1 << 22)
      fout.flush()
      os.fsync(fout.fileno())
    files.commit(tmp, dst)
  for rel, record in records.items():
    problem = fmt.file_problem(os.path.join(local, rel), record, verify=True)
    if problem:
      raise fmt.IncompleteDBError(f"{url} is damaged: {problem}")
  for dirpath, _, names in os.walk(local):   # Files of an older version.
    for name in names:
      rel = os.path.relpath(os.path.join(dirpath, name), local)
      if rel not in wanted and rel not in (STAMP, fmt.MANIFEST):
        os.remove(os.path.join(dirpath, name))
  files.write_bytes(manifest_path, manifest_bytes)


def publish(local: str, url: str) -> None:
  """Uploads the finalized DB folder `local` to `url`.

  The bucket's manifest is removed first and uploaded last, so that while
  the copy is under way the URL reads as an unfinished DB, never as a DB
  whose files belong to two builds. Files of an older build that this one
  lacks are deleted.
  """
  src_manifest = os.path.join(local, fmt.MANIFEST)
  if not os.path.isfile(src_manifest):
    raise fmt.IncompleteDBError(f"{local} is not finalized: nothing to "
                                f"publish to {url}")
  root = epath.Path(url)
  (root / fmt.MANIFEST).unlink(missing_ok=True)
  local_files = set()
  for dirpath, _, names in os.walk(local):
    for name in sorted(names):
      rel = os.path.relpath(os.path.join(dirpath, name), local)
      if rel in (fmt.MANIFEST, STAMP) or fmt.TMP_MARK in name:
        continue
      local_files.add(rel)
      dst = root / rel
      dst.parent.mkdir(parents=True, exist_ok=True)
      with open(os.path.join(dirpath, name), "rb") as fin, dst.open(
          "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
  if root.exists():
    for rel, p in _remote_files(url):
      if rel not in local_files and rel != fmt.MANIFEST:
        p.unlink(missing_ok=True)
  with open(src_manifest, "rb") as f:
    (root / fmt.MANIFEST).write_bytes(f.read())
