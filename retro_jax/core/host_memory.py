"""Keeps freed host memory in the process, so XLA:CPU steps stop page-faulting.

XLA:CPU allocates each execution's temporary buffer (about 1.3 GB for a
`bench` training step) with malloc and frees it when the step ends. glibc
serves blocks that large with mmap, or from per-thread arenas that hand freed
pages back to the kernel, so the next step touches fresh pages: 325,000 minor
page faults and about 1.3 s of kernel time per `bench` step on one core (16%
of the step), all of it spent zero-filling memory the process just released.

`keep_freed_memory()` tells glibc (mallopt) to serve every allocation from
the main heap and never to return freed memory to the kernel: one arena
(M_ARENA_MAX=1), no mmap for large blocks (M_MMAP_MAX=0), no trimming
(M_TRIM_THRESHOLD=-1). The process then keeps its peak heap, and each step
reuses the pages of the previous one. All three are needed; any two leave the
faults in place.

Arenas are chosen when a thread first allocates, so this must run before the
JAX backend starts its threads (before the first array or computation); the
entry scripts call it first thing. It does nothing on other C libraries and
on hosts with an accelerator, where the step's buffers live on the device and
a single arena would only serialise the input pipeline's threads.
"""

import ctypes
import ctypes.util
import glob
import os
import platform
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")

# glibc >= 2.35: malloc madvises its heap for transparent huge pages.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):   # Another jax layout: assume not.
    return False


def accelerator_present() -> bool:
  """A TPU or GPU device node exists on this host."""
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def keep_freed_memory() -> bool:
  """Sets glibc to keep freed memory for reuse (see the module docstring).

  Returns:
    True if the settings were applied; False if this host has an
    accelerator, the C library is not glibc, or the JAX backend has already
    started (too late for its threads' arenas).
  """
  if accelerator_present() or _backend_started():
    return False
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(mallopt(param, value) == 1 for param, value in settings)


def _glibc_at_least(major: int, minor: int) -> bool:
  lib, version = platform.libc_ver()
  if lib != "glibc":
    return False
  try:
    have = tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return False
  return have >= (major, minor)


def _thp_on_request() -> bool:
  """The kernel grants transparent huge pages to madvised memory."""
  try:
    with open(_THP_ENABLED) as f:
      mode = f.read()
  except OSError:
    return False
  return "[madvise]" in mode or "[always]" in mode


def reexec_with_hugepage_heap() -> bool:
  """Restarts this process with glibc's heap on transparent huge pages.

  Even with `keep_freed_memory`, the heap still grows now and then: a small
  allocation lands in the hole a step's freed temporaries left, and the next
  step's ~900 MB block has to go above it. Each such growth page-faults
  ~225,000 fresh 4 kB pages (about a second of kernel time on the `bench`
  step, on a random step of a run). With `glibc.malloc.hugetlb=1` malloc
  madvises its heap for 2 MB pages, 512 times fewer faults: measured on
  `bench`, the first step's ~361,000 faults became ~3,000 and later growth
  no longer showed.

  The tunable is read when the C library starts, so this sets
  GLIBC_TUNABLES and exec()s the same command line again. Call it first
  thing in an entry script, before any thread or file is opened. It returns
  False (and does nothing) when the tunable is already set, on an
  accelerator host, without glibc >= 2.35, or without kernel THP support;
  it does not return otherwise, unless exec() itself fails (then the
  environment is restored and it returns False).
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if ("glibc.malloc.hugetlb" in tunables or accelerator_present() or
      not _glibc_at_least(2, 35) or not _thp_on_request()):
    return False
  os.environ["GLIBC_TUNABLES"] = ":".join(
      t for t in (tunables, HUGEPAGE_TUNABLE) if t)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
  except OSError:
    if tunables:
      os.environ["GLIBC_TUNABLES"] = tunables
    else:
      del os.environ["GLIBC_TUNABLES"]
  return False
