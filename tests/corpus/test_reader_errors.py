"""Bad corpus input is one line that names the file, the line and the cause.

The six inputs of issue 21 (a line that is not JSON, invalid UTF-8, a line
without "text", a cut .jsonl.zst, an empty file, a folder without files to
read), read by the real readers from real files (real zstd). The scripts
that print these messages run in tests/test_bad_input.py.
"""

import json
import pickle
import random

import pytest
import zstandard

from retro_jax.corpus import errors
from retro_jax.corpus import sources


def _line(**fields) -> bytes:
  return json.dumps(fields).encode()


def _good_lines(count: int) -> list:
  # Text that compresses poorly: zstd's blocks (128 KiB of input) then come
  # out as the file is read, so a cut one still yields its first lines.
  rng = random.Random(0)
  return [_line(text=f"document {i} " + " ".join(
      f"{rng.getrandbits(64):x}" for _ in range(60))) for i in range(count)]


def _error(spec: str, **kwargs) -> errors.CorpusError:
  with pytest.raises(errors.CorpusError) as info:
    list(sources.open_corpus(spec, **kwargs))
  message = str(info.value)
  assert "\n" not in message and isinstance(info.value, ValueError)
  return info.value


def test_a_line_that_is_not_json_names_file_line_and_cause(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(b"\n".join(_good_lines(2) + [b"not json", _line(text="d")]))
  error = _error(f"jsonl:{path}")
  assert str(error) == (f"{path}:3: not valid JSON (Expecting value: "
                        "column 1)")
  assert (error.where, error.line) == (str(path), 3)


def test_invalid_utf8_names_the_byte_and_its_column(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(b"\n".join(_good_lines(4) + [b'{"text": "caf\xff"}']))
  assert str(_error(f"jsonl:{path}")) == (
      f"{path}:5: not valid UTF-8 (byte 0xff at column 14)")


def test_a_missing_field_lists_the_fields_the_line_has(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(b"\n".join(
      _good_lines(2) + [_line(id=3, meta={"lang": "en"}), b"[1, 2]"]))
  assert str(_error(f"jsonl:{path}")) == (
      f'{path}:3: no "text" field (has: id, meta)')
  assert str(_error(f"jsonl:{path}", text_field="id")) == (
      f'{path}:1: no "id" field (has: text)')
  skipped = {}
  docs = list(sources.jsonl(str(path), on_error="skip", skipped=skipped))
  assert len(docs) == 2 and skipped == {"missing_text": 2}
  path.write_bytes(b"[1, 2]\n")
  assert str(_error(f"jsonl:{path}")) == (
      f'{path}:1: not a JSON object (a list), so no "text" field')


def test_a_cut_zstd_file_says_how_many_whole_lines_came_first(tmp_path):
  lines = _good_lines(600)  # About 600 KB: 5 zstd blocks.
  whole = zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n")
  path = tmp_path / "x.jsonl.zst"
  path.write_bytes(whole[:len(whole) // 2])
  read = []
  with pytest.raises(errors.CorpusError) as info:
    for doc in sources.open_corpus(f"jsonl:{path}"):
      read.append(doc)
  # Every whole line before the cut was a document; the cut one was not.
  assert 0 < len(read) < 600
  assert str(info.value) == (
      f"{path}: truncated zstd file (it ends inside a frame) after "
      f"{len(read)} lines")
  assert [d.source for d in read] == [f"x.jsonl.zst:{i}"
                                      for i in range(1, len(read) + 1)]
  # Skipping bad lines never skips damage: the file still raises.
  with pytest.raises(errors.CorpusError, match="truncated zstd"):
    list(sources.jsonl(str(path), on_error="skip"))


@pytest.mark.parametrize("name,data", [
    ("zero_bytes.jsonl", b""),
    ("blank_lines.jsonl", b"\n \n\t\r\n"),
    ("zero_bytes.jsonl.zst", b""),
    ("no_text.jsonl.zst", zstandard.ZstdCompressor().compress(b"")),
])
def test_an_empty_file_says_so(tmp_path, name, data):
  path = tmp_path / name
  path.write_bytes(data)
  assert str(_error(f"jsonl:{path}")) == f"{path}: empty file (no documents)"
  skipped = {}
  assert not list(sources.jsonl(str(path), on_error="skip", skipped=skipped))
  assert skipped.get("empty_file") == 1
  # Any split reports it: no line belongs to one.
  with pytest.raises(errors.CorpusError, match="empty file"):
    list(sources.jsonl(str(path), split="validation"))


def test_an_empty_file_among_good_ones_is_named(tmp_path):
  (tmp_path / "a.jsonl").write_bytes(b"\n".join(_good_lines(3)))
  (tmp_path / "b.jsonl").write_bytes(b"")
  read = []
  with pytest.raises(errors.CorpusError) as info:
    for doc in sources.open_corpus(f"jsonl:{tmp_path}/*.jsonl"):
      read.append(doc)
  assert len(read) == 3
  assert str(info.value) == f"{tmp_path}/b.jsonl: empty file (no documents)"


def test_a_folder_without_text_files_names_suffixes_and_files_passed_over(
    tmp_path):
  for i in range(14):
    (tmp_path / f"m{i:02d}.py").write_text("x = 1\n")
  (tmp_path / ".hidden.txt").write_text("hidden\n")
  error = _error(f"textdir:{tmp_path}")
  assert isinstance(error, errors.NoCorpusFiles)
  assert isinstance(error, FileNotFoundError)
  assert str(error) == (f"textdir:{tmp_path}: no .txt files (reads *.txt; "
                        "passed over 15 other files, e.g. .hidden.txt)")
  docs = list(sources.text_folder(str(tmp_path), suffixes=(".py",)))
  assert len(docs) == 14
  with pytest.raises(errors.NoCorpusFiles) as info:
    list(sources.text_folder(str(tmp_path), suffixes=(".md", ".rst")))
  assert str(info.value) == (
      f"textdir:{tmp_path}: no .md or .rst files (reads *.md, *.rst; "
      "passed over 15 other files, e.g. .hidden.txt)")
  (tmp_path / "sub").mkdir()
  with pytest.raises(errors.NoCorpusFiles) as info:
    list(sources.text_folder(str(tmp_path / "sub")))
  assert str(info.value) == (f"textdir:{tmp_path / 'sub'}: no .txt files "
                             "(reads *.txt; the folder is empty)")


def test_a_glob_that_matches_nothing_says_what_the_folder_holds(tmp_path):
  for i in range(14):
    (tmp_path / f"m{i:02d}.py").write_text("x = 1\n")
  with pytest.raises(errors.NoCorpusFiles) as info:
    list(sources.open_corpus(f"jsonl:{tmp_path}/*.jsonl"))
  assert str(info.value) == (
      f"{tmp_path}/*.jsonl: no file matches (passed over 14 other files in "
      f"{tmp_path}, e.g. m00.py)")
  with pytest.raises(errors.NoCorpusFiles, match="it is a folder"):
    list(sources.open_corpus(f"jsonl:{tmp_path}"))
  with pytest.raises(errors.NoCorpusFiles, match="no folder"):
    list(sources.open_corpus(f"jsonl:{tmp_path}/gone/*.jsonl"))


def test_a_folder_whose_files_are_all_skipped_says_why(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"caf\xe9\n")
  (tmp_path / "b.txt").write_bytes(b"  \n")
  with pytest.raises(errors.CorpusError) as info:
    list(sources.open_corpus(f"textdir:{tmp_path}"))
  assert str(info.value) == (
      f"textdir:{tmp_path}: no documents: every file read was skipped "
      "(1 empty, 1 invalid_utf8)")
  (tmp_path / "c.txt").write_text("text\n")
  skipped = {}
  docs = list(sources.text_folder(str(tmp_path), skipped=skipped))
  assert [d.source for d in docs] == ["c.txt"]
  assert skipped == {"empty": 1, "invalid_utf8": 1}


def test_errors_survive_pickling_as_beam_sends_them():
  for error in (errors.CorpusError("a.jsonl", "not valid JSON (x)", 3),
                errors.NoCorpusFiles("textdir:d", "no .txt files")):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert (back.where, back.cause, back.line) == (
        error.where, error.cause, error.line)


def test_json_lines_parse_keeps_the_layouts_meta_and_names_bad_lines():
  from retro_jax.corpus import json_lines  # pylint: disable=g-import-not-at-top
  line = json.dumps({"text": "hi", "url": "u", "meta": {"pile_set_name": "X",
                                                        "n": 3}}).encode()
  assert json_lines.parse(line, "text", "plain") == ("hi", {})
  assert json_lines.parse(line, "text", "pile") == (
      "hi", {"pile_set_name": "X", "n": "3"})
  assert json_lines.parse(line, "text", "c4") == ("hi", {"url": "u"})
  with pytest.raises(json_lines.BadLine, match='no "body" field'):
    json_lines.parse(line, "body", "plain")
  with pytest.raises(json_lines.BadLine, match="byte 0xff at column 3"):
    json_lines.parse(b'{"\xff', "text", "plain")
