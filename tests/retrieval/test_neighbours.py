"""Tests of same-document filtering and the Retriever on real embeddings."""

import numpy as np
import pytest

# The shared fixtures of real stdlib embeddings.
from retrieval_data import data, embeddings  # pylint: disable=unused-import
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval.embedder import BertEmbedder
from retro_jax.retrieval.index import ExactSearcher
from retro_jax.retrieval.neighbours import (Neighbours, Retriever,
                                            search_filtered)


class CountingSearcher:
  """Wraps a searcher and records the k of every call."""

  def __init__(self, searcher):
    self.inner, self.calls = searcher, []
    self.kind, self.n, self.dim = searcher.kind, searcher.n, searcher.dim

  def search(self, queries, k):
    self.calls.append((len(queries), k))
    return self.inner.search(queries, k)


def filtered_brute_force(db, docs, queries, k, exclude):
  """Sort the whole DB by float64 distance (ties by id), drop excluded."""
  ids = np.full((len(queries), k), -1, np.int64)
  for i, q in enumerate(queries.astype(np.float64)):
    row = np.argsort(np.square(q - db).sum(-1), kind="stable")
    keep = row[~np.isin(docs[row], list(exclude[i]))][:k]
    ids[i, :len(keep)] = keep
  return ids


def random_case(embeddings, docs, rng, num_queries=300):
  """Queries near DB points; exclusions of 1-10 documents incl. their own."""
  rows = rng.choice(len(embeddings), num_queries, replace=False)
  queries = embeddings[rows] + 0.05 * rng.standard_normal(
      (num_queries, embeddings.shape[1])).astype(np.float32)
  all_docs = np.unique(docs)
  exclude = []
  for r in rows:
    others = rng.choice(all_docs, rng.integers(0, 10), replace=False)
    exclude.append({int(docs[r])} | {int(x) for x in others})
  return queries, exclude


def check_filtered(nb, docs, exclude, k):
  assert isinstance(nb, Neighbours)
  assert nb.ids.shape == nb.dists.shape == (len(exclude), k)
  assert nb.ids.dtype == np.int64 and nb.dists.dtype == np.float32
  for ids, dists, banned in zip(nb.ids, nb.dists, exclude):
    assert not set(docs[ids[ids >= 0]].tolist()) & set(banned)
    assert (np.diff(dists) >= 0).all()


def documents(kind, data, rng):
  """Document ids of the DB chunks: 50 random documents; the chunks' real
  files; or 50 clusters of nearby chunks (a chunk's nearest neighbours then
  share its document, so excluding it forces search_filtered to fetch
  more)."""
  if kind == "random":
    return rng.integers(0, 50, len(data[2]))
  if kind == "files":
    return data[1]
  centres = data[2][rng.choice(len(data[2]), 50, replace=False)]
  return ExactSearcher(centres).search(data[2], 1)[0][:, 0]


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
@pytest.mark.parametrize("doc_kind", ["random", "files", "clustered"])
def test_exact_filtering_equals_brute_force(data, embeddings, doc_kind):
  rng = np.random.default_rng(len(doc_kind))
  docs = documents(doc_kind, data, rng)
  queries, exclude = random_case(embeddings, docs, rng)
  searcher = CountingSearcher(ExactSearcher(embeddings))
  nb = search_filtered(searcher, queries, 10, lambda ids: docs[ids], exclude)
  check_filtered(nb, docs, exclude, 10)
  want = filtered_brute_force(embeddings, docs, queries, 10, exclude)
  np.testing.assert_array_equal(nb.ids, want)
  assert (nb.ids >= 0).all()
  assert searcher.calls[0] == (300, 40)  # k * 4 > k + 10 exclusions.
  print(f"\n{doc_kind}: search calls (queries, k) {searcher.calls}")
  if doc_kind == "clustered":  # Short rows, and only those, asked again.
    assert len(searcher.calls) > 1 and searcher.calls[1][0] < 300


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_scann_filtering(data, embeddings):
  rng = np.random.default_rng(2)
  docs = documents("clustered", data, rng)
  queries, exclude = random_case(embeddings, docs, rng)
  scann = index_lib.build_index(embeddings, kind="scann")
  nb = search_filtered(scann, queries, 10, lambda ids: docs[ids], exclude)
  check_filtered(nb, docs, exclude, 10)
  want = filtered_brute_force(embeddings, docs, queries, 10, exclude)
  recall = index_lib.recall_at_k(nb.ids, want, 10)
  print(f"\nScaNN filtered recall@10 = {recall:.4f}")
  assert recall >= 0.9


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_exclusion_of_almost_everything_pads(embeddings):
  n = len(embeddings)
  docs = np.zeros(n, np.int64)
  docs[[3, 1500, 2999]] = 7  # The only chunks of document 7.
  searcher = CountingSearcher(ExactSearcher(embeddings))
  nb = search_filtered(searcher, embeddings[:2], 5, lambda ids: docs[ids],
                       [{0}, {0, 7}])
  assert sorted(nb.ids[0, :3]) == [3, 1500, 2999]
  assert (nb.ids[0, 3:] == -1).all() and np.isinf(nb.dists[0, 3:]).all()
  assert (nb.ids[1] == -1).all() and np.isinf(nb.dists[1]).all()
  assert searcher.calls[-1][1] == n  # Doubled until the whole DB.


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_no_exclusion_is_plain_search(embeddings):
  nb = search_filtered(ExactSearcher(embeddings), embeddings[:20], 4,
                       lambda ids: ids, [()] * 20)
  np.testing.assert_array_equal(
      nb.ids, ExactSearcher(embeddings).search(embeddings[:20], 4)[0])
  with pytest.raises(ValueError, match="exclude"):
    search_filtered(ExactSearcher(embeddings), embeddings[:2], 4,
                    lambda ids: ids, [()])


