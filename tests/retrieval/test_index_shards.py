"""Tests of the sharded index (retrieval.index_shards) on small synthetic DBs.

A synthetic DB is a real one (write_chunks, embed_shards, finalize) of
random-word documents, tokenized by a tiny SentencePiece model and embedded
by a fake embedder that maps each chunk's text to a clustered random vector
(seeded by its sha256), so a DB of thousands of chunks builds in a second or
two. `make_db` is shared with test_neighbour_table.py.
"""

import hashlib
import os

import numpy as np
import pytest

from retro_jax.corpus import vocab
from retro_jax.corpus.sources import Document
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import index as indexlib
from retro_jax.retrieval import index_shards
from retro_jax.retrieval import neighbours

DIM = 16
WORDS = [f"w{i}" for i in range(300)]


class FakeEmbedder:
  """Text -> one of 12 cluster centres plus noise, seeded by the text: the
  same text always gives the same vector (twin chunks tie exactly)."""

  name, dim = "fake-clusters", DIM
  fingerprint = "f" * 64

  def __init__(self, dim: int = DIM):
    self.dim = dim
    self._centres = np.random.default_rng(123).standard_normal((12, dim))

  def embed(self, texts):
    out = np.zeros((len(texts), self.dim), np.float32)  # [n, D]
    for i, text in enumerate(texts):
      seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
      rng = np.random.default_rng(seed)
      out[i] = self._centres[seed % 12] + 0.4 * rng.standard_normal(self.dim)
    return out


def make_db(root: str, num_chunks: int, shard_chunks: int, seed: int = 0,
            dim: int = DIM, twins: bool = True) -> str:
  """A finalized DB of about `num_chunks` chunks in DB shards of
  `shard_chunks` under root/db; returns its path. With `twins`, the second
  document repeats the first (same text, another id): exact distance ties."""
  rng = np.random.default_rng(seed)
  spm_path = os.path.join(root, "spm.model")
  if not os.path.exists(spm_path):
    vocab.train([" ".join(rng.choice(WORDS, 200)) for _ in range(100)],
                spm_path, vocab_size=272)
  sp = vocab.load(spm_path)
  docs, tokens = [], 0
  while tokens < num_chunks * 64:
    text = " ".join(rng.choice(WORDS, int(rng.integers(40, 400))))
    if twins and len(docs) == 1:
      text = docs[0].text
    docs.append(Document(len(docs) + 1, text, f"synthetic:{len(docs)}"))
    tokens += len(sp.encode(text)) + 1
  db_dir = os.path.join(root, "db")
  dblib.write_chunks(docs, sp, db_dir, shard_chunks=shard_chunks,
                     spm_path=spm_path, progress=False)
  dblib.embed_shards(db_dir, FakeEmbedder(dim), progress=False)
  dblib.finalize(db_dir)
  return db_dir


class RecordingDB:
  """A RetrievalDB whose embedding reads are recorded; whole-DB reads fail."""

  def __init__(self, db):
    self._db, self.reads = db, []

  def __getattr__(self, name):
    return getattr(self._db, name)

  def embedding_range(self, first, count):
    self.reads.append((first, count))
    return self._db.embedding_range(first, count)

  def embeddings(self):
    raise AssertionError("the build loaded every embedding")

  def embedding_shards(self):
    raise AssertionError("the build read the whole memory maps")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """(RetrievalDB of ~600 chunks in DB shards of 100, its embeddings)."""
  db = dblib.RetrievalDB.open(make_db(str(tmp_path_factory.mktemp("small")),
                                      600, 100))
  return db, db.embeddings()


