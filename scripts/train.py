r"""Trains RETRO: the same command on one CPU, a TPU VM or a pod slice.

  python scripts/train.py --config=configs/tiny.py --workdir=runs/tiny \
      [--config.train.steps=200 --config.data.source=task ...]
  python scripts/train.py --config=configs/retro.py:172m --workdir=gs://...

Rerunning on an existing workdir resumes from its latest checkpoint. SIGTERM
(preemption) saves a checkpoint and exits 0. On TPU VMs of a multi-host
slice, jax.distributed is initialised automatically (--distributed=auto);
every host runs this same command (scripts/launch_tpu.sh does that).
See retro_jax/training/loop.py for the loop and configs/base.py for every
field.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retro_jax.core import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py",
                                          "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, "
                               "config.json, TensorBoard events.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): on, off, or auto = on TPU VMs only.")
flags.mark_flag_as_required("workdir")


def on_tpu_vm() -> bool:
  """A Cloud TPU VM (its accelerator devices or environment are present)."""
  return (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
          or "TPU_ACCELERATOR_TYPE" in os.environ
          or "TPU_WORKER_HOSTNAMES" in os.environ)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:   # Progress lines go to stdout;
    logging.set_verbosity(logging.WARNING)  # -v 0 shows orbax/clu INFO logs.
  from retro_jax.core import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_hugepage_heap()  # Once; a no-op where unsupported.
  host_memory.keep_freed_memory()  # Before the XLA backend starts.
  import jax  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto"
                                    and on_tpu_vm()):
    jax.distributed.initialize()
  from retro_jax.training import loop  # pylint: disable=g-import-not-at-top
  try:
    summary = loop.train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, loop.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() == 0:
    print(f"{summary['status']} at step {summary['step']}: "
          f"{_WORKDIR.value}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
