"""Corpus readers on small files written into tmp_path: a fake standard
library, Pile-style .jsonl.zst, C4-style .json.gz, plain .jsonl, a text
folder and a tiny TFDS dataset prepared offline."""

import gzip
import json
import pickle

import pytest

from retro_jax.corpus import sources
from retro_jax.corpus import streams


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


def test_shuffled_order_samples_every_package_and_keeps_the_split(tmp_path):
  for package in ("aaa", "mmm", "zzz"):
    for i in range(20):
      _write(tmp_path, f"{package}/m{i}.py", f"x = {i}  # {package}\n".encode())
  root = str(tmp_path)
  in_path_order = [d.source for d in sources.python_stdlib(root=root)]
  shuffled = [d.source for d in sources.python_stdlib(root=root,
                                                      order="shuffled")]
  assert in_path_order == sorted(in_path_order)
  assert sorted(shuffled) == in_path_order and shuffled != in_path_order
  # The order is a function of the paths alone: the same on every run.
  assert shuffled == [d.source for d in sources.open_corpus(
      "python_stdlib:shuffled", root=root)]
  # A small prefix draws from every package, not only the alphabetical head.
  head = list(sources.python_stdlib(root=root, order="shuffled",
                                    max_bytes=15 * 15))
  assert {d.source.split(":")[1].split("/")[0] for d in head} == {
      "aaa", "mmm", "zzz"}
  for split in sources.SPLITS:   # The split of a file does not depend on order.
    assert sorted(d.source for d in sources.python_stdlib(
        split, root=root, order="shuffled")) == [
            d.source for d in sources.python_stdlib(split, root=root)]
  with pytest.raises(ValueError, match="unknown file order"):
    list(sources.python_stdlib(root=root, order="random"))
  with pytest.raises(ValueError, match="python_stdlib:shuffled"):
    sources.open_corpus("python_stdlib:random")


# --- JSON lines ---------------------------------------------------------------

def _zst(path, lines, frames=1):
  """Writes `lines` (bytes, no newlines) as zstd, split into `frames` frames."""
  import zstandard  # pylint: disable=g-import-not-at-top
  data = b"".join(line + b"\n" for line in lines)
  cut = [len(data) * i // frames for i in range(frames + 1)]
  path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(data[a:b])
                            for a, b in zip(cut, cut[1:])))
  return path


def _gz(path, lines):
  path.write_bytes(gzip.compress(b"".join(line + b"\n" for line in lines)))
  return path


def _obj(**fields) -> bytes:
  return json.dumps(fields).encode()


PILE = [_obj(text=f"def f{i}(): return {i}  # café",
             meta={"pile_set_name": name})
        for i, name in enumerate(["Github", "ArXiv", "Pile-CC", "Github",
                                  "ArXiv"])]


def test_pile_zst_keeps_subsets_and_stable_ids(tmp_path, monkeypatch):
  path = _zst(tmp_path / "00.jsonl.zst", PILE, frames=2)
  docs = list(sources.jsonl(str(path)))
  assert [d.meta["pile_set_name"] for d in docs] == [
      "Github", "ArXiv", "Pile-CC", "Github", "ArXiv"]
  assert [d.source for d in docs] == [f"00.jsonl.zst:{i}" for i in range(1, 6)]
  assert docs[2].text == "def f2(): return 2  # café"
  assert all(d.doc_id == sources.stable_id(d.source) for d in docs)
  assert len({d.doc_id for d in docs}) == 5
  # The same documents whatever the read size: lines and frames cut anywhere.
  monkeypatch.setattr(streams, "_CHUNK_BYTES", 7)
  assert list(sources.jsonl([str(path), str(tmp_path / "*.zst")])) == docs
  # Names are machine-independent: the same ids from another folder.
  moved = tmp_path / "elsewhere"
  moved.mkdir()
  (moved / "00.jsonl.zst").write_bytes(path.read_bytes())
  assert [d.doc_id for d in sources.jsonl(str(moved / "*.zst"))] == [
      d.doc_id for d in docs]


