"""Tests of the retrieval DB: chunking, the build stages, resume, refusals.

Real components, small: a SentencePiece model of 512 pieces trained on about
300 KB of the standard library, the real all-MiniLM-L6-v2 embedder, and a DB
of about two hundred chunks in shards of 50 (so documents straddle shard
boundaries). The uninterrupted one-worker build is made once per module and
is the reference the resumed and the two-worker builds must equal bitwise.
"""

import json
import os
import shutil

import numpy as np

from retro_jax.config import EOS_ID
import pytest

from retro_jax.corpus import sources, vocab
from retro_jax.corpus.sources import Document
from retro_jax.retrieval import db as db_lib
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval.db import IncompleteDBError, RetrievalDB
from retro_jax.retrieval.embedder import BertEmbedder

M = 64
SHARD = 50


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  """(processor, .model path) of a 512-piece vocabulary."""
  path = str(tmp_path_factory.mktemp("spm") / "v512.model")
  texts = [d.text for d in sources.python_stdlib(split="train",
                                                 max_bytes=300_000)]
  return vocab.train(texts, path, vocab_size=512), path


@pytest.fixture(scope="module")
def other_spm(tmp_path_factory):
  """A second, different vocabulary (for the refusals)."""
  path = str(tmp_path_factory.mktemp("spm2") / "v600.model")
  texts = [d.text for d in sources.python_stdlib(split="validation",
                                                 max_bytes=60_000)]
  vocab.train(texts, path, vocab_size=600)
  return path


@pytest.fixture(scope="module")
def corpus():
  """Validation-split stdlib files of 1-6 KB (about 200 chunks) with a short
  document in the middle."""
  docs, total = [], 0
  for doc in sources.python_stdlib(split="validation"):
    if 1000 < len(doc.text) < 6000:
      docs.append(doc)
      total += len(doc.text)
    if total > 20_000:
      break
  docs.insert(3, Document(sources.stable_id("short"), "x = 1\n", "short"))
  return docs


@pytest.fixture(scope="module")
def bert():
  return BertEmbedder.load()


def _build(docs, spm, out, bert, workers=1):
  sp, path = spm
  summary = db_lib.write_chunks(docs, sp, str(out), shard_chunks=SHARD,
                                spm_path=path, progress=False)
  for w in range(workers):
    db_lib.embed_shards(str(out), bert, shard_index=w, num_shards=workers,
                        progress=False)
  db_lib.finalize(str(out))
  return summary


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, spm, bert):
  """(path, write_chunks summary) of the uninterrupted one-worker build."""
  out = tmp_path_factory.mktemp("ref") / "db"
  return str(out), _build(corpus, spm, out, bert)


def _arrays(path):
  db = RetrievalDB.open(path, verify=True)
  ids = np.arange(db.num_chunks)
  return db.chunk_tokens(ids), db.doc_ids_of(ids), db.embeddings()


def _assert_same_db(path, ref):
  for got, want in zip(_arrays(path), _arrays(ref)):
    np.testing.assert_array_equal(got, want)
  with open(os.path.join(path, fmt.MANIFEST)) as f:
    got = json.load(f)["shards"]
  with open(os.path.join(ref, fmt.MANIFEST)) as f:
    assert got == json.load(f)["shards"]  # Same per-file checksums.


def test_chunk_document():
  assert db_lib.chunk_document(np.zeros(0, np.int32)).shape == (0, M)
  ids = np.arange(1, 131)
  chunks = db_lib.chunk_document(ids)
  assert chunks.shape == (3, M) and chunks.dtype == np.int32
  np.testing.assert_array_equal(chunks.reshape(-1)[:130], ids)
  assert not chunks.reshape(-1)[130:].any()
  assert db_lib.chunk_document(np.arange(1, 65)).shape == (1, M)
  with pytest.raises(ValueError, match="1-D"):
    db_lib.chunk_document(np.ones((2, 3), np.int32))
  with pytest.raises(ValueError, match="pad id"):
    db_lib.chunk_document(np.array([5, 0, 7]))


