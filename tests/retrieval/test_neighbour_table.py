"""Tests of the neighbour table (retrieval.neighbour_table) on synthetic DBs:
it equals brute force, its bytes do not depend on the order of the steps,
it resumes, and a stale or unfinished table is refused."""

import hashlib
import os
import shutil

import numpy as np
import pytest

from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import index as indexlib
from retro_jax.retrieval import index_shards
from retro_jax.retrieval import neighbour_table as nt
from retro_jax.retrieval import neighbours
from test_index_shards import make_db  # pylint: disable=g-bad-import-order

C = 8
QUIET = lambda _: None  # pylint: disable=unnecessary-lambda-assignment


def _tree(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for d, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(d, name), "rb") as f:
        out[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha256(
            f.read()).hexdigest()
  return out


def _shards(db_dir):
  return len(dblib.RetrievalDB.open(db_dir).shard_ranges())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A DB of ~700 chunks in DB shards of 100, an exact index of 3 shards
  (whose ranges cut DB shards), its table; returns (db_dir, index_dir,
  {file: sha256} of the table)."""
  root = tmp_path_factory.mktemp("table")
  db_dir = make_db(str(root), 700, 100, seed=7)
  index_dir = os.path.join(db_dir, "index")
  db = dblib.RetrievalDB.open(db_dir)
  index_shards.build(db, index_dir, kind="exact",
                     shard_chunks=-(-db.num_chunks // 3), log=QUIET)
  assert len(index_shards.ranges(index_dir)) == 3
  nt.build_table(db_dir, index_dir, C, log=QUIET)
  return db_dir, index_dir, _tree(os.path.join(db_dir, nt.TABLE_DIR))


def test_table_equals_brute_force(built):
  db_dir, _, tree = built
  db = dblib.RetrievalDB.open(db_dir)
  assert sorted(tree) == sorted(
      [nt.TABLE_JSON] + [f"shard-{i:05d}/{f}" for i in range(_shards(db_dir))
                         for f in (nt.IDS, nt.DISTS, nt.RECORD)])
  emb = db.embeddings()  # [N, D]
  table = nt.NeighbourTable.open(db_dir)
  assert table.candidates == C and table.num_chunks == len(emb)
  ids, dists = table.lookup(np.arange(len(emb)))  # [N, C]
  assert ids.dtype == np.int64 and dists.dtype == np.float32
  docs = db.doc_ids_of(np.arange(len(emb)))  # [N]
  # The C nearest chunks of other documents than the chunk's own.
  want = neighbours.search_filtered(indexlib.ExactSearcher(emb), emb, C,
                                    db.doc_ids_of, [(d,) for d in docs])
  np.testing.assert_array_equal(ids, want.ids)
  np.testing.assert_array_equal(dists, want.dists)
  assert not (db.doc_ids_of(ids) == docs[:, None]).any()
  # And against float64 brute force: the distances of the ids found, and
  # no chunk of another document left out that is nearer than the C-th by
  # more than rounding.
  d64 = np.square(emb[:, None, :].astype(np.float64) - emb[None]).sum(-1)
  np.testing.assert_allclose(dists, np.take_along_axis(d64, ids, 1),
                             rtol=1e-5, atol=1e-5)
  d64[docs[:, None] == docs[None]] = np.inf
  assert (np.sort(d64, 1)[:, C - 1] >= dists[:, -1] - 1e-4).all()
  # The second document repeats the first: their chunks find each other.
  first = np.flatnonzero(docs == docs[0])
  assert (dists[first, 0] == 0).all()
  assert (db.doc_ids_of(ids[first, 0]) != docs[0]).all()


def test_lookup_shapes_and_memory_maps(built):
  db_dir, _, _ = built
  table = nt.NeighbourTable.open(db_dir)
  all_ids, all_dists = table.lookup(np.arange(table.num_chunks))
  q = np.array([[0, 99, 100], [101, table.num_chunks - 1, 350]])  # Across
  ids, dists = table.lookup(q)                                    # shards.
  assert ids.shape == dists.shape == (2, 3, C)
  np.testing.assert_array_equal(ids, all_ids[q])
  np.testing.assert_array_equal(dists, all_dists[q])
  assert table.lookup(np.zeros((0,), np.int32))[0].shape == (0, C)
  assert all(isinstance(a, np.memmap) for a in table._ids + table._dists)
  with pytest.raises(IndexError):
    table.lookup(np.array([table.num_chunks]))
  with pytest.raises(IndexError):
    table.lookup(np.array([-1]))


def test_same_bytes_whatever_the_order_of_the_steps(built, tmp_path):
  """Search steps in another order, merge steps in reverse, merges that
  find their index beside the partials: the same files, the same identity."""
  db_dir, index_dir, tree = built
  want_identity = nt.NeighbourTable.open(db_dir).identity
  copy = str(tmp_path / "db")
  shutil.copytree(db_dir, copy, ignore=shutil.ignore_patterns(nt.TABLE_DIR))
  index_copy = os.path.join(copy, "index")
  for j in (2, 0, 1):
    assert nt.search_step(copy, index_copy, j, C) == list(
        range(_shards(copy)))
  partials = os.listdir(os.path.join(copy, nt.TABLE_DIR, nt.PARTIAL))
  assert len(partials) == 1
  for i in reversed(range(_shards(copy))):
    nt.merge_step(copy, i, C, index_dir=index_copy if i % 2 else None)
  with pytest.raises(ValueError, match="table.json is missing"):
    nt.NeighbourTable.open(copy)  # Not finalized yet.
  nt.finalize(copy, index_copy, C)
  assert _tree(os.path.join(copy, nt.TABLE_DIR)) == tree  # Partials gone too.
  assert nt.NeighbourTable.open(copy).identity == want_identity


def test_steps_read_one_index_shard_and_one_db_shard(built, tmp_path,
                                                     monkeypatch):
  db_dir, _, _ = built
  copy = str(tmp_path / "db")
  shutil.copytree(db_dir, copy, ignore=shutil.ignore_patterns(nt.TABLE_DIR))
  loads, reads = [], []
  real_load, real_range = (index_shards.load_shard,
                           dblib.RetrievalDB.embedding_range)
  monkeypatch.setattr(index_shards, "load", None)  # The merged index: never.
  monkeypatch.setattr(index_shards, "load_shard", lambda d, j, db: (
      loads.append(j), real_load(d, j, db))[1])
  monkeypatch.setattr(dblib.RetrievalDB, "embedding_range", lambda self, f, c: (
      reads.append((f, c)), real_range(self, f, c))[1])
  nt.search_step(copy, os.path.join(copy, "index"), 1, C)
  assert loads == [1]
  db = dblib.RetrievalDB.open(copy)
  first, count = index_shards.ranges(os.path.join(copy, "index"))[1]
  # Queries: one DB shard per read, each once; the exact shard's own reads
  # stay within its range, in blocks no larger than it.
  queries = [r for r in reads if r in db.shard_ranges()]
  assert sorted(set(queries)) == db.shard_ranges()
  assert all(first <= f and f + c <= first + count
             for f, c in reads if (f, c) not in db.shard_ranges())


def test_resume_and_rebuild(built, tmp_path):
  db_dir, index_dir, tree = built
  copy = str(tmp_path / "db")
  shutil.copytree(db_dir, copy)
  index_copy = os.path.join(copy, "index")
  tdir = os.path.join(copy, nt.TABLE_DIR)
  stamps = {p: os.stat(os.path.join(tdir, p)).st_mtime_ns for p in tree}
  nt.build_table(copy, index_copy, C, log=QUIET)  # Complete: nothing done.
  assert stamps == {p: os.stat(os.path.join(tdir, p)).st_mtime_ns
                    for p in tree}
  # Killed while shard 3 was merged: only shard 3 is searched and merged.
  os.remove(os.path.join(tdir, "shard-00003", nt.RECORD))
  os.remove(os.path.join(tdir, nt.TABLE_JSON))
  with pytest.raises(ValueError, match="table.json is missing.*--stage=table"):
    nt.NeighbourTable.open(copy)
  with pytest.raises(ValueError, match="shard-00003 is not written"):
    nt.finalize(copy, index_copy, C)
  assert nt.search_step(copy, index_copy, 0, C) == [3]
  nt.build_table(copy, index_copy, C, log=QUIET)
  assert _tree(tdir) == tree
  for p in tree:
    if not p.startswith("shard-00003") and p != nt.TABLE_JSON:
      assert os.stat(os.path.join(tdir, p)).st_mtime_ns == stamps[p]
  # Another C is another table, with another identity.
  before = nt.NeighbourTable.open(copy).identity
  nt.build_table(copy, index_copy, 4, log=QUIET)
  table = nt.NeighbourTable.open(copy)
  assert table.candidates == 4 and table.identity != before
  np.testing.assert_array_equal(
      table.lookup(np.arange(50))[0],
      nt.NeighbourTable.open(db_dir).lookup(np.arange(50))[0][:, :4])


def test_refuses_stale_tables(built, tmp_path):
  db_dir, _, _ = built
  copy = str(tmp_path / "db")
  shutil.copytree(db_dir, copy)
  index_copy = os.path.join(copy, "index")
  # Another index (rebuilt, here with other shards): the table is stale.
  db = dblib.RetrievalDB.open(copy)
  index_shards.build(db, index_copy, kind="exact", shard_chunks=150,
                     log=QUIET)
  with pytest.raises(ValueError) as e:
    nt.NeighbourTable.open(copy)
  assert "another index" in str(e.value) and "--stage=table" in str(e.value)
  assert "\n" not in str(e.value)
  nt.NeighbourTable.open(copy, index_dir=db_dir + "/index")  # Its own index.
  # A table of another DB copied in: refused.
  other = make_db(str(tmp_path / "o"), 300, 100, seed=9)
  shutil.copytree(os.path.join(copy, nt.TABLE_DIR),
                  os.path.join(other, nt.TABLE_DIR))
  with pytest.raises(ValueError, match="other DB shards.*--stage=table"):
    nt.NeighbourTable.open(other)
  # A shard rewritten after table.json (same sizes, other bytes): refused.
  rec_path = os.path.join(copy, nt.TABLE_DIR, "shard-00002", nt.RECORD)
  rec = dblib.fmt.read_json(rec_path)
  rec["files"][nt.IDS]["sha256"] = "0" * 64
  dblib.fmt.write_json_atomic(rec_path, rec)
  with pytest.raises(ValueError, match="shard-00002.*another index"):
    nt.NeighbourTable.open(copy, index_dir=db_dir + "/index")
  # The search step refuses an index built for another DB.
  with pytest.raises(ValueError, match="other DB shards.*--stage=index"):
    nt.search_step(other, index_copy, 0, C)


def test_scann_table_recall(tmp_path):
  """A table made with two ScaNN index shards: its neighbours are mostly the
  exact ones (recall@8 against exact search, own document excluded)."""
  db_dir = make_db(str(tmp_path), 2000, 500, seed=11)
  db = dblib.RetrievalDB.open(db_dir)
  index_dir = os.path.join(db_dir, "index")
  index_shards.build(db, index_dir, kind="scann", shard_chunks=1000,
                     log=QUIET, recall_queries=0)
  nt.build_table(db_dir, index_dir, C, log=QUIET)
  ids, _ = nt.NeighbourTable.open(db_dir).lookup(np.arange(db.num_chunks))
  emb = db.embeddings()
  docs = db.doc_ids_of(np.arange(db.num_chunks))
  exact = neighbours.search_filtered(indexlib.ExactSearcher(emb), emb, C,
                                     db.doc_ids_of, [(d,) for d in docs]).ids
  recall = indexlib.recall_at_k(ids, exact, C)
  print(f"\ntable recall@{C} with 2 ScaNN shards: {recall:.4f}")
  assert recall >= 0.9
