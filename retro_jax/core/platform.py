"""Which accelerator this host has, read from the hardware, not from jax.

An entry script on a CPU-only host with libtpu installed (the `tpu` extra,
which CI and `scripts/setup_env.sh` install for ahead-of-time compilation)
would otherwise have jax probe for TPUs at its first computation, and libtpu
print a dozen lines of warnings about missing TPU hostnames to stderr.
"""

from __future__ import annotations

import glob
import os

# Google's PCI vendor id and the device ids of its TPU chips (v3 to TPU7x).
# A GCE VM's virtual NIC has Google's vendor id too, and a CI runner may have
# /dev/vfio or TPU_* variables for other reasons, so only the chip ids count.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f",
                    "0x0076"}
# Device files of an NVIDIA GPU (bare metal, containers, WSL2).
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def tpu_chip_attached() -> bool:
  """A Cloud TPU VM: a TPU chip is attached through PCI."""
  for vendor_path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    folder = os.path.dirname(vendor_path)
    try:
      with open(vendor_path) as v, open(os.path.join(folder, "device")) as d:
        if (v.read().strip() == _GOOGLE_PCI_VENDOR
            and d.read().strip() in _TPU_PCI_DEVICES):
          return True
    except OSError:
      continue
  return False


def nvidia_gpu_attached() -> bool:
  return any(os.path.exists(p) for p in _NVIDIA_DEVICES)


def use_cpu_without_accelerator() -> bool:
  """Sets jax's platform to the CPU where the host has no TPU chip and no
  NVIDIA GPU and the user chose none ($JAX_PLATFORMS unset). Must run
  before jax's first computation. Returns whether it did."""
  import jax  # pylint: disable=g-import-not-at-top
  if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
      or tpu_chip_attached() or nvidia_gpu_attached()):
    return False
  jax.config.update("jax_platforms", "cpu")
  return True
