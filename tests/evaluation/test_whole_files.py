"""scripts/evaluate.py on a real trained run (tiny, on the stdlib Task of
tests/task_cache.py): a Pile-layout .jsonl.zst file scored whole, every byte
of its text accounted for, per pile_set_name; three evaluations of one
checkpoint (the Task, the file, the Task with another DB) that keep three
sets of results, read back by scripts/eval_results.py; word-level
perplexity against a hand computation; and peak memory that does not grow
with the file."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from conftest import REPO_ROOT
from retro_jax.config import EOS_ID
from retro_jax.corpus import sources
from retro_jax.evaluation import chunk_files
from retro_jax.evaluation import loaded_run
from retro_jax.evaluation import result_files
from retro_jax.retrieval import build_job
import task_cache

pytestmark = pytest.mark.slow

# WikiText-103's format: spaces around tokens, one line end per line.
WIKI_TEXT = (" = Valkyria = \n"
             " \n"
             " Valkyria Chronicles III is a tactical role @-@ playing video "
             "game developed by Sega and Media.Vision for the PlayStation "
             "Portable . \n"
             " The game was released in 2011 . \n"
             " It sold 1 @,@ 000 copies . \n")
# Counted by hand: "=", "Valkyria", "=" and the line end (4); the blank
# line's end (1); "Valkyria" ... "Portable", "." (21, "@-@" and
# "Media.Vision" one each) and the line end (22); 7 words and the line end
# (8); "It", "sold", "1", "@,@", "000", "copies", "." and the line end (8).
WIKI_WORDS = 4 + 1 + 22 + 8 + 8
MEMORY_TEXT_BYTES = 300_000  # Of the smaller file; the larger holds 4x.
UNICODE_TEXT = ("naïve café — ünïcödé ✓ 日本語 テキスト\n"
                "\tdef f(x): return x\n")


def _script(name, *args, timeout=900):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)  # One device, as a user runs it.
  proc = subprocess.run([sys.executable, os.path.join("scripts", name), *args],
                        cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _write_pile(path, docs):
  """A Pile-layout .jsonl.zst file of (text, pile_set_name) documents."""
  lines = "".join(json.dumps({"text": text, "meta": {"pile_set_name": name}})
                  + "\n" for text, name in docs)
  with open(path, "wb") as f:
    f.write(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
  return str(path)


def _read_pile(path):
  """(text, pile_set_name) of every line, read without retro_jax."""
  with open(path, "rb") as f:
    data = zstandard.ZstdDecompressor().decompressobj().decompress(f.read())
  return [(o["text"], o["meta"]["pile_set_name"])
          for o in map(json.loads, data.decode("utf-8").splitlines())]


def _stdlib_texts(min_bytes):
  """Standard-library files (all splits) until `min_bytes` of text."""
  texts, total = [], 0
  for doc in sources.python_stdlib():
    if total >= min_bytes:
      return texts
    if len(doc.text) < 20_000:  # Many documents, none dominant.
      texts.append(doc.text)
      total += len(doc.text.encode())
  return texts


@pytest.fixture(scope="module")
def run(stdlib_task, tmp_path_factory):
  """A tiny run trained 4 steps on the stdlib Task, and a second DB of the
  same vocabulary in a folder also named "db"."""
  root = tmp_path_factory.mktemp("whole_files")
  workdir = str(root / "tiny")
  _script("train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
          *task_cache.training_flags(stdlib_task),
          "--config.train.steps=4", "--config.train.batch_size=4",
          "--config.checkpoint.every=4", "--config.train.warmup_steps=1",
          "--config.train.log_every=1")
  other_db = str(root / "other" / "db")
  build_job.build_database(
      other_db, {"train": sources.text_source("python_stdlib", "validation",
                                              8_000)},
      stdlib_task["spm_path"], stdlib_task["embedder"], shard_chunks=100,
      log=lambda _: None)
  pile = [(t, "Github") for t in _stdlib_texts(30_000)]
  pile.insert(1, (UNICODE_TEXT, "Enron Emails"))
  pile.insert(3, (WIKI_TEXT, "Wikipedia (en)"))
  pile.append((UNICODE_TEXT * 3, "Enron Emails"))
  return dict(workdir=workdir, other_db=other_db, task=stdlib_task,
              pile=_write_pile(root / "wiki.jsonl.zst", pile))


def _snapshot(eval_dir):
  return {name: hashlib.sha256(open(os.path.join(eval_dir, name),
                                    "rb").read()).hexdigest()
          for name in os.listdir(eval_dir)}


@pytest.fixture(scope="module")
def evaluations(run):
  """The Task, the file, the Task with the other DB: one after the other,
  the eval folder's files (and their bytes) after each."""
  w = run["workdir"]
  eval_dir = os.path.join(w, "eval")
  snapshots, outs = [], []
  for args in (["--config=configs/eval.py:task"],
               ["--config=configs/eval.py:pile",
                f"--config.eval.sets.pile.corpus=jsonl:{run['pile']}",
                "--config.eval.progress_seconds=0.001"],
               ["--config=configs/eval.py:task", f"--db={run['other_db']}"]):
    outs.append(_script("evaluate.py", f"--workdir={w}", *args))
    snapshots.append(_snapshot(eval_dir))
  return dict(snapshots=snapshots, outs=outs,
              pile=result_files.find(w, "pile")[-1])


