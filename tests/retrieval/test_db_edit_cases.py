"""Editing a retrieval DB: selections by metadata, DBs built before
attribution, refusals, a killed edit, and scripts/edit_db.py.

A small DB of 12 standard-library files posing as web pages (sources
https://a.example/... and https://b.example/..., meta pile_set_name A or B
and a title), a 512-piece SentencePiece model, the one-layer MiniLM of
test_beam_jobs and an exact index: 257 chunks, built once per module
and copied for each test that edits it.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from retro_jax.corpus import sources, vocab
from retro_jax.corpus.sources import Document
from retro_jax.retrieval import attribution
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import db_edit
from retro_jax.retrieval import db_finalize
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval import index_shards
from retro_jax.retrieval import shard_writer
from retro_jax.retrieval.db_select import Selection
from retro_jax.retrieval.embedder import BertEmbedder
from test_beam_jobs import make_tiny_bert  # pylint: disable=g-bad-import-order

QUIET = lambda line: None
SHARD = 40


def _pages():
  """12 stdlib files as Documents with a URL, a Pile-like subset and a
  title."""
  files = [d for d in sources.python_stdlib()
           if d.source.startswith(("stdlib:json/", "stdlib:tomllib/",
                                   "stdlib:zoneinfo/"))]
  out = []
  for i, d in enumerate(files[:12]):
    site = "a" if i % 2 else "b"
    url = f"https://{site}.example/{d.source.split(':')[1]}"
    out.append(Document(sources.stable_id(url), d.text[:3000], url,
                        {"pile_set_name": site.upper(), "url": url,
                         "title": f"page {i}"}))
  return out


def build(db_dir, docs, sp, spm_path, bert):
  dblib.write_chunks({"train": docs}, sp, db_dir, shard_chunks=SHARD,
                     spm_path=spm_path, progress=False)
  dblib.embed_shards(db_dir, bert, progress=False)
  db_finalize.finalize(db_dir)
  db = dblib.RetrievalDB.open(db_dir)
  built = index_shards.build(db, os.path.join(db_dir, fmt.INDEX_DIR),
                             kind="exact", log=QUIET)
  dblib.update_manifest(db_dir, index={"kind": "exact", "dir": "index",
                                       "shards": 1, "shard_chunks": 0},
                        recall=built["recall"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  root = tmp_path_factory.mktemp("cases")
  docs = _pages()
  spm_path = str(root / "spm.model")
  sp = vocab.train([d.text for d in docs], spm_path, vocab_size=512)
  bert_dir = make_tiny_bert(str(root / "bert-l1"))
  bert = BertEmbedder.load(bert_dir)
  db_dir = str(root / "db")
  build(db_dir, docs, sp, spm_path, bert)
  return dict(root=root, docs=docs, sp=sp, spm_path=spm_path, bert=bert,
              bert_dir=bert_dir, db_dir=db_dir)


@pytest.fixture
def db_copy(base, tmp_path):
  copy = str(tmp_path / "db")
  shutil.copytree(base["db_dir"], copy)
  return copy


def _sources(db_dir):
  return [r["source"] for r in dblib.RetrievalDB.open(db_dir).documents()]


def test_document_of_gives_source_title_and_meta(base):
  db = dblib.RetrievalDB.open(base["db_dir"])
  last = db.document_of(len(db) - 1)
  doc = base["docs"][-1]
  assert last == {"doc_id": doc.doc_id, "source": doc.source,
                  "title": doc.meta["title"], "meta": dict(doc.meta),
                  "bytes": len(doc.text.encode())}
  assert last == shard_writer.document_record(doc, len(doc.text.encode()))
  assert attribution.describe_hit(len(db) - 1, last) == (
      f"chunk {len(db) - 1} · {doc.source} · page 11 (document {doc.doc_id})")
  assert attribution.describe_document(attribution.unknown(7)) == (
      "source unknown (document 7)")
  # A document that straddles shards is listed by both, reported once.
  starts = [first for first, _ in db.shard_ranges()]
  doc_ids = db.doc_ids_of(np.arange(len(db)))
  straddling = {int(doc_ids[s]) for s in starts[1:]
                if doc_ids[s] == doc_ids[s - 1]}
  assert straddling
  assert [r["doc_id"] for r in db.documents()] == [d.doc_id
                                                   for d in base["docs"]]


def test_remove_by_meta_glob_and_id(base, db_copy):
  docs = base["docs"]
  record = db_edit.remove_documents(
      db_copy, Selection.of(meta={"pile_set_name": "B"}), log=QUIET)
  assert record["documents"] == 6
  assert _sources(db_copy) == [d.source for d in docs if "//a." in d.source]
  # Two fields of one meta selection must both match.
  db_edit.remove_documents(
      db_copy, Selection.of(meta={"pile_set_name": "A", "title": "page 1"}),
      log=QUIET)
  assert docs[1].source not in _sources(db_copy)
  db_edit.remove_documents(
      db_copy, Selection.of(source_globs=["https://a.example/json/*"],
                            doc_ids=[docs[11].doc_id]), log=QUIET)
  left = [d.source for d in docs if "//a." in d.source and d is not docs[1]
          and "/json/" not in d.source and d is not docs[11]]
  assert _sources(db_copy) == left
  db = dblib.RetrievalDB.open(db_copy, verify=True)
  assert [e["action"] for e in db.manifest["edits"]] == ["remove"] * 3
  assert db.manifest["num_documents"] == len(left)
  assert sum(s["num_chunks"] for s in db.manifest["shards"]) == len(db)


def test_refusals_are_one_line(base, db_copy):
  cases = [
      (Selection.of(source_globs=["https://c.example/*"]), "matches no"),
      (Selection.of(doc_ids=[12345]), "no document with id"),
      (Selection.of(source_globs=["https://*"]), "every document"),
      (Selection.of(), "selection is empty"),
  ]
  version = dblib.RetrievalDB.open(db_copy).content_version
  for selection, message in cases:
    with pytest.raises(ValueError, match=message) as e:
      db_edit.remove_documents(db_copy, selection, log=QUIET)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="no document was added.*repeated"):
    db_edit.add_documents(db_copy, base["docs"][:2], base["bert"], log=QUIET)
  assert dblib.RetrievalDB.open(db_copy).content_version == version
  # Once a part follows "train", adding to "train" would split its ids.
  note = Document(sources.stable_id("note"), "x = 1\n" * 100, "note")
  db_edit.add_documents(db_copy, [note], base["bert"], part="x", log=QUIET)
  with pytest.raises(ValueError, match="part 'train'.*not its last"):
    db_edit.add_documents(db_copy, [note], base["bert"], part="train",
                          log=QUIET)


def _strip_attribution(db_dir):
  """The DB as built before attribution: no documents.jsonl in any shard,
  none in the records, the manifest finalized from them."""
  for name in os.listdir(os.path.join(db_dir, fmt.SHARDS)):
    sdir = os.path.join(db_dir, fmt.SHARDS, name)
    os.remove(os.path.join(sdir, fmt.DOCUMENTS))
    record = fmt.read_json(os.path.join(sdir, fmt.CHUNKS_RECORD))
    del record["files"][fmt.DOCUMENTS]
    fmt.write_json_atomic(os.path.join(sdir, fmt.CHUNKS_RECORD), record)
  os.remove(os.path.join(db_dir, fmt.MANIFEST))
  db_finalize.finalize(db_dir)


def test_a_db_built_before_attribution_still_works(base, db_copy):
  _strip_attribution(db_copy)
  db = dblib.RetrievalDB.open(db_copy, verify=True)
  assert not db.has_sources
  first = base["docs"][0]
  assert db.document_of(0) == {"doc_id": first.doc_id, "source": None,
                               "title": None, "meta": {}, "bytes": None}
  manifest = dict(db.manifest)
  # A rerun of the build's first stage restores it as it was.
  dblib.write_chunks({"train": base["docs"]}, base["sp"], db_copy,
                     shard_chunks=SHARD, spm_path=base["spm_path"],
                     progress=False)
  assert db_finalize.finalize(db_copy)["shards"] == manifest["shards"]
  with pytest.raises(ValueError, match="built before documents were "
                     "recorded.*--remove_doc_id"):
    db_edit.remove_documents(db_copy, Selection.of(source_globs=["*"]),
                             log=QUIET)
  record = db_edit.remove_documents(
      db_copy, Selection.of(doc_ids=[first.doc_id]), log=QUIET)
  assert record["documents"] == 1
  db = dblib.RetrievalDB.open(db_copy, verify=True)
  assert first.doc_id not in set(db.doc_ids_of(np.arange(len(db))).tolist())


def _run_python(code):
  return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=REPO_ROOT))


def test_a_killed_edit_leaves_the_old_db_then_resumes(base, db_copy,
                                                      tmp_path):
  reference = str(tmp_path / "reference")
  shutil.copytree(db_copy, reference)
  selection = Selection.of(meta={"pile_set_name": "B"})
  expected = db_edit.remove_documents(reference, selection, log=QUIET)
  old = dblib.RetrievalDB.open(db_copy).content_version
  # The index build logs once its shard is saved: killed there, after the
  # new shards and the new index were written, before the manifest switch.
  code = f"""
