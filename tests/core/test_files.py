"""retro_jax.core.files: whole-file writes that a crash cannot leave half
done, and JSON that names the file it could not read."""

import os

import pytest

from retro_jax.core import files


def test_write_json_round_trip_creates_parents(tmp_path):
  path = tmp_path / "a" / "b" / "record.json"
  files.write_json(path, {"z": 1, "a": [1, 2]})
  assert files.read_json(path) == {"z": 1, "a": [1, 2]}
  text = path.read_text()
  assert text.endswith("\n") and text.index('"a"') < text.index('"z"')
  assert os.listdir(path.parent) == ["record.json"]  # No temporary left.


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  """The new bytes go to a temporary name first: if the rename never
  happens (a crash), readers still see the whole old file."""
  path = tmp_path / "record.json"
  files.write_json(path, {"version": 1})

  def crash(src, dst):
    raise OSError("killed before the rename")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError, match="killed"):
    files.write_json(path, {"version": 2})
  assert files.read_json(path) == {"version": 1}
  stale = [n for n in os.listdir(tmp_path) if files.TMP_MARK in n]
  assert stale == [os.path.basename(files.tmp_name(path))]


def test_read_json_errors_name_the_file(tmp_path):
  missing = tmp_path / "missing.json"
  with pytest.raises(FileNotFoundError, match="missing.json"):
    files.read_json(missing)
  broken = tmp_path / "broken.json"
  broken.write_text('{"a": ')
  with pytest.raises(ValueError, match="broken.json: not valid JSON"):
    files.read_json(broken)
  assert files.read_json_or_none(missing) is None
  assert files.read_json_or_none(broken) is None


def test_write_bytes_and_text(tmp_path):
  files.write_bytes(tmp_path / "b.bin", b"\x00\x01")
  files.write_text(tmp_path / "t.txt", "é\n")
  assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
  assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()
  assert files.read_json_or_none(tmp_path / "t.txt") is None  # Not JSON.


def test_only_local_paths_are_renamed():
  assert files.is_local("/tmp/x") and files.is_local("runs/db")
  assert not files.is_local("gs://bucket/db/manifest.json")
