"""Evaluation: bits per byte by hand, retrieval off == no CCA, the leakage
table and report, paired gains with bootstrap intervals, chunk files, sliding
windows. (Eval sets are in test_eval_sets.py; the evaluate script runs in
test_run.py.)"""

import json
import math
import os

import haiku as hk
import jax
import numpy as np
import pytest

from retro_jax.config import EOS_ID
from retro_jax.config import RetroConfig
from retro_jax.core import files
from retro_jax.evaluation import chunk_files
from retro_jax.evaluation import inputs
from retro_jax.evaluation import intervals
from retro_jax.evaluation import report
from retro_jax.evaluation import scores as scores_lib
from retro_jax.corpus import sources
from retro_jax.corpus import vocab
from retro_jax.model.network import Retro

TEXTS = ["naïve café — ünïcödé ✓ 日本語 テキスト\n\tdef f(x):  return x ** 2\n",
         "plain ascii text with  double  spaces and a trailing space ",
         "emoji 🙂 and bytes \x07 \u00a0 mixed"]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
  docs = list(sources.python_stdlib("train", max_bytes=300_000))
  path = str(tmp_path_factory.mktemp("spm") / "spm.model")
  return vocab.train([d.text for d in docs], path, 512)


@pytest.fixture(scope="module")
def stdlib_ids(sp):
  doc = next(d for d in sources.python_stdlib("validation", max_bytes=200_000)
             if len(d.text) > 5000)
  return np.asarray(sp.encode(doc.text), np.int32)


def _dummy_prefix(sp, first_id):
  return int(sp.id_to_piece(int(first_id)).startswith("\u2581"))


def test_token_bytes_sum_to_the_decoded_text(sp, stdlib_ids):
  table = scores_lib.token_bytes(sp)
  assert table.shape == (512,) and table[0] == table[1] == table[2] == 0
  for text in TEXTS + [sp.decode(stdlib_ids[:300].tolist())]:
    ids = sp.encode(text)
    decoded = sp.decode(ids)
    # SentencePiece's decoder drops the leading dummy-prefix space only.
    assert table[ids].sum() == len(decoded.encode()) + _dummy_prefix(sp, ids[0])
  # A slice from the middle of a text (what a chunk is).
  ids = stdlib_ids[101:400]
  assert table[ids].sum() == (len(sp.decode(ids.tolist()).encode())
                              + _dummy_prefix(sp, ids[0]))
  assert any(sp.is_byte(i) for i in sp.encode(TEXTS[2]))  # Fallback used.


