"""core/platform.py: a CPU-only host runs jax on the CPU without probing for
TPUs (libtpu's warnings stay off stderr); a chosen platform is kept."""

import os
import subprocess
import sys

from conftest import REPO_ROOT
from retro_jax.core import platform

_PROGRAM = """
import jax
from retro_jax.core import platform
print(platform.use_cpu_without_accelerator(), jax.devices()[0].platform)
"""


def _run(**env_changes):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(PYTHONPATH=REPO_ROOT, **env_changes)
  return subprocess.run([sys.executable, "-c", _PROGRAM], env=env,
                        capture_output=True, text=True, timeout=300)


def test_a_host_without_accelerators_runs_on_the_cpu_quietly():
  proc = _run()
  assert proc.returncode == 0, proc.stderr
  bare = not (platform.tpu_chip_attached() or platform.nvidia_gpu_attached())
  if bare:
    assert proc.stdout.split() == ["True", "cpu"]
    assert "TPU" not in proc.stderr, proc.stderr
  else:
    assert proc.stdout.split()[0] == "False"


def test_a_chosen_platform_is_kept():
  proc = _run(JAX_PLATFORMS="cpu")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["False", "cpu"]
