"""Editing a retrieval DB: remove the email/ package, then add it back.

Real parts, small: the standard library's email/, json/, tomllib/ and
zoneinfo/ packages (41 files, 488 KB), a SentencePiece model of 4096 pieces
trained on them (2114 chunks, 1596 of them email/), a one-layer BERT cut from
all-MiniLM-L6-v2 (test_beam_jobs.make_tiny_bert; RETRO_JAX_EDIT_TEST_BERT=
minilm uses the whole model, as for the figures in docs/db_editing.md) and a
ScaNN index, whose recall@10 each edit measures again. Queries are chunks of
email/ files, embedded as text: the "before" answers are recorded on the
built DB, then the same queries are asked after the removal and after the
documents are added back.
"""

import json
import os
import time

import numpy as np
import pytest

from retro_jax.corpus import sources, vocab
from retro_jax.corpus.packing import document_chunks
from retro_jax.evaluation.leakage import chunk_leakage
from retro_jax.retrieval import db as dblib
from retro_jax.retrieval import db_edit
from retro_jax.retrieval import db_format as fmt
from retro_jax.retrieval import index as indexlib
from retro_jax.retrieval import index_shards
from retro_jax.retrieval import neighbour_table as nt
from retro_jax.retrieval import sequence_neighbours
from retro_jax.retrieval.db_select import Selection
from retro_jax.retrieval.embedder import BertEmbedder
from test_beam_jobs import make_tiny_bert  # pylint: disable=g-bad-import-order

PACKAGES = ("stdlib:email/", "stdlib:json/", "stdlib:tomllib/",
            "stdlib:zoneinfo/")
EMAIL = "stdlib:email/*"
SHARD = 400
K = 10
NUM_QUERIES = 80
QUIET = lambda line: None


def _is_email(record):
  return (record["source"] or "").startswith("stdlib:email/")


def _answers(db, embedder, texts, k=K):
  """Per query: the exact top-k as (chunk id, source, chunk text) and the
  index's top-k ids, with the values [q, k, 2m] of the exact top-k."""
  sp = vocab.load(os.path.join(db.path, fmt.SPM_MODEL))
  queries = embedder.embed(texts)  # [q, D]
  exact_ids, _ = indexlib.ExactSearcher(db.embeddings()).search(queries, k)
  index = index_shards.load(fmt.index_dir_of(db.path, db.manifest), db)
  index_ids, _ = index.search(queries, k)  # [q, k]
  hits = [[(int(i), db.document_of(int(i))["source"], db.chunk_text(int(i), sp))
           for i in row] for row in exact_ids]
  return hits, index_ids, db.neighbour_values(exact_ids)


