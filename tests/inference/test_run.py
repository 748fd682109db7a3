"""retro_jax.load on a run written by scripts/train.py; the evaluate and
sample scripts on it, with a retrieval DB built here (real SentencePiece,
MiniLM and index, small); attribution: the DB chunks a generation was
conditioned on, their documents, and the sample script's --show_neighbours
and --html. One module, so the run and the DB are built once."""

import html.parser
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import retro_jax
from conftest import REPO_ROOT
from retro_jax.core import sharding
from retro_jax.corpus import sources
from retro_jax.corpus import vocab
from retro_jax.data import train_sources
from retro_jax.evaluation import chunk_files
from retro_jax.inference import sampling
from retro_jax.retrieval import build_job
from retro_jax.retrieval.embedder import BertEmbedder
from retro_jax.training import run_config
from retro_jax.training import step as train_step

STEPS = 20


def _script(name, *args, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)  # One device, as a user runs it.
  proc = subprocess.run([sys.executable, os.path.join("scripts", name), *args],
                        cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("run") / "tiny")
  _script("train.py", "--config=configs/tiny.py", f"--workdir={path}",
          f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
          "--config.train.seq_len=128", f"--config.checkpoint.every={STEPS}",
          "--config.train.warmup_steps=2")
  return path


@pytest.fixture(scope="module")
def db_dir(workdir):
  """A DB whose vocabulary (2048 pieces) is the run's: spm.model in the
  workdir, where `load` finds it."""
  path = os.path.join(os.path.dirname(workdir), "db")
  docs = sources.python_stdlib("train", max_bytes=400_000)
  vocab.train([d.text for d in docs], os.path.join(workdir, "spm.model"),
              2048)
  build_job.build_database(
      path, {"train": sources.text_source("python_stdlib", "train", 30_000)},
      os.path.join(workdir, "spm.model"), BertEmbedder.load(),
      vocab_size=2048, spm_train_bytes=300_000, shard_chunks=100,
      log=lambda _: None)
  return path


def _loss(cfg, params):
  batch = train_sources.synthetic_batch(cfg, 8, 128, seed=0, step=10_000)
  return float(train_step.loss_fn(retro_jax.Retro(cfg), params, batch)[0])


@pytest.mark.slow
def test_load_round_trips_the_checkpoint(workdir):
  run = retro_jax.load(workdir)
  saved = json.load(open(os.path.join(workdir, run_config.CONFIG_FILE)))
  assert run.step == STEPS
  assert run.model_config == retro_jax.RetroConfig.from_dict(saved["model"])
  assert run.model_config == retro_jax.RetroConfig.preset("tiny",
                                                          vocab_size=2048)
  fresh = run.model.init(jax.random.key(0), *run.model.dummy_inputs())
  shapes = lambda p: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), p)
  assert shapes(run.params) == shapes(fresh)
  # The trained parameters came back: they predict the synthetic chain.
  assert _loss(run.model_config, run.params) < _loss(run.model_config,
                                                     fresh) - 0.5
  # Onto a mesh: the same function, parameters split across devices.
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, model=1))
  sharded = retro_jax.load(workdir, mesh=mesh)
  tokens = np.random.default_rng(0).integers(1, 2048, (2, 128)).astype(
      np.int32)
  np.testing.assert_allclose(sharded.logits(tokens), run.logits(tokens),
                             atol=1e-4, rtol=1e-4)
  assert any(len(x.sharding.device_set) > 1
             for x in jax.tree_util.tree_leaves(sharded.params))
  with pytest.raises(FileNotFoundError, match="no checkpoint of step 7"):
    retro_jax.load(workdir, step=7)