@pytest.mark.slow
def test_bits_per_byte_equals_hand_computed(sp, stdlib_ids):
  cfg = RetroConfig.preset("tiny")
  model = Retro(cfg)
  n = 128
  tokens = stdlib_ids[None, :n]  # [1, n]
  rng = np.random.default_rng(0)
  nbs = rng.integers(1, cfg.vocab_size, (1, n // 64, 2, 128)).astype(np.int32)
  params = model.init(jax.random.key(3), tokens, nbs)
  scores = scores_lib.evaluate_batches(
      model, params, [{"tokens": tokens, "neighbours": nbs}],
      scores_lib.token_bytes(sp))
  got = scores_lib.summarize(scores)

  logits = np.asarray(model.apply(params, tokens, nbs), np.float64)[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -sum(logp[t, tokens[0, t + 1]] for t in range(n - 1))
  targets = tokens[0, 1:]
  num_bytes = len(sp.decode(targets.tolist()).encode()) + _dummy_prefix(
      sp, targets[0])
  on = got["retrieval_on"]
  assert got["tokens"] == n - 1 and got["bytes"] == num_bytes
  assert on["bits_per_byte"] == pytest.approx(nll / math.log(2) / num_bytes,
                                              rel=1e-5)
  assert on["loss"] == pytest.approx(nll / (n - 1), rel=1e-5)
  assert on["perplexity"] == pytest.approx(math.exp(nll / (n - 1)), rel=1e-5)
  assert on["bits_per_token"] == pytest.approx(nll / (n - 1) / math.log(2),
                                               rel=1e-5)


@pytest.mark.slow
def test_retrieval_off_equals_the_model_without_cca(tiny, make_tokens,
                                                    make_neighbours):
  model = Retro(tiny)
  tokens = make_tokens(tiny, 2, 192)
  nbs = make_neighbours(tiny, 2, 192)
  params = model.init(jax.random.key(0), tokens, nbs)
  table = np.ones(tiny.vocab_size, np.int64)
  batch = {"tokens": tokens, "neighbours": nbs,
           "loss_mask": np.ones_like(tokens)}
  retro = scores_lib.evaluate_batches(model, params, [batch], table)

  base_cfg = tiny.replace(cca_layers=())
  base_params = hk.data_structures.filter(
      lambda mod, name, v: "encoder" not in mod and "/cca" not in mod, params)
  assert (hk.data_structures.tree_size(base_params)
          < hk.data_structures.tree_size(params))
  base = scores_lib.evaluate_batches(Retro(base_cfg), base_params, [batch],
                                   table, retrieval_off=False)
  np.testing.assert_allclose(retro.nll_off, base.nll_on, rtol=1e-5, atol=1e-4)
  # Retrieval on differs: the comparison above is not vacuous.
  assert np.abs(retro.nll_on - retro.nll_off).max() > 1e-3
  # Chunk 0's targets (positions < m - 1 predict them) see no neighbours.
  assert retro.nll_on[0] == pytest.approx(retro.nll_off[0], rel=1e-5)


def test_leakage_table_filters_chunks():
  scores = scores_lib.ChunkScores(
      nll_on=np.array([1.0, 2.0, 3.0, 4.0]) * math.log(2),
      nll_off=np.array([2.0, 2.0, 4.0, 8.0]) * math.log(2),
      targets=np.array([63, 64, 64, 64]), bytes=np.array([10, 10, 20, 40]),
      leakage=np.array([0.0, 0.2, 0.5, 1.0], np.float32))
  rows = {r["alpha"]: r for r in report.leakage_table(scores)}
  assert rows[0.0]["chunks"] == 1 and rows[0.0]["bpb_on"] == pytest.approx(0.1)
  assert rows[0.25]["bpb_on"] == pytest.approx(3 / 20)
  assert rows[0.5]["bpb_off"] == pytest.approx(8 / 40)
  assert rows[1.0]["bpb_on"] == pytest.approx(
      scores_lib.summarize(scores)["retrieval_on"]["bits_per_byte"])
  assert "alpha" in report.format_table(list(rows.values()))


def test_paired_gain_is_exact_for_a_uniform_saving_and_brackets_noise():
  rng = np.random.default_rng(0)
  nbytes = rng.integers(50, 300, size=40)  # 10 sequences of 4 chunks.
  base = nbytes * 2.0 * math.log(2)  # 2 bits per byte everywhere.
  new = base - nbytes * 0.25 * math.log(2)  # Saves 0.25 bits per byte.
  g = intervals.paired_gain(base, new, nbytes, 4)
  assert g["bpb_gain"] == pytest.approx(0.25)
  assert g["ci95"] == pytest.approx([0.25, 0.25])  # Every resample agrees.
  assert g["relative"] == pytest.approx(0.125) and g["sequences"] == 10
  # Worse in half the sequences, better in the other half by the same bits:
  # no net gain, and the interval straddles zero.
  swing = np.repeat(np.where(np.arange(10) % 2, 1.0, -1.0), 4) * 30.0
  g = intervals.paired_gain(base, base + swing, nbytes, 4)
  assert g["ci95"][0] < 0 < g["ci95"][1]
  # Resampling whole sequences: a saving confined to one of ten sequences
  # gives an interval whose low end is 0 (the resamples without it).
  one = base.copy()
  one[:4] -= 100.0
  g = intervals.paired_gain(base, one, nbytes, 4)
  assert g["bpb_gain"] > 0 and g["ci95"][0] == 0.0 < g["ci95"][1]
  with pytest.raises(ValueError, match="not whole sequences of 3"):
    intervals.paired_gain(base, new, nbytes, 3)
  with pytest.raises(ValueError, match="did not score the same chunks"):
    intervals.paired_gain(base, new[:-4], nbytes, 4)


def test_chunk_scores_round_trip_through_npz(tmp_path):
  scores = scores_lib.ChunkScores(
      nll_on=np.array([1.5, 2.5]), nll_off=None,
      targets=np.array([63, 64]), bytes=np.array([100, 120]),
      leakage=np.array([0.0, 0.5], np.float32))
  path = str(tmp_path / "eval" / "c.npz")  # The folder is created.
  back = chunk_files.load_chunk_scores(
      chunk_files.save_chunk_scores(path, scores))
  assert back.nll_off is None
  for name in ("nll_on", "targets", "bytes", "leakage"):
    np.testing.assert_array_equal(getattr(back, name), getattr(scores, name))
    assert getattr(back, name).dtype == getattr(scores, name).dtype
  assert os.listdir(tmp_path / "eval") == ["c.npz"]  # No temporary left.
  # The format is a plain np.savez of the fields: files written before
  # (and by other tools) load alike.
  np.savez(str(tmp_path / "old.npz"), nll_on=scores.nll_on,
           nll_off=scores.nll_on * 2, targets=scores.targets,
           bytes=scores.bytes)
  old = chunk_files.load_chunk_scores(str(tmp_path / "old.npz"))
  np.testing.assert_array_equal(old.nll_off, scores.nll_on * 2)
  assert old.leakage is None


def test_plot_writes_a_png(tmp_path):
  rows = [{"alpha": a, "bpb_on": 1 + a, "bpb_off": 2.0, "chunks": 1,
           "chunk_fraction": 1.0} for a in report.ALPHAS]
  path = report.plot_leakage({"valid": rows}, str(tmp_path / "l.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("stride", [64, 128, 256])
def test_sliding_windows_score_every_target_once(stride):
  stream = np.arange(1, 700)
  windows, mask, starts = inputs.sliding_windows(stream, 256, stride)
  scored = []
  for w, s in enumerate(starts):
    for j in np.flatnonzero(mask[w]):
      if j >= 1:                       # Position 0 predicts nothing.
        assert windows[w, j] == stream[s + j]
        scored.append(s + j)
  want = set(range(1, len(stream)))
  if stride == 256:                    # Non-overlapping: window starts lost.
    want -= set(starts[1:].tolist())
  assert sorted(scored) == sorted(want)
  with pytest.raises(ValueError, match="multiples"):
    inputs.sliding_windows(stream, 256, 100)


def test_online_batches_without_a_retriever_pad_the_neighbours():
  """A model without retrieval: no retriever, all-padding neighbours of the
  requested k, every window once, each document followed by EOS."""
  docs = [(7, np.arange(3, 200)), (8, np.arange(3, 90))]
  seqs = inputs.sequences_from_documents(docs, 128, None, 64)
  assert (seqs["tokens"].reshape(-1)[[197, 197 + 88]] == EOS_ID).all()
  rows = list(inputs.online_batches(seqs, None, None, k=5, batch_size=2,
                                       chunk_size=64, neighbour_len=128))
  assert [len(r["tokens"]) for r in rows] == [2, 1]
  np.testing.assert_array_equal(
      np.concatenate([r["tokens"] for r in rows]), seqs["tokens"])
  for r in rows:
    assert r["neighbours"].shape == (len(r["tokens"]), 2, 5, 128)
    assert r["neighbours"].dtype == np.int32 and not r["neighbours"].any()


def test_report_lines_and_results_json(tmp_path):
  scores = scores_lib.ChunkScores(
      nll_on=np.array([1.0, 3.0]) * math.log(2),
      nll_off=np.array([2.0, 4.0]) * math.log(2),
      targets=np.array([63, 64]), bytes=np.array([10, 10]),
      leakage=np.array([0.0, 1.0], np.float32))
  summary = scores_lib.summarize(scores)
  summary["leakage"] = report.leakage_table(scores)
  summary["retrieval_gain"] = intervals.paired_gain(
      scores.nll_off, scores.nll_on, scores.bytes, 2)
  text = report.format_summary("stdlib", summary)
  assert text.startswith("stdlib: 127 tokens, 20 bytes | retrieval on: ")
  assert "bpb 0.2000 | off: " in text and "bpb 0.3000" in text
  assert "retrieval saves 0.1000 bpb (33.33%)" in text
  assert text.splitlines()[2].split() == ["alpha", "chunks", "frac", "bpb",
                                          "on", "bpb", "off"]
  # A model scored without retrieval off and gain: those lines are left out.
  del summary["retrieval_off"], summary["retrieval_gain"]
  assert "off:" not in report.format_summary("x", summary).splitlines()[0]
  path = report.write_results(str(tmp_path / "eval" / "step_1.json"),
                              {"sets": {"stdlib": summary}})
  assert files.read_json(path)["sets"]["stdlib"]["bytes"] == 20
  with open(path) as f:
    assert json.load(f)["sets"]["stdlib"]["leakage"][0]["alpha"] == 0.0


def test_document_batches_tokenize_window_and_pad(sp):
  texts = [(3, "def f(x):\n  return x\n" * 40), (4, "import os\n" * 30)]
  rows = list(inputs.document_batches(texts, sp, 128, 64, None, k=2,
                                      batch_size=3, chunk_size=64,
                                      neighbour_len=128))
  tokens = np.concatenate([r["tokens"] for r in rows])
  ids = np.concatenate([r["doc_ids"] for r in rows])
  assert tokens.shape[1] == 128 and len(rows[0]["tokens"]) == 3
  assert set(np.unique(ids)) <= {-1, 3, 4}
  # Windows step by 64: the second starts where the first's half ends.
  np.testing.assert_array_equal(tokens[1, :64], tokens[0, 64:])
  assert rows[0]["neighbours"].shape == (3, 2, 2, 128)
  scored = sum(int(r["loss_mask"].sum()) for r in rows)
  assert scored == len(sp.encode(texts[0][1])) + len(sp.encode(texts[1][1])) + 2
