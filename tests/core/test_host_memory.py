"""host_memory.keep_freed_memory: repeated XLA:CPU executions stop
page-faulting their temporary buffers back in."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from retro_jax.core import host_memory

# The gradient of four chained [4096, 1024] layers: its saved activations
# and temporaries (~150 MB per call) are far above glibc's mmap threshold. Run
# it a few times and count the minor page faults of each later call. With the
# memory kept, a call faults only when the heap has to grow (now and then, as
# the allocation order varies between threads; more often on a loaded host,
# where a few calls also fault ~1,000 pages of small allocations), so the
# typical call and the total are compared with the plain run's.
_PROBE = r"""
import json, resource, sys
from retro_jax.core import host_memory
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
@pytest.mark.slow
def test_kept_memory_removes_the_page_faults_of_each_execution():
  plain = _probe("plain")
  kept = _probe("keep")
  assert not plain["kept"] and kept["kept"]
  # Without it every call faults its fresh buffers in, 4 KB at a time.
  assert min(plain["faults"]) > 10_000, plain
  # The typical call faults under a tenth of what the plain one does...
  assert statistics.median(kept["faults"]) < min(plain["faults"]) / 10, (
      plain, kept)
  # ...and the occasional heap growth does not bring the total back.
  assert sum(kept["faults"]) < sum(plain["faults"]) / 2, (plain, kept)
  # Once the backend runs, its threads' arenas are fixed: refused.
  assert kept["late"] is False and plain["late"] is False


# Re-executes itself once with the huge-page tunable, then grows the heap
# (64 MB with the mmap threshold off) and reads the heap's VMA flags: "hg"
# is the kernel's mark of madvise(MADV_HUGEPAGE).
_HUGEPAGE_PROBE = r"""
import json, os, sys
from retro_jax.core import host_memory
again = host_memory.reexec_with_hugepage_heap()
host_memory.keep_freed_memory()
block = bytearray(64 << 20)
flags, in_heap = "", False
with open("/proc/self/smaps") as f:
  for line in f:
    if "-" in line.split()[0] and len(line.split()) >= 5:
      in_heap = line.rstrip().endswith("[heap]")
    elif in_heap and line.startswith("VmFlags:"):
      flags += line
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"),
                  "again": again, "argv": sys.argv[1:],
                  "heap_hugepage": " hg" in flags}))
"""


@pytest.mark.skipif(host_memory.accelerator_present() or
                    not host_memory._glibc_at_least(2, 35) or
                    not host_memory._thp_on_request(),
                    reason="needs glibc >= 2.35, kernel THP, no accelerator")
def test_reexec_puts_the_heap_on_huge_pages_once_keeping_argv_and_tunables():
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  env["PYTHONPATH"] = REPO_ROOT
  env["GLIBC_TUNABLES"] = "glibc.malloc.tcache_count=7"
  out = subprocess.run([sys.executable, "-c", _HUGEPAGE_PROBE, "a b", "-x"],
                       env=env, check=True, capture_output=True, text=True,
                       timeout=120)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1, out.stdout  # The first image printed nothing.
  result = json.loads(lines[0])
  assert result["tunables"] == ("glibc.malloc.tcache_count=7:"
                                + host_memory.HUGEPAGE_TUNABLE)
  assert result["again"] is False       # Already set: no second exec.
  assert result["argv"] == ["a b", "-x"]
  assert result["heap_hugepage"], result
  # Without the tunable glibc leaves the heap to the kernel's default.
  env["GLIBC_TUNABLES"] = host_memory.HUGEPAGE_TUNABLE.replace("=1", "=0")
  out = subprocess.run([sys.executable, "-c", _HUGEPAGE_PROBE], env=env,
                       check=True, capture_output=True, text=True, timeout=120)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["again"] is False and not result["heap_hugepage"], result
