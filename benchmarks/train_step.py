r"""Times the RETRO training step on random tokens and neighbours.

  python benchmarks/train_step.py --config=configs/bench.py [--threads=1]
      [--rounds=2] [--peer=benchmarks/peer]

Prints per-step times to stderr and one JSON line last on stdout: params,
tokens_per_step, step_s_median, tokens_per_s, model_flops_per_step, mfu
(against a float32 matmul peak measured in this run), threads. The public
PyTorch RETRO (retro-pytorch, in a venv of its own that --peer's setup.sh
creates outside the repository on first use, about 1.5 min) is timed in the
same run, alternating with ours, and the JSON adds its figures and the speed
ratio; --peer= (empty) times ours alone.
"""

import os
import sys

# pylint: disable=g-import-not-at-top,wrong-import-position
from retro_jax.core import host_memory

# Run as a script, restarts once with glibc's heap on huge pages (a no-op
# where unsupported); before anything else, since exec() discards this
# process. Importing the module must not replace the importer's process.
if __name__ == "__main__":
  host_memory.reexec_with_hugepage_heap()


def _pin_threads_before_jax():
  """XLA sizes its thread pool when jax is imported, before flags are parsed,
  so --threads is read from argv here. One thread = this process pinned to
  one core (XLA's thread flags alone still use a second core)."""
  threads = 0
  for i, arg in enumerate(sys.argv):
    if arg.startswith("--threads="):
      threads = int(arg.split("=", 1)[1])
    elif arg == "--threads" and i + 1 < len(sys.argv):
      threads = int(sys.argv[i + 1])
  if threads > 0:
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    if threads == 1:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 " --xla_cpu_multi_thread_eigen=false"
                                 " intra_op_parallelism_threads=1")
  return threads


_THREADS = _pin_threads_before_jax()

_KEPT_FREED_MEMORY = host_memory.keep_freed_memory()  # Before XLA starts.

import json
import statistics
import subprocess
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import numpy as np

import retro_jax
from retro_jax.core import accelerators
from retro_jax.core import cli
from retro_jax.model import flops
from retro_jax.core import sharding
from retro_jax.training import step as step_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/bench.py",
                                          "Benchmark config file.")
flags.DEFINE_integer("threads", 0, "Cores to use (0 = all); 1 pins the "
                     "process to one core.")
_PEER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer")
_PEER = flags.DEFINE_string("peer", _PEER_DIR, "Folder of the PyTorch peer "
                            "(setup.sh, bench_retro_pytorch.py) to time in the "
                            "same run; empty = ours alone.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternations of ours and the "
                               "peer's timing (ours only: repeats).")


def log(msg):
  print(msg, file=sys.stderr, flush=True)


def random_batch(cfg: retro_jax.RetroConfig, batch: int, seq_len: int,
                 seed: int):
  """Token ids from 1..V-1 (0 is padding), as the peer draws them."""
  rng = np.random.default_rng(seed)
  l = seq_len // cfg.chunk_size
  return {
      "tokens": rng.integers(1, cfg.vocab_size, (batch, seq_len), np.int32),
      "neighbours": rng.integers(
          1, cfg.vocab_size,
          (batch, l, cfg.num_neighbours, cfg.neighbour_len), np.int32),
  }


class OurStep:
  """Our jitted, donated train step, compiled once and timed in rounds."""

  def __init__(self, config):
    self.cfg = retro_jax.RetroConfig.from_dict(config.model)
    tc = config.train
    self.model = retro_jax.Retro(self.cfg)
    self.optimizer = step_lib.make_optimizer(
        tc.learning_rate, tc.warmup_steps, tc.total_steps,
        weight_decay=tc.weight_decay, b2=tc.b2, clip_norm=tc.clip_norm or None)
    self.mesh = sharding.make_mesh(dict(config.mesh))
    host = random_batch(self.cfg, tc.batch_size, tc.seq_len, tc.seed)
    self.batch = sharding.global_batch(host, self.mesh)
    _, state_sh, _ = step_lib.state_shardings(self.model, self.optimizer,
                                           self.mesh, self.batch)
    self.state = step_lib.init_sharded_state(
        self.model, self.optimizer, state_sh,
        jax.random.key(tc.seed), self.batch)
    self.step = step_lib.jit_train_step(self.model, self.optimizer, self.mesh,
                                     state_sh, self.batch)
    self.params = retro_jax.count_params(self.state.params)
    self.tokens_per_step = tc.batch_size * tc.seq_len
    self.flops = flops.train_flops(self.cfg, tc.batch_size, tc.seq_len)
    self.losses = []

  def run(self, steps: int):
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch)
      loss = float(metrics["loss"])   # Blocks until the step is done.
      times.append(time.perf_counter() - t0)
      self.losses.append(loss)
      log(f"[retro_jax] step {len(self.losses)}: {times[-1]:.3f} s "
          f"loss {loss:.4f}")
    return times


