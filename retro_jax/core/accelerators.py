"""What one accelerator can do: its datasheet bf16 peak, a measured matmul
peak, its memory use, and whether a device is an NVIDIA GPU.

MFU (model FLOPs utilisation) divides the analytic FLOPs of a step by time
and by a peak. The peak is the chip's dense bf16 tensor-core (TPU: MXU)
figure from its datasheet, as MaxText and MosaicML report MFU; the matmul
peak measured here is printed beside it, because a chip that is clocked down,
shared, or a variant the table names wrongly shows up as a gap between the
two. Imports only jax and numpy: GPU hosts without TensorFlow use it.
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Dense (not 2:4-sparse) bf16 peak FLOP/s of one JAX device, by the first
# matching `device_kind` prefix: longer, more specific names come first (an
# "NVIDIA H100 PCIe" must not match "NVIDIA H100"). A TPU v4/v5p/v6e device
# is a chip; v2/v3 devices are single TensorCores.
PEAK_FLOPS = (
    ("TPU v2", 22.5e12),
    ("TPU v3", 61.5e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H100", 989e12),        # SXM: "NVIDIA H100 80GB HBM3".
    ("NVIDIA B200", 2250e12),
    ("NVIDIA A100", 312e12),        # SXM and PCIe alike.
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
)


def datasheet_peak_flops(device=None) -> Optional[float]:
  """The table's bf16 peak of `device` (default: the first), or None when
  its kind is not in the table (CPUs, unlisted chips)."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in PEAK_FLOPS:
    if kind.startswith(prefix):
      return peak
  return None


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32,
                      device=None) -> float:
  """Best FLOP/s of an n x n x n jitted matmul in `dtype` on `device`
  (default: the first). Float32 on CPU, bf16 with n = 8192 on accelerators:
  smaller products leave a GPU's tensor cores partly idle."""
  device = device or jax.devices()[0]
  rng = np.random.default_rng(0)
  a, b = (jax.device_put(jnp.asarray(rng.standard_normal((n, n)), dtype),
                         device) for _ in range(2))
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def device_peak_flops(override: float = 0.0) -> float:
  """Peak FLOP/s of one device for MFU: `override` if set, the table for
  known accelerators, else a measured float32 matmul (CPU)."""
  if override > 0:
    return float(override)
  return datasheet_peak_flops() or matmul_peak_flops()


def is_nvidia_gpu(device=None) -> bool:
  """Whether `device` (default: the first) is an NVIDIA GPU on JAX's CUDA
  backend (ROCm GPUs share platform "gpu" but have no cuDNN)."""
  device = device or jax.devices()[0]
  if device.platform not in ("gpu", "cuda"):
    return False
  version = getattr(device.client, "platform_version", "") or ""
  return "cuda" in version.lower() or device.device_kind.startswith("NVIDIA")


def peak_memory_bytes(device=None) -> Optional[int]:
  """Peak bytes the allocator has held on `device` since start, or None
  where the backend keeps no statistics (CPU)."""
  stats = (device or jax.devices()[0]).memory_stats()
  if not stats:
    return None
  return stats.get("peak_bytes_in_use")