def _overlap_share(tokens, values):
  """The share of query chunks [q, m] whose nearest neighbour (values
  [q, k, 2m]) overlaps them by r(C) > 0.75 (evaluation/leakage.py)."""
  r = chunk_leakage(tokens, values[:, None, :1], tokens.shape[1],
                    source="same")  # [q, 1]
  return float((r[:, 0] > 0.75).mean())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The built DB (index, table, the spec its Task caches record), its docs and
  the answers of the email queries before any edit."""
  root = tmp_path_factory.mktemp("edit")
  docs = [d for d in sources.python_stdlib() if d.source.startswith(PACKAGES)]
  spm_path = str(root / "spm.model")
  sp = vocab.train([d.text for d in docs], spm_path, vocab_size=4096)
  if os.environ.get("RETRO_JAX_EDIT_TEST_BERT") == "minilm":
    bert = BertEmbedder.load()
  else:
    bert = BertEmbedder.load(make_tiny_bert(str(root / "bert-l1")))
  db_dir = str(root / "db")
  dblib.write_chunks({"train": docs}, sp, db_dir, shard_chunks=SHARD,
                     spm_path=spm_path, progress=False)
  dblib.embed_shards(db_dir, bert, progress=False)
  dblib.finalize(db_dir)
  db = dblib.RetrievalDB.open(db_dir)
  built = index_shards.build(db, os.path.join(db_dir, fmt.INDEX_DIR),
                             kind="scann", log=QUIET)
  dblib.update_manifest(db_dir, index={"kind": "scann", "dir": fmt.INDEX_DIR,
                                       "shards": 1, "shard_chunks": 0},
                        recall=built["recall"])
  nt.build_table(db_dir, os.path.join(db_dir, fmt.INDEX_DIR), 4, log=QUIET)
  db = dblib.RetrievalDB.open(db_dir)
  # Queries: email/ chunks spread over the package, as text.
  email_rows = np.flatnonzero([_is_email(db.document_of(i))
                               for i in range(len(db))])
  rows = email_rows[np.linspace(0, len(email_rows) - 1, NUM_QUERIES,
                                dtype=int)]
  texts = [db.chunk_text(int(i), sp) for i in rows]
  tokens = db.chunk_tokens(rows)  # [q, m]
  before = _answers(db, bert, texts)
  keep = np.ones(len(db), bool)
  keep[email_rows] = False
  return dict(root=root, docs=docs, sp=sp, spm_path=spm_path, bert=bert,
              db_dir=db_dir, texts=texts, tokens=tokens, before=before,
              manifest=dict(db.manifest), num_email_rows=len(email_rows),
              kept_embeddings=db.embeddings()[keep],  # [N - email, D]
              task_spec=_task_spec(db_dir, spm_path))


def _task_spec(db_dir, spm_path):
  """The spec a Task over the DB records with its cache (task_spec.py)."""
  from retro_jax.data import tasks  # pylint: disable=g-import-not-at-top
  return tasks.register_retro_task(
      "edit_test_task", corpus="python_stdlib", spm_path=spm_path,
      db_dir=db_dir, seq_len=128, num_neighbours=2,
      max_bytes={"validation": 1000}).spec


def test_documents_record_sources(world):
  db = dblib.RetrievalDB.open(world["db_dir"], verify=True)
  assert db.has_sources
  listed = list(db.documents())
  by_source = {d.source: d for d in world["docs"]}
  assert [r["source"] for r in listed] == [d.source for d in world["docs"]]
  for r in listed:
    doc = by_source[r["source"]]
    assert r["doc_id"] == doc.doc_id and r["bytes"] == len(doc.text.encode())
  # Every chunk's record is its document's: the chunk's tokens are those
  # of that file, cut as the build cuts it.
  doc_ids = db.doc_ids_of(np.arange(len(db)))  # [N]
  for i in range(0, len(db), 37):
    record = db.document_of(i)
    assert record["doc_id"] == doc_ids[i]
    rows = np.flatnonzero(doc_ids == doc_ids[i])
    ids = world["sp"].encode(by_source[record["source"]].text)
    np.testing.assert_array_equal(
        db.chunk_tokens(rows), document_chunks(np.asarray(ids, np.int32)))
  # The documents file is covered by the shard's checksums.
  assert all(fmt.DOCUMENTS in s["files"] for s in db.manifest["shards"])


@pytest.fixture(scope="module")
def removed(world):
  """The DB after removing every document under email/."""
  start = time.perf_counter()
  record = db_edit.remove_documents(world["db_dir"],
                                    Selection.of(source_globs=[EMAIL]),
                                    log=QUIET)
  print(f"\nremoval: {record['summary']} in "
        f"{time.perf_counter() - start:.1f} s, recall@10 "
        f"{world['manifest']['recall']['recall_at_10']:.3f} before, "
        f"{record['recall']['recall_at_10']:.3f} after")
  db = dblib.RetrievalDB.open(world["db_dir"], verify=True)
  return record, db, _answers(db, world["bert"], world["texts"])


def test_removed_documents_are_never_retrieved(world, removed):
  record, db, (hits, index_ids, values) = removed
  emails = [d for d in world["docs"] if d.source.startswith("stdlib:email/")]
  assert record["documents"] == len(emails)
  assert record["chunks"] == world["num_email_rows"]
  assert len(db) == world["manifest"]["num_chunks"] - record["chunks"]
  email_ids = {d.doc_id for d in emails}
  assert not email_ids & set(np.unique(db.doc_ids_of(np.arange(len(db)))))
  assert not any(_is_email(r) for r in db.documents())
  for row, ids in zip(hits, index_ids):
    assert not any(s.startswith("stdlib:email/") for _, s, _ in row)
    assert all(not _is_email(db.document_of(int(i))) for i in ids if i >= 0)
  # Before, each query found its own chunk; now something else.
  before_hits = world["before"][0]
  assert all(b[0][1].startswith("stdlib:email/") for b in before_hits)
  assert all(a[0][1] != b[0][1] or a[0][2] != b[0][2]
             for a, b in zip(hits, before_hits))
  share_before = _overlap_share(world["tokens"], world["before"][2])
  share_after = _overlap_share(world["tokens"], values)
  print(f"\nr(C) > 0.75 of the nearest neighbour: {share_before:.3f} before, "
        f"{share_after:.3f} after removing email/ ({len(hits)} queries)")
  assert share_before >= 0.95 and share_after <= 0.05


def test_removal_equals_a_build_without_them(world, removed, tmp_path):
  _, db, _ = removed
  kept = [d for d in world["docs"] if not d.source.startswith("stdlib:email/")]
  fresh = str(tmp_path / "fresh")
  summary = dblib.write_chunks({"train": kept}, world["sp"], fresh,
                               shard_chunks=SHARD, spm_path=world["spm_path"],
                               progress=False)
  ids = np.arange(len(db))
  assert summary["num_chunks"] == len(db)
  fresh_tokens = np.concatenate([np.load(os.path.join(
      fmt.shard_dir(fresh, i), fmt.TOKENS)) for i in range(
          summary["num_shards"])])
  np.testing.assert_array_equal(db.chunk_tokens(ids), fresh_tokens)
  for key in ("num_documents", "num_tokens", "pad_tokens", "text_bytes"):
    assert db.manifest[key] == summary[key], key
  part = db.manifest["parts"][0]
  assert (part["first_chunk"], part["num_chunks"], part["num_tokens"]) == (
      0, summary["num_chunks"], summary["num_tokens"])
  # Stored embeddings were carried over, not recomputed.
  np.testing.assert_array_equal(db.embeddings(), world["kept_embeddings"])
  assert db.manifest["content_version"] != world["manifest"][
      "content_version"]


def test_edit_is_recorded_and_the_old_files_are_gone(world, removed):
  record, db, _ = removed
  manifest = db.manifest
  assert manifest["edits"][-1] == record
  assert record["previous_version"] == world["manifest"]["content_version"]
  assert record["version"] == db.content_version == fmt.content_version(
      manifest["shards"])
  assert record["recall"]["queries"] > 0 and manifest["recall"] == record[
      "recall"]
  assert record["recall"]["recall_at_10"] >= 0.9
  assert manifest["index"]["dir"] == f"index-{db.content_version[:12]}"
  names = set(os.listdir(os.path.join(world["db_dir"], fmt.SHARDS)))
  assert names == {s["name"] for s in manifest["shards"]}
  assert not os.path.exists(os.path.join(world["db_dir"], fmt.INDEX_DIR))
  # The build's stages, rerun on the edited DB, keep it as it is.
  assert dblib.finalize(world["db_dir"]) == manifest
  with pytest.raises(ValueError, match="was edited.*fresh directory"):
    dblib.write_chunks({"train": world["docs"]}, world["sp"], world["db_dir"],
                       shard_chunks=SHARD, spm_path=world["spm_path"],
                       progress=False)


def test_stale_table_and_cache_are_refused(world, removed):
  from retro_jax.data import cache_job  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as e:
    nt.NeighbourTable.open(world["db_dir"])
  message = str(e.value)
  assert "\n" not in message and "--stage=table" in message
  assert world["manifest"]["content_version"][:12] in message
  assert "removed" in message  # Names the edit.
  # A Task cache made before the edit (its retro_task.json holds the spec
  # of the Task then, as cache_task writes it) is refused after it, naming
  # cache_tasks.py; a cache of the edited DB is served.
  cache_dir = str(world["root"] / "cache")
  directory = cache_job.task_dir("edit_test_task", cache_dir)
  os.makedirs(directory)
  with open(os.path.join(directory, cache_job.COMPLETED), "w"):
    pass
  record_path = os.path.join(directory, cache_job.RETRO_TASK)
  with open(record_path, "w") as f:
    json.dump({"spec": world["task_spec"]}, f)
  spec = _task_spec(world["db_dir"], world["spm_path"])
  assert spec["db_version"] == removed[1].content_version
  with pytest.raises(cache_job.IncompleteCacheError) as e:
    cache_job.require_complete("edit_test_task", cache_dir, (), spec)
  assert "db_version" in str(e.value) and "cache_tasks.py" in str(e.value)
  assert "\n" not in str(e.value)
  with open(record_path, "w") as f:
    json.dump({"spec": spec}, f)
  cache_job.require_complete("edit_test_task", cache_dir, (), spec)


def test_adding_back_retrieves_the_same_documents(world, removed):
  start = time.perf_counter()
  record = db_edit.add_documents(
      world["db_dir"], [d for d in world["docs"]
                        if d.source.startswith("stdlib:email/")],
      world["bert"], part="train", log=QUIET)
  seconds = time.perf_counter() - start
  db = dblib.RetrievalDB.open(world["db_dir"], verify=True)
  assert record["action"] == "add" and record["chunks"] == world[
      "num_email_rows"]
  assert len(db.manifest["edits"]) == 2
  for key in ("num_chunks", "num_documents", "num_tokens", "pad_tokens",
              "text_bytes"):
    assert db.manifest[key] == world["manifest"][key], key
  assert record["recall"]["queries"] > 0
  assert record["recall"]["recall_at_10"] >= 0.9
  hits, index_ids, values = _answers(db, world["bert"], world["texts"])
  before_hits, _, before_values = world["before"]
  # The same documents and texts, at new chunk ids (appended at the end).
  same = [[h[1:] for h in a] == [h[1:] for h in b]
          for a, b in zip(hits, before_hits)]
  top1 = np.mean([a[0][1:] == b[0][1:] for a, b in zip(hits, before_hits)])
  print(f"\nadding back: {record['summary']} in {seconds:.1f} s; recall@10 "
        f"{record['recall']['recall_at_10']:.3f}; exact top-1 the same "
        f"document and text for {top1:.3f} of queries, top-{K} for "
        f"{np.mean(same):.3f}; r(C) > 0.75 share "
        f"{_overlap_share(world['tokens'], values):.3f}")
  assert top1 == 1.0
  assert np.mean(same) >= 0.9, np.mean(same)
  np.testing.assert_array_equal(values[:, 0], before_values[:, 0])
  assert _overlap_share(world["tokens"], values) >= 0.95
  # The index finds what exact search finds (recall measured above).
  exact = np.asarray([[h[0] for h in row] for row in hits])
  assert indexlib.recall_at_k(index_ids, exact, K) >= 0.9
  # The retriever of sampling and evaluation (--db) serves the edited DB.
  retriever, _ = sequence_neighbours.load_retriever(
      world["db_dir"], world["spm_path"], world["bert"])
  nb, got = retriever.retrieve_texts(world["texts"][:8], 2)  # [8, 2, 2m]
  np.testing.assert_array_equal(got[:, 0], values[:8, 0])
  assert all(_is_email(db.document_of(int(i))) for i in nb.ids[:, 0])
  # The refresh command's stage rebuilds the table on the edited DB's index;
  # the Tasks' table lookups then serve it.
  nt.build_table(world["db_dir"], fmt.index_dir_of(world["db_dir"]), 4,
                 log=QUIET)
  lookup = sequence_neighbours.load_table(world["db_dir"])
  ids, _ = lookup.table.lookup(np.arange(len(db)))  # [N, 4]
  assert ids.max() < len(db) and (ids >= 0).all()
  assert lookup.searcher.n == len(db)
