"""The README's main command, scripts/quickstart.sh, at a small size.

It is interrupted with Ctrl-C (SIGINT to its process group) while training,
then run again: the rerun must reuse the DB and the neighbour cache, finish
every stage and print where each output lies. A third run, with everything
complete, must reproduce the same bits per byte without retraining.
"""

import glob
import math
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from retro_jax.evaluation import result_files

pytestmark = pytest.mark.slow

ARGS = ["--steps=12", "--data_bytes=300000"]
BPB_LINE = re.compile(r"held-out bits per byte: RETRO ([\d.]+) \(retrieval off "
                      r"([\d.]+)\), baseline without CCA ([\d.]+)")

LEAK_LINE = re.compile(r"leakage probe \(the held-out text retrievable too\): "
                       r"(\d+) chunks with r\(C\) > 0.75: ([\d.]+) bpb with "
                       r"retrieval, ([\d.]+) without \(([\d.]+)% (lower|higher)\)")
CONTROL_LINE = re.compile(r"control \(random neighbours\): retrieval saves "
                          r"([-+][\d.]+) bpb")

PAIRED_LINE = re.compile(r"  (\S.*?\S) *: ([-+][\d.]+) bpb saved \([-+][\d.]+%\), "
                         r"95% interval \[([-+][\d.]+), ([-+][\d.]+)\]")


def _command(workdir):
  # The venv running these tests is the one the script would set up
  # (scripts/setup_env.sh finds it installed and installs nothing).
  env = dict(os.environ, VENV=sys.prefix)
  env.pop("XLA_FLAGS", None)   # The quickstart runs on one CPU device.
  return dict(args=["bash", "scripts/quickstart.sh", *ARGS,
                    f"--workdir={workdir}"], cwd=REPO_ROOT, env=env, text=True)


def _run(workdir) -> str:
  done = subprocess.run(**_command(workdir), capture_output=True, timeout=1500)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout + done.stderr


