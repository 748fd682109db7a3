"""The standard-library corpus reader on a small fake library folder."""

import pytest

from retro_jax.corpus import sources


def _write(root, rel, data: bytes):
  path = root / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def test_reader_skips_and_counts_bad_files(tmp_path):
  _write(tmp_path, "good.py", b"print('hello')\n")
  _write(tmp_path, "pkg/also_good.py", "s = 'café'\n".encode())
  _write(tmp_path, "latin1.py", b"s = '\xe9t\xe9'\n")           # Not UTF-8.
  _write(tmp_path, "blank.py", b"   \n\n")
  _write(tmp_path, "site-packages/third_party.py", b"x = 1\n")   # Not stdlib.
  _write(tmp_path, "notes.txt", b"not python\n")
  skipped = {}
  docs = list(sources.python_stdlib(root=str(tmp_path), skipped=skipped))
  assert sorted(d.source for d in docs) == ["stdlib:good.py",
                                            "stdlib:pkg/also_good.py"]
  assert skipped == {"invalid_utf8": 1, "empty": 1}
  # Ids are stable functions of the path, the same on every run.
  again = list(sources.python_stdlib(root=str(tmp_path)))
  assert [d.doc_id for d in again] == [d.doc_id for d in docs]


def test_splits_partition_the_files(tmp_path):
  for i in range(60):
    _write(tmp_path, f"m{i}.py", f"x = {i}\n".encode())
  train = {d.source for d in sources.python_stdlib("train", root=str(tmp_path))}
  valid = {d.source for d in sources.python_stdlib("validation",
                                                   root=str(tmp_path))}
  assert not train & valid and len(train | valid) == 60 and valid


def test_bad_split_and_missing_root_raise(tmp_path):
  with pytest.raises(ValueError, match="unknown split"):
    list(sources.python_stdlib("test"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    list(sources.python_stdlib(root=str(tmp_path / "nope")))