@pytest.mark.slow
def test_research_api_session(workdir, db_dir):
  run = retro_jax.load(workdir, db_dir=db_dir)
  assert run.tokenizer is not None and len(run.db) > 50
  values = run.retrieve(["import os\nimport sys\n"], k=3)
  assert values.shape == (1, 3, 128) and (values[:, :, :64] > 0).all()
  out = run.generate("import os\n", num_tokens=80, k=3)
  assert len(out.neighbours) == len(out.tokens) // 64 >= 1
  assert len(out.neighbours[0]) == 3 and all(out.neighbours[0])
  off = run.generate("import os\n", num_tokens=80, retrieval=False)
  assert off.neighbours == [] and off.text
  res = run.evaluate(["def f(x):\n    return x + 1\n" * 30], seq_len=128,
                     batch_size=2)
  assert res["tokens"] > 0 and len(res["leakage"]) == 6
  assert res["leakage"][-1]["bpb_on"] == pytest.approx(
      res["retrieval_on"]["bits_per_byte"])
  # Retrieval off never opens the DB (here one that does not exist).
  cold = retro_jax.load(workdir, db_dir="/nonexistent/db")
  off = cold.evaluate(["def f(x):\n    return x + 1\n" * 30], seq_len=128,
                      batch_size=2, k=5, retrieval=False)
  assert off["tokens"] == res["tokens"] and cold._retriever is None  # pylint: disable=protected-access


@pytest.mark.slow
def test_evaluate_and_sample_scripts(workdir, db_dir):
  out = _script("evaluate.py", f"--workdir={workdir}", f"--db={db_dir}",
                "--config=configs/eval.py:stdlib",
                "--config.eval.max_bytes=15000", "--config.eval.seq_len=128",
                "--config.eval.num_neighbours=3", "--config.eval.stride=64")
  assert "stdlib:" in out and "bpb on" in out
  eval_dir = os.path.join(workdir, "eval")
  name = [f for f in os.listdir(eval_dir) if f.endswith(".json")][0]
  res = json.load(open(os.path.join(eval_dir, name)))
  assert res["num_neighbours"] == 3 and res["stride"] == 64
  assert res["leakage_source"] == "previous"
  assert res["leakage_neighbours"] == "Ret(C_{u-1})"
  s = res["sets"]["stdlib"]
  for side in ("retrieval_on", "retrieval_off"):
    assert 0 < s[side]["bits_per_byte"] < 20
    assert s[side]["perplexity"] == pytest.approx(math.exp(s[side]["loss"]))
  assert [r["alpha"] for r in s["leakage"]] == [0, 0.125, 0.25, 0.5, 0.75, 1]
  assert s["leakage"][-1]["bpb_off"] == pytest.approx(
      s["retrieval_off"]["bits_per_byte"])
  assert os.path.exists(res["plot"])
  # The paired gain is off minus on, and the per-chunk scores behind it
  # reproduce the summary.
  gain = s["retrieval_gain"]
  assert gain["bpb_gain"] == pytest.approx(
      s["retrieval_off"]["bits_per_byte"] - s["retrieval_on"]["bits_per_byte"])
  assert gain["ci95"][0] <= gain["bpb_gain"] <= gain["ci95"][1]
  chunks = chunk_files.load_chunk_scores(s["chunk_scores"])
  assert int(chunks.bytes.sum()) == s["bytes"]
  assert gain["sequences"] * 2 == len(chunks.nll_on)  # seq_len 128: L = 2.

  out = _script("sample.py", f"--workdir={workdir}", f"--db={db_dir}",
                "--prompt=import os", "--num_tokens=70", "--show_neighbours",
                "--temperature=0.8", "--top_k=20")
  assert "--- generated (70 tokens" in out
  assert "=== chunk 0 ===" in out and "--- neighbour 1 ---" in out


# ------------------------------------------------------------ attribution

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
  # Under each neighbour, its text: what the model read, or, where the
  # alignment dropped it, a line that says so.
  every = out.splitlines()
  heads = [i for i, l in enumerate(every) if "--- neighbour" in l or
           "=== chunk" in l] + [len(every)]
  for i, end in zip(heads, heads[1:]):
    if "--- neighbour" in every[i]:
      assert "".join(every[i + 1:end]).strip(), every[i:end]
      if "(dropped by alignment)" in every[i]:
        assert every[i + 1] == "  (the model read none of it)"
  assert f"wrote {page}" in out
  assert not [n for n in os.listdir(tmp_path / "pages") if n != "sample.html"]
  parsed = _Sections()
  parsed.feed(open(page, encoding="utf-8").read())
  # The complete chunks, then the incomplete tail.
  assert len(parsed.sections) == chunks + (total % 64 > 0) >= 3
  assert "before any retrieval" in parsed.sections[0]
  for section in parsed.sections[1:]:
    assert section.count("stdlib:") == 2 and "squared L2" in section