def test_plan():
  assert index_shards.plan(10, 0) == [(0, 10)]
  assert index_shards.plan(10, 10) == index_shards.plan(10, 99) == [(0, 10)]
  assert index_shards.plan(10, 4) == [(0, 4), (4, 3), (7, 3)]
  for n, s in ((1000, 7), (167_000, 50_000), (5, 1)):
    got = index_shards.plan(n, s)
    assert len(got) == -(-n // s)
    assert max(c for _, c in got) - min(c for _, c in got) <= 1
    assert all(c <= s for _, c in got)
    assert [f for f, _ in got] == list(np.cumsum([0] + [c for _, c in got])[
        :-1])
    assert sum(c for _, c in got) == n
  with pytest.raises(ValueError):
    index_shards.plan(0, 4)


def test_merge_is_a_total_order():
  """Merging is by (distance, id), padding last: any order of the parts, or
  merging them two at a time, gives the same arrays."""
  rng = np.random.default_rng(0)
  parts = []
  for j in range(4):  # Shard j holds ids [100 j, 100 j + 100).
    ids = rng.choice(100, (6, 5), replace=True) + 100 * j
    dists = rng.integers(0, 4, (6, 5)).astype(np.float32)  # Many ties.
    ids[:, 4], dists[:, 4] = -1, np.inf  # Padding.
    parts.append((ids, dists))
  want = index_shards.merge(parts, 12)
  assert want[0].shape == (6, 12)
  np.testing.assert_array_equal(index_shards.merge(parts[::-1], 12)[0],
                                want[0])
  step = parts[2]
  for part in (parts[0], parts[3], parts[1]):
    step = index_shards.merge([step, part], 12)
  np.testing.assert_array_equal(step[0], want[0])
  np.testing.assert_array_equal(step[1], want[1])
  for ids, dists in zip(*want):
    real = ids >= 0
    key = list(zip(dists[real].tolist(), ids[real].tolist()))
    assert key == sorted(key) and not (~real[:real.sum()]).any()
  wide = index_shards.merge(parts, 30)  # More than there are: padded.
  assert (wide[0][:, 16:] == -1).all() and np.isinf(wide[1][:, 16:]).all()


def test_sharded_exact_equals_single_exact(small, tmp_path):
  """Merged exact shards answer exactly what one exact index does: the same
  ids (twins tie-broken to the smaller id) and the same float32 distances."""
  db, emb = small
  summary = index_shards.build(db, str(tmp_path / "ix"), kind="exact",
                               shard_chunks=170, log=lambda _: None)
  assert summary["kind"] == "exact" and len(summary["shards"]) == 4
  assert summary["recall"]["recall_at_10"] == 1.0
  merged = index_shards.load(str(tmp_path / "ix"), db)
  assert (merged.kind, merged.n, merged.dim) == ("exact", len(emb), DIM)
  rng = np.random.default_rng(1)
  queries = np.concatenate([emb[::37], emb[::53] + 0.05 * rng.standard_normal(
      (len(emb[::53]), DIM)).astype(np.float32)])
  for k in (1, 10, 40):
    got, want = merged.search(queries, k), indexlib.ExactSearcher(emb).search(
        queries, k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
  # The twin documents: chunk 0's first two neighbours are chunk 0 and its
  # twin, at distance 0, the smaller id first.
  ids, dists = merged.search(emb[:1], 2)
  twin = int(np.flatnonzero((emb == emb[0]).all(1))[1])
  assert ids[0].tolist() == [0, twin] and dists[0].tolist() == [0.0, 0.0]
  # The lazy form (one shard in memory per search) gives the same.
  lazy = index_shards.load(str(tmp_path / "ix"), db, lazy=True)
  np.testing.assert_array_equal(lazy.search(queries, 10)[0],
                                merged.search(queries, 10)[0])


def test_exhaustive_when_asked_for_everything(small, tmp_path):
  db, emb = small
  index_shards.build(db, str(tmp_path / "ix"), kind="exact", shard_chunks=250,
                     log=lambda _: None)
  merged = index_shards.load(str(tmp_path / "ix"), db)
  n = len(emb)
  ids, dists = merged.search(emb[[3, 400]], n + 5)
  want = indexlib.ExactSearcher(emb).search(emb[[3, 400]], n + 5)
  np.testing.assert_array_equal(ids, want[0])
  assert (ids[:, n:] == -1).all() and np.isinf(dists[:, n:]).all()
  assert sorted(ids[0, :n]) == list(range(n))
  # search_filtered relies on it: excluding every document but one leaves
  # exactly that document's chunks, found by the last, exhaustive, pass.
  docs = db.doc_ids_of(np.arange(n))
  keep = docs[n // 2]
  others = set(np.unique(docs).tolist()) - {keep}
  got = neighbours.search_filtered(merged, emb[:2], n, db.doc_ids_of,
                                   [others, others])
  assert set(got.ids[0][got.ids[0] >= 0].tolist()) == set(
      np.flatnonzero(docs == keep).tolist())


def test_build_reads_one_shard_at_a_time(small, tmp_path):
  """The build reads each index shard's range once, and nothing else: at no
  time more than one shard's embeddings (ScaNN shards of 150 chunks)."""
  db, _ = small
  rec = RecordingDB(db)
  summary = index_shards.build(rec, str(tmp_path / "ix"), kind="scann",
                               shard_chunks=150, recall_queries=0,
                               log=lambda _: None)
  assert rec.reads == index_shards.plan(db.num_chunks, 150)
  assert all(s["kind"] == "scann" and s["recall"] > 0.5
             for s in summary["shards"])
  rec.reads.clear()
  shard = index_shards.load_shard(str(tmp_path / "ix"), 2, rec)
  first, count = index_shards.ranges(str(tmp_path / "ix"))[2]
  assert shard.n == count and not rec.reads  # ScaNN keeps its own copy.
  ids, _ = shard.search(db.embedding_range(first, 5), 1)
  np.testing.assert_array_equal(ids[:, 0], np.arange(5))  # Local ids.
  # An exact shard reads its range in blocks, never more than the shard.
  index_shards.build(rec, str(tmp_path / "ex"), kind="exact", shard_chunks=150,
                     log=lambda _: None)
  assert not rec.reads  # Nothing to read: exact shards are rebuilt at load.
  index_shards.load(str(tmp_path / "ex"), rec).search(
      db.embedding_range(0, 4), 3)
  assert rec.reads and max(c for _, c in rec.reads) <= count + 1


def test_resume_keeps_complete_shards(small, tmp_path):
  db, _ = small
  d = str(tmp_path / "ix")
  quiet = lambda _: None
  first = index_shards.build(db, d, kind="scann", shard_chunks=200, log=quiet,
                             recall_queries=100)
  num = len(index_shards.plan(db.num_chunks, 200))
  assert num >= 3 and first["built"] == num
  assert index_shards.is_complete(d, db)
  stamps = {n: os.stat(os.path.join(d, n)).st_mtime_ns for n in os.listdir(d)}
  again = index_shards.build(db, d, kind="scann", shard_chunks=200, log=quiet)
  assert again["built"] == 0 and again["recall"] == first["recall"]
  assert stamps == {n: os.stat(os.path.join(d, n)).st_mtime_ns
                    for n in os.listdir(d)}  # Nothing rewritten.
  # Killed after shard 1 was saved but before its record: only it is redone.
  os.remove(os.path.join(d, "shard-00001.json"))
  os.remove(os.path.join(d, "index.json"))
  assert not index_shards.is_complete(d, db)
  with pytest.raises(ValueError, match="index.json is missing.*--stage=index"):
    index_shards.load(d, db)
  resumed = index_shards.build(db, d, kind="scann", shard_chunks=200,
                               log=quiet, recall_queries=100)
  assert [s["reused"] for s in resumed["shards"]] == [True, False] + [
      True] * (num - 2)
  for n in ("shard-00000", "shard-00002"):
    assert os.stat(os.path.join(d, n)).st_mtime_ns == stamps[n]
  # Another plan rebuilds every shard and drops those beyond it.
  index_shards.build(db, d, kind="scann", shard_chunks=db.num_chunks - 1,
                     log=quiet, recall_queries=0)
  assert sorted(os.listdir(d)) == ["index.json", "shard-00000",
                                   "shard-00000.json", "shard-00001",
                                   "shard-00001.json"]
  # A damaged shard file is found by the size check.
  victim = os.path.join(d, "shard-00001", "scann", "dataset.npy")
  with open(victim, "ab") as f:
    f.write(b"x")
  with pytest.raises(ValueError, match="shard-00001.*wrong size"):
    index_shards.load(d, db)


def test_refuses_an_index_of_other_db_shards(small, tmp_path):
  db, _ = small
  other = dblib.RetrievalDB.open(make_db(str(tmp_path / "o"), 300, 100,
                                         seed=5))
  index_shards.build(other, str(tmp_path / "ix"), kind="exact",
                     log=lambda _: None)
  with pytest.raises(ValueError, match="other DB shards.*--stage=index"):
    index_shards.load(str(tmp_path / "ix"), db)
  with pytest.raises(ValueError, match="sharded index.*index_shards.load"):
    indexlib.load(str(tmp_path / "ix"), db.embeddings())
  # A single index.save directory is not a sharded index, and a sharded
  # build over it replaces it.
  indexlib.save(indexlib.ExactSearcher(db.embeddings()), str(tmp_path / "one"))
  assert "format 2" in index_shards.problem(str(tmp_path / "one"))
  index_shards.build(db, str(tmp_path / "one"), kind="exact",
                     log=lambda _: None)
  assert index_shards.is_complete(str(tmp_path / "one"), db)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
  """A DB of ~4000 chunks (D=16) in DB shards of 1000."""
  return dblib.RetrievalDB.open(make_db(str(tmp_path_factory.mktemp("large")),
                                        4000, 1000, seed=2))


def test_sharded_scann_recall_close_to_single(large, tmp_path):
  """Four ScaNN shards, each calibrated on its own range, keep the recall of
  one ScaNN index over the whole DB (global recall@10, exact oracle)."""
  quiet = lambda _: None
  one = index_shards.build(large, str(tmp_path / "one"), kind="scann",
                           log=quiet, recall_queries=500)
  four = index_shards.build(large, str(tmp_path / "four"), kind="scann",
                            shard_chunks=1000, log=quiet, recall_queries=500)
  r1, r4 = one["recall"]["recall_at_10"], four["recall"]["recall_at_10"]
  print(f"\nrecall@10: one ScaNN index {r1:.4f}, four shards {r4:.4f}")
  assert r1 >= 0.9 and r4 >= 0.9 and r4 >= r1 - 0.03
  # The figure is index.measure_recall over all chunks: the same from the
  # loaded index, on other queries too.
  merged = index_shards.load(str(tmp_path / "four"), large)
  assert indexlib.measure_recall(merged, large.embeddings(), 500) == r4
  assert index_shards.measure_recall(str(tmp_path / "four"), large, 300,
                                     seed=3) >= 0.88
