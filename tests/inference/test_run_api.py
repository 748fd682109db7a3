"""The research API's Run (retro_jax.inference.run) over in-memory params:
logits are the model's, text round-trips through the run's vocabulary, and
a run without a DB says so when asked to retrieve."""

import dataclasses
import inspect

import jax
import ml_collections
import numpy as np
import pytest

import retro_jax
from conftest import random_neighbours, random_tokens
from retro_jax.config import EOS_ID, PAD_ID, RetroConfig
from retro_jax.corpus import vocab
from retro_jax.evaluation import loaded_run
from retro_jax.inference import run as run_lib

TEXT = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.sep)\n",
        "class Point:\n    x: int = 0\n    y: int = 0\n"] * 40


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("run")
  spm_path = str(tmp / "spm.model")
  vocab.train(TEXT, spm_path, vocab_size=296)
  cfg = RetroConfig.preset("tiny", vocab_size=296)
  tokens = random_tokens(cfg, 1, 2 * cfg.chunk_size)
  params = jax.jit(retro_jax.Retro(cfg).init)(
      jax.random.key(0), tokens, random_neighbours(cfg, 1, 128))
  config = ml_collections.ConfigDict(dict(
      model=dataclasses.asdict(cfg), train=dict(seq_len=128),
      data=dict(spm_path=spm_path, db_dir="")))
  return run_lib.Run(str(tmp), config, params, step=0, spm_path=spm_path)


def test_logits_are_the_models(run):
  cfg = run.model_config
  tokens = random_tokens(cfg, 2, 128, seed=3)
  neighbours = random_neighbours(cfg, 2, 128, seed=4)
  want = jax.jit(run.model.apply)(run.params, tokens, neighbours)
  got = run.logits(tokens, neighbours)
  assert got.shape == (2, 128, cfg.vocab_size)
  np.testing.assert_array_equal(got, np.asarray(want))
  off = run.logits(tokens)  # Retrieval off changes the CCA layers' output.
  assert not np.allclose(off[:, cfg.chunk_size:], got[:, cfg.chunk_size:])


def test_text_round_trip_drops_pad_and_eos(run):
  ids = run.encode("def add(a, b):")
  assert ids and PAD_ID not in ids
  assert run.decode([PAD_ID] + ids + [EOS_ID]) == "def add(a, b):"


def test_retrieval_without_a_db_is_refused(run):
  with pytest.raises(ValueError, match="no retrieval DB"):
    run.retrieve(["def add"])


def test_public_load_is_the_runs():
  assert "db_dir" in inspect.signature(run_lib.load).parameters
  assert issubclass(run_lib.Run, loaded_run.LoadedRun)
