"""Attribution of a sample of a run written by scripts/train.py, over a
real DB (test_run's fixtures): the DB chunks a generation was conditioned
on, their documents, and the sample script's --show_neighbours and --html."""

import html.parser
import os

import numpy as np
import pytest

import retro_jax
from retro_jax.corpus import sources
from retro_jax.inference import sampling
from test_run import _script, db_dir, workdir  # pylint: disable=unused-import

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"


@pytest.fixture(scope="module")
def run(workdir, db_dir):  # pylint: disable=redefined-outer-name
  return retro_jax.load(workdir, db_dir=db_dir)


def _longest_line_in_source(text: str, source: str) -> str:
  """The longest line of chunk `text`, asserted to occur in the stdlib file
  `source` ("stdlib:json/decoder.py") names (SentencePiece need not
  round-trip every character, so one line rather than the whole chunk)."""
  path = os.path.join(sources.stdlib_root(), source.removeprefix("stdlib:"))
  line = max(text.splitlines() or [""], key=len).strip()
  assert line in open(path, encoding="utf-8").read(), (line, source)
  return line


@pytest.mark.slow
def test_generation_keeps_the_db_chunks_it_read(run):
  assert run.model_config.neighbour_alignment == 0  # Tokens as retrieved.
  k = 3
  retrieve = sampling.make_retrieve(run.retriever, run.tokenizer, k)
  sampler = sampling.Sampler(run.model, k)
  prompt = np.asarray([run.encode(PROMPT)], np.int32)
  gen = sampler.generate(run.params, prompt, 150, retrieve)
  chunks = gen.tokens.shape[1] // 64
  assert len(gen.neighbours) == len(gen.neighbour_ids) == chunks >= 2
  assert len(gen.neighbour_distances) == chunks
  for u, (values, ids, dists) in enumerate(zip(
      gen.neighbours, gen.neighbour_ids, gen.neighbour_distances)):
    assert ids.shape == dists.shape == (1, k) and (ids >= 0).all()
    assert len(set(ids[0].tolist())) == k
    # The tokens the model read are those DB chunks' (chunk + continuation).
    np.testing.assert_array_equal(values, run.db.neighbour_values(ids))
    # Nearest first, and the index's own answer for the chunk's text.
    assert np.isfinite(dists).all() and (np.diff(dists[0]) >= 0).all()
    query = run.decode(gen.tokens[0, u * 64:(u + 1) * 64])
    found, _ = run.retriever.retrieve_texts([query], k)
    np.testing.assert_array_equal(ids, found.ids)
    np.testing.assert_allclose(dists, found.dists, rtol=1e-5, atol=1e-5)
  # A retrieve that returns bare tokens still samples the same text; the
  # DB chunks behind them are then unknown.
  bare = sampler.generate(run.params, prompt, 150,
                          lambda c: retrieve(c).values)
  np.testing.assert_array_equal(bare.tokens, gen.tokens)
  assert all((ids == -1).all() for ids in bare.neighbour_ids)
  assert all(np.isnan(d).all() for d in bare.neighbour_distances)


@pytest.mark.slow
def test_attribution_names_the_documents_of_each_chunks_neighbours(run):
  out = run.generate(PROMPT, num_tokens=150, k=3)
  rows = run.attribution(out)
  assert len(rows) == len(out.chunks) == len(out.neighbour_ids) >= 2
  assert out.prompt_len == len(run.encode(PROMPT)) and out.chunk_size == 64
  assert out.tail == run.decode(out.tokens[len(out.chunks) * 64:])
  lines = []
  for u, hits in enumerate(rows):
    assert [h["neighbour"] for h in hits] == [0, 1, 2]
    for j, hit in enumerate(hits):
      chunk_id = int(out.neighbour_ids[u][j])
      assert hit["chunk_id"] == chunk_id
      assert hit["distance"] == pytest.approx(
          float(out.neighbour_distances[u][j]))
      doc = run.db.document_of(chunk_id)
      assert hit["doc_id"] == doc["doc_id"] == int(
          run.db.doc_ids_of(np.array([chunk_id]))[0])
      assert (hit["source"], hit["title"], hit["meta"]) == (
          doc["source"], doc["title"], doc["meta"])
      assert hit["text"] == out.neighbours[u][j] == run.decode(
          run.db.neighbour_values(np.array([chunk_id]))[0])
      assert not hit["dropped"]
      # The named file holds the retrieved chunk.
      assert hit["source"].startswith("stdlib:"), hit
      lines.append(_longest_line_in_source(
          run.db.chunk_text(chunk_id, run.tokenizer), hit["source"]))
  # Most chunks hold a line long enough to tell files apart (a document's
  # last chunk may be a few characters).
  assert sum(len(line) >= 20 for line in lines) >= len(lines) // 2
  # Retrieval off: nothing to attribute, and the DB is not needed.
  off = run.generate(PROMPT, num_tokens=20, retrieval=False)
  assert run.attribution(off) == [] and off.neighbour_ids == []


class _Sections(html.parser.HTMLParser):
  """The text of each <section> of a page."""

  def __init__(self):
    super().__init__()
    self.sections = []
    self._inside = False

  def handle_starttag(self, tag, attrs):
    if tag == "section":
      self.sections.append("")
      self._inside = True

  def handle_endtag(self, tag):
    if tag == "section":
      self._inside = False

  def handle_data(self, data):
    if self._inside:
      self.sections[-1] += data


@pytest.mark.slow
def test_sample_script_shows_sources_and_writes_the_page(
    run, workdir, db_dir, tmp_path):  # pylint: disable=redefined-outer-name
  page = str(tmp_path / "pages" / "sample.html")
  out = _script("sample.py", f"--workdir={workdir}", f"--db={db_dir}",
                f"--prompt={PROMPT}", "--num_tokens=140", "--k=2",
                "--show_neighbours", f"--html={page}")
  total = len(run.encode(PROMPT)) + 140
  chunks = total // 64
  lines = [l for l in out.splitlines() if "--- neighbour" in l]
  assert "=== chunk 1 ===" in out and len(lines) == chunks * 2  # k = 2.
  for line in lines:
    # "  --- neighbour 0 --- chunk 81 · stdlib:...py (document 3), squared L2"
    assert " --- chunk " in line and " · stdlib:" in line, line
    assert "squared L2 " in line, line
  assert f"wrote {page}" in out
  assert not [n for n in os.listdir(tmp_path / "pages") if n != "sample.html"]
  parsed = _Sections()
  parsed.feed(open(page, encoding="utf-8").read())
  # The complete chunks, then the incomplete tail.
  assert len(parsed.sections) == chunks + (total % 64 > 0) >= 3
  assert "before any retrieval" in parsed.sections[0]
  for section in parsed.sections[1:]:
    assert section.count("stdlib:") == 2 and "squared L2" in section