def _peer_env() -> dict:
  """This process's environment without what it set for itself: XLA flags
  and the huge-page heap tunable. The peer runs with the defaults."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  tunables = [t for t in env.pop("GLIBC_TUNABLES", "").split(":")
              if t and t != host_memory.HUGEPAGE_TUNABLE]
  if tunables:
    env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def setup_peer(folder: str) -> str:
  """Creates or checks the peer's own environment; returns its python."""
  log(f"[peer] setting up {folder} (about 1.5 min the first time)")
  setup = subprocess.run(["bash", os.path.join(folder, "setup.sh")],
                         check=False, capture_output=True, text=True)
  if setup.returncode:
    raise RuntimeError(f"{folder}/setup.sh failed (--peer= skips the peer):"
                       f"\n{setup.stderr[-3000:]}")
  return setup.stdout.strip().splitlines()[-1]


def run_peer(folder: str, python: str, threads: int, steps: int) -> dict:
  """Times the peer in its own environment; returns its JSON line."""
  cmd = [python, os.path.join(folder, "bench_retro_pytorch.py"),
         "--steps", str(steps)]
  if threads:
    cmd += ["--threads", str(threads)]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                       env=_peer_env())
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  config = _CONFIG.value
  # Before our compile, so a peer that cannot be set up costs no wait.
  peer_python = setup_peer(_PEER.value) if _PEER.value else None
  log(f"[retro_jax] jax {jax.__version__}, devices {jax.devices()}, "
      f"cores {sorted(os.sched_getaffinity(0))}, freed memory kept: "
      f"{_KEPT_FREED_MEMORY}")
  ours = OurStep(config)
  t0 = time.perf_counter()
  ours.run(config.bench.warmup)
  log(f"[retro_jax] compile + warmup {time.perf_counter() - t0:.1f} s")
  peak = accelerators.matmul_peak_flops() / 1e9   # float32 GFLOP/s.
  log(f"[retro_jax] float32 matmul peak {peak:.1f} GFLOP/s")

  our_times, peer_runs = [], []
  for _ in range(_ROUNDS.value):
    our_times += ours.run(config.bench.steps)
    if peer_python:
      peer_runs.append(run_peer(_PEER.value, peer_python, _THREADS,
                                config.bench.steps))
      log(f"[peer] step_s_median {peer_runs[-1]['step_s_median']:.3f}")

  median = statistics.median(our_times)
  model_flops = ours.flops["total"]
  result = {
      "impl": "retro_jax",
      "params": ours.params,
      "tokens_per_step": ours.tokens_per_step,
      "step_s_median": round(median, 4),
      "step_s_min": round(min(our_times), 4),
      "tokens_per_s": round(ours.tokens_per_step / median, 2),
      "model_flops_per_step": model_flops,
      "achieved_gflops": round(model_flops / median / 1e9, 2),
      "matmul_peak_gflops": round(peak, 2),
      "mfu": round(model_flops / median / 1e9 / peak, 4),
      "threads": _THREADS or len(os.sched_getaffinity(0)),
      "freed_memory_kept": _KEPT_FREED_MEMORY,
      "hugepage_heap": host_memory.HUGEPAGE_TUNABLE in os.environ.get(
          "GLIBC_TUNABLES", ""),
      "losses": [round(x, 4) for x in ours.losses],
  }
  if peer_runs:
    peer_median = statistics.median(
        t for run in peer_runs for t in run["step_s_all"])
    result.update({
        "peer": peer_runs[-1]["impl"],
        "peer_params": peer_runs[-1]["params"],
        "peer_step_s_median": round(peer_median, 4),
        "peer_tokens_per_s": round(ours.tokens_per_step / peer_median, 2),
        "peer_flops_per_step": peer_runs[-1]["train_flops_per_step"],
        "speedup_vs_peer": round(peer_median / median, 3),
    })
    log(f"step median: retro_jax {median:.3f} s, {result['peer']} "
        f"{peer_median:.3f} s: {result['speedup_vs_peer']}x")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
