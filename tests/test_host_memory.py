"""host_memory.keep_freed_memory: repeated XLA:CPU executions stop
page-faulting their temporary buffers back in."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from retro_jax import host_memory

# The gradient of four chained [4096, 1024] layers: its saved activations
# and temporaries (~150 MB per call) are far above glibc's mmap threshold. Run
# it a few times and count the minor page faults of each later call. With the
# memory kept, a call faults only when the heap has to grow (now and then, as
# the allocation order varies between threads), so the median is compared.
_PROBE = r"""
import json, resource, sys
from retro_jax import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
def f(x, w):
  for _ in range(4):
    x = jnp.tanh(x @ w)                      # [4096, 1024]: 16 MB
  return x.sum()
g = jax.jit(jax.grad(f, argnums=1))
x = jnp.ones((4096, 1024), jnp.float32) / 64
w = jnp.ones((1024, 1024), jnp.float32) / 1024
for _ in range(2):
  g(x, w).block_until_ready()
faults = []
for _ in range(9):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  g(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults,
                  "late": host_memory.keep_freed_memory()}))
"""


def _probe(mode: str) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("MALLOC_")}
  env["PYTHONPATH"] = REPO_ROOT
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env,
                       check=True, capture_output=True, text=True,
                       timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory.accelerator_present() or
                    not sys.platform.startswith("linux"),
                    reason="applies to glibc hosts without an accelerator")
def test_kept_memory_removes_the_page_faults_of_each_execution():
  plain = _probe("plain")
  kept = _probe("keep")
  assert not plain["kept"] and kept["kept"]
  # Without it every call faults its fresh buffers in, 4 KB at a time.
  assert min(plain["faults"]) > 10_000, plain
  assert statistics.median(kept["faults"]) < 100, kept
  # Once the backend runs, its threads' arenas are fixed: refused.
  assert kept["late"] is False and plain["late"] is False
