"""The accelerator benchmark and check script, run on this CPU host.

They run on the CPU here exactly as on a GPU host, with TensorFlow, seqio,
ScaNN and Beam made unimportable (a GPU host may lack them), so what a GPU
session needs is known to work before one is lent: every check passes, the
figures are reported, and real batches flow from a numpy shard through the
double-buffered prefetch. On the CPU, "auto" attention is the reference
path and the fused path under test is XLA's.
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import REPO_ROOT
from retro_jax.config import RetroConfig
from retro_jax.core import accelerators
from retro_jax.data import numpy_shard

# Runs a script with the libraries a GPU host may lack made unimportable.
_WITHOUT_TF = """
import importlib.abc, runpy, sys
class _Absent(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in {'tensorflow', 'seqio', 'scann', 'apache_beam',
                              'tensorflow_datasets', 'tensorflow_text'}:
      raise ImportError('not on this host: ' + name)
sys.meta_path.insert(0, _Absent())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name='__main__')
"""


def _run(script, *args, timeout=900):
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
      [sys.executable, "-c", _WITHOUT_TF, os.path.join(REPO_ROOT, script),
       *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=timeout)


def _shard(path, seq_len, rows=4, vocab=512, seed=0):
  cfg = RetroConfig.preset("tiny")
  rng = np.random.default_rng(seed)
  l = seq_len // cfg.chunk_size
  batches = [{
      "tokens": rng.integers(1, vocab, (2, seq_len), dtype=np.int32),
      "neighbours": rng.integers(1, vocab, (2, l, cfg.num_neighbours,
                                            cfg.neighbour_len),
                                 dtype=np.int32),
      "loss_mask": np.ones((2, seq_len), np.int32)} for _ in range(rows // 2)]
  numpy_shard.write(path, batches, {"task_name": "test", "split": "train"})
  return path


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),     # Not the SXM figure of "NVIDIA H100".
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("cpu", None),
])
def test_datasheet_peak_by_device_kind(kind, peak):
  device = types.SimpleNamespace(device_kind=kind)
  assert accelerators.datasheet_peak_flops(device) == peak


def test_this_host_is_no_gpu_and_keeps_no_memory_statistics():
  assert not accelerators.is_nvidia_gpu()
  assert accelerators.device_peak_flops(5.0) == 5.0
  assert accelerators.matmul_peak_flops(256, repeats=2) > 1e8


@pytest.mark.slow
def test_check_script_passes_and_benchmarks_real_input(tmp_path):
  shard = _shard(str(tmp_path / "batches.npz"), 256)
  proc = _run("scripts/gpu_check.py", "--check_preset=tiny",
              "--check_seq_len=256", "--presets=tiny", "--seq_len=256",
              "--warmup=1", "--steps=2", "--sample_tokens=70",
              f"--batches={shard}")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  passed = [l for l in proc.stdout.splitlines() if l.startswith("PASS ")]
  assert len(passed) == 5, proc.stdout
  assert "FAIL" not in proc.stdout
  assert "attention 'auto' -> reference" in proc.stdout
  report = json.loads(proc.stdout.strip().splitlines()[-2])
  row, = report["presets"]
  assert row["attention"] == "reference"        # "auto" on a CPU host.
  assert row["batch_size"] == 2 and row["seq_len"] == 256
  assert row["tokens_per_s"] == pytest.approx(2 * 256 / row["step_s"])
  assert row["real_input_step_s"] > 0
  assert row["real_over_synthetic"] == pytest.approx(
      row["real_input_step_s"] / row["step_s"])
  assert 0 < row["mfu_measured_matmul"]
  assert row["mfu_datasheet"] is None           # No datasheet peak for CPUs.
  assert row["sample_tokens_per_s"] > 0
  assert np.isfinite(row["loss"])


def test_benchmark_refuses_a_shard_of_another_shape(tmp_path):
  shard = _shard(str(tmp_path / "short.npz"), 128)
  proc = _run("benchmarks/accelerator.py", "--presets=tiny", "--seq_len=256",
              f"--batches={shard}", "--sample_tokens=0", "--matmul_n=64")
  assert proc.returncode == 1, proc.stderr
  line, = proc.stderr.strip().splitlines()[-1:]
  assert shard in line and "'tokens'" in line and "seq_len=256" in line


def test_benchmark_reports_a_failing_preset_and_exits_nonzero():
  # An invalid remat policy fails the preset when its network is built; the
  # failure is reported in its row (as an out-of-memory one on a GPU would
  # be, without losing the other presets' figures) and the exit status is 1.
  proc = _run("benchmarks/accelerator.py", "--presets=tiny", "--seq_len=128",
              "--remat=sometimes", "--sample_tokens=0", "--matmul_n=64")
  assert proc.returncode == 1, proc.stderr
  row, = json.loads(proc.stdout.strip().splitlines()[-1])["presets"]
  assert row["preset"] == "tiny" and "RetroConfig.remat" in row["error"]
  assert "presets that failed: tiny" in proc.stderr.strip().splitlines()[-1]
