"""Every benchmark and developer tool parses its flags.

The absl benchmarks run with --only_check_args (flags and default config
files parsed, exit before main); the scripts that run in the PyTorch peer's
environment must answer --help and parse their arguments in this one, which
has no torch. The interpreters start in parallel; all but the absl
benchmarks' check take about a second.
"""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
ABSL_SCRIPTS = sorted(glob.glob(os.path.join(REPO_ROOT, "benchmarks", "*.py")))
ARGPARSE_SCRIPTS = sorted(
    glob.glob(os.path.join(REPO_ROOT, "benchmarks", "peer", "*.py")) +
    glob.glob(os.path.join(REPO_ROOT, "tools", "*.py")))
PEER_DIR = os.path.join(REPO_ROOT, "benchmarks", "peer")


def _env():
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3",
         "JAX_PLATFORMS": "cpu",
         # Set, so train_step.py does not restart itself for the huge-page
         # heap: one interpreter start instead of two.
         "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
  env.pop("XLA_FLAGS", None)   # No simulated devices needed.
  return env


def _run_all(commands, timeout=180):
  """Runs the commands at once from the repository root; returns their
  (returncode, stdout, stderr) in order."""
  procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for cmd in commands]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=timeout)
    results.append((proc.returncode, out, err))
  return results


def test_layout():
  names = {os.path.relpath(p, REPO_ROOT) for p in
           ABSL_SCRIPTS + ARGPARSE_SCRIPTS}
  assert {"benchmarks/train_step.py", "benchmarks/peer/bench_retro_pytorch.py",
          "benchmarks/peer/matmul_peak_torch.py",
          "tools/make_bert_fixture.py"} <= names, names
  assert os.path.exists(os.path.join(PEER_DIR, "setup.sh"))


def _check(commands):
  failures = []
  for cmd, (rc, out, err) in zip(commands, _run_all(commands)):
    if rc != 0 or "Traceback" in err:
      failures.append(f"{' '.join(cmd)}: exit {rc}\n{err[-2000:]}")
    elif cmd[-1] == "--help" and "usage" not in out.lower() + err.lower():
      failures.append(f"{' '.join(cmd)}: no usage\n{out[-2000:]}")
  assert not failures, "\n\n".join(failures)


def test_peer_scripts_and_tools_answer_help():
  # In this environment, which has no torch: the imports wait for the flags.
  _check([[sys.executable, path, "--help"] for path in ARGPARSE_SCRIPTS] +
         [["bash", "-n", os.path.join(PEER_DIR, "setup.sh")],
          ["bash", os.path.join(PEER_DIR, "setup.sh"), "--help"]])


@pytest.mark.slow   # Four interpreters that import jax (one also seqio).
def test_benchmarks_parse_their_flags():
  # absl's --help exits 1, so --only_check_args: every flag and default
  # config file parsed, exit 0 before main(). Each start imports jax.
  _check([[sys.executable, path, "--only_check_args"]
          for path in ABSL_SCRIPTS])


def _load(path):
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_peer_bench_arguments_parse_without_torch():
  had_torch = "torch" in sys.modules
  bench = _load(os.path.join(PEER_DIR, "bench_retro_pytorch.py"))
  args = bench.parse_args(["--threads", "1", "--warmup", "1", "--steps", "3",
                           "--peak-gflops", "150.5"])
  assert (args.threads, args.warmup, args.steps, args.peak_gflops) == (
      1, 1, 3, 150.5)
  defaults = bench.parse_args([])
  assert (defaults.threads, defaults.warmup, defaults.steps) == (0, 2, 5)
  peak = _load(os.path.join(PEER_DIR, "matmul_peak_torch.py"))
  assert peak.parse_args(["--threads", "2"]).threads == 2
  assert ("torch" in sys.modules) == had_torch   # Loading imported no torch.
  with pytest.raises(SystemExit):
    bench.parse_args(["--steps", "many"])


def test_peer_bench_matches_the_bench_config():
  # The peer times the model configs/bench.py describes; a change to one
  # without the other would compare different models.
  bench = _load(os.path.join(PEER_DIR, "bench_retro_pytorch.py"))
  spec = importlib.util.spec_from_file_location(
      "bench_config", os.path.join(REPO_ROOT, "configs", "bench.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  model, train = config.model, config.train
  assert (model.vocab_size, model.chunk_size, model.num_neighbours,
          model.neighbour_len) == (bench.VOCAB, bench.CHUNK, bench.NEIGHBOURS,
                                   bench.NEIGHBOUR_LEN)
  assert (train.batch_size, train.seq_len, train.learning_rate) == (
      bench.BATCH, bench.SEQ_LEN, bench.LEARNING_RATE)
  assert (model.d_model, model.enc_d_model) == (bench.DIM, bench.DIM)
  assert (model.num_layers, model.enc_num_layers) == (bench.DEC_DEPTH,
                                                      bench.ENC_DEPTH)
  assert tuple(model.cca_layers) == bench.CCA_LAYERS   # Both 1-based.
  # retro-pytorch fixes 8 heads and a feed-forward 4x wide.
  assert (model.num_heads, model.head_dim) == (8, bench.DIM_HEAD)
  assert (model.enc_num_heads, model.enc_head_dim) == (8, bench.DIM_HEAD)
  assert (model.d_ff, model.enc_d_ff) == (4 * bench.DIM, 4 * bench.DIM)
