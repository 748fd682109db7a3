"""Bad input is one line: every entry script that reads a corpus exits
non-zero with one line on stderr naming the file, the line and the cause.

The six inputs of issue 21 (a line that is not JSON, invalid UTF-8, a line
without "text", a .jsonl.zst cut in the middle, an empty file, a folder
without files to read) are written in tmp_path and given to the scripts as
a user would, in subprocesses: scripts/build_db.py (its corpus),
scripts/cache_tasks.py (the Task's held-out split, read from the corpus)
and scripts/evaluate.py (a corpus eval set). scripts/train.py reads only
the Task's cache and scripts/sample.py only its --prompt flag, so neither
reads these inputs. The readers' messages alone are tested, fast, in
tests/corpus/test_reader_errors.py.

stderr may hold the scripts' own progress bars (tqdm lines of
scripts/cache_tasks.py, which caches the training split before it reads the
held-out one); they are left out before counting lines. Nothing else is:
no third-party warning passes, since the scripts keep TensorFlow's and
Beam's log lines off stderr unless -v asks (cli.quiet_libraries).
"""

import concurrent.futures
import json
import os
import random
import re
import subprocess
import sys
from typing import Dict, List, NamedTuple

import pytest
import zstandard

from conftest import REPO_ROOT
from retro_jax.core import cli
from retro_jax.corpus import errors
from retro_jax.corpus import sources

CASES = ("malformed_line", "invalid_utf8", "missing_field", "truncated_zst",
         "empty_file", "no_matching_files")
# A tqdm progress bar: "retro_tiny:train neighbours: 147seq [00:08, 16.9seq/s]".
_PROGRESS = re.compile(r"[\w:. -]+: \d+\w* \[\d\d:\d\d[^\]]*\]\s*")
_CONCURRENT = 3  # Scripts run at once: the host has 2 cores, shared.


class Case(NamedTuple):
  spec: str       # The corpus spec a script is given.
  message: str    # A regex of the one line's message (after "error: ").


# --- The six inputs ----------------------------------------------------------

def _text_lines(count: int, seed: int = 0) -> List[bytes]:
  # Text that compresses poorly, so that a cut .zst still yields whole
  # lines before the cut (zstd blocks hold 128 KiB of input).
  rng = random.Random(seed)
  return [json.dumps({"text": f"document {i} " + " ".join(
      f"{rng.getrandbits(64):x}" for _ in range(60))}).encode()
          for i in range(count)]


def _line_in(split: str, name: str, first: int) -> int:
  """The first line number from `first` on that `split` reads in file
  `name` (a reader reports a bad line in the split that owns it)."""
  return next(n for n in range(first, 1000)
              if sources.split_of(f"{name}:{n}") == split)


