"""Tests of the exact and ScaNN indexes on real MiniLM chunk embeddings."""

import json
import os
import shutil
import time

import numpy as np
import pytest

# The shared fixtures of real stdlib embeddings.
from retrieval_data import data, embeddings  # pylint: disable=unused-import
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval.index import ExactSearcher, ScannParams, ScannSearcher


@pytest.fixture(scope="module")
def scann_index(embeddings):
  return index_lib.build_index(embeddings, kind="scann")


def brute_force(db, queries, k):
  """float64 sum((q - x)^2) over the whole DB, stable sort (ties: by id)."""
  d = np.square(queries[:, None, :].astype(np.float64) - db[None]).sum(-1)
  ids = np.argsort(d, axis=1, kind="stable")[:, :k]
  return ids, np.take_along_axis(d, ids, axis=1)


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_fixture_is_real_text(data):
  texts, docs, vecs = data
  assert len(texts) == len(set(texts)) == len(vecs) == 3000
  assert vecs.shape == (3000, 384) and vecs.dtype == np.float32
  assert len(np.unique(docs)) > 300  # Spread over the whole library.


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_exact_equals_brute_force(embeddings):
  queries = embeddings[::301] + 0.01 * np.random.default_rng(0).standard_normal(
      (10, embeddings.shape[1])).astype(np.float32)  # Off the DB points.
  queries = np.concatenate([queries, embeddings[[5, 77]]])  # And on them.
  ids, dists = ExactSearcher(embeddings).search(queries, 10)
  want_ids, want_dists = brute_force(embeddings, queries, 10)
  assert ids.dtype == np.int64 and dists.dtype == np.float32
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(dists, want_dists, rtol=1e-4, atol=1e-4)
  assert ids[-2, 0] == 5 and ids[-1, 0] == 77


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_exact_blocks_and_padding(embeddings, monkeypatch):
  db = embeddings[:500]
  q = embeddings[500:520]
  whole = ExactSearcher(db).search(q, 7)
  monkeypatch.setattr(index_lib, "_BLOCK_BYTES", 4 * 1024 * 64)  # 64 rows.
  blocked = ExactSearcher(db)
  assert blocked._rows == 64
  np.testing.assert_array_equal(blocked.search(q, 7)[0], whole[0])
  ids, dists = ExactSearcher(db[:5]).search(q[:2], 8)  # k > n: padding.
  assert (ids[:, 5:] == -1).all() and np.isinf(dists[:, 5:]).all()
  assert sorted(ids[0, :5]) == list(range(5))


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_scann_recall(embeddings, scann_index):
  """The size rule alone (no calibration) reaches recall@10 >= 0.95 on
  queries other than those build_index calibrated on (seed 0)."""
  plain = ScannSearcher.build(embeddings)
  assert plain.params == ScannParams.for_size(len(embeddings))
  recall = index_lib.measure_recall(plain, embeddings, num_queries=1000, k=10,
                                    seed=1)
  print(f"\nScaNN {plain.params}: recall@10 = {recall:.4f}")
  assert recall >= 0.95
  assert scann_index.recall >= 0.95
  ids, dists = scann_index.search(embeddings[:50], 10)
  assert ids.shape == dists.shape == (50, 10)
  assert (np.diff(dists, axis=1) >= 0).all()
  # Reorder distances are true squared L2 distances.
  true = np.square(embeddings[ids] - embeddings[:50, None]).sum(-1)
  np.testing.assert_allclose(dists, true, rtol=1e-4, atol=1e-3)


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_calibrate_searches_more_leaves(embeddings, scann_index):
  low = scann_index.with_leaves_to_search(2)
  assert index_lib.measure_recall(low, embeddings, 300, seed=1) < 0.9
  tuned = index_lib.calibrate(low, embeddings, 0.95)
  assert tuned.recall >= 0.95 and tuned.params.leaves_to_search > 2
  assert tuned.params.num_leaves == scann_index.params.num_leaves
  print(f"\ncalibrated from 2 to {tuned.params.leaves_to_search} leaves: "
        f"recall@10 {tuned.recall:.4f}")
  assert index_lib.measure_recall(tuned, embeddings, 1000, seed=1) >= 0.93


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_scann_exhaustive_when_asked_for_everything(embeddings, scann_index):
  n = len(embeddings)
  ids, dists = scann_index.search(embeddings[:3], n + 5)
  assert (ids[:, n:] == -1).all() and np.isinf(dists[:, n:]).all()
  want, _ = ExactSearcher(embeddings).search(embeddings[:3], n)
  for row, exact in zip(ids[:, :n], want):
    assert sorted(row) == list(range(n))
    np.testing.assert_array_equal(row[:20], exact[:20])


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_build_index_size_rule(embeddings):
  assert isinstance(index_lib.build_index(embeddings), ExactSearcher)
  assert isinstance(index_lib.build_index(embeddings, exact_below=1000),
                    ScannSearcher)
  with pytest.raises(ValueError, match="kind"):
    index_lib.build_index(embeddings, kind="annoy")
  with pytest.raises(ValueError, match="ExactSearcher"):
    index_lib.build_index(embeddings[:15], kind="scann")
  tiny = index_lib.build_index(embeddings[:40], kind="scann")  # 6 leaves.
  ids, _ = tiny.search(embeddings[:40], 3)
  np.testing.assert_array_equal(ids[:, 0], np.arange(40))


