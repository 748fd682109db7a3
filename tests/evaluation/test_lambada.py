"""LAMBADA last-word accuracy (retro_jax.evaluation.lambada): the scoring
rule on given predictions, the file checks, the tokenization convention
with a real SentencePiece model, result names; and (slow) the accuracy of a
real checkpoint with a real DB, retrieval on and off, against a direct full
forward of the model per example, and the script end to end."""

import hashlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from retro_jax.config import PAD_ID
from retro_jax.config import RetroConfig
from retro_jax.corpus import sources
from retro_jax.corpus import vocab
from retro_jax.evaluation import lambada
from retro_jax.evaluation import leakage
from retro_jax.evaluation import loaded_run
from retro_jax.model.network import Retro
from retro_jax.retrieval import db_format

FIXTURE = os.path.join(REPO_ROOT, "tests", "fixtures", "lambada_sample.jsonl")
M = 64  # Chunk size.
DIRECT_LEN = 4 * M  # Padded length of the direct forwards (all texts fit).


# -- scoring rule -------------------------------------------------------------
def test_a_word_is_right_only_when_every_token_is_greedy():
  # Four examples of n = 8: context C, length T; target = tokens C .. T-1.
  tokens = np.array([[5, 6, 7, 8, 9, 0, 0, 0],     # C=3, T=5: [8, 9]
                     [5, 6, 7, 8, 9, 0, 0, 0],     # same text
                     [5, 6, 7, 8, 9, 4, 0, 0],     # C=3, T=6: [8, 9, 4]
                     [3, 3, 3, 3, 3, 3, 3, 2]])    # C=7, T=8: [2]
  context_len, length = np.array([3, 3, 3, 7]), np.array([5, 5, 6, 8])
  predicted = np.array([
      [-1, 1, 1, 8, 1, 1, 1, 1],  # First target token right, second wrong.
      [-1, 1, 1, 8, 9, 1, 1, 1],  # Both right; wrong context and padding
      #                             predictions do not count.
      [-1, 6, 7, 8, 9, 5, 0, 0],  # Last of three wrong.
      [-1, 3, 3, 3, 3, 3, 3, 2]])  # Single token right.
  got = lambada.words_correct(predicted, tokens, context_len, length)
  np.testing.assert_array_equal(got, [False, True, False, True])
  mask = lambada.target_mask(context_len, length, 8)
  np.testing.assert_array_equal(mask[2], [0, 0, 0, 1, 1, 1, 0, 0])
  with pytest.raises(ValueError, match="no target token"):
    lambada.words_correct(predicted, tokens, context_len, context_len)


def test_score_batches_with_a_fixed_batch_and_sums_target_nll():
  """`score` on a stand-in predictor with known outputs: rows are padded to
  the batch size, and the NLL counts target positions only."""
  calls = []

  def predict(params, tokens, neighbours):
    del params
    calls.append((tokens.shape, None if neighbours is None else
                  neighbours.shape))
    return tokens.copy(), np.ones(tokens.shape, np.float32)  # All right.

  packed = lambada.Packed(
      tokens=np.arange(1, 5 * 128 + 1, dtype=np.int32).reshape(5, 128),
      context_len=np.array([100, 64, 3, 10, 1]),
      length=np.array([101, 66, 6, 12, 128]))
  scored = lambada.score(predict, None, packed, None, batch_size=2)
  assert calls == [((2, 128), None)] * 3  # 5 examples: one shape, padded.
  assert scored.correct.all()
  np.testing.assert_array_equal(scored.target_nll, [1, 2, 3, 2, 127])