def _with_bad_line(path: str, bad: bytes, split: str, first: int) -> int:
  number = _line_in(split, os.path.basename(path), first)
  lines = _text_lines(number + 2)
  lines[number - 1] = bad
  with open(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return number


def write_inputs(folder: str, split: str, textdir: bool,
                 early: bool = False) -> Dict[str, Case]:
  """The six bad inputs, each in a subfolder of `folder` named by its case.

  Args:
    folder: where they go.
    split: the split the script reads (a bad line is put in it).
    textdir: the folder without matching files is read as "textdir:" (as
      build_db is given it); else as a jsonl glob, "jsonl:corpus/*.jsonl*",
      the spec every case has in a script run from its case folder.
    early: the damage comes before any whole document (a bad first line, a
      .zst cut inside its first block), for a script that would otherwise
      work on the documents before it (evaluate.py scores as it reads).
  Returns:
    {case: Case}; specs are relative to the case folder when not textdir.
  """
  first = 1 if early else 3
  cases = {}
  for case in CASES:
    os.makedirs(os.path.join(folder, case, "corpus"))
  def at(case, name):
    return os.path.join(folder, case, "corpus", name)
  def spec(case, name):
    return f"jsonl:{at(case, name)}" if textdir else "jsonl:corpus/*.jsonl*"
  def shown(case, name):  # The path as the message shows it.
    return re.escape(at(case, name) if textdir else f"corpus/{name}")

  n = _with_bad_line(at("malformed_line", "x.jsonl"), b'{"text": "cut', split,
                     first)
  cases["malformed_line"] = Case(
      spec("malformed_line", "x.jsonl"),
      rf"{shown('malformed_line', 'x.jsonl')}:{n}: not valid JSON "
      r"\(Unterminated string starting at: column 10\)")
  n = _with_bad_line(at("invalid_utf8", "x.jsonl"), b'{"text": "caf\xff"}',
                     split, first)
  cases["invalid_utf8"] = Case(
      spec("invalid_utf8", "x.jsonl"),
      rf"{shown('invalid_utf8', 'x.jsonl')}:{n}: not valid UTF-8 "
      r"\(byte 0xff at column 14\)")
  n = _with_bad_line(at("missing_field", "x.jsonl"),
                     b'{"id": 7, "meta": {"lang": "en"}}', split, first)
  cases["missing_field"] = Case(
      spec("missing_field", "x.jsonl"),
      rf"{shown('missing_field', 'x.jsonl')}:{n}: no \"text\" field "
      r"\(has: id, meta\)")
  whole = zstandard.ZstdCompressor().compress(
      b"\n".join(_text_lines(600)) + b"\n")
  with open(at("truncated_zst", "x.jsonl.zst"), "wb") as f:
    f.write(whole[:1000] if early else whole[:len(whole) // 2])
  cases["truncated_zst"] = Case(
      spec("truncated_zst", "x.jsonl.zst"),
      rf"{shown('truncated_zst', 'x.jsonl.zst')}: truncated zstd file \(it "
      r"ends inside a frame\) after " + ("0 lines" if early else
                                         r"[1-9]\d* lines"))
  open(at("empty_file", "x.jsonl"), "wb").close()
  cases["empty_file"] = Case(
      spec("empty_file", "x.jsonl"),
      rf"{shown('empty_file', 'x.jsonl')}: empty file \(no documents\)")
  for i in range(14):
    with open(at("no_matching_files", f"m{i:02d}.py"), "w") as f:
      f.write("x = 1\n")
  if textdir:
    src = os.path.dirname(at("no_matching_files", "m00.py"))
    cases["no_matching_files"] = Case(
        f"textdir:{src}", rf"textdir:{re.escape(src)}: no \.txt files "
        r"\(reads \*\.txt; passed over 14 other files, e\.g\. m00\.py; "
        rf"textdir:{re.escape(src)}/\*\.py reads those\)")
  else:
    cases["no_matching_files"] = Case(
        spec("no_matching_files", ""), r"corpus/\*\.jsonl\*: no file matches "
        r"\(passed over 14 other files in corpus, e\.g\. m00\.py\)")
  return cases


# --- Running the scripts ------------------------------------------------------

def _env() -> Dict[str, str]:
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)            # One device, as a user runs it.
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # conftest's: a user has none.
  return env


def _run(script: str, *args: str, cwd: str = REPO_ROOT, timeout: int = 600
         ) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, script, *args], cwd=cwd, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _run_all(runs: Dict[str, tuple]) -> Dict[str, subprocess.CompletedProcess]:
  """{name: (script, args, cwd)} run a few at a time."""
  with concurrent.futures.ThreadPoolExecutor(_CONCURRENT) as pool:
    futures = {name: pool.submit(_run, script, *args, cwd=cwd)
               for name, (script, args, cwd) in runs.items()}
    return {name: f.result() for name, f in futures.items()}


def error_lines(stderr: str) -> List[str]:
  """The non-empty lines of stderr, less the scripts' own progress bars."""
  out = []
  for line in stderr.split("\n"):
    updates = [u for u in line.split("\r") if u.strip()]
    if updates and not all(_PROGRESS.fullmatch(u) for u in updates):
      out.append(line.strip())
  return out


def assert_one_line(proc: subprocess.CompletedProcess, prefix: str,
                    message: str) -> None:
  """Exit status 1 and one line on stderr: `prefix` + a `message` match."""
  lines = error_lines(proc.stderr)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert re.fullmatch(prefix + message, lines[0]), (lines[0], message)


# --- build_db.py --------------------------------------------------------------

@pytest.mark.slow
def test_build_db_reports_each_bad_corpus_in_one_line(tmp_path):
  cases = write_inputs(str(tmp_path), "train", textdir=True)
  script = os.path.join("scripts", "build_db.py")
  def args(name):
    return ("--config=configs/tiny.py",
            f"--config.data.corpus={cases[name].spec}",
            f"--config.data.db_dir={tmp_path}/db_{name}")
  runs = {name: (script, args(name), REPO_ROOT) for name in cases}
  # -v shows the traceback instead (and still exits 1).
  runs["verbose"] = (script, (*args("malformed_line"), "-v", "1"), REPO_ROOT)
  procs = _run_all(runs)
  for name, case in cases.items():
    assert_one_line(procs[name], re.escape(f"{script}: error: "), case.message)
    assert not os.path.exists(tmp_path / f"db_{name}"), name  # Nothing made.
  verbose = procs["verbose"]
  assert verbose.returncode == 1
  assert "Traceback (most recent call last)" in verbose.stderr
  assert re.search(r"CorpusError: " + cases["malformed_line"].message + "$",
                   verbose.stderr, re.MULTILINE), verbose.stderr[-3000:]


# --- cache_tasks.py and evaluate.py: a DB over a good corpus -----------------

CORPUS_SPEC = "jsonl:corpus/*.jsonl*"  # Relative: each case has its own.
VOCAB = 512


def _db_flags(db_dir: str) -> List[str]:
  return [f"--config={REPO_ROOT}/configs/tiny.py",
          f"--config.data.corpus={CORPUS_SPEC}",
          f"--config.data.db_dir={db_dir}"]


@pytest.fixture(scope="module")
def corpus_db(tmp_path_factory):
  """A DB that build_db.py built over a good corpus ("corpus/*.jsonl*"
  under its folder): about 100 chunks, a 512-piece vocabulary."""
  root = tmp_path_factory.mktemp("good")
  os.makedirs(root / "corpus")
  with open(root / "corpus" / "a.jsonl", "w", encoding="utf-8") as f:
    for doc in sources.python_stdlib("train", max_bytes=20_000):
      f.write(json.dumps({"text": doc.text}) + "\n")
  db_dir = str(root / "db")
  proc = _run(os.path.join(REPO_ROOT, "scripts", "build_db.py"),
              *_db_flags(db_dir), f"--config.db.vocab_size={VOCAB}",
              "--config.db.shard_chunks=100", cwd=str(root))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return db_dir


@pytest.mark.slow
def test_cache_tasks_reports_each_bad_held_out_corpus_in_one_line(
    tmp_path, corpus_db):
  """The training split is the DB's; the held-out split is read from the
  corpus, which is bad in each case folder (same spec, relative to it)."""
  cases = write_inputs(str(tmp_path), "validation", textdir=False)
  script = os.path.join(REPO_ROOT, "scripts", "cache_tasks.py")
  procs = _run_all({
      name: (script, (*_db_flags(corpus_db),
                      f"--config.data.cache_dir={tmp_path}/{name}/cache"),
             str(tmp_path / name))
      for name in cases})
  for name, case in cases.items():
    assert case.spec == CORPUS_SPEC
    assert_one_line(procs[name], re.escape(f"{script}: error: "),
                    case.message)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus_db):
  """A 2-step tiny run (synthetic data) whose vocabulary is the DB's."""
  workdir = str(tmp_path_factory.mktemp("run") / "tiny")
  proc = _run(os.path.join("scripts", "train.py"), "--config=configs/tiny.py",
              f"--workdir={workdir}", "--config.train.steps=2",
              "--config.train.batch_size=2", "--config.train.seq_len=128",
              "--config.checkpoint.every=2", "--config.train.warmup_steps=1",
              f"--config.model.vocab_size={VOCAB}",
              f"--config.data.db_dir={corpus_db}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_evaluate_reports_each_bad_eval_corpus_in_one_line(tmp_path,
                                                           tiny_run):
  """evaluate.py scores documents as it reads them, so the damage comes
  before the first document; progress lines (stderr) are turned off."""
  cases = write_inputs(str(tmp_path), "train", textdir=True, early=True)
  script = os.path.join("scripts", "evaluate.py")
  procs = _run_all({
      name: (script, (f"--workdir={tiny_run}", "--config=configs/eval.py:pile",
                      f"--config.eval.sets.pile.corpus={case.spec}",
                      "--config.eval.sets.pile.group_by=",
                      "--config.eval.progress_seconds=0"), REPO_ROOT)
      for name, case in cases.items()})
  for name, case in cases.items():
    # evaluate.py prints "error: ..." (not this change's file); either form.
    assert_one_line(procs[name], rf"(?:{re.escape(script)}: )?error: ",
                    case.message)