def test_params_for_size():
  assert ScannParams.for_size(1).num_leaves == 1
  assert ScannParams.for_size(1).leaves_to_search == 1
  p = ScannParams.for_size(1_000_000)
  assert p.num_leaves == 1000 and p.leaves_to_search == 95
  assert p.dims_per_block == 2 and p.reorder == 100


def test_recall_at_k():
  exact = np.array([[1, 2, 3], [4, 5, -1]])
  assert index_lib.recall_at_k(exact, exact, 3) == 1.0
  assert index_lib.recall_at_k(np.array([[3, 9, 1], [5, -1, -1]]), exact,
                               3) == pytest.approx(3 / 5)


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_save_load_round_trip_and_move(embeddings, scann_index, tmp_path):
  queries = embeddings[1000:1100]
  want = scann_index.search(queries, 10)
  path = tmp_path / "index"
  index_lib.save(scann_index, str(path))
  meta = json.loads((path / "index.json").read_text())
  assert meta["kind"] == "scann" and meta["n"] == len(embeddings)
  assert meta["params"]["num_leaves"] == scann_index.params.num_leaves
  assert not [p for p in os.listdir(tmp_path) if p != "index"]  # No temp.
  moved = tmp_path / "elsewhere" / "renamed"
  moved.parent.mkdir()
  shutil.move(str(path), str(moved))
  loaded = index_lib.load(str(moved), embeddings)
  assert loaded.params == scann_index.params
  got = loaded.search(queries, 10)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  with pytest.raises(FileExistsError):
    index_lib.save(loaded, str(moved))
  index_lib.save(ExactSearcher(embeddings), str(moved), overwrite=True)
  assert json.loads((moved / "index.json").read_text())["kind"] == "exact"


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_exact_save_load(embeddings, tmp_path):
  index_lib.save(ExactSearcher(embeddings), str(tmp_path / "exact"))
  assert os.listdir(tmp_path / "exact") == ["index.json"]
  loaded = index_lib.load(str(tmp_path / "exact"), embeddings)
  assert isinstance(loaded, ExactSearcher)
  with pytest.raises(ValueError, match="embeddings"):
    index_lib.load(str(tmp_path / "exact"))
  with pytest.raises(ValueError, match=r"\[3000, 384\]"):
    index_lib.load(str(tmp_path / "exact"), embeddings[:10])


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_interrupted_save_is_never_loaded(embeddings, scann_index, tmp_path,
                                          monkeypatch):
  def crash(path, obj, indent=1):
    del path, obj, indent
    raise KeyboardInterrupt  # As if killed after ScaNN's files were written.
  monkeypatch.setattr(index_lib.files, "write_json", crash)
  with pytest.raises(KeyboardInterrupt):
    index_lib.save(scann_index, str(tmp_path / "index"))
  assert os.listdir(tmp_path) == []  # Neither the index nor its temp dir.
  # A temp dir left by a hard kill holds ScaNN's files but no index.json.
  half = tmp_path / ".index.tmp-x"
  scann_index.serialize(str(half / "scann"))
  with pytest.raises(ValueError, match="not a complete index"):
    index_lib.load(str(half))


def test_load_missing_dir(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=missing):
    index_lib.load(missing)


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_queries_per_second(embeddings, scann_index):
  """Information only (not asserted): ScaNN vs exact on 1000 queries."""
  queries = embeddings[:1000]
  exact = ExactSearcher(embeddings)
  for name, searcher in (("exact", exact), ("scann", scann_index)):
    searcher.search(queries[:10], 10)  # Warm up.
    start = time.perf_counter()
    searcher.search(queries, 10)
    qps = len(queries) / (time.perf_counter() - start)
    print(f"\n{name}: {qps:,.0f} queries/s (n={len(embeddings)}, k=10)")