def _interrupt_during_training(workdir) -> str:
  """Runs the command until training starts, then presses Ctrl-C."""
  # A shell that starts jobs in the background (a CI runner, `cmd &`) hands
  # them SIGINT ignored; a terminal's foreground job has the default action.
  proc = subprocess.Popen(
      **_command(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      start_new_session=True,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  lines = []
  for line in proc.stdout:
    lines.append(line)
    # "model: ..." is printed by the training process itself, so the signal
    # reaches a running Python, as a Ctrl-C in a terminal would.
    if line.startswith("model:") and any(
        seen.startswith("== 3/6") for seen in lines):
      os.killpg(proc.pid, signal.SIGINT)
      break
  rest, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0, "the interrupted command must fail"
  return "".join(lines) + rest


def _mtimes(paths):
  return {p: os.stat(p).st_mtime_ns for p in paths}


def test_quickstart_interrupted_then_rerun_resumes_and_finishes(tmp_path):
  w = str(tmp_path / "qs")
  first = _interrupt_during_training(w)
  assert "== 1/6" in first and "== 2/6" in first and "== 4/6" not in first
  # Vocabulary, chunks, BERT embeddings, index; the cached neighbours.
  db_files = glob.glob(f"{w}/db/shards/*/*") + [
      f"{w}/db/spm.model", f"{w}/db/index/index.json"]
  cache_files = glob.glob(f"{w}/cache/retro_quickstart/*")
  assert f"{w}/db/manifest.json" in glob.glob(f"{w}/db/*")
  assert f"{w}/cache/retro_quickstart/COMPLETED" in cache_files
  assert any(p.endswith("embeddings.npy") for p in db_files)
  before = _mtimes(db_files + cache_files)

  second = _run(w)
  # The DB and the neighbour cache were reused, not rebuilt.
  assert _mtimes(before) == before
  assert "complete cache" in second and "nothing to do" in second
  for stage in range(1, 7):
    assert f"== {stage}/6" in second
  on, off, base = map(float, BPB_LINE.search(second).groups())
  assert all(0 < x < 16 and math.isfinite(x) for x in (on, off, base))
  assert on != off          # Retrieval changes what RETRO predicts.
  # The paired gains: on vs off is the difference of the first two figures.
  gain = PAIRED_LINE.findall(second)
  assert [g[0] for g in gain] == ["retrieval on vs off", "RETRO vs baseline"]
  assert float(gain[0][1]) == pytest.approx(off - on, abs=2e-4)
  assert float(gain[1][1]) == pytest.approx(base - on, abs=2e-4)
  for _, saved, low, high in gain:
    assert float(low) <= float(saved) <= float(high)
  # The leakage probe: with the held-out text in the DB most chunks (all
  # but each sequence's first) overlap their neighbours; its cut is the
  # relative difference of its two figures. Then the random control.
  chunks, leak_on, leak_off, cut, way = LEAK_LINE.search(second).groups()
  assert int(chunks) > 0
  assert float(cut) * (1 if way == "lower" else -1) == pytest.approx(
      100 * (1 - float(leak_on) / float(leak_off)), abs=0.06)
  assert CONTROL_LINE.search(second)
  # Sampling shows each chunk with the neighbours it was continued from.
  assert "=== chunk 1 ===" in second and "--- neighbour 0 ---" in second

  # Everything the last lines name exists.
  for run in ("retro", "baseline"):
    assert os.path.isdir(f"{w}/{run}/checkpoints/12")
    assert glob.glob(f"{w}/{run}/events.out.tfevents.*")
    [result] = result_files.find(f"{w}/{run}", "task")
    assert result["step"] == 12
    assert result["sets"]["task"]["retrieval_on"]["bits_per_byte"] > 0
  assert glob.glob(f"{w}/retro/eval/step_12_task_*_leakage.png")
  for probe in ("leak", "random"):
    [result] = result_files.find(f"{w}/retro", "task", probe)
    assert result["neighbours"] == probe
  assert f"retrieval DB:      {w}/db" in second

  # Complete: a third run trains nothing and reproduces the numbers.
  checkpoints = _mtimes(glob.glob(f"{w}/*/checkpoints/12"))
  assert len(checkpoints) == 2
  third = _run(w)
  assert _mtimes(checkpoints) == checkpoints
  assert BPB_LINE.search(third).groups() == BPB_LINE.search(second).groups()


def test_seeds_script_trains_other_seeds_and_pairs_them(tmp_path):
  """scripts/seeds.sh after a quickstart: seed 0 is the quickstart's own
  runs (linked, not retrained), seed 1 is trained; the table pairs RETRO
  with the baseline per seed, and seed 0's figure is the quickstart's."""
  w = str(tmp_path / "qs")
  first = _run(w)
  on, _, _ = BPB_LINE.search(first).groups()
  env = dict(os.environ, VENV=sys.prefix)
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
      ["bash", "scripts/seeds.sh", *ARGS, f"--workdir={w}", "--seeds=0,1",
       "--models=retro,baseline"], cwd=REPO_ROOT, env=env, text=True,
      capture_output=True, timeout=1500)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert os.path.islink(f"{w}/seeds/retro/seed_0")
  assert os.path.isdir(f"{w}/seeds/retro/seed_1/checkpoints/12")
  rows = {line.split("|")[1].strip(): [c.strip() for c in
                                       line.split("|")[2:-1]]
          for line in done.stdout.splitlines() if line.startswith("| ")}
  assert rows["retro, retrieval on"][0] == on
  assert rows["retro, retrieval on"][1] != on   # Another seed, another run.
  for s in range(2):
    assert rows["retro saves over baseline"][s].count("[") == 1
    assert rows["retro, leakage probe: r(C) > 0.75 cut"][s].endswith("%")
  bad = subprocess.run(["bash", "scripts/seeds.sh", "--workdir=/nonexistent"],
                       cwd=REPO_ROOT, env=env, text=True, capture_output=True)
  assert bad.returncode == 2 and "run scripts/quickstart.sh" in bad.stderr