import os, signal
from retro_jax.retrieval import db_edit
from retro_jax.retrieval.db_select import Selection
def die(line):
  os.kill(os.getpid(), signal.SIGKILL)
db_edit.remove_documents({db_copy!r}, Selection.of(
    meta={{"pile_set_name": "B"}}), log=die)
"""
  result = _run_python(code)
  assert result.returncode == -9, result.stderr[-2000:]
  leftovers = [n for n in os.listdir(os.path.join(db_copy, fmt.SHARDS))
               if n.startswith("shard-e")]
  assert leftovers  # The killed edit had written new shards...
  db = dblib.RetrievalDB.open(db_copy, verify=True)  # ...the old DB is whole.
  assert db.content_version == old and "edits" not in db.manifest
  assert len(_sources(db_copy)) == len(base["docs"])
  # Rerun: the edit completes, as the uninterrupted one did.
  record = db_edit.remove_documents(db_copy, selection, log=QUIET)
  assert record["version"] == expected["version"]
  assert dblib.RetrievalDB.open(db_copy, verify=True).content_version == (
      expected["version"])


def _script(*args):
  return subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "scripts", "edit_db.py"),
       f"--config={os.path.join(REPO_ROOT, 'configs', 'tiny.py')}", *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_edit_script_lists_removes_and_adds(base, db_copy, tmp_path):
  listed = _script(f"--db_dir={db_copy}", "--remove_meta=pile_set_name=B",
                   "--list")
  assert listed.returncode == 0, listed.stderr[-2000:]
  assert "6 document(s)" in listed.stdout
  assert "https://b.example/" in listed.stdout and "page 0" in listed.stdout
  bad = _script(f"--db_dir={db_copy}", "--remove_meta=pile_set_name")
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].endswith(
      "--remove_meta='pile_set_name': expected field=pattern, e.g. "
      "pile_set_name=Github")
  removed = _script(f"--db_dir={db_copy}",
                    "--remove_glob=https://b.example/*")
  assert removed.returncode == 0, removed.stderr[-2000:]
  record = json.loads(removed.stdout.split("edit: ", 1)[1])
  assert record["documents"] == 6 and record["action"] == "remove"
  # Adding back a folder of text, embedded with the DB's BERT.
  folder = tmp_path / "new"
  folder.mkdir()
  (folder / "note.txt").write_text("def parse_note(text):\n  return text\n"
                                   * 20)
  added = _script(f"--db_dir={db_copy}", f"--add_corpus=textdir:{folder}",
                  f"--config.db.embedder={base['bert_dir']}")
  assert added.returncode == 0, added.stderr[-2000:]
  db = dblib.RetrievalDB.open(db_copy, verify=True)
  assert db.manifest["parts"][-1]["name"] == "added"
  assert db.document_of(len(db) - 1)["source"].endswith("note.txt")
