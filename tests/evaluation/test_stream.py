"""A corpus set streamed (retro_jax.evaluation.stream): the packer's windows
equal the all-at-once windows, groups are packed apart and every row names
its group, words are counted as WikiText counts them, and the progress
lines (retro_jax.evaluation.progress)."""

import io
import json
import tracemalloc

import numpy as np
import pytest
import zstandard

from retro_jax.config import EOS_ID
from retro_jax.corpus import sources
from retro_jax.evaluation import inputs
from retro_jax.evaluation import progress
from retro_jax.evaluation import sets
from retro_jax.evaluation import stream

M = 64


def _packed(docs, n, stride):
  packer = stream.WindowPacker(n, stride, M)
  windows = []
  for doc_id, tokens in docs:
    windows += packer.add(doc_id, tokens)
  windows += packer.finish()
  return {key: np.stack([w[key] for w in windows])
          for key in ("tokens", "loss_mask", "doc_ids")}


@pytest.mark.parametrize("stride", [64, 128, 256])
def test_packer_gives_the_windows_of_the_whole_stream(stride):
  rng = np.random.default_rng(stride)
  for _ in range(40):
    docs = [(i, rng.integers(3, 500, rng.integers(1, 700)))
            for i in range(rng.integers(1, 6))]
    want = inputs.sequences_from_documents(docs, 256, stride, M)
    got = _packed(docs, 256, stride)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_packer_holds_only_the_window_being_filled():
  packer = stream.WindowPacker(256, 128, M)
  for i in range(200):
    packer.add(i, np.arange(3, 103))  # 101 tokens with EOS.
    assert len(packer._tokens) < 256 + 101  # pylint: disable=protected-access
  assert packer.length == 200 * 101
  # A stream that ended exactly at a window's end adds no padded window.
  exact = stream.WindowPacker(128, 128, M)
  assert len(exact.add(1, np.arange(3, 130))) == 1  # 127 + EOS = 128.
  assert exact.finish() == []
  with pytest.raises(ValueError, match="multiples of the chunk size"):
    stream.WindowPacker(256, 100, M)


def _doc(i, text, group):
  return sources.Document(i, text, f"t:{i}", {"pile_set_name": group})


def test_groups_are_packed_apart_and_rows_name_their_group():
  docs = [_doc(1, "a" * 300, "A"), _doc(2, "b" * 50, "B"),
          _doc(3, "a" * 100, "A")]
  encode = lambda text: [ord(c) for c in text]  # One token per character.
  groups, stats = [], {}
  batches = list(stream.labelled_batches(
      docs, lambda d: d.meta["pile_set_name"], encode, 128, 128, 3, groups,
      stats, M))
  assert groups == ["A", "B"]
  # A's stream: 301 + 101 = 402 tokens, 4 windows of 128 (the last
  # padded); B's: 51 tokens, one padded window. Rows of both share batches.
  assert [b["group"].tolist() for b in batches] == [[0, 0, 0], [0, 1]]
  rows = np.concatenate([b["group"] for b in batches])
  tokens = np.concatenate([b["tokens"] for b in batches])
  for row, label in zip(tokens, rows):
    assert not ({ord("b")} if label == 0 else {ord("a")}) & set(row.tolist())
  a_rows = tokens[rows == 0].reshape(-1)
  assert (a_rows == ord("a")).sum() == 400 and (a_rows == EOS_ID).sum() == 2
  assert stats["A"] == stream.DocumentStats(2, 400, 2)
  assert stream.total_stats(stats).documents == 3


def test_words_are_whitespace_tokens_plus_line_ends():
  assert stream.count_words(" = Valkyria = \n") == 3 + 1
  assert stream.count_words(" \n \n") == 2
  assert stream.count_words("It sold 1 @,@ 000 copies .") == 7
  assert stream.count_words("tab\tand  double  spaces\n") == 4 + 1
  stats = stream.DocumentStats()
  stats.add("naïve café\n")
  assert stats == stream.DocumentStats(1, 13, 3)


def test_progress_prints_plain_lines_at_the_interval():
  out, now = io.StringIO(), [0.0]
  read = stream.DocumentStats(12, 2_500_000, 0)
  bar = progress.Progress("pile", lambda: read, every_s=10, out=out,
                          clock=lambda: now[0])
  bar(1)
  assert out.getvalue() == ""
  now[0] = 10.0
  bar(7)
  bar(8)  # Within the interval of the last line: nothing.
  bar.done()
  lines = out.getvalue().splitlines()
  assert lines == ["pile: 12 documents, 2.50 MB of text read, 7 batches "
                   "scored, 10 s (250.0 kB/s)",
                   "pile: 12 documents, 2.50 MB of text read, 8 batches "
                   "scored, 10 s (250.0 kB/s) (done)"]
  silent = io.StringIO()
  quiet = progress.Progress("x", lambda: read, every_s=0, out=silent)
  quiet(1)
  quiet.done()
  assert silent.getvalue() == ""


def _pile_file(path, num_docs):
  """A Pile-layout .jsonl.zst of `num_docs` documents of ~1.6 kB, all
  different (so that zstd cannot shrink repeats to nothing and hand back a
  whole file from one compressed read)."""
  rng = np.random.default_rng(num_docs)
  words = [f"w{i}" for i in range(2000)]
  with open(path, "wb") as f, zstandard.ZstdCompressor().stream_writer(
      f) as out:
    for i in range(num_docs):
      out.write((json.dumps({"text": " ".join(rng.choice(words, 300)) + "\n",
                             "meta": {"pile_set_name": f"set{i % 3}"}})
                 + "\n").encode())
  return str(path)


def _peak_bytes(path):
  """Peak Python heap (tracemalloc) while a file is read and packed."""
  pile = sets.EvalSet("pile", f"jsonl:{path}", {}, "pile_set_name")
  encode = lambda text: np.frombuffer(text.encode(), np.uint8) + 2
  groups, stats = [], {}
  tracemalloc.start()
  rows = sum(len(b["tokens"]) for b in stream.labelled_batches(
      sets.documents(pile), sets.group_of(pile), encode, 256, 128, 8,
      groups, stats, M))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  return peak, rows, stream.total_stats(stats)


@pytest.mark.slow
def test_reading_a_file_4x_larger_takes_no_more_memory(tmp_path):
  """The reading and packing half of a corpus set (the scoring half keeps
  5 numbers per chunk): a whole document list would take 4x here."""
  one = _peak_bytes(_pile_file(tmp_path / "one.jsonl.zst", 1000))
  four = _peak_bytes(_pile_file(tmp_path / "four.jsonl.zst", 4000))
  print(f"peak Python heap: {one[0] / 1e6:.2f} MB reading "
        f"{one[2].text_bytes / 1e6:.2f} MB of text, {four[0] / 1e6:.2f} MB "
        f"reading {four[2].text_bytes / 1e6:.2f} MB")
  assert four[2].documents == 4 * one[2].documents == 4000
  assert four[2].text_bytes > 6_000_000
  assert four[2].text_bytes == pytest.approx(4 * one[2].text_bytes, rel=0.01)
  assert four[1] >= 4 * one[1] - 3  # Every window was made.
  assert four[0] < 1.25 * one[0], (one[0], four[0])
  # Far below the text itself (which a document list would hold).
  assert four[0] < four[2].text_bytes / 4
