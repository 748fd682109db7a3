"""Shared pytest setup for retro_jax.

The environment variables below must be set before JAX is first imported:
XLA reads `XLA_FLAGS` once, when its CPU backend starts, so the 8 simulated
host devices the sharding tests need cannot be added later; JAX reads
`JAX_PLATFORMS` on import. Subprocesses inherit them.
"""

import os
import sys

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _DEVICES_FLAG).strip()
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # TensorFlow's CUDA chatter.
# The tests run on CPU (8 simulated devices). With libtpu installed (the
# `tpu` extra, for tests/training/test_aot.py), JAX would otherwise also
# start its TPU plugin in every process, which takes /tmp/libtpu_lockfile
# and prints five lines of warnings on a host without TPUs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The tests run from a checkout without `pip install -e .`.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import pytest

from retro_jax.config import RetroConfig

REPO_ROOT = _ROOT


def random_tokens(cfg: RetroConfig, batch: int, length: int,
                  seed: int = 0) -> np.ndarray:
  """int32 [batch, length] token ids in 1..V-1 (0 is padding)."""
  rng = np.random.default_rng(seed)
  return rng.integers(1, cfg.vocab_size, (batch, length), dtype=np.int32)


def random_neighbours(cfg: RetroConfig, batch: int, length: int,
                      seed: int = 1, k=None, r=None) -> np.ndarray:
  """int32 [batch, length // m, k, r] neighbour ids in 1..V-1 (no padding)."""
  rng = np.random.default_rng(seed)
  shape = (batch, length // cfg.chunk_size, k or cfg.num_neighbours,
           r or cfg.neighbour_len)
  return rng.integers(1, cfg.vocab_size, shape, dtype=np.int32)


@pytest.fixture(scope="session")
def tiny() -> RetroConfig:
  """The `tiny` preset: 4 layers of width 64, CCA in layers 2 and 4,
  m=64, k=2, r=128 (the paper's retrieval shapes)."""
  return RetroConfig.preset("tiny")


@pytest.fixture(scope="session")
def make_tokens():
  return random_tokens


@pytest.fixture(scope="session")
def make_neighbours():
  return random_neighbours


@pytest.fixture(scope="session")
def stdlib_task(tmp_path_factory):
  """A real RETRO Task over a slice of the standard library with its
  neighbour cache (tests/task_cache.py), built once per session."""
  import task_cache  # pylint: disable=g-import-not-at-top
  return task_cache.build(tmp_path_factory.mktemp("stdlib_task"))
