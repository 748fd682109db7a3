"""scripts/train.py as N processes on this machine: one mesh over the devices
of all of them, each reading its own rows of a real seqio Task cache.

Two processes of 4 CPU devices (one FSDP mesh of 8) train exactly what one
process of 8 devices trains with the same collectives (gloo), and what a
plain one-process run trains up to float32 rounding (XLA's in-process
collectives sum in another order); each process reads disjoint rows that
together make the global batch (as each recorded it,
`config.data.record_rows`); only process 0 writes metrics; a kill -9 of one
process ends the other (non-zero) within the heartbeat timeout, and
rerunning both resumes from the last checkpoint to the uninterrupted run's
parameters, bit for bit.

Compiling dominates these runs on 2 cores (about 20 s each for the init and
the step, per process), so they are few: the 2-process run is the one
killed and resumed, and the uninterrupted reference is the 1-process run it
must equal anyway. Runs share jax's persistent compilation cache, so a
process that compiles what an earlier one did loads it instead (jax writes
entries from process 0 only); that changes when programs compile, not what
they compute.

The processes reach each other through a coordinator on a free local port
and gloo over TCP. Each runs in its own process group, killed in a `finally`,
so a failing test leaves no process behind.
"""

import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT
import task_cache

pytestmark = pytest.mark.slow

HEARTBEAT_S = 10       # --heartbeat_timeout of these runs.
# After a kill, the survivor must be gone within the heartbeat timeout plus
# slack for a loaded 2-core host (measured: 0.2 s when gloo sees the
# connection drop, 7-9 s when the coordinator sees heartbeats stop).
DEAD_PEER_S = HEARTBEAT_S + 20
RUN_S = 600            # Any one run, start to end.
STEPS = 6
BATCH = 8
DEVICES = 8            # Of the mesh, over all processes of a run.
FLAGS = ["--config=configs/tiny.py", "--config.model.num_layers=2",
         "--config.model.cca_layers=(2,)", "--config.model.enc_num_layers=1",
         f"--config.train.batch_size={BATCH}", f"--config.train.steps={STEPS}",
         "--config.train.warmup_steps=2", "--config.train.log_every=1",
         "--config.train.peak_flops=1e11", "--config.checkpoint.every=3",
         # Parameters and moments sharded over all 8 devices (FSDP), so each
         # process saves and restores its own half of every checkpoint.
         "--config.mesh.data=1", "--config.mesh.fsdp=-1",
         # The batch is read as 2 data shards by every run, whatever its
         # process count, so all runs see the same batches.
         "--config.data.num_shards=2", "--config.data.record_rows=True"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, jax_cache: str) -> dict:
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3",
         "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
         "JAX_COMPILATION_CACHE_DIR": jax_cache}
  env.pop("XLA_FLAGS", None)   # conftest's 8 devices: each process has its own.
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


class Run:
  """The processes of one launch of a run, each leading its own group."""

  def __init__(self, workdir, procs, logs):
    self.workdir, self.procs, self.logs = str(workdir), procs, logs

  def output(self, i: int) -> str:
    with open(self.logs[i], encoding="utf-8", errors="replace") as f:
      return f.read()

  def check_done(self) -> None:
    deadline = time.monotonic() + RUN_S
    codes = [p.wait(timeout=max(deadline - time.monotonic(), 1))
             for p in self.procs]
    assert codes == [0] * len(codes), "\n".join(
        f"process {i} exited {c}:\n{self.output(i)[-3000:]}"
        for i, c in enumerate(codes) if c)


