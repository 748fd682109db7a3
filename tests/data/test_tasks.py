"""RETRO seqio Tasks end to end on a slice of the standard library: a freshly
trained SentencePiece model, a real DB over the training split (real MiniLM,
exact index, neighbour table), the neighbour precompute in Beam
(FnApiRunner): table lookups for the training split, BERT for held-out
text; and the online batches."""

import os
import shutil

import numpy as np
import pytest
import seqio

from retro_jax.config import EOS_ID
from retro_jax.corpus import packing
from retro_jax.corpus import sources
from retro_jax.data import batches as batches_lib
from retro_jax.data import cache_job
from retro_jax.data import tasks
from retro_jax.retrieval import sequence_neighbours

from task_cache import K, MAX_BYTES, NAME, SEQ_LEN, read_split


@pytest.fixture(scope="module")
def setup(stdlib_task):
  return stdlib_task


def _db_chunk_docs(db):
  """DB chunk tokens (as bytes) -> set of document ids having that chunk."""
  ids = np.arange(len(db))
  tokens, docs = db.chunk_tokens(ids), db.doc_ids_of(ids)
  table = {}
  for t, d in zip(tokens, docs):
    table.setdefault(t.tobytes(), set()).add(int(d))
  return table


def test_batches_have_the_model_shapes_and_dtypes(setup):
  it = tasks.batches(NAME, "train", batch_size=4,
                     cache_dir=setup["cache_dir"])
  batch = next(it)
  assert set(batch) == {"tokens", "neighbours", "loss_mask"}
  assert batch["tokens"].shape == (4, SEQ_LEN)
  assert batch["neighbours"].shape == (4, SEQ_LEN // 64, K, 128)
  assert batch["loss_mask"].shape == (4, SEQ_LEN)
  for v in batch.values():
    assert v.dtype == np.int32
  assert (batch["loss_mask"] == (batch["tokens"] != 0)).all()
  # Padding only ends a document's last chunk, right after its EOS.
  chunks = batch["tokens"].reshape(-1, 64)
  for c in chunks[(chunks == 0).any(-1)]:
    first_pad = np.argmax(c == 0)
    assert c[first_pad - 1] == EOS_ID and not c[first_pad:].any()
  assert (batch["neighbours"][..., :64] != 0).any(-1).all()  # All found.


def test_summary_counts_and_rerun_skips(setup):
  summary = setup["summary"]
  for split in ("train", "validation"):
    s = summary[split]
    cached = batches_lib.cached_split(
        cache_job.task_dir(NAME, setup["cache_dir"]), split)
    assert s["sequences"] == cached.num_input_examples(split) > 0
    assert s["chunks"] == s["sequences"] * SEQ_LEN // 64
    assert s["missing"] == 0
  # The training split is the DB's: looked up; held-out text is embedded.
  assert summary["train"]["from_db"] and not summary["validation"]["from_db"]
  assert setup["task"].spec["from_db"] == ["train"]
  assert summary["validation"]["searched"] == summary["validation"]["chunks"]
  # The table holds other documents' chunks: a row runs short only when the
  # sequence's other documents fill it.
  assert summary["train"]["searched"] < summary["train"]["chunks"] // 10
  assert any("dropped by the document filter" in l for l in setup["lines"])
  again = tasks.cache_task(NAME, setup["cache_dir"], log=lambda _: None)
  assert again["skipped"] and again["train"] == summary["train"]


def _source_sequences(setup, split):
  ds = setup["task"].source.get_dataset(split, shuffle=False)
  return list(ds.as_numpy_iterator())


def test_training_sequences_are_runs_of_db_chunks(setup):
  """Every training chunk is a DB chunk with a known id, cut as the corpus
  tokenized and chunked document by document (packing.pack_chunks)."""
  db, sp = setup["db"], setup["sp"]
  got = _source_sequences(setup, "train")
  part = db.part("train")
  assert part["first_chunk"] == 0
  assert len(got) == part["num_chunks"] // (SEQ_LEN // 64) == setup[
      "summary"]["train"]["sequences"]
  docs = sources.python_stdlib("train", max_bytes=MAX_BYTES)
  want = list(packing.pack_chunks(
      ((d.doc_id, sp.encode(d.text)) for d in docs), SEQ_LEN))
  assert len(want) == len(got)
  for s, (g, (tokens, doc_ids)) in enumerate(zip(got, want)):
    ids = np.arange(s * SEQ_LEN // 64, (s + 1) * SEQ_LEN // 64)
    np.testing.assert_array_equal(g["chunk_ids"], ids)
    np.testing.assert_array_equal(g["tokens"], tokens)
    np.testing.assert_array_equal(g["doc_ids"], doc_ids)
    np.testing.assert_array_equal(g["tokens"].reshape(-1, 64),
                                  db.chunk_tokens(ids))


def test_held_out_sequences_are_chunked_as_the_db_chunks(setup):
  sp = setup["sp"]
  got = _source_sequences(setup, "validation")
  docs = sources.python_stdlib("validation", max_bytes=MAX_BYTES)
  want = list(packing.pack_chunks(
      ((d.doc_id, sp.encode(d.text)) for d in docs), SEQ_LEN))
  assert len(got) == len(want) > 0
  for g, (tokens, doc_ids) in zip(got, want):
    assert (g["chunk_ids"] == -1).all()          # Not in the DB.
    np.testing.assert_array_equal(g["tokens"], tokens)
    np.testing.assert_array_equal(g["doc_ids"], doc_ids)


def test_table_lookups_equal_searching_with_the_stored_embeddings(setup):
  """The table path gives exactly the neighbours that searching the index
  with each chunk's stored embedding gives, with the same document filter;
  a table row that the filter empties is searched again, to the same end."""
  db, sp = setup["db"], setup["sp"]
  got = _source_sequences(setup, "train")
  chunk_ids = np.stack([g["chunk_ids"] for g in got])      # [S, L]
  tokens = np.stack([g["tokens"] for g in got])            # [S, n]
  doc_ids = np.stack([g["doc_ids"] for g in got])          # [S, n]
  lookup = sequence_neighbours.load_table(setup["db_dir"])
  nb, stats = sequence_neighbours.neighbours_from_table(lookup, chunk_ids, K)
  retriever, _ = sequence_neighbours.load_retriever(
      setup["db_dir"], setup["spm_path"], setup["embedder"])
  want, want_stats = sequence_neighbours.neighbours_for_sequences(
      retriever, sp, tokens, doc_ids, K,
      embeddings=db.embeddings_of(chunk_ids.reshape(-1)))
  np.testing.assert_array_equal(nb, want)
  # The search drops each chunk's own document (its nearest: itself) too;
  # the table never held it.
  assert want_stats["dropped"] >= stats["chunks"] > stats["dropped"]
  assert stats["missing"] == 0 and stats["searched"] < stats["chunks"]

  class FirstColumn:  # The same table with one candidate per chunk: itself.
    candidates = 1
    def lookup(self, ids):
      cand, dists = lookup.table.lookup(ids)
      return cand[..., :1], dists[..., :1]

  short = sequence_neighbours.TableLookup.__new__(
      sequence_neighbours.TableLookup)
  short.__dict__.update(lookup.__dict__, table=FirstColumn())
  again, again_stats = sequence_neighbours.neighbours_from_table(
      short, chunk_ids, K)
  np.testing.assert_array_equal(again, want)
  assert again_stats["searched"] == again_stats["chunks"]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_no_neighbour_from_its_own_sequence_over_a_whole_split(setup, split):
  every = read_split(setup["cache_dir"], split)
  n = setup["summary"][split]["sequences"]
  assert every["loss_mask"].any(-1).sum() == n      # Every example once,
  assert not every["loss_mask"][n:].any()           # then padding rows.
  db = setup["db"]
  all_ids = np.arange(len(db))
  docs, values = db.doc_ids_of(all_ids), db.neighbour_values(all_ids)
  twins = {}                                        # chunk bytes -> ids
  for i, t in enumerate(db.chunk_tokens(all_ids)):
    twins.setdefault(t.tobytes(), []).append(i)
  for nbs, seq_docs in zip(every["neighbours"][:n], every["doc_ids"][:n]):
    own = set(seq_docs.tolist())
    for nb in nbs.reshape(-1, nbs.shape[-1]):        # [r]
      ids = twins[nb[:64].tobytes()]                 # A DB chunk ...
      allowed = [i for i in ids if int(docs[i]) not in own]
      assert allowed, "neighbour only found in its own sequence's documents"
      # ... with its continuation (of one of its twins outside them).
      assert any((values[i] == nb).all() for i in allowed)


def test_neighbours_decode_to_db_text(setup):
  db, sp = setup["db"], setup["sp"]
  texts = {db.chunk_text(i, sp) for i in range(len(db))}
  batch = next(tasks.batches(NAME, "validation", batch_size=2,
                             cache_dir=setup["cache_dir"]))
  for nb in batch["neighbours"][0].reshape(-1, 128):
    assert sp.decode([int(t) for t in nb[:64] if t]) in texts


def test_same_seed_same_batches_across_epochs(setup):
  def take(seed, steps=30):
    it = tasks.batches(NAME, "train", batch_size=6, seed=seed,
                       cache_dir=setup["cache_dir"])
    return [next(it) for _ in range(steps)]
  a, b, c = take(0), take(0), take(1)
  epoch_steps = setup["summary"]["train"]["sequences"] / 6
  assert len(a) > epoch_steps                   # Crosses an epoch.
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any((x["tokens"] != z["tokens"]).any() for x, z in zip(a, c))


def test_resume_gives_the_uninterrupted_batches(setup):
  kw = dict(batch_size=4, seed=3, cache_dir=setup["cache_dir"])
  it = tasks.batches(NAME, "train", **kw)
  full = [next(it) for _ in range(40)]
  for start in (7, 26):                         # Within and after epoch 1.
    resumed = tasks.batches(NAME, "train", start_step=start, **kw)
    for step in range(start, 40):
      got = next(resumed)
      for k in got:
        np.testing.assert_array_equal(got[k], full[step][k])


def test_hosts_read_disjoint_shards_covering_the_split(setup):
  every = read_split(setup["cache_dir"], "train")
  n = setup["summary"]["train"]["sequences"]
  seen, counts = [], []
  for host in range(2):
    rows = list(tasks.batches(NAME, "train", batch_size=2, shard_index=host,
                              num_shards=2, cache_dir=setup["cache_dir"],
                              shuffle=False, repeat=False))
    assert all(r["tokens"].shape == (1, SEQ_LEN) for r in rows)
    counts.append(len(rows))
    seen += [t.tobytes() for r in rows for t, m in
             zip(r["tokens"], r["loss_mask"]) if m.any()]
  assert counts[0] == counts[1] == -(-n // 2)   # Hosts step together.
  assert len(seen) == n
  assert sorted(seen) == sorted(t.tobytes() for t in every["tokens"][:n])


def test_neighbours_for_sequences_excludes_the_sequence_documents(setup):
  db, sp = setup["db"], setup["sp"]
  retriever, _ = sequence_neighbours.load_retriever(
      setup["db_dir"], setup["spm_path"], setup["embedder"])
  docs = db.doc_ids_of(np.arange(len(db)))
  doc = next(d for d in np.unique(docs) if (docs == d).sum() >= 4)
  ids = np.flatnonzero(docs == doc)[:4]
  tokens = db.chunk_tokens(ids).reshape(1, -1)           # [1, 256]
  doc_ids = np.full(tokens.shape, doc, np.int64)
  nb, stats = sequence_neighbours.neighbours_for_sequences(
      retriever, sp, tokens, doc_ids, K)
  assert nb.shape == (1, 4, K, 128) and nb.dtype == np.int32
  assert stats["chunks"] == 4 and stats["dropped"] >= 4   # Itself, each.
  table = _db_chunk_docs(db)
  for v in nb.reshape(-1, 128):
    assert table[v[:64].tobytes()] - {int(doc)}
  # With an unrelated document id nothing is excluded: itself comes first.
  free, stats = sequence_neighbours.neighbours_for_sequences(
      retriever, sp, tokens, np.full(tokens.shape, -7, np.int64), K)
  assert stats["dropped"] == 0
  np.testing.assert_array_equal(free[0, :, 0, :64], tokens.reshape(4, 64))


def test_an_evaluation_host_without_examples_yields_padding(setup):
  """More hosts than examples: every host yields as many batches; a host
  with an empty shard yields only padding (and refuses to repeat)."""
  total = setup["summary"]["validation"]["sequences"]
  hosts = total + 2
  per_host = []
  for host in (0, total - 1, total, total + 1):
    rows = list(tasks.batches(NAME, "validation", batch_size=hosts,
                              shard_index=host, num_shards=hosts,
                              cache_dir=setup["cache_dir"], shuffle=False,
                              repeat=False, with_doc_ids=True))
    per_host.append(rows)
  assert [len(rows) for rows in per_host] == [1, 1, 1, 1]
  assert per_host[0][0]["loss_mask"].all()
  for rows in per_host[2:]:
    (batch,) = rows
    assert batch["tokens"].shape == (1, SEQ_LEN)
    assert batch["neighbours"].shape == (1, SEQ_LEN // 64, K, 128)
    assert not batch["loss_mask"].any() and not batch["tokens"].any()
    assert (batch["doc_ids"] == -1).all()
  with pytest.raises(ValueError, match="has no example"):
    next(tasks.batches(NAME, "validation", batch_size=hosts,
                       shard_index=total, num_shards=hosts,
                       cache_dir=setup["cache_dir"]))


@pytest.mark.slow
def test_inspect_command_prints_chunks_beside_neighbours(setup):
  import subprocess
  import sys
  from conftest import REPO_ROOT
  out = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "scripts", "inspect_example.py"),
       "--config=" + os.path.join(REPO_ROOT, "configs", "tiny.py"),
       f"--config.data.task_name={NAME}",
       f"--config.data.db_dir={setup['db_dir']}",
       f"--config.data.spm_path={setup['spm_path']}",
       f"--config.data.cache_dir={setup['cache_dir']}",
       f"--config.data.max_bytes.train={MAX_BYTES}",
       f"--config.data.max_bytes.validation={MAX_BYTES}",
       f"--config.train.seq_len={SEQ_LEN}",
       f"--config.model.num_neighbours={K}", "--split=validation",
       "--index=1"],
      capture_output=True, text=True, cwd=REPO_ROOT, check=True,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  assert out.stdout.count("=== chunk") == SEQ_LEN // 64, out.stdout[-2000:]
  assert out.stdout.count("--- neighbour") == K * SEQ_LEN // 64
  # The printed chunk texts are those of the example (file order, index 1).
  example = list(tasks.batches(NAME, "validation", batch_size=1,
                               cache_dir=setup["cache_dir"], shuffle=False,
                               repeat=False))[1]
  first_chunk = setup["sp"].decode(example["tokens"][0, :64].tolist())
  assert first_chunk.splitlines()[0] in out.stdout


def test_hosts_read_whole_files_when_the_cache_has_enough(setup, tmp_path):
  """A cache of 2 record files over 2 hosts: seqio shards by file; hosts
  still cover the split once and step together."""
  import json
  import tensorflow as tf
  src = cache_job.task_dir(NAME, setup["cache_dir"])
  dst = cache_job.task_dir(NAME, str(tmp_path))
  shutil.copytree(src, dst)
  prefix = seqio.get_cached_tfrecord_prefix(dst, "train")
  records = list(tf.data.TFRecordDataset(f"{prefix}-00000-of-00001"))
  os.remove(f"{prefix}-00000-of-00001")
  for i in range(2):                    # Uneven files: 2/3 and 1/3.
    part = records[:2 * len(records) // 3] if i == 0 else records[
        2 * len(records) // 3:]
    with tf.io.TFRecordWriter(f"{prefix}-{i:05d}-of-00002") as w:
      for r in part:
        w.write(r.numpy())
  info_path = seqio.get_cached_info_path(dst, "train")
  info = json.load(open(info_path))
  info["num_shards"] = 2
  json.dump(info, open(info_path, "w"))
  seen, counts = [], []
  for host in range(2):
    rows = list(tasks.batches(NAME, "train", batch_size=4, shard_index=host,
                              num_shards=2, cache_dir=str(tmp_path),
                              shuffle=False, repeat=False))
    counts.append(len(rows))
    seen += [t.tobytes() for r in rows for t, m in
             zip(r["tokens"], r["loss_mask"]) if m.any()]
  assert counts[0] == counts[1] == -(-(2 * len(records) // 3) // 2)
  every = read_split(setup["cache_dir"], "train")
  n = len(records)
  assert sorted(seen) == sorted(t.tobytes() for t in every["tokens"][:n])
  # Training streams of both hosts run on past their (unequal) epochs.
  it = tasks.batches(NAME, "train", batch_size=4, shard_index=1,
                     num_shards=2, cache_dir=str(tmp_path))
  assert len([next(it) for _ in range(n)]) == n