def test_leakage_is_that_of_the_target_chunk_against_the_previous_chunks():
  tokens = np.zeros((2, 128), np.int32)  # [S, n]
  tokens[:, :102] = np.arange(1, 103)
  # Example 0: context 0..99, target 100..101 (chunk 1). Example 1: context
  # 0..61, target 62..65 (chunks 0 and 1).
  packed = lambada.Packed(tokens, np.array([100, 62]), np.array([102, 66]))
  neighbours = np.zeros((2, 2, 2, 128), np.int32)  # [S, L, k, r]
  neighbours[:, 0, 1, 5:37] = tokens[:, 64:96]  # Ret(C_0): half of C_1.
  neighbours[:, 1, 0, :64] = tokens[:, 64:128]  # Ret(C_1): unread by C_1.
  neighbours[1, 0, 0, :10] = tokens[1, 70:80]  # A shorter match.
  got = lambada.example_leakage(packed, neighbours, M)
  np.testing.assert_allclose(got, [0.5, 0.5])
  neighbours[:, 0] = 0
  neighbours[1, 1, 0, :64] = tokens[1, :64]  # Not what any target reads.
  np.testing.assert_allclose(lambada.example_leakage(packed, neighbours, M),
                             [0, 0])

  rows = lambada.leakage_table(np.array([0, 0.1, 0.5, 1.0]),
                               np.array([1, 0, 1, 1], bool),
                               np.array([0, 0, 1, 0], bool))
  assert [(r["alpha"], r["examples"]) for r in rows] == [
      (0, 1), (0.125, 2), (0.25, 2), (0.5, 3), (0.75, 3), (1, 4)]
  assert [r["accuracy_on"] for r in rows] == pytest.approx(
      [1, 0.5, 0.5, 2 / 3, 2 / 3, 0.75])
  assert [r["accuracy_off"] for r in rows] == pytest.approx(
      [0, 0, 0, 1 / 3, 1 / 3, 0.25])
  empty = lambada.leakage_table(np.array([0.5]), np.array([True]),
                                np.array([True]), alphas=(0.25,))
  assert empty == [{"alpha": 0.25, "examples": 0, "accuracy_on": None,
                    "accuracy_off": None}]


# -- input files --------------------------------------------------------------
def test_the_target_is_the_text_after_the_last_space():
  assert lambada.split_target("he said  hello world") == ("he said  hello",
                                                          "world")
  assert lambada.split_target("a\nb c") == ("a\nb", "c")
  for bad, why in (("oneword", "no space"), ("ends with ", "empty target"),
                   (" lonely", "empty context")):
    with pytest.raises(ValueError, match=why):
      lambada.split_target(bad)


def test_reads_the_fixture_and_stops_at_max_examples(tmp_path):
  examples = lambada.read_examples(FIXTURE)
  assert len(examples) == 8
  assert [e.target for e in examples] == [
      "gulls", "home", "exception", "east", "sys", "hands", "square", "wife"]
  assert [e.line for e in examples] == list(range(1, 9))
  assert examples[3].context.endswith("curved gently toward the")
  path = tmp_path / "blank.jsonl"
  path.write_text('\n{"text": "a b"}\n\n{"text": "c d"}\n')
  got = lambada.read_examples(str(path))
  assert [(e.line, e.context, e.target) for e in got] == [(2, "a", "b"),
                                                          (4, "c", "d")]
  assert len(lambada.read_examples(str(path), max_examples=1)) == 1


@pytest.mark.parametrize("content,line,why", [
    (b'{"text": "a b"}\n{"text": "c d"\n', 2, "not valid JSON"),
    (b'{"text": "a b"}\n{"txt": "c d"}\n', 2, 'with a "text" field'),
    (b'["a b"]\n', 1, 'with a "text" field'),
    (b'{"text": 3}\n', 1, "not a string"),
    (b'{"text": "a b"}\n{"text": "caf\xe9 b"}\n', 2, "not valid UTF-8"),
    (b'{"text": "a b"}\n{"text": "nospace"}\n', 2, "no space"),
])
def test_a_bad_line_names_the_file_and_line(tmp_path, content, line, why):
  path = tmp_path / "bad.jsonl"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: ") + ".*"
                     + re.escape(why)):
    lambada.read_examples(str(path))


def test_an_empty_or_missing_file_is_refused(tmp_path):
  path = tmp_path / "empty.jsonl"
  path.write_bytes(b"")
  with pytest.raises(ValueError, match=f"{path}: no example"):
    lambada.read_examples(str(path))
  with pytest.raises(FileNotFoundError, match="no such file"):
    lambada.read_examples(str(tmp_path / "absent.jsonl"))


def test_result_names_identify_step_file_db_and_k(tmp_path):
  db = tmp_path / "db"
  db.mkdir()
  (db / db_format.MANIFEST).write_bytes(b'{"chunks": 3}\n')
  db_id = lambada.db_identity(str(db))
  assert db_id == "db-" + hashlib.sha256(b'{"chunks": 3}\n').hexdigest()[:12]
  digest = hashlib.sha256(open(FIXTURE, "rb").read()).hexdigest()
  name = lambada.results_name(40, digest, db_id, 4)
  assert name == f"lambada_step_40_file-{digest[:12]}_{db_id}_k4.json"
  assert re.fullmatch(r"[A-Za-z0-9._-]+", name)
  assert lambada.results_name(40, digest, lambada.NO_DB, 0, 10).endswith(
      "_nodb_k0_first10.json")
  with pytest.raises(ValueError, match="not a finalized retrieval DB"):
    lambada.db_identity(str(tmp_path))


