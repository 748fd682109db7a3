"""scripts/train.py (the quickstart's job) end to end, briefly."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_train_script_trains_and_evaluates(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
      [sys.executable, os.path.join("scripts", "train.py"),
       "--config=configs/tiny.py", f"--workdir={tmp_path}",
       "--config.model.vocab_size=512", "--config.data.max_bytes=400000",
       "--config.data.spm_train_bytes=200000", "--config.train.steps=20",
       "--config.train.log_every=10", "--config.train.eval_batches=1"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  losses = [float(x) for x in re.findall(r"step +\d+  loss ([\d.]+)",
                                         out.stdout)]
  assert len(losses) == 2 and losses[1] < losses[0], out.stdout
  assert "validation loss (retrieval on)" in out.stdout
  assert "validation loss (retrieval off)" in out.stdout
  assert os.path.exists(tmp_path / "spm.model")
