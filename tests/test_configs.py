"""Every experiment config loads and describes a model that builds; the
benchmark script's flags parse.

Configs are loaded twice: directly (importlib, `get_config()`), and through
`ml_collections.config_flags` exactly as the scripts do, with an override.
"""

import glob
import importlib.util
import os
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import pytest

from retro_jax import Retro, RetroConfig
from retro_jax.core import sharding
from conftest import REPO_ROOT

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(
      "config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# Experiment configs carry a `model` section; the others (e.g. the DB build)
# are checked by the tests of the script that reads them.
MODEL_CONFIGS = [p for p in CONFIGS if "model" in _load(p)]


def test_there_are_configs():
  assert MODEL_CONFIGS, "no configs/*.py with a model section found"


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=os.path.basename)
def test_config_builds_abstract_model(path):
  config = _load(path)
  cfg = RetroConfig.from_dict(config.model)
  model = Retro(cfg)
  # The config's own training shapes where it has them, else one chunk.
  train_cfg = config.get("train", {})
  batch = train_cfg.get("batch_size", 1)
  length = train_cfg.get("seq_len", cfg.chunk_size)
  tokens, neighbours = model.dummy_inputs(batch, length)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens, neighbours)
  logits = jax.eval_shape(model.apply, params, tokens, neighbours)
  assert logits.shape == (batch, length, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  if "mesh" in config:   # Resolves on the 8 simulated devices.
    assert len(sharding.mesh_shape(dict(config.mesh), 8)) == 3


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=os.path.basename)
def test_config_loads_through_config_flags(path):
  # Overrides reach the nested model section, as `--config.model.x=...`
  # does on a script's command line. config_flags finds override flags in
  # the argv it is given (sys.argv by default).
  argv = ["prog", f"--config={path}", "--config.model.num_layers=3",
          "--config.model.cca_layers=(3,)"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, "experiment config",
                                  flag_values=fv, sys_argv=argv)
  fv(argv)
  cfg = RetroConfig.from_dict(fv.config.model)
  assert cfg.num_layers == 3 and cfg.cca_layers == (3,)
  assert fv.config.to_dict() == {**_load(path).to_dict(),
                                 "model": fv.config.model.to_dict()}


def _script(*args, timeout=120):
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)   # The script needs no simulated devices.
  return subprocess.run(
      [sys.executable, os.path.join("scripts", "benchmark.py"), *args],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=timeout, check=False)


def test_benchmark_script_flags():   # ~3 s: two interpreter starts.
  # absl's --help prints usage and exits with status 1 (absl convention),
  # so the clean-exit check uses --only_check_args: flags, including the
  # default config file, are parsed and the script exits 0 before main().
  out = _script("--only_check_args")
  assert out.returncode == 0, out.stderr[-3000:]
  out = _script("--help")
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.returncode in (0, 1)
  assert "--config" in out.stdout and "--threads" in out.stdout, out.stdout