def test_three_evaluations_keep_three_sets_of_results(run, evaluations):
  first, second, third = evaluations["snapshots"]
  # Each evaluation added files and changed none of the earlier ones.
  assert first.items() < second.items() < third.items()
  jsons = sorted(n for n in third if n.endswith(".json"))
  assert len(jsons) == 3
  for name in third:
    assert set(name) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstu"
                            "vwxyz0123456789._-"), name
  run_db = result_files.db_identity(run["task"]["db_dir"])
  other = result_files.db_identity(run["other_db"])
  assert run_db != other and run_db.startswith("db-")
  assert os.path.basename(run["task"]["db_dir"]) == os.path.basename(
      run["other_db"]) == "db"  # Told apart by content, not folder name.
  assert jsons == sorted([f"step_4_task_{run_db}_k2.json",
                          f"step_4_pile_{run_db}_k2.json",
                          f"step_4_task_{other}_k2.json"])
  assert "step_4_pile_" + run_db + "_k2_chunks_Wikipedia_en.npz" in third

  proc = _script("eval_results.py", f"--workdir={run['workdir']}")
  table = proc.stdout.splitlines()
  rows = result_files.collect(run["workdir"])
  keys = [(r["set"], r["subset"], r["db"]) for r in rows]
  assert keys == sorted([
      ("pile", "", run_db), ("pile", "Enron Emails", run_db),
      ("pile", "Github", run_db), ("pile", "Wikipedia (en)", run_db),
      ("task", "", run_db), ("task", "", other)])
  assert len(table) == 1 + len(rows)
  for row, line in zip(rows, table[1:]):
    assert line.split()[:2] == [str(row["step"]), row["set"]]
    assert f"{row['bpb_on']:.4f}" in line and f"{row['bpb_off']:.4f}" in line
    assert 0 < row["bpb_on"] < 20 and 0 < row["bpb_off"] < 20
  task = [r for r in rows if r["set"] == "task"]
  assert task[0]["bytes"] == task[1]["bytes"]  # Same text, other DB.
  assert task[0]["bpb_off"] == pytest.approx(task[1]["bpb_off"])


def test_a_whole_file_is_scored_and_every_byte_accounted_for(run,
                                                             evaluations):
  results = evaluations["pile"]
  assert (results["split"], results["max_bytes"]) == ("all", 0)
  docs = _read_pile(run["pile"])
  sp = run["task"]["sp"]
  by_name = {"pile": docs}
  for text, name in docs:
    by_name.setdefault(f"pile/{name}", []).append((text, name))
  assert set(results["sets"]) == set(by_name)
  for name, group in by_name.items():
    s = results["sets"][name]
    text_bytes = sum(len(t.encode("utf-8")) for t, _ in group)
    assert s["complete"] and s["documents"] == len(group)
    assert s["text_bytes"] == text_bytes
    # Scored bytes plus those of the tokens no target covers (each
    # window's first) are the text's, plus one dummy-prefix space per
    # document (docs/evaluation.md).
    assert s["bytes"] + s["unscored_bytes"] == text_bytes + len(group), name
    # Likewise every token (each document's EOS included).
    tokens = sum(len(sp.encode(t)) + 1 for t, _ in group)
    assert s["tokens"] + s["unscored_tokens"] == tokens, name
    assert s["words"] == sum(len(t.split()) + t.count("\n")
                             for t, _ in group)
  # The subsets add up to the set.
  parts = [results["sets"][n] for n in by_name if n != "pile"]
  assert sum(p["bytes"] for p in parts) == results["sets"]["pile"]["bytes"]
  # The progress lines went to stderr, the results to stdout.
  out = evaluations["outs"][1]
  assert f"pile: {len(docs)} documents" in out.stderr and "(done)" in (
      out.stderr)
  assert "word ppl" in out.stdout and "documents," not in out.stdout


