"""What evaluated chunks retrieve (retro_jax.evaluation.probes): the union
of two indexes, the evaluated text as DB rows, the leakage probe with the
real frozen BERT, the random control, and the overlap split of the report."""

import numpy as np
import pytest

from retro_jax.corpus import packing
from retro_jax.corpus import sources
from retro_jax.corpus import vocab
from retro_jax.evaluation import leakage
from retro_jax.evaluation import probes
from retro_jax.evaluation import report
from retro_jax.evaluation import scores as scores_lib
from retro_jax.retrieval import index as index_lib
from retro_jax.retrieval import sequence_neighbours
from retro_jax.retrieval.embedder import BertEmbedder
from retro_jax.retrieval.neighbours import Retriever

M = 64


def test_union_searcher_is_exact_search_over_the_concatenation():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(50, 8)), rng.normal(size=(30, 8))
  queries = rng.normal(size=(7, 8)).astype(np.float32)
  union = probes.UnionSearcher([index_lib.ExactSearcher(a),
                                index_lib.ExactSearcher(b)])
  whole = index_lib.ExactSearcher(np.concatenate([a, b]))
  assert union.n == 80
  got, want = union.search(queries, 5), whole.search(queries, 5)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
  ids, dists = union.search(queries, 100)  # More than exist: padded.
  assert (ids[:, 80:] == -1).all() and np.isinf(dists[:, 80:]).all()


def _batch(chunk_rows, docs):
  tokens = np.asarray(chunk_rows, np.int32).reshape(1, -1)
  return {"tokens": tokens, "doc_ids": np.repeat(np.asarray(docs), M)[None]}


def test_evaluated_chunks_continue_within_their_document_only():
  c = [np.full(M, v, np.int32) for v in (1, 2, 3, 4)]
  pad = np.zeros(M, np.int32)
  batches = [_batch([c[0], c[1]], [5, 5]), _batch([c[2], pad], [6, -1]),
             _batch([c[3], pad], [6, -1])]
  tokens, values, docs = probes.evaluated_chunks(batches, M)
  # Padding chunks are not text; the continuation follows the document
  # across batches and stops at its end.
  np.testing.assert_array_equal(tokens[:, 0], [1, 2, 3, 4])
  np.testing.assert_array_equal(docs, [5, 5, 6, 6])
  np.testing.assert_array_equal(values[:, M], [2, 0, 4, 0])
  np.testing.assert_array_equal(values[:, :M], tokens)


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
  docs = list(sources.python_stdlib("train", max_bytes=300_000))
  return vocab.train([d.text for d in docs],
                     str(tmp_path_factory.mktemp("spm") / "spm.model"), 512)


def _chunk_batch(sp, doc, doc_id, num_chunks):
  chunks = packing.document_chunks(sp.encode(doc.text), M)[:num_chunks]
  return {"tokens": np.asarray(chunks, np.int32).reshape(1, -1),
          "doc_ids": np.full((1, num_chunks * M), doc_id, np.int64)}


