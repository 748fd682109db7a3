"""A DB on gs://: built locally and published, staged once per host, checked.

Against the real GCS JSON API of fake-gcs-server on localhost
(tests/gcs_emulator.py): the corpus (Pile-layout .jsonl.zst), the trained
vocabulary and the DB all live on the bucket; nothing of it is a local
folder named "gs:".
"""

import io
import json
import os

from etils import epath
import numpy as np
import pytest
import zstandard

from retro_jax.corpus import sources, vocab
from retro_jax.retrieval import build_job
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval import db_stage
from retro_jax.retrieval.db import IncompleteDBError, RetrievalDB
from gcs_emulator import GcsEmulator  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def gcs(tmp_path_factory, monkeypatch_module):
  emu = GcsEmulator().start()
  monkeypatch_module.setenv(db_stage.STAGE_ENV,
                            str(tmp_path_factory.mktemp("stage")))
  yield emu
  emu.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
  mp = pytest.MonkeyPatch()
  yield mp
  mp.undo()


def _pile_jsonl_zst(docs) -> bytes:
  lines = "".join(json.dumps({"text": d.text, "meta": {
      "pile_set_name": "Github"}}) + "\n" for d in docs)
  return zstandard.ZstdCompressor().compress(lines.encode())


@pytest.fixture(scope="module")
def built(gcs):
  """A DB built from gs:// text into gs://: (url, summary, local twin)."""
  bucket = gcs.new_bucket("stage-test")
  docs = [d for d in sources.python_stdlib(split="validation")
          if 1000 < len(d.text) < 5000][:12]
  for i in range(2):   # Two files, so the glob has something to match.
    epath.Path(f"{bucket}/pile/train/0{i}.jsonl.zst").parent.mkdir(
        parents=True, exist_ok=True)
    epath.Path(f"{bucket}/pile/train/0{i}.jsonl.zst").write_bytes(
        _pile_jsonl_zst(docs[i::2]))
  parts = {"train": sources.text_source(
      f"jsonl:{bucket}/pile/train/*.jsonl.zst")}
  url = f"{bucket}/db"
  spm = build_job.build_spm_path("", url)
  kwargs = dict(vocab_size=512, spm_train_bytes=200_000, shard_chunks=40,
                index_kind="exact", recall_queries=0, log=lambda _: None)
  summary = build_job.build_database(url, parts, spm, **kwargs)
  return url, summary, docs


def test_built_on_the_bucket_and_nowhere_named_gs(gcs, built):
  url, summary, docs = built
  names = gcs.objects("stage-test")
  assert "spm.model" in names and "db/manifest.json" in names
  assert any(n.startswith("db/shards/") for n in names)
  assert any(n.startswith("db/table/") for n in names)
  assert summary["num_documents"] == len(docs)
  assert not any(n.endswith(".tmp") or fmt.TMP_MARK in n for n in names)
  assert not os.path.exists("gs:") and not os.path.exists(
      os.path.join(os.path.dirname(__file__), "gs:"))


def test_staged_copy_is_the_bucket_byte_for_byte(built):
  url, _, _ = built
  db = RetrievalDB.open(url)
  assert db.path.startswith(db_stage.stage_root())
  remote = {rel: p for rel, p in db_stage._remote_files(url)}  # pylint: disable=protected-access
  staged = {os.path.relpath(os.path.join(d, n), db.path)
            for d, _, names in os.walk(db.path) for n in names} - {
                db_stage.STAMP}
  assert staged == set(remote)
  for rel, p in remote.items():
    with open(os.path.join(db.path, rel), "rb") as f:
      assert f.read() == p.read_bytes(), rel
  sp = vocab.load(f"{url}/spm.model")      # The vocabulary read from gs://.
  assert sp.vocab_size() == 512
  hits = build_job.query(url, db.chunk_text(3, sp), _embedder(), k=1)
  assert hits[0]["id"] == 3


def _embedder():
  from retro_jax.retrieval.embedder import BertEmbedder  # pylint: disable=g-import-not-at-top
  return BertEmbedder.load()


def test_staging_is_reused_until_the_manifest_changes(built):
  url, _, _ = built
  local = db_stage.local_dir(url)
  shard = os.path.join(local, fmt.SHARDS, fmt.shard_name(0), fmt.TOKENS)
  before = os.stat(shard).st_mtime_ns
  assert db_stage.local_dir(url) == local
  assert os.stat(shard).st_mtime_ns == before     # Not copied again.
  manifest = epath.Path(url) / fmt.MANIFEST
  original = manifest.read_bytes()
  try:   # Another build's manifest: staged again, unchanged files kept.
    edited = json.loads(original)
    edited["finalized"] += 1.0
    manifest.write_bytes(json.dumps(edited).encode())
    db_stage.local_dir(url)
    assert os.stat(shard).st_mtime_ns == before
    assert json.loads(open(os.path.join(local, fmt.MANIFEST)).read()) == edited
  finally:
    manifest.write_bytes(original)


def test_a_damaged_bucket_copy_is_refused_by_name(built, tmp_path,
                                                  monkeypatch):
  url, _, _ = built
  monkeypatch.setenv(db_stage.STAGE_ENV, str(tmp_path))   # Another host.
  shard = epath.Path(url) / fmt.SHARDS / fmt.shard_name(1) / fmt.EMBEDDINGS
  good = shard.read_bytes()
  try:
    bad = bytearray(good)
    bad[-1] ^= 0xFF                                   # Same size, wrong bytes.
    shard.write_bytes(bytes(bad))
    with pytest.raises(IncompleteDBError, match=r"shard-00001.*sha256"):
      db_stage.local_dir(url)
  finally:
    shard.write_bytes(good)
  assert db_stage.local_dir(url) == db_stage.staging_dir(url)  # Whole again.


def test_an_unfinished_bucket_db_is_refused(gcs):
  bucket = gcs.new_bucket("stage-empty")
  (epath.Path(bucket) / "db" / "build.json").parent.mkdir(parents=True,
                                                           exist_ok=True)
  (epath.Path(bucket) / "db" / "build.json").write_text("{}")
  with pytest.raises(IncompleteDBError, match="not a finalized"):
    RetrievalDB.open(f"{bucket}/db")


def test_corpus_globs_on_the_bucket(built):
  url, _, docs = built
  bucket = url.rsplit("/", 1)[0]
  got = list(sources.open_corpus(f"jsonl:{bucket}/pile/train/*.jsonl.zst"))
  assert sorted(d.text for d in got) == sorted(d.text for d in docs)
  with pytest.raises(FileNotFoundError, match="no file matches"):
    list(sources.open_corpus(f"jsonl:{bucket}/pile/nothing/*.jsonl"))
  buf = io.BytesIO(epath.Path(
      f"{bucket}/pile/train/00.jsonl.zst").read_bytes())
  assert buf.getbuffer().nbytes > 0