def test_word_level_perplexity_matches_a_hand_computation(run, evaluations):
  s = evaluations["pile"]["sets"]["pile/Wikipedia (en)"]
  assert s["words"] == WIKI_WORDS and s["documents"] == 1
  # Its group holds one document: one window, position 0 unscored.
  loaded = loaded_run.LoadedRun.load(run["workdir"])
  tokens = loaded.tokenizer.encode(WIKI_TEXT) + [EOS_ID]
  n = loaded.config.train.seq_len
  assert len(tokens) <= n and s["tokens"] == len(tokens) - 1
  window = np.zeros((1, n), np.int32)
  window[0, :len(tokens)] = tokens
  logits = np.asarray(loaded.model.apply(loaded.params, window, None),
                      np.float64)[0]  # [n, V], retrieval off.
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll_off = -sum(logp[t, tokens[t + 1]] for t in range(len(tokens) - 1))
  off = s["retrieval_off"]
  assert off["word_perplexity"] == pytest.approx(
      math.exp(nll_off / WIKI_WORDS), rel=1e-4)
  assert off["loss"] == pytest.approx(nll_off / (len(tokens) - 1), rel=1e-4)
  # Retrieval on: the total NLL of the per-chunk scores written beside.
  chunks = chunk_files.load_chunk_scores(s["chunk_scores"])
  assert chunks.nll_off.sum() == pytest.approx(nll_off, rel=1e-4)
  assert s["retrieval_on"]["word_perplexity"] == pytest.approx(
      math.exp(chunks.nll_on.sum() / WIKI_WORDS), rel=1e-9)
  assert s["retrieval_on"]["word_perplexity"] != pytest.approx(
      off["word_perplexity"], rel=1e-6)  # Retrieval changed the scores.


def _peak_rss_kib(log_path, *args):
  """Peak resident memory (KiB) of scripts/evaluate.py run with `args`."""
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(
        [sys.executable, os.path.join("scripts", "evaluate.py"), *args],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)  # This child's own rusage.
    proc.returncode = os.waitstatus_to_exitcode(status)
  assert proc.returncode == 0, open(log_path, encoding="utf-8").read()[-3000:]
  return usage.ru_maxrss


def test_peak_memory_does_not_grow_with_the_file(run, tmp_path):
  # Different documents throughout (no repeats for zstd to collapse).
  four = [(t, "Github" if i % 3 else "ArXiv")
          for i, t in enumerate(_stdlib_texts(4 * MEMORY_TEXT_BYTES))]
  one = four[:len(_stdlib_texts(MEMORY_TEXT_BYTES))]
  files = {"1x": _write_pile(tmp_path / "one.jsonl.zst", one),
           "4x": _write_pile(tmp_path / "four.jsonl.zst", four)}
  peaks, read = {}, {}
  # A copy of the run, so that these results stay out of the others' way.
  workdir = str(tmp_path / "tiny")
  shutil.copytree(run["workdir"], workdir,
                  ignore=shutil.ignore_patterns("eval"))
  for size, path in files.items():
    peaks[size] = _peak_rss_kib(
        str(tmp_path / f"{size}.log"), f"--workdir={workdir}",
        "--config=configs/eval.py:pile",
        f"--config.eval.sets.pile.corpus=jsonl:{path}",
        # Random DB chunks as neighbours: no BERT, the same memory.
        "--config.eval.neighbours=random", "--config.eval.batch_size=16",
        "--config.eval.progress_seconds=0")
    read[size] = result_files.find(workdir, "pile", "random")[-1]["sets"][
        "pile"]
  print(f"peak RSS: {peaks['1x'] / 1024:.0f} MiB for "
        f"{read['1x']['text_bytes'] / 1e6:.2f} MB of text, "
        f"{peaks['4x'] / 1024:.0f} MiB for "
        f"{read['4x']['text_bytes'] / 1e6:.2f} MB")
  assert read["4x"]["text_bytes"] == pytest.approx(
      4 * read["1x"]["text_bytes"], rel=0.05)
  assert (read["1x"]["documents"], read["4x"]["documents"]) == (len(one),
                                                                len(four))
  assert peaks["4x"] <= 1.25 * peaks["1x"]