@contextlib.contextmanager
def _launcher(log_dir: str, task: dict, jax_cache: str):
  """Yields `launch(workdir, processes, distributed=True) -> Run` on `task`
  (tests/task_cache.py); kills the process group of every process still
  running on the way out."""
  runs = []

  def launch(workdir, processes: int, distributed: bool = True) -> Run:
    port, procs, logs = _free_port(), [], []
    for i in range(processes):
      cmd = [sys.executable, os.path.join("scripts", "train.py"),
             f"--workdir={workdir}", *FLAGS,
             *task_cache.training_flags(task)]
      if distributed:
        cmd += [f"--num_processes={processes}", f"--process_id={i}",
                f"--coordinator_address=127.0.0.1:{port}",
                f"--heartbeat_timeout={HEARTBEAT_S}"]
      logs.append(os.path.join(
          log_dir, f"{os.path.basename(workdir)}-{len(runs)}-p{i}.log"))
      with open(logs[-1], "w", encoding="utf-8") as out:
        procs.append(subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=_env(DEVICES // processes, jax_cache),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    runs.append(Run(workdir, procs, logs))
    return runs[-1]

  try:
    yield launch
  finally:
    for run in runs:
      for p in run.procs:
        if p.poll() is None:
          with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
          p.wait()


def _steps_saved(workdir):
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  # Orbax writes a step under a temporary name and renames it when complete.
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _kill_1_after_a_checkpoint(run: Run) -> dict:
  """kill -9 of process 1 once a checkpoint is complete; what became of
  process 0: its exit code (None: still running after DEAD_PEER_S) and the
  seconds it took; and the last complete checkpoint."""
  deadline = time.monotonic() + RUN_S
  while not _steps_saved(run.workdir):
    assert time.monotonic() < deadline, "no checkpoint in time"
    assert all(p.poll() is None for p in run.procs), run.output(0)[-3000:]
    time.sleep(0.05)
  run.procs[1].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  assert run.procs[1].wait() == -signal.SIGKILL
  try:
    code = run.procs[0].wait(timeout=DEAD_PEER_S)
  except subprocess.TimeoutExpired:
    code = None
  return dict(code=code, seconds=time.monotonic() - killed_at,
              saved=_steps_saved(run.workdir)[-1])


@pytest.fixture(scope="module")
def runs(stdlib_task, tmp_path_factory):
  """2 processes x 4 devices, killed after a checkpoint and run again; 1
  plain process x 8 devices (XLA's own collectives); 1 process x 8 devices
  joined through jax.distributed as well (gloo collectives)."""
  root = tmp_path_factory.mktemp("multiprocess")
  with _launcher(str(root), stdlib_task, str(root / "jax_cache")) as launch:
    plain = launch(root / "plain", 1, distributed=False)
    first = launch(root / "two", 2)
    kill = _kill_1_after_a_checkpoint(first)
    plain.check_done()
    one = launch(root / "one", 1)   # Loads what `plain` compiled.
    resumed = launch(root / "two", 2)
    one.check_done()
    resumed.check_done()
  return dict(plain=plain, one=one, two=(first, resumed), kill=kill)


def _final_params(workdir):
  from retro_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  _, params, step = checkpoints.restore_params(str(workdir))
  return step, {f"{m}/{n}": np.asarray(v) for m, leaves in params.items()
                for n, v in leaves.items()}


def _rows(workdir, process: int):
  """{step: row fingerprints} a process recorded. A resumed run records
  again from its start step: a step read twice must have read the same."""
  from retro_jax.training import loop  # pylint: disable=g-import-not-at-top
  out = {}
  with open(loop.rows_path(str(workdir), process), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      assert out.setdefault(record["step"], record["rows"]) == record["rows"]
  return out


def test_two_processes_equal_one(runs):
  step, two = _final_params(runs["two"][1].workdir)
  _, one = _final_params(runs["one"].workdir)
  _, plain = _final_params(runs["plain"].workdir)
  assert step == STEPS
  assert two.keys() == one.keys() == plain.keys()
  for k in two:
    # The same mesh, batches and collectives (gloo): bit for bit.
    assert np.array_equal(two[k], one[k]), k
    # XLA's in-process collectives sum over the devices in another order:
    # float32 rounding apart (measured after 6 steps: 1.2e-7 to 2.7e-7 at
    # most, one or two units in the last place of values near 1 and 2).
    np.testing.assert_allclose(two[k], plain[k], rtol=0, atol=1e-6,
                               err_msg=k)


def test_processes_read_disjoint_rows_that_make_the_global_batch(runs):
  workdir = runs["two"][1].workdir
  p0, p1 = _rows(workdir, 0), _rows(workdir, 1)
  whole = _rows(runs["one"].workdir, 0)   # One process reads every row.
  assert sorted(p0) == sorted(p1) == sorted(whole) == list(range(STEPS))
  for s in range(STEPS):
    assert len(p0[s]) == len(p1[s]) == BATCH // 2, s
    assert not set(p0[s]) & set(p1[s]), s
    assert p0[s] + p1[s] == whole[s], s   # Rows 0-3 on process 0's devices.


def test_only_process_0_writes_metrics(runs):
  launches = runs["two"]
  events = glob.glob(os.path.join(launches[1].workdir, "events.out.tfevents.*"))
  # TensorBoard names an events file after its writer's pid.
  writers = {int(os.path.basename(e).split(".")[-3]) for e in events}
  assert launches[1].procs[0].pid in writers, events
  assert writers <= {launch.procs[0].pid for launch in launches}, events
  out0 = launches[1].output(0)
  for s in range(runs["kill"]["saved"] + 1, STEPS + 1):
    assert f"step {s:6d}/{STEPS}" in out0, out0[-3000:]
  assert f"done at step {STEPS}" in out0
  for launch in launches:
    out1 = launch.output(1)
    assert "step " not in out1 and "done at" not in out1, out1[-3000:]


def test_kill_9_ends_the_other_process_and_a_restart_resumes(runs):
  kill, (first, resumed) = runs["kill"], runs["two"]
  assert kill["code"] is not None, (
      f"process 0 still ran {DEAD_PEER_S} s after its peer died:\n"
      f"{first.output(0)[-3000:]}")
  assert kill["code"] != 0 and kill["seconds"] <= DEAD_PEER_S
  # Either gloo saw the connection drop in a collective (the script then
  # exits 1 at once) or the coordinator saw the heartbeats stop (it aborts
  # the process).
  assert any(why in first.output(0) for why in (
      "Connection reset by peer", "stopped sending heartbeats")), (
          first.output(0)[-3000:])
  print(f"process 0 exited {kill['code']} {kill['seconds']:.1f} s after "
        f"process 1's kill -9")
  assert kill["saved"] < STEPS, "the run ended before the kill"
  assert f"start step {kill['saved']} of {STEPS}" in resumed.output(0)
  # Each process wrote its own part of the sharded parameters (orbax's
  # OCDBT files per process), and one process reads both back below.
  parts = glob.glob(os.path.join(resumed.workdir, "checkpoints", str(STEPS),
                                 "params", "ocdbt.process_*"))
  assert len(parts) == 2, parts
  step, two = _final_params(resumed.workdir)
  _, whole = _final_params(runs["one"].workdir)   # Never interrupted.
  assert step == STEPS
  for k in whole:
    assert np.array_equal(two[k], whole[k]), k      # Bit for bit.