def test_c4_gzip_keeps_url(tmp_path):
  lines = [_obj(text=f"Page {i}.", url=f"https://example.com/{i}",
                timestamp="2019-04-25T12:57:54Z") for i in range(3)]
  _gz(tmp_path / "c4-train.00000-of-01024.json.gz", lines)
  docs = list(sources.jsonl(str(tmp_path / "c4-*.json.gz"), layout="c4"))
  assert [d.meta["url"] for d in docs] == [
      f"https://example.com/{i}" for i in range(3)]
  assert dict(docs[0].meta) == {"url": "https://example.com/0",
                                "timestamp": "2019-04-25T12:57:54Z"}
  assert list(sources.jsonl(str(tmp_path / "c4-*.json.gz"))) == docs  # auto


def test_plain_jsonl_fields_and_layouts(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_bytes(_obj(content="one", id=7, meta={"lang": "en"}) + b"\n" +
                   _obj(content="two\u2028still two", id=8) + b"\r\n")
  docs = list(sources.jsonl(str(path), text_field="content"))
  assert [d.text for d in docs] == ["one", "two\u2028still two"]
  assert dict(docs[0].meta) == {"id": "7", "lang": "en"}
  plain = list(sources.jsonl(str(path), text_field="content", layout="plain"))
  assert [dict(d.meta) for d in plain] == [{}, {}]
  assert dict(next(sources.jsonl(str(path), text_field="content",
                                 layout="pile")).meta) == {"lang": "en"}
  with pytest.raises(ValueError, match="unknown layout"):
    sources.jsonl(str(path), layout="xml")
  with pytest.raises(FileNotFoundError, match="no file matches"):
    sources.jsonl(str(tmp_path / "*.zst"))


def test_same_basename_needs_root(tmp_path):
  for sub in ("train", "val"):
    (tmp_path / sub).mkdir()
    (tmp_path / sub / "00.jsonl").write_bytes(_obj(text=sub) + b"\n")
  pattern = str(tmp_path / "*" / "00.jsonl")
  with pytest.raises(ValueError, match="both named '00.jsonl'"):
    sources.jsonl(pattern)
  docs = list(sources.jsonl(pattern, root=str(tmp_path)))
  assert [d.source for d in docs] == ["train/00.jsonl:1", "val/00.jsonl:1"]


BAD_LINES = {
    "malformed_json": b'{"text": "cut',
    "missing_text": _obj(body="no text field"),
    "text_not_string": _obj(text=["a", "list"]),
    "invalid_utf8": b'{"text": "caf\xe9"}',
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_raises_naming_file_and_line_or_is_counted(tmp_path, reason):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b"\n".join([_obj(text="a"), _obj(text="b"),
                               BAD_LINES[reason], _obj(text="d")]) + b"\n")
  with pytest.raises(ValueError, match=rf"bad\.jsonl:3: "):
    list(sources.jsonl(str(path)))
  skipped = {}
  docs = list(sources.jsonl(str(path), on_error="skip", skipped=skipped))
  assert [d.text for d in docs] == ["a", "b", "d"]
  assert [d.source for d in docs] == ["bad.jsonl:1", "bad.jsonl:2",
                                      "bad.jsonl:4"]
  assert skipped == {reason: 1}


def test_lone_surrogate_and_non_object_lines(tmp_path):
  path = tmp_path / "odd.jsonl"
  path.write_bytes(b'{"text": "caf\\udce9"}\n[1, 2]\n')
  skipped = {}
  assert not list(sources.jsonl(str(path), on_error="skip", skipped=skipped))
  assert skipped == {"invalid_utf8": 1, "missing_text": 1}
  with pytest.raises(ValueError, match=":1: text holds a lone surrogate"):
    list(sources.jsonl(str(path)))


def test_empty_texts_and_blank_lines_are_skipped_and_counted(tmp_path):
  path = tmp_path / "gaps.jsonl"
  path.write_bytes(b"\n".join([_obj(text="a"), _obj(text=" \n\t"), b"",
                               _obj(text=""), _obj(text="b")]))
  skipped = {}
  docs = list(sources.jsonl(str(path), skipped=skipped))  # on_error="raise"
  assert [d.source for d in docs] == ["gaps.jsonl:1", "gaps.jsonl:5"]
  assert skipped == {"empty": 2, "blank_line": 1}


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_truncated_or_corrupt_file_raises_naming_it(tmp_path, suffix):
  lines = [_obj(text=f"document {i} " + "word " * 50) for i in range(200)]
  path = tmp_path / ("whole" + suffix)
  (_zst if suffix.endswith(".zst") else _gz)(path, lines)
  assert len(list(sources.jsonl(str(path)))) == 200
  data = path.read_bytes()
  cut = tmp_path / ("cut" + suffix)
  cut.write_bytes(data[:len(data) // 2])
  for on_error in ("raise", "skip"):  # Never a silently shorter corpus.
    with pytest.raises(ValueError, match=r"cut\.jsonl\.(zst|gz).*truncated"):
      list(sources.jsonl(str(cut), on_error=on_error))
  garbage = tmp_path / ("garbage" + suffix)
  garbage.write_bytes(b"this is not compressed" * 10)
  with pytest.raises(ValueError, match=r"garbage\.jsonl\.(zst|gz).*corrupt"):
    list(sources.jsonl(str(garbage)))


def test_jsonl_splits_and_max_bytes(tmp_path):
  path = tmp_path / "many.jsonl"
  path.write_bytes(b"".join(_obj(text=f"doc {i}") + b"\n" for i in range(80)))
  train = {d.source for d in sources.jsonl(str(path), split="train")}
  valid = {d.source for d in sources.jsonl(str(path), split="validation")}
  assert not train & valid and len(train | valid) == 80 and valid
  assert all(sources.split_of(s) == "validation" for s in valid)
  # Texts of 5 bytes: the third brings the total past 12, and is the last.
  assert len(list(sources.jsonl(str(path), max_bytes=12))) == 3


def test_document_meta_is_read_only_hashable_and_picklable():
  doc = sources.Document(1, "text", "a.jsonl:1", {"pile_set_name": "Github"})
  with pytest.raises(TypeError):
    doc.meta["pile_set_name"] = "ArXiv"
  assert hash(doc) == hash(sources.Document(1, "text", "a.jsonl:1"))
  assert pickle.loads(pickle.dumps(doc)) == doc
  assert sources.Document(1, "t", "s").meta == {}


# --- Text folders and open_corpus ---------------------------------------------

def test_text_folder_reads_sorted_and_counts_skips(tmp_path):
  _write(tmp_path, "b.txt", b"second\n")
  _write(tmp_path, "a/one.txt", "premier café\n".encode())
  _write(tmp_path, "a/latin1.txt", b"caf\xe9\n")
  _write(tmp_path, "blank.txt", b" \n")
  _write(tmp_path, "notes.md", b"# not read\n")
  _write(tmp_path, ".git/HEAD.txt", b"hidden\n")
  skipped = {}
  docs = list(sources.text_folder(str(tmp_path), skipped=skipped))
  assert [d.source for d in docs] == ["b.txt", "a/one.txt"]  # os.walk order.
  assert docs[1].text == "premier café\n"
  assert docs[1].doc_id == sources.stable_id("a/one.txt")
  assert skipped == {"invalid_utf8": 1, "empty": 1}
  every = sources.text_folder(str(tmp_path), suffixes=None)
  assert [d.source for d in every] == ["b.txt", "notes.md", "a/one.txt"]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    list(sources.text_folder(str(tmp_path / "nope")))


def test_a_textdir_spec_may_name_the_files_it_reads(tmp_path):
  """"textdir:<folder>/*.py" reads the .py files of the folder and below
  (not hidden ones), as `suffixes=(".py",)` does; the .txt default, finding
  none, says how to name the files it passed over."""
  _write(tmp_path, "pkg/mod.py", b"x = 1\n")
  _write(tmp_path, "pkg/sub/deep.py", b"y = 2\n")
  _write(tmp_path, "README.md", b"# read me\n")
  _write(tmp_path, "setup.py", b"z = 3\n")
  _write(tmp_path, ".hidden/h.py", b"no\n")
  docs = list(sources.open_corpus(f"textdir:{tmp_path}/*.py"))
  assert [d.source for d in docs] == ["setup.py", "pkg/mod.py",
                                      "pkg/sub/deep.py"]
  assert [d.doc_id for d in docs] == [
      d.doc_id for d in sources.text_folder(str(tmp_path), suffixes=(".py",))]
  assert [d.source for d in sources.open_corpus(
      f"textdir:{tmp_path}/[RS]*")] == ["README.md"]
  with pytest.raises(FileNotFoundError) as info:
    list(sources.open_corpus(f"textdir:{tmp_path}"))
  assert str(info.value) == (
      f"textdir:{tmp_path}: no .txt files (reads *.txt; passed over 4 other "
      f"files, e.g. README.md; textdir:{tmp_path}/*.md reads those)")
  with pytest.raises(FileNotFoundError) as info:
    list(sources.open_corpus(f"textdir:{tmp_path}/pkg/*.rst"))
  assert str(info.value) == (
      f"textdir:{tmp_path}/pkg/*.rst: no files named *.rst (passed over 2 "
      f"other files, e.g. mod.py; textdir:{tmp_path}/pkg/*.py reads those)")
  with pytest.raises(FileNotFoundError, match="the folder does not exist"):
    list(sources.open_corpus(f"textdir:{tmp_path}/gone/*.py"))


def test_open_corpus_dispatches_and_lists_kinds(tmp_path):
  _zst(tmp_path / "00.jsonl.zst", PILE)
  _write(tmp_path / "texts", "x.txt", b"hello\n")
  _write(tmp_path / "lib", "m.py", b"x = 1\n")
  skipped = {}
  docs = list(sources.open_corpus(f"jsonl:{tmp_path}/*.jsonl.zst",
                                  skipped=skipped))
  assert [d.source for d in docs] == [f"00.jsonl.zst:{i}" for i in range(1, 6)]
  texts = sources.open_corpus(f"textdir:{tmp_path / 'texts'}")
  assert [d.text for d in texts] == ["hello\n"]
  lib = sources.open_corpus("python_stdlib", root=str(tmp_path / "lib"))
  assert [d.source for d in lib] == ["stdlib:m.py"]
  for spec in ("c4", "jsonl:", "hf:c4/en", "python_stdlib:x"):
    with pytest.raises(ValueError, match=r"known kinds: python_stdlib, "
                       r"python_stdlib:shuffled, jsonl:<glob>, "
                       r"textdir:<path>\[/<name pattern>\], tfds:"):
      sources.open_corpus(spec)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TFDS's own.
def test_tfds_reads_a_prepared_dataset_offline(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Three train and two validation pages, written from memory."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.
                                   FeaturesDict({"text": tfds.features.Text(),
                                                 "url": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return {"train": self._generate_examples(0, 4),
              "validation": self._generate_examples(4, 6)}

    def _generate_examples(self, start, stop):  # pylint: disable=all
      for i in range(start, stop):
        yield i, {"text": "" if i == 3 else f"page {i} café",
                  "url": f"https://example.com/{i}"}

  TinyCorpus(data_dir=str(tmp_path)).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  # Read back by name from the files alone: the builder class is not
  # registered, as for a dataset prepared on another machine.
  skipped = {}
  train = list(sources.open_corpus("tfds:tiny_corpus:1.0.0",
                                   data_dir=str(tmp_path), skipped=skipped))
  assert sorted(d.text for d in train) == [f"page {i} café" for i in range(3)]
  assert skipped == {"empty": 1}
  assert all(d.meta["url"].endswith(d.text.split()[1]) for d in train)
  assert all(d.source.startswith("tfds:tiny_corpus/1.0.0:") for d in train)
  assert len({d.doc_id for d in train}) == 3
  again = sources.tfds_dataset("tiny_corpus", data_dir=str(tmp_path))
  assert [d.doc_id for d in again] == [d.doc_id for d in train]
  everything = sources.tfds_dataset("tiny_corpus", split=None,
                                    data_dir=str(tmp_path))
  assert len(list(everything)) == 5
  # A registered dataset that was never prepared here: no download.
  with pytest.raises(FileNotFoundError, match="mnist:3.0.1 is not prepared"):
    sources.tfds_dataset("mnist:3.0.1", data_dir=str(tmp_path / "empty"))
