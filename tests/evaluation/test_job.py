"""The evaluation job's plan (retro_jax.evaluation.job.plan_of): k, window,
whether cached neighbours are replaced, and the name of the output files."""

import dataclasses

import ml_collections

from retro_jax.config import RetroConfig
from retro_jax.evaluation import job
from retro_jax.evaluation import loaded_run


def _run(tmp_path, **model):
  config = ml_collections.ConfigDict(dict(
      model=dataclasses.asdict(RetroConfig.preset("tiny", **model)),
      train=dict(seq_len=256), data=dict(spm_path="", db_dir="")))
  return loaded_run.LoadedRun(str(tmp_path), config, params=None, step=40)


def _eval(**fields):
  base = dict(num_neighbours=0, seq_len=0, stride=0)
  return ml_collections.ConfigDict(dict(base, **fields))


def test_plan_defaults_to_what_the_run_trained_with(tmp_path):
  plan = job.plan_of(_run(tmp_path), _eval())
  assert (plan.k, plan.trained_k, plan.seq_len, plan.stride) == (2, 2, 256, 256)
  assert not plan.online and plan.retrieval and plan.tag == "step_40"


def test_another_k_or_db_retrieves_online_and_names_the_files(tmp_path):
  plan = job.plan_of(_run(tmp_path), _eval(num_neighbours=4, stride=128),
                     db_dir="/data/dbs/c4/")
  assert plan.online and plan.k == 4 and plan.stride == 128
  assert plan.tag == "step_40_k4_c4"


def test_a_baseline_never_opens_a_db(tmp_path):
  plan = job.plan_of(_run(tmp_path, cca_layers=()), _eval())
  assert not plan.retrieval