# --- cli: which errors are one line -------------------------------------------

def test_error_line_finds_a_corpus_error_however_it_is_wrapped():
  corpus_error = errors.CorpusError("a.jsonl", "not valid JSON (x)", 3)
  assert cli.error_line(corpus_error) == "a.jsonl:3: not valid JSON (x)"
  try:
    try:
      raise corpus_error
    except ValueError as e:
      raise RuntimeError("a worker failed") from e
  except RuntimeError as wrapped:
    assert cli.error_line(wrapped) == "a.jsonl:3: not valid JSON (x)"
  # TensorFlow's and Beam's wrappers carry only the formatted traceback.
  text = ("InvalidArgumentError: {{node}} CorpusError: a.jsonl:3: x\n"
          "Traceback (most recent call last):\n  File \"s.py\", line 1\n"
          "retro_jax.corpus.errors.CorpusError: a.jsonl:3: not valid JSON "
          "(x) [while running 'validation_preprocess']\n\n [[{{node PyFunc}}]]")
  assert cli.error_line(Exception(text)) == "a.jsonl:3: not valid JSON (x)"


def test_error_line_takes_bad_input_and_leaves_bugs():
  assert cli.error_line(ValueError("bad value")) == "bad value"
  assert cli.error_line(FileNotFoundError(2, "No such file", "x.json")) == (
      "[Errno 2] No such file: 'x.json'")
  assert cli.error_line(ValueError("head:\n  detail\nlast")) == "head: last"
  assert cli.error_line(KeyError("x")) is None
  assert cli.error_line(RuntimeError("x")) is None
  assert cli.error_line(RuntimeError("cut"), also=(RuntimeError,)) == "cut"


def test_verbosity_is_seen_before_flags_are_parsed():
  assert cli.asks_verbosity(["s.py", "-v", "1"])
  assert cli.asks_verbosity(["s.py", "--verbosity=0"])
  assert cli.asks_verbosity(["s.py", "--v=1"])
  assert not cli.asks_verbosity(["s.py", "--config.v=1", "--vocab=3", "-x"])
