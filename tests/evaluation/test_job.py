"""The evaluation job's plan (retro_jax.evaluation.job.plan_of): k, window,
whether cached neighbours are replaced, and the settings that name the
output files (job.variants_of)."""

import dataclasses

import ml_collections

from retro_jax.config import RetroConfig
from retro_jax.evaluation import job
from retro_jax.evaluation import loaded_run
from retro_jax.evaluation import sets


def _run(tmp_path, **model):
  config = ml_collections.ConfigDict(dict(
      model=dataclasses.asdict(RetroConfig.preset("tiny", **model)),
      train=dict(seq_len=256), data=dict(spm_path="", db_dir="")))
  return loaded_run.LoadedRun(str(tmp_path), config, params=None, step=40)


def _eval(**fields):
  base = dict(num_neighbours=0, seq_len=0, stride=0, max_bytes=0,
              max_batches=0, leakage_source="previous",
              task_split="validation")
  return ml_collections.ConfigDict(dict(base, **fields))


TASK = sets.EvalSet("task", "task", {}, "")
WIKI = sets.EvalSet("wiki", "jsonl:/x.jsonl", {}, "")


def test_plan_defaults_to_what_the_run_trained_with(tmp_path):
  plan = job.plan_of(_run(tmp_path), _eval())
  assert (plan.k, plan.trained_k, plan.seq_len, plan.stride) == (2, 2, 256, 256)
  assert not plan.online and plan.retrieval
  # The defaults add nothing to the file names.
  assert job.variants_of(plan, _eval(), TASK) == []
  assert job.variants_of(plan, _eval(), WIKI) == []


def test_another_k_or_db_retrieves_online_and_settings_name_the_files(
    tmp_path):
  ec = _eval(num_neighbours=4, stride=128, max_bytes=5000, neighbours="leak")
  plan = job.plan_of(_run(tmp_path), ec, db_dir="/data/dbs/c4/")
  assert plan.online and plan.k == 4 and plan.stride == 128
  # k and the DB are named apart (result_files.stem); these are the rest.
  split = dataclasses.replace(WIKI, split="validation")
  assert job.variants_of(plan, ec, split) == [
      "leak", "stride128", "split-validation", "max5000B"]
  # The Task keeps its cached windows: stride and byte cap do not apply.
  assert job.variants_of(plan, ec, TASK) == ["leak"]
  ec = _eval(seq_len=512, max_batches=64, leakage_source="same",
             task_split="train")
  plan = job.plan_of(_run(tmp_path), ec)
  assert job.variants_of(plan, ec, TASK) == ["split-train", "64batches",
                                             "leakage-same"]
  assert job.variants_of(plan, ec, WIKI) == ["n512", "64batches",
                                             "leakage-same"]


def test_a_baseline_never_opens_a_db(tmp_path):
  plan = job.plan_of(_run(tmp_path, cca_layers=()), _eval())
  assert not plan.retrieval