def test_chunks_doc_ids_and_continuations(reference, corpus, spm):
  sp, spm_path = spm
  path, summary = reference
  db = RetrievalDB.open(path, spm_path=spm_path)
  encoded = [np.asarray(sp.encode(d.text), np.int32) for d in corpus]
  counts = [-(-(len(ids) + 1) // M) for ids in encoded]  # + EOS.
  assert db.num_chunks == sum(counts) == summary["num_chunks"] > 150
  assert summary["num_documents"] == db.manifest["num_documents"] == len(
      corpus)
  assert summary["short_documents"] == 1
  assert db.manifest["num_tokens"] == sum(len(ids) for ids in encoded)
  assert db.manifest["text_bytes"] == sum(len(d.text.encode())
                                          for d in corpus)
  ids = np.arange(db.num_chunks)
  want_tokens = np.concatenate([db_lib.chunk_document(np.append(e, EOS_ID))
                                for e in encoded])
  # Every document ends with EOS, then padding to its last chunk's end.
  assert (want_tokens == EOS_ID).sum() == len(corpus)
  assert db.manifest["pad_tokens"] == want_tokens.size - sum(
      len(e) + 1 for e in encoded)
  part, = db.manifest["parts"]
  assert (part["first_chunk"], part["num_chunks"]) == (0, db.num_chunks)
  want_docs = np.repeat([d.doc_id for d in corpus], counts)
  np.testing.assert_array_equal(db.chunk_tokens(ids), want_tokens)
  np.testing.assert_array_equal(db.doc_ids_of(ids), want_docs)
  assert db.doc_ids_of(ids).dtype == np.int64
  # Continuation: the next chunk of the same document, else zeros.
  last_of_doc = np.append(want_docs[1:] != want_docs[:-1], True)
  nxt = np.append(want_tokens[1:], np.zeros((1, M), np.int32), axis=0)
  want_values = np.concatenate(
      [want_tokens, nxt * ~last_of_doc[:, None]], axis=1)
  values = db.neighbour_values(ids)
  assert values.shape == (db.num_chunks, 2 * M) and values.dtype == np.int32
  np.testing.assert_array_equal(values, want_values)
  # Some document runs across a shard boundary; its continuation is read
  # from the next shard.
  straddling = [b for b in range(SHARD, db.num_chunks, SHARD)
                if want_docs[b - 1] == want_docs[b]]
  assert straddling
  b = straddling[0]
  np.testing.assert_array_equal(db.neighbour_values(np.array([b - 1]))[0, M:],
                                want_tokens[b])
  # Any id shape; -1 is "no neighbour".
  grid = np.array([[0, -1, 5], [-1, b - 1, db.num_chunks - 1]])
  got = db.neighbour_values(grid)
  assert got.shape == (2, 3, 2 * M)
  assert not got[grid == -1].any()
  np.testing.assert_array_equal(got[grid >= 0], want_values[grid[grid >= 0]])
  with pytest.raises(IndexError):
    db.chunk_tokens(np.array([db.num_chunks]))
  # Chunk text is the detokenized chunk; the chunks of a document put
  # together detokenize to the document.
  start = 0
  for doc, e, c in zip(corpus, encoded, counts):
    for j in range(c):
      assert db.chunk_text(start + j, sp) == sp.decode(
          e[j * M:(j + 1) * M].tolist())
    whole = db.chunk_tokens(np.arange(start, start + c)).reshape(-1)
    assert sp.decode(whole[whole != 0].tolist()) == doc.text
    start += c
  assert db.embeddings().shape == (db.num_chunks, db.dim)
  assert db.embeddings().dtype == np.float32


def test_embeddings_are_bert_of_chunk_text(reference, spm, bert):
  sp, _ = spm
  db = RetrievalDB.open(reference[0], embedder=bert)
  ids = [0, SHARD, db.num_chunks - 1]
  want = bert.embed([db.chunk_text(i, sp) for i in ids])
  np.testing.assert_allclose(db.embeddings()[ids], want, atol=1e-5)


def test_skipped_and_short_documents(spm, tmp_path):
  sp, path = spm
  docs = [Document(1, "", "empty"), Document(2, " \n\t\n", "blank"),
          Document(3, "caf\udce9 = 1\n", "surrogate"),
          Document(4, "x = 1\n", "short"), Document(4, "x = 1\n", "again"),
          Document(5, "def f():\n  return 2\n" * 20, "long")]
  summary = db_lib.write_chunks(docs, sp, str(tmp_path / "db"),
                                shard_chunks=SHARD, spm_path=path,
                                progress=False)
  assert summary["skipped"] == {"empty": 2, "invalid_unicode": 1,
                                "empty_after_tokenization": 0,
                                "repeated_doc_id": 1}
  assert summary["num_documents"] == 2
  assert summary["short_documents"] == 1
  tokens = np.load(os.path.join(fmt.shard_dir(str(tmp_path / "db"), 0),
                                fmt.TOKENS))
  short = np.asarray(sp.encode("x = 1\n"))
  assert len(short) < M
  np.testing.assert_array_equal(tokens[0, :len(short)], short)
  assert tokens[0, len(short)] == EOS_ID and not tokens[0, len(short) + 1:].any()
  assert summary["num_chunks"] == 1 + -(-len(sp.encode(docs[-1].text)) // M)


def test_a_document_in_two_parts_enters_once(spm, tmp_path):
  # Extra text that overlaps the training split (a longer prefix of the same
  # corpus) adds only the documents the training part lacks.
  sp, path = spm
  a, b, c = (Document(i, f"x{i} = {i}\n" * 30, f"doc{i}") for i in (7, 8, 9))
  summary = db_lib.write_chunks({"train": [a, b], "extra": [a, c, b]}, sp,
                                str(tmp_path / "db"), shard_chunks=SHARD,
                                spm_path=path, progress=False)
  assert summary["skipped"]["repeated_doc_id"] == 2
  assert summary["num_documents"] == 3
  extra = [p for p in summary["parts"] if p["name"] == "extra"][0]
  assert extra["num_documents"] == 1
  assert extra["num_chunks"] == -(-(len(sp.encode(c.text)) + 1) // M)


def test_float16_embeddings(spm, bert, tmp_path):
  sp, path = spm
  out = str(tmp_path / "db")
  docs = [Document(1, "import os\n", "a"),
          Document(2, "def f(x):\n  return x + 1\n" * 12, "b")]
  db_lib.write_chunks(docs, sp, out, spm_path=path, progress=False)
  db_lib.embed_shards(out, bert, dtype="float16", progress=False)
  with pytest.raises(ValueError, match="float16 embeddings, this run asks "
                     "for float32"):
    db_lib.embed_shards(out, bert, dtype="float32", progress=False)
  db_lib.finalize(out)
  db = RetrievalDB.open(out, spm_path=path, embedder=bert, verify=True)
  assert db.manifest["embedding"] == {"dim": bert.dim, "dtype": "float16"}
  assert db.embedding_shards()[0].dtype == np.float16
  emb = db.embeddings()  # Widened for the index builder.
  assert emb.dtype == np.float32 and emb.shape == (db.num_chunks, bert.dim)
  want = bert.embed([db.chunk_text(i, sp) for i in range(db.num_chunks)])
  np.testing.assert_allclose(emb, want, rtol=2e-3, atol=2e-3)


def test_empty_corpus_raises(spm, tmp_path):
  sp, path = spm
  out = str(tmp_path / "db")
  with pytest.raises(ValueError, match="corpus is empty"):
    db_lib.write_chunks([Document(1, "", "e"), Document(2, "\udcff", "s")],
                        sp, out, spm_path=path, progress=False)
  with pytest.raises(ValueError, match="corpus is empty"):
    db_lib.finalize(out)
  with pytest.raises(IncompleteDBError, match="not a finalized"):
    RetrievalDB.open(out)


def test_refuses_another_vocabulary_or_embedder(reference, corpus, spm,
                                                other_spm, bert, tmp_path):
  path = reference[0]
  want = fmt.sha256_file(spm[1])
  have = fmt.sha256_file(other_spm)
  with pytest.raises(ValueError, match=f"{want}.*{have}"):
    RetrievalDB.open(path, spm_path=other_spm)
  with pytest.raises(ValueError, match=f"{bert.fingerprint}.*is 0123"):
    RetrievalDB.open(path, embedder="0123")
  RetrievalDB.open(path, spm_path=spm[1], embedder=bert)
  copy = str(tmp_path / "db")
  shutil.copytree(path, copy)
  with pytest.raises(ValueError, match=f"spm_model_sha256 '{want}'.*'{have}'"):
    db_lib.write_chunks(corpus, vocab.load(other_spm), copy,
                        spm_path=other_spm, shard_chunks=SHARD,
                        progress=False)
  with pytest.raises(ValueError, match="shard_chunks 50"):
    db_lib.write_chunks(corpus, spm[0], copy, spm_path=spm[1],
                        shard_chunks=64, progress=False)
  # A finalized DB reruns as a no-op, and refuses another corpus.
  summary = db_lib.write_chunks(corpus, spm[0], copy, spm_path=spm[1],
                                shard_chunks=SHARD, progress=False)
  assert summary["shards_written"] == 0
  assert summary["shards_reused"] == summary["num_shards"]
  with pytest.raises(ValueError, match="finalized"):
    db_lib.write_chunks(corpus[1:], spm[0], copy, spm_path=spm[1],
                        shard_chunks=SHARD, progress=False)
  RetrievalDB.open(copy, verify=True)

  class OtherBert:  # Refused before it embeds anything.
    name, fingerprint, dim = "other-bert", "f" * 64, bert.dim

  with pytest.raises(ValueError, match=f"{bert.fingerprint}.*f{{64}}"):
    db_lib.embed_shards(copy, OtherBert(), progress=False)
  os.makedirs(tmp_path / "junk")
  (tmp_path / "junk" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="not a retrieval DB"):
    db_lib.write_chunks(corpus, spm[0], str(tmp_path / "junk"),
                        spm_path=spm[1], progress=False)


def test_corruption_is_detected(reference, tmp_path):
  copy = str(tmp_path / "db")
  shutil.copytree(reference[0], copy)
  emb = os.path.join(fmt.shard_dir(copy, 1), fmt.EMBEDDINGS)
  with open(emb, "r+b") as f:  # Flip one byte in the middle, same size.
    f.seek(os.path.getsize(emb) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  RetrievalDB.open(copy, verify=False)  # Sizes alone cannot tell.
  with pytest.raises(IncompleteDBError, match="shard-00001.*embeddings.npy "
                     "fails its sha256"):
    RetrievalDB.open(copy, verify=True)
  with pytest.raises(IncompleteDBError, match="shard-00001.*sha256"):
    db_lib.finalize(copy)
  tokens = os.path.join(fmt.shard_dir(copy, 2), fmt.TOKENS)
  with open(tokens, "r+b") as f:
    f.truncate(os.path.getsize(tokens) - 100)
  with pytest.raises(IncompleteDBError, match="shard-00002.*tokens.npy has"):
    RetrievalDB.open(copy)


def test_resume_after_kill(reference, corpus, spm, bert, tmp_path):
  """A build killed mid-way (files truncated under their final names, a
  stray temporary, missing records) is resumed into the reference DB."""
  ref = reference[0]
  out = str(tmp_path / "db")
  shutil.copytree(ref, out)
  os.remove(os.path.join(out, fmt.MANIFEST))
  with pytest.raises(IncompleteDBError, match="not a finalized.*all shards "
                     "are complete"):
    RetrievalDB.open(out)
  s0, s2, s3 = (fmt.shard_dir(out, i) for i in (0, 2, 3))
  with open(os.path.join(s0, fmt.TOKENS), "r+b") as f:
    f.truncate(1000)  # Stage 1 killed (on a disk that lost the tail).
  with open(os.path.join(s2, fmt.EMBEDDINGS), "r+b") as f:
    f.truncate(5000)
  os.remove(os.path.join(s3, fmt.EMBEDDINGS_RECORD))  # Killed before it.
  with open(os.path.join(s3, fmt.EMBEDDINGS + fmt.TMP_MARK + "99"), "wb") as f:
    f.write(b"half an array")
  with pytest.raises(IncompleteDBError, match="shard-00000.*tokens.npy"):
    RetrievalDB.open(out)
  with pytest.raises(IncompleteDBError, match="tokens.npy.*rerun write_"):
    db_lib.embed_shards(out, bert, progress=False)
  with pytest.raises(IncompleteDBError, match="cannot be finalized"):
    db_lib.finalize(out)
  summary = db_lib.write_chunks(corpus, spm[0], out, shard_chunks=SHARD,
                                spm_path=spm[1], progress=False)
  assert (summary["shards_written"], summary["shards_reused"]) == (
      1, summary["num_shards"] - 1)
  done = db_lib.embed_shards(out, bert, progress=False)
  assert done["embedded"] == [2, 3]  # Shard 0's embeddings were still valid.
  assert done["skipped"] == [i for i in range(summary["num_shards"])
                             if i not in (2, 3)]
  db_lib.finalize(out)
  assert not [f for f in os.listdir(s3) if fmt.TMP_MARK in f]
  _assert_same_db(out, ref)


@pytest.mark.slow  # Embeds the whole DB again: ~12 s on 2 cores.
def test_two_workers_equal_one(reference, corpus, spm, bert, tmp_path):
  out = str(tmp_path / "db")
  with pytest.raises(ValueError, match="shard_index 2"):
    db_lib.embed_shards(out, bert, shard_index=2, num_shards=2)
  summary = db_lib.write_chunks(corpus, spm[0], out, shard_chunks=SHARD,
                                spm_path=spm[1], progress=False)
  with pytest.raises(IncompleteDBError, match="embeddings not written"):
    RetrievalDB.open(out)
  one = db_lib.embed_shards(out, bert, shard_index=1, num_shards=2,
                            progress=False)
  assert one["embedded"] == list(range(1, summary["num_shards"], 2))
  with pytest.raises(IncompleteDBError, match="shard-00000: embeddings not"):
    db_lib.finalize(out)
  zero = db_lib.embed_shards(out, bert, shard_index=0, num_shards=2,
                             progress=False)
  assert zero["embedded"] == list(range(0, summary["num_shards"], 2))
  db_lib.finalize(out)
  _assert_same_db(out, reference[0])


def test_update_manifest(reference, tmp_path):
  copy = str(tmp_path / "db")
  shutil.copytree(reference[0], copy)
  db_lib.update_manifest(copy, index={"kind": "scann", "leaves": 4},
                         recall={"10@10": 0.97})
  with pytest.raises(ValueError, match="num_chunks"):
    db_lib.update_manifest(copy, num_chunks=3)
  manifest = db_lib.finalize(copy)  # Unchanged shards keep the index fields.
  assert manifest["recall"] == {"10@10": 0.97}
  assert RetrievalDB.open(copy).manifest["index"]["leaves"] == 4