# -- tokenization (real SentencePiece) ----------------------------------------
@pytest.fixture(scope="module")
def sp(tmp_path_factory):
  docs = sources.python_stdlib("train", max_bytes=300_000)
  path = str(tmp_path_factory.mktemp("spm") / "spm.model")
  return vocab.train([d.text for d in docs], path, 512)


def test_context_and_target_tokens_are_the_whole_texts_tokens(sp):
  examples = lambada.read_examples(FIXTURE)
  packed = lambada.pack(sp, examples, M)
  texts = [json.loads(line)["text"] for line in open(FIXTURE)]
  longest = max(len(sp.encode(t)) for t in texts)
  assert packed.tokens.shape == (8, -(-longest // M) * M)
  for i, (example, text) in enumerate(zip(examples, texts)):
    ids = sp.encode(text)
    assert packed.length[i] == len(ids)
    np.testing.assert_array_equal(packed.tokens[i, :len(ids)], ids)
    assert (packed.tokens[i, len(ids):] == PAD_ID).all()
    # The target's first piece carries the separating space ("▁").
    first = sp.id_to_piece(int(ids[packed.context_len[i]]))
    assert first.startswith("\u2581"), (example.target, first)
    assert sp.decode(ids[packed.context_len[i]:]) == example.target


# -- a real checkpoint and DB (slow) ------------------------------------------
def _script(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)  # One device, as a user runs it.
  return subprocess.run(
      [sys.executable, os.path.join("scripts", "evaluate_lambada.py"), *args],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=timeout)


def test_the_script_refuses_a_bad_file_in_one_line(tmp_path):
  """The file is read before the checkpoint loads (none exists here)."""
  path = tmp_path / "bad.jsonl"
  path.write_bytes(b'{"text": "a b"}\n{"text": "no_space_here"}\n')
  proc = _script(f"--workdir={tmp_path}/run", f"--file={path}")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"scripts/evaluate_lambada.py: error: {path}:2: the text has no space, "
      f"so no target word"]
  assert proc.stdout == ""
  proc = _script(f"--workdir={tmp_path}/run", f"--file={FIXTURE}")
  assert proc.returncode == 1
  assert proc.stderr.startswith("scripts/evaluate_lambada.py: error: ")
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  proc = _script(f"--file={FIXTURE}")  # absl: a required flag is missing.
  assert proc.returncode != 0 and "workdir" in proc.stderr


def _save_run(workdir, model_config, spm_path, db_dir):
  """A run folder as scripts/train.py leaves it (config.json, a checkpoint
  of step 3), with random weights."""
  # pylint: disable=g-import-not-at-top  (heavy, and only for the slow tier)
  from retro_jax.training import checkpoints
  from retro_jax.training import run_config
  from retro_jax.training import step as train_step
  config = run_config.base_config()
  config.model = model_config.to_dict()
  config.data.spm_path, config.data.db_dir = spm_path, db_dir
  model = Retro(model_config)
  params = model.init(jax.random.key(7), *model.dummy_inputs())
  run_config.save_run_config(workdir, config)
  ckpt = checkpoints.Checkpointer(workdir, save_every=1, keep=1,
                                  async_save=False, config=config)
  state = train_step.TrainState(params, {"count": jnp.zeros((), jnp.int32)},
                                jnp.int32(3))
  ckpt.save(3, state, {"step": 3}, force=True)
  ckpt.wait()
  ckpt.close()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A checkpoint of the tiny preset (vocabulary 2048, CCA in layers 2 and
  4, k=2) with random weights, whose config names a real DB over the
  standard library and that DB's SentencePiece model: (workdir, db_dir)."""
  # pylint: disable=g-import-not-at-top  (heavy, and only for the slow tier)
  from retro_jax.retrieval import build_job
  from retro_jax.retrieval.embedder import BertEmbedder
  root = tmp_path_factory.mktemp("lambada")
  workdir, db_dir = str(root / "run"), str(root / "db")
  spm_path = str(root / "spm.model")
  docs = sources.python_stdlib("train", max_bytes=400_000)
  vocab.train([d.text for d in docs], spm_path, 2048)
  build_job.build_database(
      db_dir, {"train": sources.text_source("python_stdlib", "train", 30_000)},
      spm_path, BertEmbedder.load(), vocab_size=2048,
      spm_train_bytes=300_000, shard_chunks=100, log=lambda _: None)
  _save_run(workdir, RetroConfig.preset("tiny", vocab_size=2048), spm_path,
            db_dir)
  return workdir, db_dir


def _direct_predictions(run, apply, ids, context_len, k, retrieval):
  """(int [T] the argmax at every position of one full forward of the
  example alone (position t predicts token t + 1), the neighbours [1, L, k,
  r] or None): each complete context chunk's k neighbours retrieved one
  chunk at a time (on), or no neighbours (off)."""
  n = DIRECT_LEN  # One compile; padding after the text changes no logit.
  assert len(ids) <= n
  tokens = np.zeros((1, n), np.int32)  # [1, n]
  tokens[0, :len(ids)] = ids
  neighbours = None
  if retrieval:
    neighbours = np.zeros((1, n // M, k, 2 * M), np.int32)  # [1, L, k, r]
    for u in range(context_len // M):
      chunk = [int(t) for t in ids[u * M:(u + 1) * M]]  # [m]
      chunk_text = run.tokenizer.decode(chunk)
      neighbours[0, u] = run.retriever.retrieve_texts([chunk_text], k)[1][0]
  logits = apply(run.params, tokens, neighbours)  # [1, n, V]
  return np.asarray(jnp.argmax(logits[0], -1))[:len(ids)], neighbours


def _expected(run, apply, text, k, retrieval):
  """(right, predictions, leakage): the word is right when the argmax at
  positions C-1 .. T-2 reproduces tokens C .. T-1 of the whole text's
  tokens; leakage is r(C) of the chunks holding the target against the
  neighbours of the chunk before each (None when off)."""
  context, _ = lambada.split_target(text)
  ids = run.tokenizer.encode(text)
  c = len(run.tokenizer.encode(context))
  assert ids[:c] == run.tokenizer.encode(context)  # The convention holds.
  pred, neighbours = _direct_predictions(run, apply, ids, c, k, retrieval)
  right = bool((pred[c - 1:-1] == np.asarray(ids[c:])).all())
  if not retrieval:
    return right, pred, None
  padded = np.zeros(neighbours.shape[1] * M, np.int64)
  padded[:len(ids)] = ids
  leak = 0.0
  for u in range(c // M, (len(ids) - 1) // M + 1):
    for nb in (neighbours[0, u - 1] if u else []):  # [r]
      leak = max(leak, leakage.longest_common_substring(
          padded[u * M:(u + 1) * M], nb) / M)
  return right, pred, leak


def _greedy_word(sp, context, predicted_id):
  """The word whose only token the model predicted after `context`, or None
  when that token is not a whole word of letters."""
  piece = sp.id_to_piece(int(predicted_id))
  word = piece[1:]
  if (piece.startswith("\u2581") and word.isalpha()
      and sp.encode(context + " " + word) == sp.encode(context) + [
          int(predicted_id)]):
    return word
  return None


@pytest.fixture(scope="module")
def lambada_case(tiny_run, tmp_path_factory):
  """The fixture's passages, plus passages whose target is the word the
  model predicts (retrieval off, then on) after a prefix of one of them,
  so that some words are right by construction; the module's results and
  the direct computation's."""
  workdir, _ = tiny_run
  run = loaded_run.LoadedRun.load(workdir)
  sp = run.tokenizer
  # Compiled once per padded length (the model's own apply, jitted: eager
  # Haiku is far slower on CPU).
  apply = jax.jit(run.model.apply)
  texts = [json.loads(line)["text"] for line in open(FIXTURE)]
  extra = []
  for text in texts:
    words = text.split(" ")
    for cut in (len(words) - 1, len(words) // 2):
      context = " ".join(words[:cut])
      ids = sp.encode(context)
      for retrieval in (False, True):
        pred, _ = _direct_predictions(run, apply, ids + [PAD_ID], len(ids),
                                      2, retrieval)
        word = _greedy_word(sp, context, pred[len(ids) - 1])
        if word and f"{context} {word}" not in extra:
          extra.append(f"{context} {word}")
  path = tmp_path_factory.mktemp("lambada_file") / "lambada.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n"
                          for t in texts + extra))
  examples = lambada.read_examples(str(path))
  results = lambada.evaluate(run, examples, batch_size=4)
  expected = {side: [_expected(run, apply, t, 2, side == "on")
                     for t in texts + extra] for side in ("on", "off")}
  return run, str(path), results, expected


@pytest.mark.slow
def test_accuracy_equals_a_direct_forward_retrieval_on_and_off(lambada_case):
  run, _, results, expected = lambada_case
  num = len(expected["off"])
  assert results["examples"] == num > 8 and results["num_neighbours"] == 2
  for side in ("off", "on"):
    right = [r for r, _, _ in expected[side]]
    got = [e[f"correct_{side}"] for e in results["per_example"]]
    assert got == right, side
    summary = results[f"retrieval_{side}"]
    assert summary["correct"] == sum(right)
    assert summary["accuracy"] == pytest.approx(sum(right) / num)
  # Not vacuous: right and wrong words, and retrieval that changes
  # predictions (contexts of a chunk or more retrieve).
  assert 0 < results["retrieval_off"]["correct"] < num
  assert results["retrieval_on"]["correct"] > 0
  assert any(e["context_tokens"] >= M for e in results["per_example"])
  assert any((on[M:] != off[M:]).any() for (_, on, _), (_, off, _) in zip(
      expected["on"], expected["off"]))
  # Leakage per example, and the table's last row (alpha 1) is all of them.
  leaks = [e["leakage"] for e in results["per_example"]]
  assert leaks == pytest.approx([leak for _, _, leak in expected["on"]])
  assert max(leaks) > 0
  last = results["leakage"][-1]
  assert last["alpha"] == 1 and last["examples"] == num
  assert last["accuracy_on"] == pytest.approx(
      results["retrieval_on"]["accuracy"])
  lengths = [e["target_tokens"] for e in results["per_example"]]
  assert results["mean_target_tokens"] == pytest.approx(np.mean(lengths))
  assert max(lengths) > 1  # Multi-token words are among them.
  assert run.step == 3


@pytest.mark.slow
def test_the_script_prints_and_writes_the_results(tiny_run, lambada_case):
  workdir, db_dir = tiny_run
  _, path, results, _ = lambada_case
  proc = _script(f"--workdir={workdir}", f"--file={path}", f"--db={db_dir}",
                 "--num_neighbours=2", "--max_examples=6")
  assert proc.returncode == 0, proc.stderr[-3000:]
  db_id = "db-" + hashlib.sha256(open(
      os.path.join(db_dir, db_format.MANIFEST), "rb").read()).hexdigest()[:12]
  digest = hashlib.sha256(open(path, "rb").read()).hexdigest()[:12]
  name = f"lambada_step_3_file-{digest}_{db_id}_k2_first6.json"
  out = os.path.join(workdir, "eval", name)
  saved = json.load(open(out))
  assert saved["per_example"] == results["per_example"][:6]
  assert saved["examples"] == 6 and saved["db_id"] == db_id
  on, off = saved["retrieval_on"], saved["retrieval_off"]
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith("lambada lambada.jsonl: 6 examples, "
                             f"{saved['mean_target_tokens']:.2f} target tokens")
  assert lines[1] == (f"  accuracy retrieval on: {on['accuracy']:.4f} "
                      f"({on['correct']}/6)")
  assert lines[2] == (f"  accuracy retrieval off: {off['accuracy']:.4f} "
                      f"({off['correct']}/6)")
  assert lines[3:5] == ["  examples with leakage r(C) <= alpha:",
                        "    alpha  examples  acc on  acc off"]
  assert len(lines) == 5 + len(saved["leakage"]) + 1
  last = saved["leakage"][-1]  # alpha 1: every example.
  assert lines[-2] == (f"    1.000  {6:8d}  {last['accuracy_on']:.4f}   "
                       f"{last['accuracy_off']:.4f}")
  assert lines[-1] == f"wrote {out}"


@pytest.mark.slow
def test_a_model_without_cca_is_scored_without_any_db(tiny_run, tmp_path):
  workdir, _ = tiny_run
  spm_path = loaded_run.LoadedRun.load(workdir).spm_path
  baseline = str(tmp_path / "baseline")
  _save_run(baseline, RetroConfig.preset("tiny", vocab_size=2048,
                                         cca_layers=()),
            spm_path, "/nonexistent/db")  # Never opened.
  lines = []
  results = lambada.evaluate_file(baseline, FIXTURE, log=lines.append)
  run = loaded_run.LoadedRun.load(baseline)
  apply = jax.jit(run.model.apply)
  texts = [json.loads(line)["text"] for line in open(FIXTURE)]
  right = [_expected(run, apply, t, 2, False)[0] for t in texts]
  assert [e["correct_off"] for e in results["per_example"]] == right
  assert results["retrieval_off"]["correct"] == sum(right)
  assert results["retrieval_on"] is None and results["leakage"] is None
  assert os.path.basename(results["json"]).endswith("_nodb_k0.json")
  printed = "\n".join(lines).splitlines()
  assert printed[1] == "  accuracy retrieval on: - (the model has no CCA layer)"
  assert printed[2].startswith("  accuracy retrieval off: ")
  assert printed[-1] == f"wrote {results['json']}" and len(printed) == 4
