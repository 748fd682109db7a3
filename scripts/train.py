r"""Trains RETRO: the same command on one CPU, a TPU VM or a pod slice.

  python scripts/train.py --config=configs/tiny.py --workdir=runs/tiny \
      [--config.train.steps=200 --config.data.source=task ...]
  python scripts/train.py --config=configs/retro.py:172m --workdir=gs://...

Rerunning on an existing workdir resumes from its latest checkpoint. SIGTERM
(preemption) saves a checkpoint and exits 0. On TPU VMs of a multi-host
slice, jax.distributed is initialised automatically (--distributed=auto);
every host runs this same command (scripts/launch_tpu.sh does that).

N processes started by hand (one machine, or hosts without a cluster manager
JAX detects) each run the same command with their own --process_id:

  for i in 0 1; do JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=4 \
      python scripts/train.py --config=configs/tiny.py --workdir=runs/mh \
      --num_processes=2 --process_id=$i \
      --coordinator_address=127.0.0.1:8476 & done; wait

Their devices form one mesh; each process reads its own rows of every batch
(with --config.data.num_shards=S fixed, any process count dividing S reads
the same batches); process 0 writes metrics; every process writes its part of
each checkpoint. If a process dies, the others exit non-zero: at once if a
collective sees its connection drop or it was process 0, else once it has
missed heartbeats for --heartbeat_timeout seconds. Rerunning every process
resumes from the last checkpoint.
See retro_jax/training/loop.py for the loop and configs/base.py for every
field.
"""

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from retro_jax.core import cli
from retro_jax.core import platform

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py",
                                          "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, "
                               "config.json, TensorBoard events.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): on, off, or auto = on TPU VMs only (or "
    "with --num_processes).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port where process 0 serves the coordination service that every "
    "process connects to (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", os.environ.get("JAX_NUM_PROCESSES"),
    "Processes of a run started by hand (each with its --process_id); "
    "unset: one, or what the cluster says (default: $JAX_NUM_PROCESSES).",
    lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", os.environ.get("JAX_PROCESS_ID"),
    "This process, 0 .. --num_processes - 1; process 0 serves the "
    "coordinator and writes metrics (default: $JAX_PROCESS_ID).",
    lower_bound=0)
# 60 s: a dead peer ends the run within a minute, while a live process, whose
# heartbeats come from their own thread (not blocked by compiling, a long
# step or the GIL), would have to be frozen for a whole minute, far beyond
# scheduling delays or a VM's live-migration pause, to be taken for dead.
# jax's default is 100 s.
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 60, "Seconds without heartbeats after which a "
    "process counts as dead and every other one exits non-zero.",
    lower_bound=1)
flags.mark_flag_as_required("workdir")


def process_flags_error() -> str:
  """What is wrong with the process flags, as one line ("" if nothing)."""
  n, i = _NUM_PROCESSES.value, _PROCESS_ID.value
  if n is None and i is None:
    return ""
  if n is None or i is None:
    given, missing = (("--process_id", "--num_processes") if n is None else
                      ("--num_processes", "--process_id"))
    return f"{given} needs {missing} too"
  if i >= n:
    return f"--process_id={i} must be below --num_processes={n}"
  if _DISTRIBUTED.value == "off":
    return "--num_processes contradicts --distributed=off"
  if not _COORDINATOR.value:
    return ("--num_processes needs --coordinator_address (or "
            "$JAX_COORDINATOR_ADDRESS)")
  return ""


def start_distributed(jax) -> None:
  """Joins the run's other processes, if there are any."""
  if _NUM_PROCESSES.value is not None:
    # CPU processes reach each other's devices through gloo over TCP (the
    # option touches only the CPU backend; TPUs have their own links).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        heartbeat_timeout_seconds=_HEARTBEAT.value)
  elif _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto"
                                      and platform.tpu_chip_attached()):
    jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT.value)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}", status=2)
  if problem := process_flags_error():   # Before anything starts.
    cli.fail(problem, status=2)
  if not flags.FLAGS["verbosity"].present:   # Progress lines go to stdout;
    logging.set_verbosity(logging.WARNING)  # -v 0 shows orbax/clu INFO logs.
  from retro_jax.core import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_hugepage_heap()  # Once; a no-op where unsupported.
  host_memory.keep_freed_memory()  # Before the XLA backend starts.
  cli.quiet_tensorflow()  # Before the data pipeline imports TensorFlow.
  import jax  # pylint: disable=g-import-not-at-top
  platform.use_cpu_without_accelerator()  # No TPU probing on a CPU host.
  start_distributed(jax)
  from retro_jax.data import cache_job  # pylint: disable=g-import-not-at-top
  from retro_jax.training import loop  # pylint: disable=g-import-not-at-top
  try:
    summary = loop.train(_CONFIG.value, _WORKDIR.value)
  except BaseException as e:  # pylint: disable=broad-except
    # Bad input (a config value, a cache, a corpus) or a diverged run: one
    # line, unless -v asked for the traceback.
    line = cli.error_line(e, (loop.NonFiniteLossError,
                              cache_job.IncompleteCacheError))
    if line is not None and not cli.verbose():
      print(f"{argv[0]}: error: {line}", file=sys.stderr, flush=True)
    elif jax.process_count() == 1:
      raise
    else:
      traceback.print_exc()
    if jax.process_count() > 1:
      # A plain exit would wait up to 5 minutes at jax's shutdown barrier
      # for peers that may be blocked in a collective with this process; the
      # coordinator sees this one's heartbeats stop and ends them instead.
      sys.stderr.flush()
      os._exit(1)  # pylint: disable=protected-access
    sys.exit(1)
  if jax.process_index() == 0:
    print(f"{summary['status']} at step {summary['step']}: "
          f"{_WORKDIR.value}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