def test_the_leak_probe_retrieves_the_evaluated_text_and_its_continuation(sp):
  """A real DB of training chunks and held-out chunks that are not in it:
  with the probe, chunk u's nearest neighbour is itself, its value holds
  chunk u + 1, so r(C_{u+1}) = 1 against the neighbours it is predicted
  with; without it, neither holds."""
  train = [d for d in sources.python_stdlib("train", max_bytes=60_000)]
  held = [d for d in sources.python_stdlib("validation", max_bytes=100_000)
          if len(d.text) > 3000][:2]
  db_chunks, db_docs = [], []
  for i, d in enumerate(train):
    for c in packing.document_chunks(sp.encode(d.text), M):
      db_chunks.append(c)
      db_docs.append(i)
  db_chunks = np.asarray(db_chunks, np.int32)
  db_docs = np.asarray(db_docs, np.int64)
  db_values = np.concatenate([db_chunks, np.zeros_like(db_chunks)], 1)
  embedder = BertEmbedder.load()
  base = Retriever(
      embedder, index_lib.ExactSearcher(embedder.embed(
          sequence_neighbours.chunk_texts(sp, db_chunks, M))),
      doc_ids_of=lambda ids: db_docs[ids], values_of=lambda ids: db_values[ids])
  batches = [_chunk_batch(sp, d, 100 + i, 4) for i, d in enumerate(held)]
  k = 2
  probe = probes.leaked_retriever(base, sp, batches, M)
  for batch in batches:
    got, _ = sequence_neighbours.neighbours_for_sequences(
        probe, sp, batch["tokens"], batch["doc_ids"], k, M)  # [1, L, k, r]
    plain, _ = sequence_neighbours.neighbours_for_sequences(
        base, sp, batch["tokens"], batch["doc_ids"], k, M)
    chunks = batch["tokens"].reshape(-1, M)  # [L, m]
    np.testing.assert_array_equal(got[0, :, 0, :M], chunks)
    np.testing.assert_array_equal(got[0, :-1, 0, M:], chunks[1:])
    r_leak = leakage.chunk_leakage(batch["tokens"], got, M)  # [1, L]
    r_plain = leakage.chunk_leakage(batch["tokens"], plain, M)
    assert (r_leak[0, 1:] == 1.0).all() and (r_plain[0, 1:] < 1.0).all()
    # Without the probe the held-out chunks are not in the DB at all.
    assert not (plain[0, :, :, :M] == chunks[:, None]).all(-1).any()


class _TinyDB:
  chunk_size = M
  num_chunks = 10

  def neighbour_values(self, ids):
    return np.repeat(np.asarray(ids, np.int32)[..., None] + 1, 2 * M, -1)


def test_random_neighbours_are_uniform_db_chunks_of_the_right_shape():
  batches = [{"tokens": np.ones((3, 4 * M), np.int32),
              "doc_ids": np.zeros((3, 4 * M), np.int64)}] * 200
  out = list(probes.with_random_neighbours(batches, _TinyDB(), k=2))
  nbs = np.stack([b["neighbours"] for b in out])  # [200, 3, 4, 2, 2m]
  assert nbs.shape == (200, 3, 4, 2, 2 * M)
  counts = np.bincount(nbs[..., 0].ravel() - 1, minlength=10)
  assert counts.min() > 0.8 * counts.mean()  # Every chunk, about as often.
  again = list(probes.with_random_neighbours(batches[:1], _TinyDB(), k=2))
  np.testing.assert_array_equal(again[0]["neighbours"], out[0]["neighbours"])


def test_overlap_split_sums_the_chunks_on_each_side_of_the_threshold():
  s = scores_lib.ChunkScores(
      nll_on=np.array([1.0, 2.0, 4.0, 0.0]), nll_off=np.array([2.0, 4.0,
                                                              4.0, 0.0]),
      targets=np.array([1, 1, 1, 0]), bytes=np.array([1, 1, 2, 0]),
      leakage=np.array([1.0, 0.8, 0.1, 1.0]))
  split = report.overlap_split(s)
  ln2 = np.log(2)
  over, rest = split["overlapping"], split["rest"]
  assert over["chunks"] == 2 and rest["chunks"] == 1  # No-target chunk out.
  assert over["bpb_on"] == pytest.approx(3.0 / ln2 / 2)
  assert over["cut"] == pytest.approx(0.5)
  assert rest["cut"] == pytest.approx(0.0)
  lines = report.format_overlap("task", split)
  assert "50.0% lower" in lines[0] and "r(C) > 0.75" in lines[0]
  assert lines[1].endswith("(0.0% lower)") and "r(C) <= 0.75" in lines[1]
  # Where retrieval made the figure worse the line says so, not "-x% lower".
  worse = dict(split, rest=dict(rest, cut=-0.043))
  assert report.format_overlap("task", worse)[1].endswith("(4.3% higher)")


def test_an_unknown_mode_is_refused_by_name():
  with pytest.raises(ValueError, match="config.eval.neighbours"):
    probes.check_mode("leaky")