@pytest.mark.slow  # Real BERT embeddings of 3000 chunks.
def test_retriever(data, embeddings):
  texts, docs, _ = data
  n = len(texts)
  tokens = (np.arange(n * 6, dtype=np.int32).reshape(n, 6) + 1)  # [n, r]
  retriever = Retriever(BertEmbedder.load(), ExactSearcher(embeddings),
                        doc_ids_of=lambda ids: docs[ids],
                        values_of=lambda ids: tokens[ids])
  nb, values = retriever.retrieve_texts(texts[:3], k=2)
  np.testing.assert_array_equal(nb.ids[:, 0], [0, 1, 2])  # Each finds itself.
  assert nb.dists[:, 0].max() < 1e-3
  assert values.shape == (3, 2, 6) and values.dtype == np.int32
  np.testing.assert_array_equal(values, tokens[nb.ids])
  # Excluding its own file: neither itself nor any chunk of that file.
  exclude = [{int(docs[i])} for i in range(3)]
  nb, values = retriever.retrieve_embeddings(embeddings[:3], k=2,
                                             exclude=exclude)
  assert not (docs[nb.ids] == docs[:3, None]).any()
  # A DB of 2 chunks asked for 3 neighbours: the third is padding.
  small = Retriever(None, ExactSearcher(embeddings[:2]),
                    doc_ids_of=lambda ids: docs[ids],
                    values_of=lambda ids: tokens[ids])
  nb, values = small.retrieve_embeddings(embeddings[:1], k=3)
  assert nb.ids[0, 2] == -1 and (values[0, 2] == 0).all()
  assert (values[0, :2] == tokens[nb.ids[0, :2]]).all()
  with pytest.raises(ValueError, match="no embedder"):
    small.retrieve_texts(["x"], k=1)


def test_filtering_on_synthetic_clusters():
  """The fast tier's check of search_filtered: 40 tight clusters of random
  vectors, one document each, so excluding a query's own document forces a
  second, wider search; the result equals brute force."""
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((40, 16)).astype(np.float32)
  docs = np.repeat(np.arange(40), 25)                            # [1000]
  db = centres[docs] + 0.01 * rng.standard_normal((1000, 16)).astype(
      np.float32)                                                # [1000, 16]
  queries, exclude = random_case(db, docs, rng, num_queries=50)
  searcher = CountingSearcher(ExactSearcher(db))
  nb = search_filtered(searcher, queries, 10, lambda ids: docs[ids], exclude)
  check_filtered(nb, docs, exclude, 10)
  np.testing.assert_array_equal(
      nb.ids, filtered_brute_force(db, docs, queries, 10, exclude))
  assert len(searcher.calls) > 1  # The first candidates were not enough.
