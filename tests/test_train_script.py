"""scripts/train.py as a process: kill -9 then restart ends bit-identical to
an uninterrupted run; SIGTERM saves and exits 0; a bad config key or
process flag fails. Runs of several processes: training/test_multiprocess.py.
"""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT

# A small model and batch on one CPU device (the script's own process).
SMALL = ["--config=configs/tiny.py", "--config.model.vocab_size=256",
         "--config.model.num_layers=2", "--config.model.cca_layers=(2,)",
         "--config.model.enc_num_layers=1", "--config.train.batch_size=4",
         "--config.train.seq_len=128", "--config.train.warmup_steps=2",
         "--config.train.log_every=1", "--config.train.peak_flops=1e11"]


def _env():
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)   # One device, as a user's CPU run.
  return env


def _cmd(workdir, *extra):
  return [sys.executable, os.path.join("scripts", "train.py"),
          f"--workdir={workdir}", *SMALL, *extra]


def _run(workdir, *extra, timeout=300):
  return subprocess.run(_cmd(workdir, *extra), cwd=REPO_ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _steps_saved(workdir):
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _final_params(workdir):
  # Imported here: the test process has 8 simulated devices, which
  # restore_params does not need (it places params on one device).
  from retro_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  _, params, step = checkpoints.restore_params(str(workdir))
  return step, {f"{m}/{n}": np.asarray(v) for m, leaves in params.items()
                for n, v in leaves.items()}


@pytest.mark.slow
def test_kill_9_then_restart_equals_uninterrupted_run(tmp_path):
  steps = ["--config.train.steps=7", "--config.checkpoint.every=1"]
  whole = subprocess.Popen(_cmd(tmp_path / "whole", *steps), cwd=REPO_ROOT,
                           env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  killed = tmp_path / "killed"
  victim = subprocess.Popen(_cmd(killed, *steps), cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  kill_after = random.Random().randint(1, 4)
  deadline = time.time() + 240
  while time.time() < deadline and victim.poll() is None:
    if _steps_saved(killed) and _steps_saved(killed)[-1] >= kill_after:
      victim.send_signal(signal.SIGKILL)   # Possibly mid-save of the next.
      break
    time.sleep(0.05)
  assert victim.wait() == -signal.SIGKILL, "the run ended before the kill"
  at_kill = _steps_saved(killed)[-1]
  assert at_kill < 7
  resumed = _run(killed, *steps)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"start step {at_kill} of 7" in resumed.stdout, resumed.stdout
  assert whole.wait(timeout=300) == 0
  step_a, a = _final_params(tmp_path / "whole")
  step_b, b = _final_params(killed)
  assert step_a == step_b == 7
  assert a.keys() == b.keys()
  for k in a:
    assert np.array_equal(a[k], b[k]), k      # Bit for bit.


@pytest.mark.slow
def test_sigterm_saves_and_exits_0(tmp_path):
  proc = subprocess.Popen(
      _cmd(tmp_path, "--config.train.steps=100000",
           "--config.checkpoint.every=100000"),
      cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL, text=True)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step ") and "steps/s" in line:
      proc.send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + proc.stdout.read()
  assert proc.wait(timeout=120) == 0, out
  assert "SIGTERM: saved step" in out, out
  saved = _steps_saved(tmp_path)
  assert len(saved) == 1 and 2 <= saved[0] < 100000
  assert f"preempted at step {saved[0]}" in out


def test_unknown_config_key_fails_before_compute(tmp_path):
  out = _run(tmp_path / "run", "--config.train.stepz=3", timeout=120)
  assert out.returncode == 2
  # One line that names the flag and the field it probably meant.
  assert out.stderr.strip().splitlines()[-1] == (
      "scripts/train.py: error: --config.train.stepz=3: no such config field "
      "(did you mean steps?); configs/base.py and configs/eval.py state every "
      "field"), out.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")


def test_bad_process_flags_fail_before_anything_starts(tmp_path):
  for flags, message in (
      (["--num_processes=2", "--process_id=2",
        "--coordinator_address=127.0.0.1:1"],
       "--process_id=2 must be below --num_processes=2"),
      (["--process_id=0"], "--process_id needs --num_processes too")):
    out = _run(tmp_path / "run", *flags, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"scripts/train.py: error: {message}"), out.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")
