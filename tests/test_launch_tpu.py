"""scripts/launch_tpu.sh for real, with a stand-in `gcloud` on PATH.

tests/gcloud_standin.py records every gcloud call and runs the launcher's
`--worker=all` commands as one local process per host of the slice: a v4-16
is 2 hosts of 4 chips, here 2 processes of 4 CPU devices. So the launcher's
own install and train command lines run: the workers clone the repository
(a clone of this checkout's HEAD: uncommitted changes are not in it), run
scripts/setup_env.sh (against the existing environment, $VENV, so nothing is
downloaded) and train docs/tpu.md §3's command (the tiny preset on
synthetic data in place of the 172m preset on C4) as one 8-device mesh.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from readme_shell import readme_commands

pytestmark = pytest.mark.slow

RECIPE = os.path.join(REPO_ROOT, "docs", "tpu.md")
STEPS = 4


def _recipe_train_flags(workdir):
  """docs/tpu.md §3's launcher flags: the tiny preset on synthetic data, a
  local workdir (both "hosts" share this disk, as a slice shares a bucket)."""
  with open(RECIPE) as f:
    launch = next(c for c in readme_commands(f.read())
                  if c.script == "scripts/launch_tpu.sh")
  name, zone, accelerator = launch.args[:3]
  kept = [a for a in launch.args[3:] if not a.startswith(
      ("--config=", "--config.data.", "--workdir="))]
  kept = [re.sub(r"accum_steps=\d+", "accum_steps=2", a) for a in kept]
  return (name, zone, accelerator), [
      f"--config={REPO_ROOT}/configs/tiny.py", f"--workdir={workdir}",
      "--config.model.num_layers=2", "--config.model.cca_layers=(2,)",
      "--config.model.enc_num_layers=1", "--config.train.batch_size=16",
      "--config.train.seq_len=128", f"--config.train.steps={STEPS}",
      "--config.train.log_every=1", "--config.checkpoint.every=2"] + kept


def _git(*args, cwd):
  subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_launcher_trains_on_a_two_host_slice(tmp_path):
  origin = tmp_path / "origin"     # What the workers clone: HEAD, branched.
  _git("clone", "-q", REPO_ROOT, str(origin), cwd=tmp_path)
  _git("checkout", "-q", "-b", "launch-test", cwd=origin)
  # The workers' scripts/setup_env.sh must find $VENV installed from these
  # very files, or it would reinstall the shared environment from the clone.
  venv = os.path.join(REPO_ROOT, os.environ.get("VENV", ".venv"))
  want = hashlib.sha256(b"".join(
      (origin / f).read_bytes() for f in ("setup.cfg", "pyproject.toml",
                                          "scripts/setup_env.sh"))).hexdigest()
  with open(os.path.join(venv, ".retro_jax-installed")) as f:
    assert f.read().strip() == want, (
        "the environment was not installed from HEAD's setup.cfg and "
        "scripts/setup_env.sh: commit them and run scripts/setup_env.sh")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f"#!/bin/sh\nexec {sys.executable} "
                    f"{os.path.join(REPO_ROOT, 'tests', 'gcloud_standin.py')}"
                    ' "$@"\n')
  gcloud.chmod(0o755)
  # A worker without python3.11 would fetch it with uv (network); this host's
  # interpreter stands for the one the image would get.
  (bin_dir / "python3.11").symlink_to(sys.executable)
  state = tmp_path / "gcloud"
  workdir = tmp_path / "run"
  (_, zone, _), flags = _recipe_train_flags(workdir)
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", GCLOUD_STANDIN_DIR=str(state),
             REPO=str(origin), BRANCH="launch-test",
             VENV=venv, JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run(
      ["bash", os.path.join(REPO_ROOT, "scripts", "launch_tpu.sh"),
       "retro-test", zone, "v4-16"] + flags,
      env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
  logs = [state / f"worker-{i}" / "retro_train.log" for i in range(2)]
  try:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
      running = subprocess.run(["pgrep", "-f", f"--workdir={workdir}"],
                               capture_output=True).returncode == 0
      if not running:
        break
      time.sleep(2)
    else:
      pytest.fail("training did not finish: " + logs[0].read_text()[-2000:])
  finally:
    subprocess.run(["pkill", "-9", "-f", f"--workdir={workdir}"])
  lead = logs[0].read_text()
  assert f"done at step {STEPS}" in lead, lead[-3000:]
  assert re.search(r"over 8 devices / 2 hosts", lead), lead[-3000:]
  assert "done at step" not in logs[1].read_text()     # Process 0 reports.
  assert (workdir / "checkpoints" / str(STEPS)).is_dir()
  calls = [json.loads(line) for line in (state / "calls.jsonl").open()]
  create = [c for c in calls if c[3] == "create"]
  assert len(create) == 1 and "--version=tpu-ubuntu2204-base" in create[0]
  ssh = [c for c in calls if c[3] == "ssh"]
  assert len(ssh) == 2 and all("--worker=all" in c for c in ssh)
  for i in range(2):   # Each worker cloned the branch it was told to.
    head = subprocess.run(
        ["git", "-C", str(state / f"worker-{i}" / "retro_jax"), "rev-parse",
         "--abbrev-ref", "HEAD"], capture_output=True, text=True).stdout
    assert head.strip() == "launch-test"
